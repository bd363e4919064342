"""Build the mergekit 0.1.5 reference fixtures under tests/fixtures/mergekit/.

Run with the interpreter of the mergekit venv (see install.sh):

    benchmarks/mergekit/.venv/bin/python benchmarks/mergekit/make_fixtures.py

Everything is deterministic: the inputs come from a fixed torch.Generator seed,
the merges from the real ``mergekit-yaml`` CLI (CPU), and the DARE merges from
mergekit's own code with the random keep-masks replaced by the masks stored in
``inputs/masks.safetensors`` (see README.md in the fixture folder).

Layout written (FIX = tests/fixtures/mergekit):
    FIX/inputs/{base,ft1,ft2,ft3}/config.json + model.safetensors   (bf16)
    FIX/inputs/masks.safetensors        DARE keep-masks, key "<model>/<tensor>"
    FIX/configs/<name>.yaml             mergekit configs; model paths are the
                                        bare names base/ft1/ft2/ft3, resolved
                                        relative to FIX/inputs (mergekit is run
                                        with cwd = FIX/inputs)
    FIX/outputs/<name>/model.safetensors + mergekit_config.yml
    FIX/manifest.json                   sha256 of every file + versions
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from mergekit_run import mergekit_yaml, write_manifest  # beside this script
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIX = REPO / "tests" / "fixtures" / "mergekit"
INPUTS = FIX / "inputs"
CONFIGS = FIX / "configs"
OUTPUTS = FIX / "outputs"

SEED = 20250101
BF16 = torch.bfloat16
MODELS = ("ft1", "ft2", "ft3")

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 16, 32, 2, 2, 1, 64
HEAD_DIM = HIDDEN // HEADS

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": HEAD_DIM,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": INTER,
    "max_position_embeddings": 128,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB,
}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


# Tensors in which a large block of elements gets an exactly tied |delta|
# (so the TIES threshold falls inside a group of equal magnitudes).
TIE_TENSORS = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "lm_head.weight",
    "model.layers.0.input_layernorm.weight",
)
# Sign-election ties: weighted sum exactly 0 with weights [1, 0.5, 0.25].
ELECT_TIE_TENSOR = "model.layers.1.self_attn.o_proj.weight"


def build_inputs() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    shapes = tensor_shapes()
    base: dict[str, torch.Tensor] = {}
    tie_region: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        if name in TIE_TENSORS:
            # 60% of the elements get |base| in [0.5, 1): there a delta of
            # -sign(base) * 2**-7 is exact in bf16 (ft - base == that delta).
            sel = torch.rand(shape, generator=g) < 0.60
            mag = 0.5 + 0.49 * torch.rand(shape, generator=g)
            sgn = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
            t = torch.where(sel, mag * sgn, t)
            tie_region[name] = sel
        if name == ELECT_TIE_TENSOR:
            spot = (torch.arange(t.numel()).reshape(shape) % 5) == 2
            t = torch.where(spot, torch.full(shape, 0.75), t)
        base[name] = t.to(BF16).contiguous()

    models: dict[str, dict[str, torch.Tensor]] = {"base": base}
    for mi, m in enumerate(MODELS):
        ft = {}
        for name, shape in shapes.items():
            b = base[name].float()
            delta = 0.01 * torch.randn(shape, generator=g)
            # ~10% of elements unchanged (delta exactly 0)
            zero = torch.rand(shape, generator=g) < 0.10
            delta = torch.where(zero, torch.zeros_like(delta), delta)
            t = (b + delta).to(BF16)
            if name in TIE_TENSORS:
                # each fine-tune: 80% of the tie region gets the exact tied delta
                sub = tie_region[name] & (torch.rand(shape, generator=g) < 0.80)
                tied = (b - torch.sign(b) * 2.0**-7).to(BF16)
                t = torch.where(sub, tied, t)
            if name == ELECT_TIE_TENSOR:
                # d1 = +2**-8, d2 = -2**-7, d3 = 0 on every 5th element:
                # 1*d1 + 0.5*d2 + 0.25*d3 == 0 exactly -> majority sign +1.
                spot = (torch.arange(t.numel()).reshape(shape) % 5) == 2
                d = (2.0**-8, -(2.0**-7), 0.0)[mi]
                t = torch.where(spot, (b + d).to(BF16), t)
            if m == "ft3" and name == "model.norm.weight":
                t = base[name].clone()  # an entirely unchanged tensor
            ft[name] = t.contiguous()
        models[m] = ft
    return models


def check_inputs(models):
    base = models["base"]
    for m in MODELS:
        for name, t in models[m].items():
            d = (t.float() - base[name].float()).abs().max().item()
            assert d < 0.1, (m, name, d)


def build_masks(models) -> dict[str, torch.Tensor]:
    """DARE keep-masks: mask[model/tensor] ~ Bernoulli(density_model), seeded."""
    g = torch.Generator().manual_seed(SEED + 1)
    masks = {}
    for m, p in zip(MODELS, DARE_DENSITY):
        for name, t in models["base"].items():
            masks[f"{m}/{name}"] = (
                torch.rand(t.shape, generator=g) < p
            ).to(torch.uint8).contiguous()
    return masks


W_TIES = (1.0, 0.5, 0.25)
DARE_DENSITY = (0.5, 0.7, 0.3)


def yaml_models(weights, densities=None, with_base=True):
    lines = ["models:"]
    for i, m in enumerate(MODELS):
        lines.append(f"  - model: {m}")
        lines.append("    parameters:")
        lines.append(f"      weight: {weights[i]}")
        if densities is not None:
            lines.append(f"      density: {densities[i]}")
    return "\n".join(lines)


def make_config(method, weights, densities=None, base=True, dtype="bfloat16",
                out_dtype=None, params=None):
    parts = [yaml_models(weights, densities), f"merge_method: {method}"]
    if base:
        parts.append("base_model: base")
    if params:
        parts.append("parameters:")
        for k, v in params.items():
            parts.append(f"  {k}: {json.dumps(v)}")
    if dtype:
        parts.append(f"dtype: {dtype}")
    if out_dtype:
        parts.append(f"out_dtype: {out_dtype}")
    return "\n".join(parts) + "\n"


D5 = (0.5, 0.5, 0.5)
CLI_CONFIGS = {
    # required by the brief
    "ties_bf16": make_config("ties", W_TIES, D5),
    "ties_fp32": make_config("ties", W_TIES, D5, dtype="float32"),
    "task_arithmetic_bf16": make_config("task_arithmetic", (0.3, 0.3, 0.3)),
    "task_arithmetic_lambda": make_config(
        "task_arithmetic", (0.3, 0.3, 0.3), params={"lambda": 0.7}),
    "linear_bf16": make_config("linear", (1, 2, 3), base=False),
    "linear_fp16": make_config("linear", (1, 2, 3), base=False, dtype="float16"),
    # extras that pin down less obvious rules
    "linear_bf16_out_fp16": make_config(
        "linear", (1, 2, 3), base=False, dtype="bfloat16", out_dtype="float16"),
    # float32 output with non-dyadic weights: exposes addcmul_'s fused
    # multiply-add (AVX2/AVX512 CPU kernels; see SEMANTICS_NOTES.md)
    "linear_fp32": make_config("linear", (0.3, 0.7, 1.1), base=False,
                               dtype="float32"),
    "ties_lambda_int8": make_config(
        "ties", W_TIES, (0.3, 0.6, 0.9),
        params={"lambda": 0.7, "int8_mask": True}),
    "ties_negweight_nonorm": make_config(
        "ties", (1.0, -0.5, 0.3), D5, params={"normalize": False}),
    "task_arithmetic_normalize": make_config(
        "task_arithmetic", W_TIES, params={"normalize": True}),
    "ties_nodtype": make_config("ties", W_TIES, D5, dtype=None),
}
CLI_CONFIGS.update({
    # Model Breadcrumbs: per-model gamma, then a global gamma with L1 rescale in float32
    "breadcrumbs_bf16": make_config("breadcrumbs", W_TIES, DARE_DENSITY) .replace(
        "      density: 0.5\n", "      density: 0.5\n      gamma: 0.05\n").replace(
        "      density: 0.3\n", "      density: 0.3\n      gamma: 0.2\n"),
    "breadcrumbs_ties_fp32": make_config(
        "breadcrumbs_ties", W_TIES, DARE_DENSITY, dtype="float32",
        params={"gamma": 0.1, "normalize": True, "rescale": True}),
    "ties_rescale": make_config("ties", W_TIES, (0.3, 0.6, 0.9), params={"rescale": True}),
})

# A 5-layer model, so that gradients interpolate (t = 0, .25, .5, .75, 1): the config forms of
# mergekit's examples/ties.yml and examples/bio-merge.yml, slices equal to models, filters.
DEEP = ("deep_base", "deep_ft1", "deep_ft2", "deep_ft3")
DEEP_DIMS = dict(hidden=8, inter=16, layers=5, heads=2, kv_heads=1, vocab=32)
DEEP_CONFIGS = {
    # examples/ties.yml: a density gradient, a weight gradient, a weight filter list
    "deep_ties_yml": """\
models:
  - model: deep_ft1
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: deep_ft2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: deep_ft3
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: deep_base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    # examples/bio-merge.yml: two fine-tunes, normalize false, int8_mask, float16
    "deep_bio_merge": """\
models:
  - model: deep_ft1
    parameters:
      density: 0.5
      weight: 0.5
  - model: deep_ft2
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: deep_base
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    # slices that say the same as models: source > slice > global precedence, a lambda gradient,
    # a numeric string (YAML reads 9e-1 as a string; mergekit's float accepts it), out_dtype
    "deep_slices_ties": """\
slices:
  - sources:
      - model: deep_base
        layer_range: [0, 5]
      - model: deep_ft1
        layer_range: [0, 5]
        parameters:
          weight: [0.2, 1.0]
          density: 0.8
      - model: deep_ft2
        layer_range: [0, 5]
        parameters:
          density:
            - filter: self_attn
              value: [0.9, 0.2]
      - model: deep_ft3
        layer_range: [0, 5]
    parameters:
      density:
        - filter: mlp
          value: 0.4
      weight: 0.6
merge_method: ties
base_model: deep_base
parameters:
  density: 0.7
  weight: 0.1
  lambda: [1.0, 9e-1, 0.5]
dtype: bfloat16
out_dtype: float32
""",
    # filters: '*', a single {filter, value} entry that falls through, gamma per filter, a gradient
    "deep_breadcrumbs_filters": """\
models:
  - model: deep_ft1
    parameters:
      weight: {filter: mlp, value: 0.7}
      density: [0.9, 0.5]
  - model: deep_ft2
    parameters:
      weight: 1.0
      gamma:
        - filter: self_attn
          value: 0.1
        - filter: "*"
          value: 0.02
  - model: deep_ft3
    parameters:
      weight: [1.0, 0.0]
merge_method: breadcrumbs_ties
base_model: deep_base
parameters:
  weight: 0.4
  density: 0.6
  gamma: 0.05
  normalize: true
dtype: bfloat16
""",
    # linear over slices: mergekit does not add the base to slice sources
    "deep_linear_slices": """\
slices:
  - sources:
      - model: deep_ft1
        layer_range: [0, 5]
        parameters: {weight: [1.0, 3.0]}
      - model: deep_ft2
        layer_range: [0, 5]
        parameters: {weight: 2.0}
merge_method: linear
base_model: deep_base
dtype: bfloat16
""",
}

# Run in-process with injected keep-masks (torch.bernoulli replaced).
DARE_CONFIGS = {
    "dare_linear_bf16": make_config("dare_linear", W_TIES, DARE_DENSITY),
    "dare_ties_bf16": make_config("dare_ties", W_TIES, DARE_DENSITY),
    "dare_ties_fp32": make_config("dare_ties", W_TIES, DARE_DENSITY,
                                  dtype="float32"),
    "dare_linear_norescale": make_config(
        "dare_linear", W_TIES, DARE_DENSITY, params={"rescale": False}),
    # DELLA: the stored mask replaces mergekit's bernoulli(probs); probs are kept (della_probs.safetensors)
    "della_bf16": make_config("della", W_TIES, DARE_DENSITY, params={"epsilon": 0.1, "lambda": 0.9}),
    "della_linear_fp32": make_config("della_linear", W_TIES, DARE_DENSITY, dtype="float32").replace(
        "      density: 0.3\n", "      density: 0.3\n      epsilon: 0.15\n"),
}


def deep_config() -> dict:
    d = DEEP_DIMS
    return {**LLAMA_CONFIG, "hidden_size": d["hidden"], "intermediate_size": d["inter"], "num_hidden_layers": d["layers"],
            "num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"], "vocab_size": d["vocab"],
            "head_dim": d["hidden"] // d["heads"]}


def build_deep_inputs() -> dict[str, dict[str, torch.Tensor]]:
    """Base ~ N(0, 0.05); deltas on a 2^-9 grid (many exact |delta| ties), ~10% zeros."""
    d = DEEP_DIMS
    hd = d["hidden"] // d["heads"]
    shapes = {"model.embed_tokens.weight": (d["vocab"], d["hidden"])}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d["hidden"],), p + "post_attention_layernorm.weight": (d["hidden"],),
            p + "self_attn.q_proj.weight": (d["heads"] * hd, d["hidden"]),
            p + "self_attn.k_proj.weight": (d["kv_heads"] * hd, d["hidden"]),
            p + "self_attn.v_proj.weight": (d["kv_heads"] * hd, d["hidden"]),
            p + "self_attn.o_proj.weight": (d["hidden"], d["heads"] * hd),
            p + "mlp.gate_proj.weight": (d["inter"], d["hidden"]), p + "mlp.up_proj.weight": (d["inter"], d["hidden"]),
            p + "mlp.down_proj.weight": (d["hidden"], d["inter"]),
        })
    shapes["model.norm.weight"] = (d["hidden"],)
    shapes["lm_head.weight"] = (d["vocab"], d["hidden"])
    g = torch.Generator().manual_seed(SEED + 7)
    base = {n: ((1.0 if n.endswith("norm.weight") else 0.0) + 0.05 * torch.randn(s, generator=g)).to(BF16) for n, s in shapes.items()}
    models = {"deep_base": base}
    for m in DEEP[1:]:
        ft = {}
        for n, s in shapes.items():
            steps = torch.round(3 * torch.randn(s, generator=g)) * 2.0**-9
            steps = torch.where(torch.rand(s, generator=g) < 0.10, torch.zeros(s), steps)
            ft[n] = (base[n].float() + steps).to(BF16).contiguous()
        models[m] = ft
    return models


def save_model(folder: Path, tensors, config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or LLAMA_CONFIG, indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(tensors.items())), str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def collect_output(tmp_out: Path, name: str):
    files = sorted(tmp_out.glob("*.safetensors"))
    assert len(files) == 1, files
    dest = OUTPUTS / name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files[0], dest / "model.safetensors")
    shutil.copyfile(CONFIGS / f"{name}.yaml", dest / "mergekit_config.yml")


def run_cli(name: str):
    with mergekit_yaml(CONFIGS / f"{name}.yaml", INPUTS) as out:
        collect_output(out, name)


@contextlib.contextmanager
def injected_masks(masks):
    """Replace mergekit's random DARE masks by the stored ones.

    GeneralizedTaskArithmeticMerge.merge_group calls sparsify() once per
    non-base entry, in config order; the mask for that call is
    masks["<model>/<tensor name>"].  torch.bernoulli is replaced by a function
    returning that mask in the dtype/shape mergekit asked for.
    """
    import mergekit.merge_methods.generalized_task_arithmetic as gta

    state = {}
    real_merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group
    real_sparsify = gta.sparsify
    real_bernoulli = torch.bernoulli

    def merge_group(self, group, /, **parameters):
        state["name"] = group.metadata.name
        state["models"] = [Path(str(e.id)).name for e in group.non_base]
        state["i"] = 0
        return real_merge_group(self, group, **parameters)

    def sparsify(tensor, *args, **kwargs):
        state["key"] = f"{state['models'][state['i']]}/{state['name']}"
        state["i"] += 1
        return real_sparsify(tensor, *args, **kwargs)

    def bernoulli(probs, *args, **kwargs):
        assert not args and not kwargs
        mask = masks[state["key"]]
        assert mask.numel() == probs.numel(), (state["key"], mask.shape, probs.shape)  # della: 1-D as [1, n]
        state.setdefault("used", set()).add(state["key"])
        state.setdefault("probs", {})[state["key"]] = probs.reshape(mask.shape).clone()
        return mask.reshape(probs.shape).to(dtype=probs.dtype, device=probs.device)

    gta.GeneralizedTaskArithmeticMerge.merge_group = merge_group
    gta.sparsify = sparsify
    torch.bernoulli = bernoulli
    try:
        yield state
    finally:
        gta.GeneralizedTaskArithmeticMerge.merge_group = real_merge_group
        gta.sparsify = real_sparsify
        torch.bernoulli = real_bernoulli


def run_dare(name: str, masks):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    with tempfile.TemporaryDirectory() as td, injected_masks(masks) as state:
        out = Path(td) / "out"
        cwd = os.getcwd()
        os.chdir(INPUTS)
        try:
            mergekit_yaml.main(
                [str(CONFIGS / f"{name}.yaml"), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                standalone_mode=False,
            )
        finally:
            os.chdir(cwd)
        n_expected = len(MODELS) * len(tensor_shapes())
        assert len(state.get("used", ())) == n_expected, len(state.get("used", ()))
        collect_output(out, name)
        if name.startswith("della"):  # mergekit's keep probabilities, to check ours bit for bit
            save_file(dict(sorted(state["probs"].items())), str(OUTPUTS / name / "probs.safetensors"),
                      metadata={"format": "pt"})


def main():
    from importlib.metadata import version

    import mergekit  # noqa: F401

    if FIX.exists():
        for sub in ("inputs", "configs", "outputs"):
            shutil.rmtree(FIX / sub, ignore_errors=True)
    for d in (INPUTS, CONFIGS, OUTPUTS):
        d.mkdir(parents=True, exist_ok=True)

    models = build_inputs()
    check_inputs(models)
    for m, tensors in models.items():
        save_model(INPUTS / m, tensors)
    for m, tensors in build_deep_inputs().items():
        save_model(INPUTS / m, tensors, deep_config())
    masks = build_masks(models)
    save_file(dict(sorted(masks.items())), str(INPUTS / "masks.safetensors"),
              metadata={"format": "pt"})

    for name, text in {**CLI_CONFIGS, **DEEP_CONFIGS, **DARE_CONFIGS}.items():
        (CONFIGS / f"{name}.yaml").write_text(text)
    for name in {**CLI_CONFIGS, **DEEP_CONFIGS}:
        print("mergekit-yaml", name, flush=True)
        run_cli(name)
    stored_masks = load_file(str(INPUTS / "masks.safetensors"))
    for name in DARE_CONFIGS:
        print("mergekit (injected masks)", name, flush=True)
        run_dare(name, stored_masks)

    write_manifest(FIX, {
        "generator": "benchmarks/mergekit/make_fixtures.py",
        "mergekit": version("mergekit"),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cli_outputs": sorted({**CLI_CONFIGS, **DEEP_CONFIGS}),
        "dare_outputs_injected_masks": sorted(DARE_CONFIGS),
    }, limit=1_500_000)


if __name__ == "__main__":
    main()
