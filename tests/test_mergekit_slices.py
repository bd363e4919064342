"""Layer stacking: mergekit's `slices:` with partial, shifted and repeated layer ranges, `passthrough`
(with `scale`), and several sources per slice merged by another method.

The fixtures (tests/fixtures/mergekit_slices/, made by benchmarks/mergekit/make_slice_fixtures.py
with the real mergekit-yaml) hold each config and mergekit's output shard and config.json; the
inputs are the 5-layer `deep_*` models of tests/fixtures/mergekit/inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import split_run_hashes
from safetensors.torch import load_file

from streammerge import ConfigError, MergeConfig, merge
from streammerge import plan as plan_merge
from streammerge.errors import MismatchError, OutputError, StreammergeError
from streammerge.pipeline import passes as engine

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit_slices"
INPUTS = Path(__file__).parent / "fixtures" / "mergekit" / "inputs"
NAMES = sorted(p.stem for p in (FIXTURES / "configs").glob("*.yaml"))


def _data(name: str) -> dict:
    return yaml.safe_load((FIXTURES / "configs" / f"{name}.yaml").read_text())


def _config(data: dict, semantics: str = "mergekit") -> MergeConfig:
    return MergeConfig.from_dict({**data, "semantics": semantics}, base_dir=str(INPUTS))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("model-*.safetensors"):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_bit_identical_to_mergekit(tmp_path, name):
    merge(_config(_data(name)), tmp_path / "out")
    expected = load_file(FIXTURES / "outputs" / name / "model.safetensors")
    actual = _tensors(tmp_path / "out")
    assert set(actual) == set(expected)
    mismatched = [n for n in expected if actual[n].dtype != expected[n].dtype or not torch.equal(actual[n], expected[n])]
    assert not mismatched, f"{len(mismatched)} tensors differ from mergekit, e.g. {mismatched[:3]}"
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    theirs = json.loads((FIXTURES / "outputs" / name / "config.json").read_text())
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"]
    assert ours["torch_dtype"] == theirs["dtype"]


@pytest.mark.parametrize("name", ["stack_repeat", "stack_scale"])
def test_passthrough_gives_mergekits_bytes_under_the_default_semantics_too(tmp_path, name):
    # a copy, or one product rounded once: float32 arithmetic gives what mergekit's bf16 multiply gives
    merge(_config(_data(name), "default"), tmp_path / "out")
    expected = load_file(FIXTURES / "outputs" / name / "model.safetensors")
    assert all(torch.equal(t, expected[n]) for n, t in _tensors(tmp_path / "out").items())


def test_the_plan_maps_output_layers_to_input_layers():
    the_plan = plan_merge(_config(_data("stack_two")))
    assert the_plan.layers == 7 and the_plan.reference.endswith("deep_ft1")  # config.json: the first slice's model
    labels = [the_plan.reference, *the_plan.sources]
    reads = {t.name: [(Path(labels[i]).name, n) for i, n in t.inputs] for t in the_plan.tensors}
    assert reads["model.layers.2.mlp.up_proj.weight"] == [("deep_ft1", "model.layers.2.mlp.up_proj.weight")]
    assert reads["model.layers.3.mlp.up_proj.weight"] == [("deep_ft2", "model.layers.1.mlp.up_proj.weight")]
    assert reads["model.layers.6.input_layernorm.weight"] == [("deep_ft2", "model.layers.4.input_layernorm.weight")]
    # embeddings from the first slice's model, final norm and lm_head from the last slice's
    assert reads["model.embed_tokens.weight"] == [("deep_ft1", "model.embed_tokens.weight")]
    assert reads["model.norm.weight"] == [("deep_ft2", "model.norm.weight")]
    assert reads["lm_head.weight"] == [("deep_ft2", "lm_head.weight")]
    assert [t.name for t in the_plan.tensors][:2] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
    # a merged slice: the base first, then each fine-tune's corresponding (here shifted) layer
    merged = plan_merge(_config(_data("slices_ties")))
    labels = [merged.reference, *merged.sources]
    tp = next(t for t in merged.tensors if t.name == "model.layers.1.self_attn.q_proj.weight")
    assert [(Path(labels[i]).name, n) for i, n in tp.inputs] == [
        ("deep_base", "model.layers.1.self_attn.q_proj.weight"), ("deep_ft1", "model.layers.1.self_attn.q_proj.weight"),
        ("deep_ft2", "model.layers.2.self_attn.q_proj.weight")]
    assert tp.weights == (1.0, 0.5) and tp.densities == (0.6, 0.5) and tp.lam == 0.9  # gradient [0.2, 0.8] at t = 1/2


def test_transformers_loads_and_runs_the_stacked_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    merge(_config(_data("stack_two")), tmp_path / "out", max_shard_size=20_000)
    ours, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert ours.config.num_hidden_layers == 7 and len(ours.model.layers) == 7
    theirs = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "outputs" / "stack_two")
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    logits = ours(ids).logits
    assert logits.shape == (1, 5, 32) and torch.isfinite(logits).all()
    assert torch.equal(logits, theirs(ids).logits)


def test_passthrough_copies_stream_straight_through(tmp_path, monkeypatch):
    # no scale, the inputs' dtype: every tensor's mapped bytes go to the writer, no merge arithmetic
    calls = []
    for backend in (engine.NumpyBackend, engine.TorchBackend):
        monkeypatch.setattr(backend, "merge", lambda self, *a, real=backend.merge: calls.append(1) or real(self, *a))
    merge(_config(_data("stack_two")), tmp_path / "out", max_memory=1 << 20)
    assert len(_tensors(tmp_path / "out")) == 3 + 7 * 9 and not calls
    merge(_config(_data("stack_repeat")), tmp_path / "f16", max_memory=1 << 20)  # through mergekit's dtype: merged
    assert len(calls) == 3 + 9 * 9


def test_passthrough_of_one_whole_model_copies_it(tmp_path):
    data = {"merge_method": "passthrough", "models": [{"model": "deep_ft3"}]}
    merge(_config(data, "default"), tmp_path / "out")
    expected = load_file(INPUTS / "deep_ft3" / "model.safetensors")
    actual = _tensors(tmp_path / "out")
    assert set(actual) == set(expected) and all(torch.equal(t, expected[n]) for n, t in actual.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_a_slice_over_whole_models_still_merges_them_whole():
    data = _data("partial_task_arithmetic")
    for s in data["slices"][0]["sources"]:
        s["layer_range"] = [0, 5]
    the_plan = plan_merge(_config(data))
    assert the_plan.layers is None and not any(t.inputs for t in the_plan.tensors)


def test_split_and_resumed_runs_give_the_same_bytes_and_the_mapping_is_fingerprinted(tmp_path):
    single, split = split_run_hashes(_config(_data("slices_ties")), tmp_path, 2_000)
    assert len(single) > 2 and split == single
    # the same output names and shapes read from other input layers: a different merge
    data = _data("slices_ties")
    data["slices"][0]["sources"][2]["layer_range"] = [2, 5]
    with pytest.raises(OutputError, match="holds a different merge"):
        merge(_config(data), tmp_path / "one", max_shard_size=2_000)


def _stack(*slices, method="passthrough", **more) -> dict:
    return {"merge_method": method, "slices": [{"sources": list(s)} for s in slices], **more}


def _src(model, start, end, **params) -> dict:
    return {"model": model, "layer_range": [start, end], **({"parameters": params} if params else {})}


def test_slice_errors_name_the_slice_and_key():
    cases = [
        (_stack([_src("deep_ft1", 0, 2), _src("deep_ft2", 0, 3)], method="linear"),
         r"slices\[0\]: layer ranges \[\[0, 2\], \[0, 3\]\] differ in length"),
        (_stack([_src("deep_ft1", 2, 2)]), r"slices\[0\].sources\[0\].layer_range: \[2, 2\] is empty or reversed"),
        (_stack([_src("deep_ft1", 0, 2), _src("deep_ft1", 2, 4)], method="linear"),
         r"slices\[0\].sources\[1\]: model 'deep_ft1' is already a source of this slice"),
        (_stack([_src("deep_ft1", 0, 2)], [_src("deep_ft1", 0, 2), _src("deep_ft2", 0, 2)]),
         r"slices\[1\].sources: passthrough copies one model per slice, got 2"),
        (_stack([_src("deep_ft1", 0, 2)], [{"model": "deep_ft2"}]),
         r"slices\[1\].sources\[0\]: expected a mapping with 'model' and 'layer_range'"),
        ({"merge_method": "passthrough", "models": [{"model": "deep_ft1"}, {"model": "deep_ft2"}]},
         r"models: passthrough copies one model, got 2"),
        (_stack([_src("deep_ft1", 0, 2)], [_src("deep_ft2", 0, 2, scale=[{"filter": "mlp"}])]),
         r"slices\[1\].sources\[0\].parameters.scale: each filter entry needs 'value'"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            _config(data).validate()


def test_layer_and_model_errors_name_the_slice(tmp_path):
    with pytest.raises(MismatchError, match=r"slices\[1\].sources\[0\].layer_range: \[3, 7\] goes past deep_ft2's 5 layers"):
        plan_merge(_config(_stack([_src("deep_ft1", 0, 2)], [_src("deep_ft2", 3, 7)])))
    with pytest.raises(MismatchError, match=r"slices\[0\]: base_model 'deep_base' is not one of the slice's sources"):
        plan_merge(_config(_stack([_src("deep_ft1", 0, 2), _src("deep_ft2", 0, 2)], [_src("deep_base", 2, 4)],
                                  method="ties", base_model="deep_base")))
    with pytest.raises(StreammergeError, match="no_such_model"):
        plan_merge(_config(_stack([_src("deep_ft1", 0, 2)], [_src("no_such_model", 0, 2)])))
    with pytest.raises(ConfigError, match="tokenizer_source: not supported with layer stacking"):
        plan_merge(_config(_stack([_src("deep_ft1", 0, 2)], [_src("deep_ft2", 0, 2)], tokenizer_source="base")))
