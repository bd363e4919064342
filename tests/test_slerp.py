"""slerp under the default semantics: against an independent float64 reference, the exact ends
t = 0 and t = 1, the lerp fallback, and the config errors. (mergekit's bytes: test_mergekit_compat.py;
block sizes, threads and staging: test_invariance.py.)"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from streammerge import ConfigError, MergeConfig, ModelSpec, merge
from streammerge import plan as make_plan
from streammerge.front.demo import TinyLlama, random_state, save_checkpoint

SHAPE = TinyLlama(hidden=32, intermediate=48, layers=3, heads=4, kv_heads=2, vocab=40)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("slerp")
    base = random_state(SHAPE, seed=11)
    other = random_state(SHAPE, seed=12)
    # matrices: cos Ω ≈ 0.6, a wide angle; norms: 1.4 · the base's ones, parallel (the lerp fallback)
    ft = {n: (0.6 * b.float() + 0.8 * other[n].float()).to(torch.bfloat16) for n, b in base.items()}
    ft["model.layers.1.mlp.up_proj.weight"] = -base["model.layers.1.mlp.up_proj.weight"]  # antiparallel: lerp
    save_checkpoint(base, root / "base", shards=2)
    save_checkpoint(ft, root / "ft", shards=1)
    fp32 = {n: t.float() + 1e-3 for n, t in ft.items()}  # float32 inputs: float32 output
    save_checkpoint({n: t.float() for n, t in base.items()}, root / "base32", shards=1)
    save_checkpoint(fp32, root / "ft32", shards=1)
    return root


def _config(root, t, *, base="base", ft="ft", **kw) -> MergeConfig:
    return MergeConfig(method="slerp", base=str(root / base), models=(ModelSpec(str(root / ft)),), parameters={"t": t}, **kw)


def _merged(out) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def _inputs(folder) -> dict[str, torch.Tensor]:
    return _merged(folder) if list(folder.glob("model-*.safetensors")) else load_file(folder / "model.safetensors")


def reference_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """slerp in float64 from exact sums (math.fsum over every element), written from the formula."""
    x, y = a.double().reshape(-1).tolist(), b.double().reshape(-1).tolist()
    norm_x, norm_y = math.sqrt(math.fsum(v * v for v in x)), math.sqrt(math.fsum(v * v for v in y))
    norm_x, norm_y = (norm_x if norm_x > 1e-8 else 1.0), (norm_y if norm_y > 1e-8 else 1.0)
    cos = max(-1.0, min(1.0, math.fsum(u * v for u, v in zip(x, y)) / (norm_x * norm_y)))
    if abs(cos) > 0.9995:
        c0, c1 = 1 - t, t
    else:
        angle = math.acos(cos)
        c0, c1 = math.sin((1 - t) * angle) / math.sin(angle), math.sin(t * angle) / math.sin(angle)
    return c0 * a.double() + c1 * b.double()


T_FILTERS = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0.9, 0.1]}, {"value": 0.7}]


def _t(name: str) -> float:
    """T_FILTERS for a tensor, transcribed: the mlp gradient over layers 0..2 at layer / 2."""
    if "self_attn" in name:
        return 0.2
    if "mlp" in name:
        pos = int(name.split(".")[2]) / 2
        return 0.9 * (1 - pos) + 0.1 * pos
    return 0.7


@pytest.mark.parametrize("dtypes", ["bf16", "fp32"])
def test_matches_a_float64_reference(models, tmp_path, dtypes):
    names = ("base", "ft") if dtypes == "bf16" else ("base32", "ft32")
    merge(_config(models, T_FILTERS, base=names[0], ft=names[1]), tmp_path / "out", max_memory=100_000)
    base, ft, out = _inputs(models / names[0]), _inputs(models / names[1]), _merged(tmp_path / "out")
    assert set(out) == set(base)
    for name, a in base.items():
        expected = reference_slerp(a, ft[name], _t(name)).float().to(a.dtype)
        assert out[name].dtype == a.dtype and torch.equal(out[name], expected), name


def test_the_lerp_fallback_and_a_wide_angle(models, tmp_path):
    merge(_config(models, 0.25), tmp_path / "out")
    base, ft, out = _inputs(models / "base"), _inputs(models / "ft"), _merged(tmp_path / "out")

    def lerp(name: str) -> torch.Tensor:
        return 0.75 * base[name].double() + 0.25 * ft[name].double()

    norm = "model.layers.0.input_layernorm.weight"  # ft = 1.4 · base: parallel
    up = "model.layers.1.mlp.up_proj.weight"  # ft = −base: antiparallel
    for name in (norm, up):
        assert torch.equal(out[name], lerp(name).float().to(torch.bfloat16)), name
    q = "model.layers.0.self_attn.q_proj.weight"  # 53°: slerp keeps the norm near the inputs', lerp shrinks it
    assert out[q].double().norm() > 1.05 * lerp(q).norm()


@pytest.mark.parametrize("t", [0, 1])
def test_t_0_and_1_give_the_inputs_exactly(models, tmp_path, t):
    merge(_config(models, t), tmp_path / "out", max_memory=100_000)
    expected = _inputs(models / ("ft" if t else "base"))
    out = _merged(tmp_path / "out")
    assert all(torch.equal(out[n], expected[n]) for n in expected)


def test_a_mergekit_yaml_with_slices_and_the_base_as_a_source(models, tmp_path):
    cfg = MergeConfig.from_dict({
        "slices": [{"sources": [{"model": "base", "layer_range": [0, 3]}, {"model": "ft", "layer_range": [0, 3]}]}],
        "merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.4}, "dtype": "bfloat16",
    }, base_dir=str(models))
    merge(cfg, tmp_path / "slices")
    merge(_config(models, 0.4), tmp_path / "models")
    assert _merged(tmp_path / "slices").keys() == _merged(tmp_path / "models").keys()
    assert all(torch.equal(a, _merged(tmp_path / "models")[n]) for n, a in _merged(tmp_path / "slices").items())


# ---- errors --------------------------------------------------------------------------------------------


def _problems(cfg: MergeConfig) -> list[str]:
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    return info.value.problems


def test_exactly_one_model_besides_the_base():
    cfg = MergeConfig(method="slerp", base="base", models=(ModelSpec("a"), ModelSpec("b"), ModelSpec("base")),
                      parameters={"t": 0.5})
    assert _problems(cfg) == ["models: slerp interpolates between base_model and exactly one other model; got 2 besides "
                              "the base (for more models use multislerp, or a task-vector method)"]
    assert "models: slerp interpolates" in _problems(MergeConfig(method="slerp", base="base", models=(ModelSpec("base"),),
                                                                 parameters={"t": 0.5}))[0]


def test_a_base_model_and_t_are_required(caplog):
    assert _problems(MergeConfig(method="slerp", models=(ModelSpec("a"),), parameters={"t": 0.5})) == [
        "base_model: the slerp method needs a base model"]
    with caplog.at_level(logging.WARNING):
        problems = _problems(MergeConfig(method="slerp", base="base", models=(ModelSpec("a", {"t": 0.5}),)))
    assert problems == ["parameters.t: slerp needs t, the interpolation factor (0 gives the base, 1 the other model), "
                        "e.g. t: 0.5, in the top-level (or slice) parameters"]
    assert "models[0].parameters.t: ignored, as mergekit does" in caplog.text  # mergekit reads t for the whole merge only


@pytest.mark.parametrize("t, bad", [(1.5, "1.5"), ([0, 0.5, -0.1], "-0.1"), ([{"filter": "mlp", "value": 2}, {"value": 0.5}], "2.0")])
def test_t_outside_0_1_is_named(t, bad):
    assert _problems(MergeConfig(method="slerp", base="base", models=(ModelSpec("a"),), parameters={"t": t})) == [
        f"parameters.t: t must be in [0, 1] (0 gives the base, 1 the other model), got {bad}"]


def test_a_t_filter_list_without_fallback_names_the_first_tensor(models):
    with pytest.raises(ConfigError, match=r"parameters.t: no value for tensor 'model.embed_tokens.weight'.*add an entry "
                                          r"without a filter"):
        make_plan(_config(models, [{"filter": "self_attn", "value": 0.3}]))


def test_other_presets_and_a_base_outside_the_slice_are_refused():
    cfg = MergeConfig(method="slerp", base="base", models=(ModelSpec("a"),), parameters={"t": 0.5}, semantics="peft")
    assert _problems(cfg) == ["semantics: peft has no slerp method; use default or mergekit"]
    sliced = MergeConfig.from_dict({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}], "merge_method": "slerp",
                                    "base_model": "base", "parameters": {"t": 0.5}})
    assert _problems(sliced) == ["slices[0].sources: slerp's base_model must be one of the sources, as mergekit requires"]
