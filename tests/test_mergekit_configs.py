"""mergekit's own example configs (examples/ties.yml, examples/bio-merge.yml, a slices form), run
unchanged apart from the model names, on generated checkpoints. Every per-tensor parameter is
checked against an independent transcription of mergekit 0.1.5's resolution rules written here
(config.evaluate_setting, parameter_resolver, plan.plan_slice), and the merged tensors against an
independent float32 TIES. (Bit-exactness with mergekit's own output: test_mergekit_compat.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from conftest import write_tokenizer
from safetensors.torch import load_file

from streammerge import MergeConfig, merge
from streammerge import plan as plan_merge
from streammerge.front.config import layer_index
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint

SHAPE = TinyLlama(hidden=32, intermediate=48, layers=5, heads=4, kv_heads=2, vocab=40)
N_LAYERS = SHAPE.layers

# examples/ties.yml (arcee-ai/mergekit), model names replaced by local folders
TIES_YML = """\
models:
  - model: orca_mini # psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: platypus # garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: wizardmath # WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: llama2 # TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

# examples/bio-merge.yml
BIO_MERGE_YML = """\
models:
  - model: instruct # mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: biomistral # BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: llama2 # mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""

# the ties.yml merge written as slices: the same tensors; a slice-level default below the sources
SLICES_YML = """\
slices:
  - sources:
      - model: llama2
        layer_range: [0, 5]
      - model: orca_mini
        layer_range: [0, 5]
        parameters: {density: [1, 0.7, 0.1], weight: 1.0}
      - model: platypus
        layer_range: [0, 5]
        parameters: {weight: [0, 0.3, 0.7, 1]}
      - model: wizardmath
        layer_range: [0, 5]
        parameters:
          density: 0.33
          weight: [{filter: mlp, value: 0.5}]
    parameters:
      density: 0.5
      weight: 0
merge_method: ties
base_model: llama2
parameters:
  normalize: true
  int8_mask: true
  weight: 0.9
dtype: float16
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    base = random_state(SHAPE, seed=3)
    save_checkpoint(base, root / "llama2", shards=2, config=SHAPE.config_json(torch.bfloat16))
    for i, name in enumerate(["orca_mini", "platypus", "wizardmath", "instruct", "biomistral"]):
        save_checkpoint(finetune_of(base, seed=60 + i, scale=0.01), root / name, shards=1, config=SHAPE.config_json(torch.bfloat16))
    return root


# ---- mergekit 0.1.5's resolution rules, transcribed independently ------------------------------


def mk_evaluate(setting, tensor: str, t: float):
    """config.evaluate_setting for a float parameter: None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and all(isinstance(e, dict) for e in setting):
        for cond in setting:
            if cond.get("filter") is None or cond["filter"] == "*" or cond["filter"] in tensor:
                return mk_evaluate(cond["value"], tensor, t)
        return None
    if isinstance(setting, list):
        values = [float(v) for v in setting]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return float(setting)


def mk_t(tensor: str) -> float:
    """plan.plan_slice: layer i of n at i / (n - 1); pre- and post-layer weights are planned at t = 0."""
    m = re.search(r"\.layers\.(\d+)\.", tensor)
    return 0.0 if m is None else int(m.group(1)) / (N_LAYERS - 1)


def mk_parameter(data: dict, model: str, key: str, tensor: str, default):
    """parameter_resolver.resolve_parameter over ConfigReader.parameter_sources(model)."""
    scopes = []
    if "slices" in data:
        out_slice = data["slices"][0]
        scopes += [s.get("parameters") for s in out_slice["sources"] if s["model"] == model]
        scopes.append(out_slice.get("parameters"))
    else:
        scopes += [m.get("parameters") for m in data["models"] if m["model"] == model]
    scopes.append(data.get("parameters"))
    for scope in scopes:
        if scope and key in scope:
            value = mk_evaluate(scope[key], tensor, mk_t(tensor))
            if value is not None:
                return value
    if default is None:
        raise AssertionError(f"mergekit: Missing required parameter {key} for {model}.{tensor}")
    return default


def mk_finetunes(data: dict) -> list[str]:
    entries = data["slices"][0]["sources"] if "slices" in data else data["models"]
    return [e["model"] for e in entries if e["model"] != data["base_model"]]


def ties_reference(base, fts, weights, densities, normalize: bool) -> torch.Tensor:
    """TIES in float32 on whole tensors: top-k (ties lower index first), weighted vote, disjoint mean or sum."""
    b = base.float()
    taus = []
    for ft, d in zip(fts, densities):
        tau = (ft.float() - b).flatten()
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[torch.sort(tau.abs(), descending=True, stable=True).indices[: int(d * tau.numel())]] = True
        taus.append((tau * keep).view(b.shape))
    weighted = [w * t for w, t in zip(weights, taus)]
    gamma = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [(torch.sign(v) == gamma).float() for v in weighted]
    merged = sum(v * a for v, a in zip(weighted, agree))
    if normalize:
        den = sum(w * a for w, a in zip(weights, agree))
        merged = merged / torch.where(den == 0, 1.0, den)
    return b + merged


# ---- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [TIES_YML, BIO_MERGE_YML, SLICES_YML], ids=["ties.yml", "bio-merge.yml", "slices"])
def test_example_config_resolves_and_merges_as_mergekit_defines(tmp_path, folder, text):
    path = folder / f"{tmp_path.name}.yml"
    path.write_text(text)
    data = yaml.safe_load(text)
    cfg = MergeConfig.from_yaml(path)
    the_plan = plan_merge(cfg)
    names = mk_finetunes(data)
    resolved = {}
    for tp in the_plan.tensors:
        weights = tuple(mk_parameter(data, m, "weight", tp.name, None) for m in names)
        densities = tuple(mk_parameter(data, m, "density", tp.name, 1.0) for m in names)
        assert tp.merged and tp.weights == weights and tp.densities == densities, tp.name
        resolved[tp.name] = weights, densities
    # the resolution is not trivial: gradients interpolate, the filter splits mlp from the rest
    distinct = {r for r in resolved.values()}
    assert len(distinct) >= (1 if "bio" in text else 8)

    merge(cfg, tmp_path / "out")
    out = {}
    for shard in (tmp_path / "out").glob("model-*.safetensors"):
        out.update(load_file(shard))
    base = load_file(folder / "llama2" / "model-00001-of-00002.safetensors") | load_file(folder / "llama2" / "model-00002-of-00002.safetensors")
    fts = [load_file(folder / m / "model.safetensors") for m in names]
    normalize = data["parameters"]["normalize"]
    for name, (weights, densities) in resolved.items():
        expected = ties_reference(base[name], [f[name] for f in fts], weights, densities, normalize).to(torch.float16)
        assert out[name].dtype == torch.float16
        torch.testing.assert_close(out[name].float(), expected.float(), rtol=2**-10, atol=1e-7, msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


@pytest.mark.slow
def test_slices_form_gives_the_models_form_bytes(tmp_path, folder):
    # SLICES_YML says what TIES_YML says (its slice defaults fill exactly the gaps ties.yml leaves):
    (folder / "a.yml").write_text(TIES_YML)
    (folder / "b.yml").write_text(SLICES_YML.replace("      density: 0.5\n      weight: 0\n", "      weight: 0\n")
                                  .replace("parameters: {weight: [0, 0.3, 0.7, 1]}", "parameters: {weight: [0, 0.3, 0.7, 1], density: 0.5}")
                                  .replace("weight: [{filter: mlp, value: 0.5}]", "weight: [{filter: mlp, value: 0.5}, {value: 0}]"))
    merge(MergeConfig.from_yaml(folder / "a.yml"), tmp_path / "a")
    merge(MergeConfig.from_yaml(folder / "b.yml"), tmp_path / "b")
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*.safetensors"))
    assert shards and all((tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in shards)


def test_a_partial_layer_range_stacks_those_layers(tmp_path, folder):
    (folder / "partial.yml").write_text(SLICES_YML.replace("[0, 5]", "[0, 4]"))
    the_plan = plan_merge(MergeConfig.from_yaml(folder / "partial.yml"))
    assert the_plan.layers == 4 and {layer_index(t.name) for t in the_plan.tensors} == {None, 0, 1, 2, 3}


def test_tokenizer_source_base_a_model_or_a_folder(tmp_path, folder):
    tokens = [f"t{i}" for i in range(SHAPE.vocab)]
    write_tokenizer(folder / "llama2", tokens)
    write_tokenizer(folder / "platypus", tokens[::-1])  # the same tokens, ids reversed
    only_tok = folder / "tok_only"
    only_tok.mkdir(exist_ok=True)
    write_tokenizer(only_tok, tokens[:-1])
    (only_tok / "tokenizer_config.json").unlink()
    text = BIO_MERGE_YML.replace("instruct #", "platypus #").replace("merge_method: ties", "merge_method: task_arithmetic")
    embeds = {}
    for source, expected in [("base", "llama2"), ("platypus", "platypus"), ("llama2", "llama2"), ("tok_only", "tok_only"),
                             ("union", "llama2")]:
        (folder / "tok.yml").write_text(text + f"tokenizer_source: {source}\n")
        out = tmp_path / source
        merge(MergeConfig.from_yaml(folder / "tok.yml"), out)
        assert (out / "tokenizer.json").read_bytes() == (folder / expected / "tokenizer.json").read_bytes()
        assert (out / "tokenizer_config.json").exists() == (expected != "tok_only")
        embeds[source] = load_file(next(out.glob("model-*.safetensors")))["model.embed_tokens.weight"]
    # rows follow the source's ids: platypus' reverse the base's; a folder of 39 tokens keeps 39 rows
    assert torch.equal(embeds["platypus"], embeds["base"].flip(0)) and torch.equal(embeds["union"], embeds["base"])
    assert torch.equal(embeds["tok_only"], embeds["base"][:-1])
    assert json.loads((tmp_path / "tok_only" / "config.json").read_text())["vocab_size"] == SHAPE.vocab - 1
    # a named source without a tokenizer: one line, before any work
    (folder / "tok.yml").write_text(text + "tokenizer_source: biomistral\n")
    with pytest.raises(Exception, match=r"^tokenizer_source: 'biomistral' \(.*biomistral\) holds no tokenizer"):
        merge(MergeConfig.from_yaml(folder / "tok.yml"), tmp_path / "none")
    assert not (tmp_path / "none").exists()


# ---- the other official examples (arcee-ai/mergekit examples/), as written but for model names and
# layer counts (their 40-layer 13B models are this 5-layer model here) -----------------------------

GRADIENT_SLERP_YML = """\
slices:
  - sources:
      - model: orca_mini
        layer_range: [0, 5]
      - model: platypus
        layer_range: [0, 5]
merge_method: slerp
base_model: orca_mini
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""

LINEAR_YML = """\
models:
  - model: orca_mini
    parameters:
      weight: 1.0
  - model: instruct
    parameters:
      weight: 0.3
  - model: platypus
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

ORCAMINI_PLATY_YML = """\
slices:
  - sources:
    - model: orca_mini
      layer_range: [0, 3]
  - sources:
    - model: platypus
      layer_range: [2, 5]
merge_method: passthrough
dtype: float16
"""

MEGA_YML = GRADIENT_SLERP_YML + "name: gradient-slerp\n---\n" + """\
models:
  - model: gradient-slerp
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: wizardmath
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: llama2
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


@pytest.mark.parametrize("text", [GRADIENT_SLERP_YML, LINEAR_YML, ORCAMINI_PLATY_YML, MEGA_YML],
                         ids=["gradient-slerp.yml", "linear.yml", "orcamini-platy-44layer.yml", "mega.yml"])
def test_the_other_official_examples_run_as_they_are(folder, tmp_path, text):
    path = folder / f"{tmp_path.name}.yml"
    path.write_text(text)
    result = merge(MergeConfig.from_yaml(path), tmp_path / "out")
    assert result.tensors and (tmp_path / "out" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    dtypes = {t.dtype for shard in set(index["weight_map"].values()) for t in load_file(tmp_path / "out" / shard).values()}
    assert dtypes == {torch.float16}
    layers = json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"]
    assert layers == (6 if "passthrough" in text else 5)  # the frankenmerge stacks 3 + 3 layers
