"""MergeConfig: YAML parsing, validation (every problem at once), per-tensor parameters, presets."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import yaml

from streammerge import ConfigError, MergeConfig, ModelSpec
from streammerge import plan as plan_merge
from streammerge.front.config import layer_index, resolve_value
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.methods import registry

UP0 = "model.layers.0.mlp.up_proj.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"

FULL_YAML = """\
merge_method: dare_ties
base_model: base
models:
  - model: base
  - model: ft1
    parameters: {weight: 0.7, density: 0.5}
  - model: ft2
    parameters:
      weight: 0.3
      density: [{filter: "*.mlp.*", value: 0.3}, {value: 0.6}]
parameters: {lambda: 1.5, normalize: true}
dtype: bfloat16
semantics: mergekit
seed: 42
"""


def _write(tmp_path, text: str, name: str = "merge.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _cfg(method: str = "ties", **kw) -> MergeConfig:
    kw.setdefault("models", (ModelSpec("ft1", {"weight": 1.0}),))
    kw.setdefault("base", "base")
    return MergeConfig(method=method, **kw)


def _problems(cfg: MergeConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    return info.value


# ---- YAML ---------------------------------------------------------------------------------


def test_from_yaml_reads_every_field(tmp_path):
    cfg = MergeConfig.from_yaml(_write(tmp_path, FULL_YAML))
    assert cfg.method == "dare_ties" and cfg.method_name == "dare_ties"
    assert cfg.base == "base"
    assert cfg.models == (
        ModelSpec("base", {}),
        ModelSpec("ft1", {"weight": 0.7, "density": 0.5}),
        ModelSpec("ft2", {"weight": 0.3, "density": [{"filter": "*.mlp.*", "value": 0.3}, {"value": 0.6}]}),
    )
    assert cfg.parameters == {"lambda": 1.5, "normalize": True}
    assert cfg.dtype == "bfloat16" and cfg.out_dtype is None
    assert cfg.semantics == "mergekit"
    assert cfg.seed == 42
    assert cfg.base_dir == str(tmp_path)
    cfg.validate()


def test_from_yaml_defaults_and_overrides(tmp_path):
    path = _write(tmp_path, "merge_method: ties\nbase_model: b\nmodels: [ft1, {model: ft2}]\n")
    cfg = MergeConfig.from_yaml(path)
    assert cfg.models == (ModelSpec("ft1", {}), ModelSpec("ft2", {}))
    assert (cfg.semantics, cfg.seed, cfg.dtype, cfg.parameters, cfg.include, cfg.exclude) == ("default", 0, None, {}, (), ())
    over = MergeConfig.from_yaml(path, seed=7, semantics="peft")
    assert (over.seed, over.semantics, over.method) == (7, "peft", "ties")


def test_from_yaml_include_exclude_string_or_list(tmp_path):
    cfg = MergeConfig.from_yaml(_write(tmp_path, """\
        merge_method: linear
        models: [a, b]
        include: "*.mlp.*"
        exclude: ["*norm*", "lm_head.weight"]
        """))
    assert cfg.include == ("*.mlp.*",) and cfg.exclude == ("*norm*", "lm_head.weight")
    assert cfg.selected(UP0)
    assert not cfg.selected("model.layers.0.mlp.norm.weight")  # included, then excluded
    assert not cfg.selected(Q0)  # not included


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "base").mkdir(parents=True)
    (cfg_dir / "ft1").mkdir()
    absolute = tmp_path / "elsewhere"
    absolute.mkdir()
    path = _write(cfg_dir, f"merge_method: ties\nbase_model: base\nmodels: [ft1, '{absolute}', missing]\n")
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    cfg = MergeConfig.from_yaml(path)
    assert cfg.base_path == os.path.join(str(cfg_dir), "base")
    assert [cfg.model_path(m) for m in cfg.models] == [os.path.join(str(cfg_dir), "ft1"), str(absolute), "missing"]
    # Flags / Python configs have no YAML folder: paths stay as given (relative to the working directory).
    assert _cfg(base="base").base_path == "base"


def test_base_listed_in_models_is_not_a_finetune(tmp_path):
    cfg = MergeConfig.from_yaml(_write(tmp_path, FULL_YAML))
    assert [m.source for m in cfg.finetunes()] == ["ft1", "ft2"]
    for method in ("task_arithmetic", "ties", "dare_linear", "magnitude_prune"):
        assert [m.source for m in _cfg(method, models=cfg.models).finetunes()] == ["ft1", "ft2"]
    # linear averages whole models: the base, when listed, is one of them.
    assert [m.source for m in _cfg("linear", models=cfg.models).finetunes()] == ["base", "ft1", "ft2"]


def test_base_spelled_differently_is_still_the_base(tmp_path):
    for name in ("base", "ft1"):
        (tmp_path / name).mkdir()
    cfg = MergeConfig.from_yaml(_write(tmp_path, f"""\
        merge_method: ties
        base_model: ./base
        models: [base, '{tmp_path / "base"}/', ft1]
        """))
    assert [m.source for m in cfg.finetunes()] == ["ft1"]


def test_from_yaml_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        MergeConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        MergeConfig.from_yaml(_write(tmp_path, "merge_method: [ties\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"list\.yaml: the config must be a YAML mapping"):
        MergeConfig.from_yaml(_write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_from_dict_collects_structural_problems():
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict({
            "merge_method": "ties",
            "models": [{"parameters": {}}, {"model": "a", "weights": 1}, {"model": "b", "parameters": [1]}],
            "parameters": [1, 2],
            "frobnicate": 1,
        })
    assert info.value.problems == [
        "unknown top-level key 'frobnicate'",
        "models[0]: expected a mapping with a 'model' key",
        "models[1]: unknown key(s) ['weights']",
        "models[2].parameters must be a mapping",
        "'parameters' must be a mapping",
    ]
    assert str(info.value).startswith("5 problems: unknown top-level key 'frobnicate'; ")


# ---- validation ---------------------------------------------------------------------------


def test_validate_reports_every_problem_at_once():
    cfg = MergeConfig(
        method="tiez", base="base",
        models=(ModelSpec("ft1", {"density": 1.5, "weigth": 1.0}),),
    )
    err = _problems(cfg)
    assert len(err.problems) == 3
    msg = str(err)
    assert msg.startswith("3 problems: ")
    assert "merge_method: unknown method 'tiez'" in msg
    assert "models[0].parameters.density: density must be in (0, 1], got 1.5" in msg
    assert "models[0].parameters.weigth: unknown parameter 'weigth'" in msg
    assert "\n" not in msg


def test_validate_value_checks():
    err = _problems(MergeConfig(
        method="ties", base=None, models=(), semantics="exact", seed=-1, dtype="fp8", out_dtype="int4",
        parameters={"normalize": "maybe", "merge_func": "median", "lambda": "big", "density": 0},
    ))
    assert err.problems == [
        "semantics: unknown value 'exact'; choose one of default, mergekit, peft, fusionbench",
        "seed: must be a non-negative integer, got -1",
        "dtype: unknown dtype 'fp8'; choose one of bfloat16, float16, float32",
        "out_dtype: unknown dtype 'int4'; choose one of bfloat16, float16, float32, float8_e4m3fn",
        "models: at least one model to merge is needed",
        "base_model: the ties method needs a base model",
        "parameters.normalize: must be true or false, got 'maybe'",
        "parameters.merge_func: must be one of mean, sum, max, got 'median'",
        "parameters.lambda: expected a number, a list of numbers (gradient) or a list of {filter, value}, got 'big'",
        "parameters.density: density must be in (0, 1], got 0.0",
    ]


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.0000001, 2, [0.5, 0], [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]])
def test_density_must_be_in_0_1(density):
    err = _problems(_cfg(models=(ModelSpec("ft1", {"density": density}),)))
    assert len(err.problems) == 1 and "models[0].parameters.density: density must be in (0, 1]" in err.problems[0]


@pytest.mark.parametrize("density", [1, 1.0, 0.001, [0.2, 1.0], [{"filter": "*.mlp.*", "value": 0.3}, {"value": 1}]])
def test_density_accepted(density):
    _cfg(models=(ModelSpec("ft1", {"density": density}),)).validate()


def test_validate_misc_rules():
    # seeds are plain ints (bool is not), options belong to the top level, filter entries are strict
    assert _problems(_cfg(seed=True)).problems == ["seed: must be a non-negative integer, got True"]
    assert _problems(_cfg(models=(ModelSpec("ft1", {"normalize": True}),))).problems == [
        "models[0].parameters.normalize: 'normalize' is an option of the whole merge; set it in the top-level parameters"
    ]
    assert _problems(_cfg(parameters={"weight": [{"filter": "mlp", "val": 1}]})).problems == [
        "parameters.weight: each filter entry needs 'value' and optionally 'filter'"
    ]
    assert _problems(_cfg(parameters={"weight": float("nan")})).problems == [
        "parameters.weight: expected a finite number, got nan"
    ]
    # linear needs no base; an alias resolves; a gradient and every option value are accepted
    MergeConfig(method="average", models=(ModelSpec("a"), ModelSpec("b"))).validate()
    assert MergeConfig(method="dare_average", models=()).method_name == "dare_linear"
    _cfg(parameters={"weight": [0.1, 0.9], "lambda": 0.5, "normalize": False, "rescale": True, "merge_func": "max",
                     "sign_method": "count", "dare_scope": "all", "trim_scope": "global", "int8_mask": True}).validate()
    _cfg(tokenizer_source="ft1").validate()
    assert _problems(_cfg(tokenizer_source="other")).problems == [
        "tokenizer_source: 'other' is neither 'base', 'union', one of the models, nor a local folder"
    ]
    _cfg(tokenizer_source="union").validate()


# ---- unsupported mergekit features ----------------------------------------------------------


def _slice(model: str, lr=(0, 2), **params) -> dict:
    return {"model": model, "layer_range": list(lr), **({"parameters": params} if params else {})}


def test_stacked_slices_parse_and_bad_ones_are_named():
    two = [{"sources": [_slice("a", (0, 1))]}, {"sources": [_slice("a", (1, 2))]}]
    cfg = MergeConfig.from_dict({"merge_method": "passthrough", "slices": two})
    assert [s.sources[0].layer_range for s in cfg.slices] == [(0, 1), (1, 2)] and cfg.layer_range is None
    assert [m.source for m in cfg.models] == ["a"]
    uneven = [{"sources": [_slice("a", (0, 2)), _slice("b", (2, 5))]}]
    with pytest.raises(ConfigError, match=r"slices\[0\]: layer ranges \[\[0, 2\], \[2, 5\]\] differ in length"):
        MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "slices": uneven})
    with pytest.raises(ConfigError, match="residual_weight is not supported"):
        MergeConfig.from_dict({"merge_method": "ties", "slices": [{"sources": [_slice("a")], "residual_weight": 0.1}]})
    with pytest.raises(ConfigError, match="give one of them"):
        MergeConfig.from_dict({"merge_method": "ties", "models": ["a"], "slices": [{"sources": [_slice("a")]}]})


def test_empty_slices_are_named():
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict({"merge_method": "nuslerp", "base_model": "b", "slices": [], "parameters": {"t": 0.5}})
    assert len(info.value.problems) == 1
    assert "'slices'" in info.value.problems[0]


def test_unknown_method_lists_the_registry():
    with pytest.raises(ConfigError) as info:
        _cfg("tiez").validate()
    names = ", ".join(registry.names())
    assert f"merge_method: unknown method 'tiez'; choose one of {names} (`streammerge methods` lists them)" in str(info.value)


def test_lora_syntax_is_accepted_and_misplaced_della_parameter_is_named(tmp_path):
    cfg = MergeConfig.from_yaml(_write(tmp_path, """\
        merge_method: ties
        base_model: base
        models:
          - model: org/ft1+org/lora
            parameters: {weight: 1.0, density: 0.5, epsilon: 0.05}
        parameters: {lambda_: 1.0}
        """))
    err = _problems(cfg)
    assert err.problems == [  # model+lora is a model (tests/test_model_lora.py)
        "parameters.lambda_: mergekit parameter 'lambda_' is not supported by streammerge yet",
    ]


def test_parameters_mergekit_ignores_are_warnings_not_errors(caplog):
    # A config written for mergekit must run as is: parameters it silently ignores are reported, not refused.
    cfg = _cfg(models=(ModelSpec("ft1", {"weight": 1.0, "density": 0.5, "epsilon": 0.05, "lambda": 0.5}),))
    with caplog.at_level("WARNING", logger="streammerge.front.config"):
        cfg.validate()
    assert "models[0].parameters.epsilon: ignored" in caplog.text and "the ties method does not use it" in caplog.text
    assert "models[0].parameters.lambda: ignored, as mergekit does" in caplog.text


def test_plus_in_an_existing_folder_name_is_not_lora(tmp_path):
    (tmp_path / "c++model").mkdir()
    _cfg(models=(ModelSpec("c++model"),), base_dir=str(tmp_path)).validate()


# ---- per-tensor parameters -------------------------------------------------------------------


def test_filter_lists_first_match_wins_substring_or_glob():
    value = [
        {"filter": "self_attn", "value": 0.1},  # substring
        {"filter": "*.mlp.*_proj.weight", "value": 0.2},  # glob on the whole name
        {"filter": "mlp", "value": 0.3},  # shadowed for *_proj weights by the glob above
        {"value": 0.9},  # fallback
    ]
    r = lambda name: resolve_value(value, name, layer_index(name), 4, default=1.0)  # noqa: E731
    assert r(Q0) == 0.1
    assert r(UP0) == 0.2
    assert r("model.layers.3.mlp.gate_proj.weight") == 0.2
    assert r("model.layers.3.mlp.bias") == 0.3  # substring match, the glob does not match
    assert r("model.embed_tokens.weight") == 0.9
    # A glob must match the whole name; a substring may be anywhere.
    assert resolve_value([{"filter": "mlp.*", "value": 0.5}], UP0, 0, 4, default=1.0) == 1.0
    assert resolve_value([{"filter": "up_proj", "value": 0.5}], UP0, 0, 4, default=1.0) == 0.5
    # No entry matches and no fallback: the default.
    assert resolve_value([{"filter": "lm_head", "value": 0.5}], UP0, 0, 4, default=0.25) == 0.25


@pytest.mark.parametrize(
    "gradient, n_layers, expected",
    [
        ([0.0, 1.0], 5, [0.0, 0.25, 0.5, 0.75, 1.0]),  # t = layer / (n_layers - 1)
        ([0.2, 0.6, 1.0], 3, [0.2, 0.6, 1.0]),
        ([0.1, 0.5, 0.3], 5, [0.1, 0.3, 0.5, 0.4, 0.3]),  # t = 0.25 -> halfway between 0.1 and 0.5
        ([1.0, 0.0, 0.0, 1.0], 4, [1.0, 0.0, 0.0, 1.0]),
        ([0.4], 3, [0.4, 0.4, 0.4]),
    ],
)
def test_gradient_interpolates_like_mergekit(gradient, n_layers, expected):
    got = [resolve_value(gradient, f"model.layers.{i}.mlp.up_proj.weight", i, n_layers, default=1.0) for i in range(n_layers)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_gradient_outside_the_layers_and_single_layer():
    # mergekit: every tensor outside the layers at t = 0 (its pre- and post-layer weights are planned
    # with a reader made at t = 0, plan.py plan_module), a single layer at t = 1.
    g = [0.2, 0.8]
    assert resolve_value(g, "model.embed_tokens.weight", None, 4, default=1.0) == 0.2
    assert resolve_value(g, "transformer.wte.weight", None, 4, default=1.0) == 0.2
    assert resolve_value(g, "model.norm.weight", None, 4, default=1.0) == 0.2
    assert resolve_value(g, "lm_head.weight", None, 4, default=1.0) == 0.2
    assert resolve_value(g, UP0, 0, 1, default=1.0) == 0.8
    # A gradient inside a filter entry.
    assert resolve_value([{"filter": "mlp", "value": [0.0, 1.0]}], "model.layers.2.mlp.up_proj.weight", 2, 5, default=1.0) == 0.5


def test_layer_index():
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("transformer.h.11.attn.c_attn.weight") == 11
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None


def test_tensor_param_precedence():
    cfg = MergeConfig(
        method="ties", base="base",
        models=(
            ModelSpec("ft1", {"weight": 0.7, "density": [{"filter": "mlp", "value": 0.3}]}),
            ModelSpec("ft2", {}),
        ),
        parameters={"weight": 0.25, "density": 0.8, "lambda": [1.0, 2.0]},
    )
    ft1, ft2 = cfg.models
    assert cfg.tensor_param("weight", ft1, UP0, 0, 2) == 0.7  # model level wins
    assert cfg.tensor_param("weight", ft2, UP0, 0, 2) == 0.25  # top level
    assert cfg.tensor_param("density", ft1, UP0, 0, 2) == 0.3
    # a model-level filter list that matches nothing falls through to the top level (as mergekit)
    assert cfg.tensor_param("density", ft1, Q0, 0, 2) == 0.8
    assert cfg.tensor_param("lambda", None, "model.layers.1.mlp.up_proj.weight", 1, 2) == 2.0
    assert cfg.tensor_param("trim_density", ft1, UP0, 0, 2) == 1.0  # built-in default
    bare = _cfg(models=(ModelSpec("ft1"),))
    assert [bare.tensor_param(k, bare.models[0], UP0, 0, 2) for k in ("weight", "density", "lambda")] == [1.0, 1.0, 1.0]


def test_plan_applies_filters_gradients_and_overrides(tmp_path):
    shape = TinyLlama(hidden=16, intermediate=32, layers=3, heads=2, kv_heads=1, vocab=32)
    base = random_state(shape, seed=0)
    save_checkpoint(base, tmp_path / "base", shards=1)
    save_checkpoint(finetune_of(base, 1), tmp_path / "ft1", shards=1)
    save_checkpoint(finetune_of(base, 2), tmp_path / "ft2", shards=2)
    cfg = MergeConfig.from_yaml(_write(tmp_path, """\
        merge_method: ties
        base_model: base
        models:
          - model: ft1
            parameters:
              weight: [0.0, 1.0]
              density: [{filter: "*.mlp.*", value: 0.25}, {filter: self_attn, value: 0.75}]
          - model: ft2
        parameters: {weight: 0.5, density: 0.5, lambda: 2.0}
        """))
    p = plan_merge(cfg)
    got = {t.name: (t.weights, t.densities, t.lam) for t in p.tensors}
    assert got["model.embed_tokens.weight"] == ((0.0, 0.5), (0.5, 0.5), 2.0)
    assert got["model.layers.0.mlp.up_proj.weight"] == ((0.0, 0.5), (0.25, 0.5), 2.0)
    assert got["model.layers.1.self_attn.q_proj.weight"] == ((0.5, 0.5), (0.75, 0.5), 2.0)
    assert got["model.layers.2.input_layernorm.weight"] == ((1.0, 0.5), (0.5, 0.5), 2.0)
    assert got["lm_head.weight"] == ((0.0, 0.5), (0.5, 0.5), 2.0)
    assert p.sources == (str(tmp_path / "ft1"), str(tmp_path / "ft2"))


# ---- round trip and presets -------------------------------------------------------------------


def test_to_dict_round_trips(tmp_path):
    cfg = MergeConfig.from_yaml(_write(tmp_path, FULL_YAML))
    data = cfg.to_dict()
    assert data["models"][0] == {"model": "base"}
    assert MergeConfig.from_dict(data, base_dir=cfg.base_dir) == cfg
    # and through YAML text, as in the manifest and the model card
    assert MergeConfig.from_dict(yaml.safe_load(yaml.safe_dump(data)), base_dir=cfg.base_dir) == cfg
    full = MergeConfig(
        method="ties", base="b", models=(ModelSpec("a", {"weight": [0.1, 0.2]}),), parameters={"lambda": 0.5},
        semantics="peft", seed=3, dtype="float16", out_dtype="bfloat16", include=("*.mlp.*",), exclude=("lm_head*",),
        tokenizer_source="a",
    )
    assert MergeConfig.from_dict(full.to_dict()) == full


def _opts(method: str, semantics: str, **params):
    return MergeConfig(method=method, base="b", models=(ModelSpec("a"),), semantics=semantics,
                       parameters=params, dtype=params.pop("dtype", None)).merge_options()


def test_default_semantics_options():
    o = _opts("ties", "default")
    assert (o.merge_func, o.normalize, o.sign_method, o.rescale, o.dare_scope, o.trim_scope, o.compute_dtype) == (
        "mean", False, "sum", "inverse", "linear", "tensor", torch.float32)
    assert (o.weighted_sign, o.mean_divisor, o.zero_sign, o.trim_rule) == (True, "weight", "positive", "exact")
    assert _opts("linear", "default").normalize is True
    assert _opts("dare_ties", "default", normalize=False).merge_func == "sum"
    assert _opts("dare_ties", "default", normalize=False, merge_func="max").merge_func == "max"
    assert _opts("dare_linear", "default", rescale=False).rescale == "none"
    assert _opts("dare_ties", "default", dare_scope="all", trim_scope="global").dare_scope == "all"


def test_mergekit_semantics_options():
    ties = _opts("ties", "mergekit", dtype="bfloat16")
    assert (ties.normalize, ties.merge_func, ties.rescale, ties.dare_scope, ties.trim_scope, ties.compute_dtype) == (
        True, "mean", "none", "all", "tensor", torch.bfloat16)  # mergekit's ties rescales only when asked
    assert _opts("ties", "mergekit", rescale=True).rescale == "l1"
    dare = _opts("dare_ties", "mergekit")
    assert dare.rescale == "l1"
    assert (dare.normalize, dare.merge_func, dare.compute_dtype) == (False, "sum", None)
    assert _opts("dare_ties", "mergekit", normalize=True).merge_func == "mean"
    assert _opts("ties", "mergekit", normalize=False).merge_func == "sum"
    assert _opts("task_arithmetic", "mergekit").normalize is False
    # mergekit's linear accumulates in float32 with a fused multiply-add, then rounds to its dtype.
    linear = _opts("linear", "mergekit", dtype="float16")
    assert (linear.compute_dtype, linear.fused_linear) == (torch.float16, True)
    assert _opts("dare_linear", "mergekit", rescale=False).rescale == "none"


def test_peft_semantics_options():
    o = _opts("dare_ties", "peft")
    assert (o.merge_func, o.normalize, o.weighted_sign, o.mean_divisor, o.rescale, o.dare_scope, o.trim_scope) == (
        "mean", False, False, "count", "inverse", "all", "tensor")
    assert _opts("linear", "peft").normalize is True


def test_fusionbench_semantics_options():
    o = _opts("ties", "fusionbench")
    assert (o.merge_func, o.normalize, o.zero_sign, o.trim_rule, o.rescale, o.dare_scope, o.trim_scope) == (
        "sum", False, "majority", "inclusive", "inverse", "all", "global")
    assert _opts("ties", "fusionbench", trim_scope="tensor", merge_func="mean").trim_scope == "tensor"
    assert _opts("ties", "fusionbench", merge_func="mean").merge_func == "mean"


def test_config_and_input_problems_are_reported_together(tmp_path):
    from streammerge import ConfigError, merge

    cfg = MergeConfig(method="ties", base=str(tmp_path / "no-base"), models=(ModelSpec(str(tmp_path / "no-ft"), {"density": 2.0}),))
    with pytest.raises(ConfigError) as info:
        merge(cfg, tmp_path / "out")
    text = str(info.value)
    assert info.value.problems[0].startswith("models[0].parameters.density")
    assert f"{tmp_path / 'no-ft'}: no such file or folder" in text and f"{tmp_path / 'no-base'}: no such file or folder" in text
    assert len(info.value.problems) == 3 and not (tmp_path / "out").exists()
