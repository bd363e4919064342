"""The methods of their own (methods/: sce, nearswap, arcee_fusion, ram, ramplus_tl, and the Gram
family) through the whole pipeline: each fixture config that the real mergekit-yaml 0.1.5 ran, merged
by `streammerge.merge` under `semantics: mergekit`, gives mergekit's bytes for every tensor; and under
the default semantics a small memory budget (many row blocks) gives the bytes of one block."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import shard_hashes, skip_other_capability
from safetensors.torch import load_file

from streammerge import MergeConfig, merge

FIXTURES = [Path(__file__).parent / "fixtures" / name for name in ("mergekit_methods_a", "mergekit_methods_b")]
CONFIGS = [p for fix in FIXTURES if fix.is_dir() for p in sorted((fix / "configs").glob("*.yaml"))]


def _config(path: Path, **overrides) -> MergeConfig:
    data = yaml.safe_load(path.read_text())
    data.update(overrides)
    return MergeConfig.from_dict(data, base_dir=str(path.parent.parent / "inputs"))


def _merged(out: Path) -> dict:
    tensors: dict = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_mergekit_configs_give_mergekits_bytes(path, tmp_path):
    skip_other_capability(path.parent.parent, path.stem)
    merge(_config(path, semantics="mergekit"), tmp_path / "out")
    expected = load_file(path.parent.parent / "outputs" / path.stem / "model.safetensors")
    got = _merged(tmp_path / "out")
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].view(-1).view(dtype=_int(want)).equal(want.view(-1).view(dtype=_int(want))), name


def _int(t):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


@pytest.mark.parametrize("path", CONFIGS[::3], ids=[p.stem for p in CONFIGS[::3]])
def test_default_semantics_any_memory_budget(path, tmp_path):
    one = merge(_config(path), tmp_path / "one")
    assert one.shards
    merge(_config(path), tmp_path / "many", max_memory=20_000)
    assert shard_hashes(tmp_path / "many") == shard_hashes(tmp_path / "one")
