"""`streammerge inspect` (streammerge/inspect.py): its numbers against a direct whole-tensor computation
on generated deltas (a full fine-tune, a LoRA adapter, a model with a resized tensor), and the CLI."""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from streammerge.errors import MissingDependencyError
from streammerge.front.cli import main
from streammerge.front.inspect import (
    HIST_SHIFT,
    inspect_deltas,
    layer_group,
    plot_report,
)

HIDDEN, LAYERS, R = 24, 2, 4
PREFIX = "base_model.model."


def _names() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (50, HIDDEN)}
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (40, HIDDEN)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (50, HIDDEN)
    return shapes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in _names().items()}
    save_file(base, root / "base.safetensors")
    ft1 = {n: (t.float() + torch.randn(t.shape, generator=gen) * 0.0015).to(torch.bfloat16) for n, t in base.items()}
    ft1["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"]  # zero delta
    save_file(ft1, root / "ft1.safetensors")
    ft2 = {n: (t.float() + torch.randn(t.shape, generator=gen) * 0.01).to(torch.bfloat16) for n, t in base.items()}
    ft2["lm_head.weight"] = torch.zeros(52, HIDDEN, dtype=torch.bfloat16)  # a resized vocabulary
    save_file(ft2, root / "ft2.safetensors")
    (root / "lora").mkdir()
    a = torch.randn(R, HIDDEN, generator=gen) * 0.05
    b = torch.randn(HIDDEN, R, generator=gen) * 0.05
    save_file({f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": a, f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": b},
              root / "lora" / "adapter_model.safetensors")
    (root / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": 8}))
    lora = {n: torch.zeros(t.shape) for n, t in base.items()}
    lora["model.layers.0.self_attn.q_proj.weight"] = (b.double() @ a.double()).float() * torch.tensor(8 / R)
    deltas = [{n: ft1[n].float() - t.float() for n, t in base.items()},
              {n: ft2[n].float() - t.float() for n, t in base.items() if n != "lm_head.weight"},
              lora]
    return root, deltas


def _paths(root):
    return [root / "ft1.safetensors", root / "ft2.safetensors", root / "lora"]


def _group(deltas: dict, group: str) -> torch.Tensor:
    return torch.cat([d.reshape(-1) for n, d in deltas.items() if group == "all" or layer_group(n) == group])


def _check_model(stats, d: torch.Tensor, threshold: float) -> None:
    a = d.abs()
    assert stats.elements == a.numel()
    assert stats.nonzero == int(torch.count_nonzero(a))
    assert stats.frac_large == int((a > threshold).sum()) / a.numel()
    assert stats.max_abs == float(a.max())
    assert stats.mean_abs == pytest.approx(float(a.double().mean()), rel=1e-12)
    assert stats.rms == pytest.approx(float(a.double().pow(2).mean().sqrt()), rel=1e-12)
    ordered = a.sort().values
    for q, got in ((0.5, stats.p50), (0.9, stats.p90), (0.99, stats.p99)):
        true = float(ordered[max(1, math.ceil(q * a.numel())) - 1])
        if true == 0:
            assert got == 0
            continue
        bits = int(np.float32(true).view(np.uint32)) >> HIST_SHIFT
        lower = float(np.uint32(bits << HIST_SHIFT).view(np.float32))
        upper = float(np.uint32((bits + 1) << HIST_SHIFT).view(np.float32))
        assert lower <= true <= got <= min(upper, stats.max_abs) and got <= true * (1 + 1 / 16)


def test_numbers_match_a_direct_computation(models):
    root, deltas = models
    report = inspect_deltas(root / "base.safetensors", _paths(root), threshold=0.006, block_elements=100)
    assert report.groups == ("embed", "layers.0", "layers.1", "norm", "lm_head", "all")
    for m, d in enumerate(deltas):
        for group in report.deltas[m]:
            _check_model(report.deltas[m][group], _group(d, group), 0.006)
    assert "lm_head" not in report.deltas[1]  # left out: its shape differs
    assert [(x.tensor, x.model_shape) for x in report.mismatches] == [("lm_head.weight", (52, HIDDEN))]
    for (i, j), by_group in report.pairs.items():
        for group, s in by_group.items():
            common = {n: d for n, d in deltas[i].items() if n in deltas[j]}
            a, b = _group(common, group).double(), _group({n: deltas[j][n] for n in common}, group).double()
            norm = float(a.norm() * b.norm())
            assert s.cosine == pytest.approx(float(a @ b) / norm if norm else 0.0, rel=1e-9, abs=1e-15)
            both = (a != 0) & (b != 0)
            assert s.both_nonzero == int(both.sum())
            assert s.sign_conflict == (int((both & (a.sign() != b.sign())).sum()) / s.both_nonzero if s.both_nonzero else 0.0)
    assert report.pairs[(0, 2)]["layers.1"].both_nonzero == 0  # the adapter leaves layer 1 alone


def test_row_blocks_change_nothing_but_rounding(models):
    root, _ = models
    small = inspect_deltas(root / "base.safetensors", _paths(root), block_elements=64).to_json()
    big = inspect_deltas(root / "base.safetensors", _paths(root)).to_json()
    for s, b in zip(small["deltas"], big["deltas"]):
        for g in s["groups"]:
            for key, value in s["groups"][g].items():
                assert value == pytest.approx(b["groups"][g][key], rel=1e-12), (g, key)


def test_warns_when_dare_is_likely_to_hurt(models):
    root, deltas = models
    report = inspect_deltas(root / "base.safetensors", _paths(root)[:2])
    large = [m for m, d in enumerate(deltas[:2]) if float((_group(d, "all").abs() > 0.005).double().mean()) >= 0.05]
    assert large == [1]  # ft2's deltas are ~N(0, 0.01): a third exceed 0.005
    assert any("ft2" in w and "DARE" in w for w in report.warnings)
    assert not any("ft1" in w for w in report.warnings)


def test_cli_json_table_and_plot(models, tmp_path):
    root, _ = models
    args = ["inspect", str(root / "base.safetensors"), *map(str, _paths(root))]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"base", "models", "threshold", "groups", "deltas", "pairs", "shape_mismatches", "warnings"}
    assert set(data["deltas"][0]["groups"]["all"]) == {"elements", "nonzero", "mean_abs", "rms", "max_abs", "p50", "p90", "p99", "frac_large"}
    assert set(data["pairs"][0]["groups"]["all"]) == {"cosine", "sign_conflict", "both_nonzero"}
    assert data["shape_mismatches"] == [{"tensor": "lm_head.weight", "model": str(root / "ft2.safetensors"), "base_shape": [50, HIDDEN],
                                         "model_shape": [52, HIDDEN]}]
    result = CliRunner().invoke(main, [*args, "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "models 1 and 3: cosine similarity" in result.stdout and "layers.1" in result.stdout
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(main, ["inspect", str(root / "base.safetensors"), str(root / "missing")])
    assert result.exit_code == 1 and "missing: no such file or folder" in result.stderr


def test_plot_without_matplotlib_says_what_to_install(models, tmp_path, monkeypatch):
    root, _ = models
    report = inspect_deltas(root / "base.safetensors", _paths(root)[:1])
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingDependencyError, match=r"pip install 'streammerge\[plot\]'"):
        plot_report(report, tmp_path / "p.png")
