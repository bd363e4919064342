"""`semantics: mergekit` against mergekit 0.1.5's own outputs, bit for bit.

The fixtures (tests/fixtures/mergekit/, made by benchmarks/mergekit/make_fixtures.py with the real
mergekit-yaml) hold a tiny bf16 Llama, its three fine-tunes, each config and mergekit's output. DARE
outputs were made with fixed masks (inputs/masks.safetensors) in place of torch.bernoulli; here the
same masks replace our counter-based mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from streammerge import MergeConfig, merge
from streammerge.methods import ops, registry

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
NAMES = sorted(p.stem for p in (FIXTURES / "configs").glob("*.yaml"))
# slerp: a 5-layer model and one fine-tune in bf16, fp16 and fp32 (benchmarks/mergekit/make_slerp_fixtures.py)
SLERP_FIXTURES = Path(__file__).parent / "fixtures" / "mergekit_slerp"
SLERP_NAMES = sorted(p.stem for p in (SLERP_FIXTURES / "configs").glob("*.yaml"))


def _config(name: str, fixtures: Path = FIXTURES) -> MergeConfig:
    data = yaml.safe_load((fixtures / "configs" / f"{name}.yaml").read_text())
    data["semantics"] = "mergekit"
    return MergeConfig.from_dict(data, base_dir=str(fixtures / "inputs"))


def _assert_mergekits_bytes(out: Path, expected_file: Path) -> None:
    expected = load_file(expected_file)
    actual = {}
    for shard in out.glob("model-*.safetensors"):
        actual.update(load_file(shard))
    assert set(actual) == set(expected)
    mismatched = [n for n in expected if actual[n].dtype != expected[n].dtype or not torch.equal(actual[n], expected[n])]
    assert not mismatched, f"{len(mismatched)} tensors differ from mergekit, e.g. {mismatched[:3]}"


@pytest.mark.parametrize("name", NAMES)
def test_bit_identical_to_mergekit(tmp_path, inject_masks, name):
    cfg = _config(name)
    if cfg.method_name.startswith(("dare", "della")):
        masks = load_file(FIXTURES / "inputs" / "masks.safetensors")
        sources = [m.source for m in cfg.finetunes()]
        inject_masks(lambda i, tensor, start, count: masks[f"{sources[i]}/{tensor}"].reshape(-1)[start:start + count])
    merge(cfg, tmp_path / "out")
    _assert_mergekits_bytes(tmp_path / "out", FIXTURES / "outputs" / name / "model.safetensors")


@pytest.mark.parametrize("name", SLERP_NAMES)
def test_slerp_bit_identical_to_mergekit(tmp_path, name):
    merge(_config(name, SLERP_FIXTURES), tmp_path / "out")
    _assert_mergekits_bytes(tmp_path / "out", SLERP_FIXTURES / "outputs" / name / "model.safetensors")


def test_slerp_fixtures_take_every_branch():
    # The generator's special tensors reach each branch of slerp: the lerp fallback at cos Ω = ±1 and
    # nearly parallel, a small angle just below the threshold, zero norms (taken as 1); the norms take
    # the lerp fallback too, every other tensor a wide angle.
    special = json.loads((SLERP_FIXTURES / "manifest.json").read_text())["special_tensors"]
    base = load_file(SLERP_FIXTURES / "inputs" / "base" / "model.safetensors")
    ft = load_file(SLERP_FIXTURES / "inputs" / "ft" / "model.safetensors")
    cosine = {}
    for name in base:
        a, b = base[name].double().reshape(-1), ft[name].double().reshape(-1)
        cosine[name] = float(a @ b / (a.norm() * b.norm())) if a.norm() and b.norm() else 0.0
    kind = {k: cosine[n] for n, k in special.items()}
    assert kind["equal"] == pytest.approx(1) and kind["opposite"] == pytest.approx(-1)
    assert 0.9995 < kind["near"] < 0.99999 and 0.998 < kind["below"] < 0.9995
    assert kind["zero_base"] == kind["zero_ft"] == 0.0
    assert all(cosine[n] > 0.9995 for n in base if n.endswith("norm.weight") and n not in special)
    assert all(abs(cosine[n]) < 0.9 for n in base if not n.endswith("norm.weight") and n not in special)


@pytest.mark.parametrize("name", ["della_bf16", "dare_ties_bf16"])
def test_l1_rescale_sparsifies_each_tensor_once(tmp_path, monkeypatch, name):
    # The L1 factor needs the sparsified tensor; the merge reuses it rather than sorting and masking again.
    calls = []

    def counted(real):
        return lambda *a, **k: calls.append(1) or real(*a, **k)

    for fn in ("della_probabilities", "dare"):
        monkeypatch.setattr(ops, fn, counted(getattr(ops, fn)))
    merge(_config(name), tmp_path / "out")
    tensors = load_file(FIXTURES / "inputs" / "base" / "model.safetensors")
    assert len(calls) == len(_config(name).finetunes()) * len(tensors)


def test_fixture_names_cover_every_method():
    methods = {_config(n).method_name for n in NAMES} | {_config(n, SLERP_FIXTURES).method_name for n in SLERP_NAMES}
    # mergekit has no plain magnitude pruning; passthrough's fixtures stack layers (test_mergekit_slices.py);
    # the methods of their own (methods/base.py) beside slerp have fixtures of their own (test_methods_*.py)
    own = {m.name for m in registry.all_methods() if not hasattr(m, "sparsify")} - {"slerp"}
    assert methods == set(registry.names()) - {"magnitude_prune", "passthrough"} - own


@pytest.mark.parametrize("name", ["della_bf16", "della_linear_fp32"])
def test_della_keep_probabilities_are_mergekits(name):
    # mergekit draws its DELLA mask as bernoulli(p); the fixture kept every p it asked for. Ours, under
    # `semantics: mergekit`, must be the same numbers, so only the uniform draws differ.
    cfg = _config(name)
    probs = load_file(FIXTURES / "outputs" / name / "probs.safetensors")
    base = load_file(FIXTURES / "inputs" / "base" / "model.safetensors")
    compute = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    for spec in cfg.finetunes():
        ft = load_file(FIXTURES / "inputs" / spec.source / "model.safetensors")
        for tensor, b in base.items():
            delta = ft[tensor].to(compute) - b.to(compute)
            density = cfg.tensor_param("density", spec, tensor, None, 2)
            epsilon = cfg.tensor_param("epsilon", spec, tensor, None, 2)
            ours = ops.della_probabilities(delta, density, epsilon, mergekit=True)
            expected = probs[f"{spec.source}/{tensor}"]
            assert ours.dtype == expected.dtype and torch.equal(ours, expected), (spec.source, tensor)


def test_linear_averages_an_unlisted_base_like_mergekit(tmp_path):
    inputs = FIXTURES / "inputs"
    data = {"merge_method": "linear", "base_model": "base", "semantics": "mergekit",
            "models": [{"model": "ft1", "parameters": {"weight": 1.0}}]}
    with pytest.raises(Exception, match="needs its weight"):
        MergeConfig.from_dict(data, base_dir=str(inputs)).validate()
    data["parameters"] = {"weight": 1.0}
    merge(MergeConfig.from_dict(data, base_dir=str(inputs)), tmp_path / "out")
    (shard,) = (tmp_path / "out").glob("model-*.safetensors")
    out = load_file(shard)["model.norm.weight"]
    base = load_file(inputs / "base" / "model.safetensors")["model.norm.weight"]
    ft1 = load_file(inputs / "ft1" / "model.safetensors")["model.norm.weight"]
    assert torch.equal(out, ((base.float() + ft1.float()) / 2).to(torch.bfloat16))
