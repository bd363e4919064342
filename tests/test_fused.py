"""The three CPU paths give the same bytes: the numpy chunk kernel, the torch.compile'd fused
kernel, and torch eager ops (the path of other devices)."""

from __future__ import annotations

import pytest
from conftest import shard_hashes

import streammerge.methods.fused
import streammerge.methods.kernels
from streammerge import MergeConfig, ModelSpec, merge
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint

SHAPE = TinyLlama(hidden=64, intermediate=96, layers=1, heads=4, kv_heads=2, vocab=50)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    base = random_state(SHAPE, seed=3)
    base["model.layers.0.mlp.up_proj.weight"][::7] = -0.0  # signed zeros in the base
    save_checkpoint(base, root / "base", shards=1)
    for i in range(3):
        ft = finetune_of(base, seed=20 + i, scale=0.01)
        ft["model.layers.0.mlp.up_proj.weight"][::5] = base["model.layers.0.mlp.up_proj.weight"][::5]  # zero deltas
        save_checkpoint(ft, root / f"ft{i}", shards=1)
    return root


def _bytes(tmp_path, root, method, semantics, mode, options=None, **params):
    models = tuple(ModelSpec(str(root / f"ft{i}"), {"weight": [0.5, -0.3, 0.4][i], "density": [0.5, 0.3, 0.8][i]}) for i in range(3))
    cfg = MergeConfig(method=method, base=str(root / "base"), models=models, semantics=semantics, parameters=params, seed=5)
    out = tmp_path / f"{method}-{semantics}-{mode}"
    merge(cfg, out, compile="on" if mode == "fused" else "off", **(options or {}))
    return shard_hashes(out)


CASES = [("dare_ties", "default", {}), ("ties", "default", {"lambda": 0.7})]
SLOW_CASES = [("task_arithmetic", "default", {"normalize": True}), ("dare_linear", "peft", {}), ("ties", "peft", {"sign_method": "count"}),
              ("ties", "fusionbench", {"merge_func": "max"}), ("dare_ties", "fusionbench", {"trim_density": 0.5}),
              ("magnitude_prune", "default", {})]


@pytest.mark.parametrize(("method", "semantics", "params"), CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CASES])
def test_fused_numpy_and_torch_give_identical_bytes(tmp_path, models, monkeypatch, caplog, method, semantics, params):
    calls = []
    monkeypatch.setattr(streammerge.methods.fused, "_kernel", lambda shape, real=streammerge.methods.fused._kernel: calls.append(shape) or real(shape))
    fused = _bytes(tmp_path, models, method, semantics, "fused", **params)
    assert calls and "torch.compile failed" not in caplog.text  # the compiled kernel really ran
    numpy = _bytes(tmp_path, models, method, semantics, "numpy", **params)
    monkeypatch.setattr(streammerge.methods.kernels, "supported", lambda dtypes, compute: False)  # torch eager ops
    eager = _bytes(tmp_path, models, method, semantics, "torch", **params)
    assert fused == numpy == eager


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_numpy_kernel_and_torch_give_identical_bytes(tmp_path, models, monkeypatch, method):
    # The band (top trim plus dropped outliers) runs in the numpy chunk kernel; torch eager is the reference.
    numpy = _bytes(tmp_path, models, method, "default", "numpy", gamma=0.05)
    monkeypatch.setattr(streammerge.methods.kernels, "supported", lambda dtypes, compute: False)
    assert numpy == _bytes(tmp_path, models, method, "default", "torch", gamma=0.05)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_numpy_kernel_and_torch_give_identical_bytes(tmp_path, models, monkeypatch, method, rescale):
    # DELLA ranks within rows in the numpy kernel; torch eager is the reference. A small budget splits
    # tensors into row blocks, and two threads split the blocks; the fused kernel never takes DELLA.
    ranked = []
    monkeypatch.setattr(streammerge.methods.kernels, "_magprune_chunk", lambda *a, real=streammerge.methods.kernels._magprune_chunk: ranked.append(1) or real(*a))
    numpy = _bytes(tmp_path, models, method, "default", "fused", rescale=rescale, epsilon=0.1, options={"max_memory": 20_000, "threads": 2})
    assert ranked  # the kernel really ran
    monkeypatch.setattr(streammerge.methods.kernels, "supported", lambda dtypes, compute: False)
    assert numpy == _bytes(tmp_path, models, method, "default", "torch", rescale=rescale, epsilon=0.1)
