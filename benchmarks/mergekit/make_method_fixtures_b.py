"""Build the mergekit 0.1.5 fixtures of sce, nearswap, arcee_fusion, ram and ramplus_tl under
tests/fixtures/mergekit_methods_b/.

Run with the interpreter of the mergekit venv (see install.sh):

    /work/main/benchmarks/mergekit/.venv/bin/python benchmarks/mergekit/make_method_fixtures_b.py

A 3-layer Llama (hidden 8) as a base and three fine-tunes, stored as bf16, fp16 and fp32 (each cast
once from the same float32 values), merged by the real ``mergekit-yaml`` (CPU) with the configs
below. Most deltas are sparse (each element changed with probability 0.6, so a position has 0-3
contributors: ram's unique and shared cases); SPECIAL tensors hit the other branches.

Layout (FIX = tests/fixtures/mergekit_methods_b):
    FIX/inputs/{base,ft1,ft2,ft3}{,_fp16,_fp32}/config.json + model.safetensors
    FIX/configs/<name>.yaml      model paths relative to FIX/inputs (mergekit runs there)
    FIX/outputs/<name>/model.safetensors
    FIX/manifest.json            sha256 of every file, versions, and `cases`: each config's method,
                                 models (non-base, in order), base, parameters, dtype, out_dtype

`arcee_fusion_fp32` depends on the CPU kernels torch picks (the manifest's `cpu_capability`): its
float32 softmax and log round differently under AVX512 and AVX2, so the tests compare it only on a
machine of the recorded capability (tests/conftest.py, CAPABILITY_BOUND).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit_run import mergekit_yaml, write_manifest  # beside this script

HERE = Path(__file__).resolve().parent
FIX = HERE.parent.parent / "tests" / "fixtures" / "mergekit_methods_b"
SEED = 20260116
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 8, 16, 3, 2, 1, 32
DTYPES = {"": torch.bfloat16, "_fp16": torch.float16, "_fp32": torch.float32}
MODELS = ("ft1", "ft2", "ft3")

# tensor -> how the fine-tunes relate to the base there (and which branch that takes)
SPECIAL = {
    "model.layers.0.self_attn.k_proj.weight": "all_equal",  # τ = 0 everywhere: sce k = 0 / equal weights; ram no contributor
    "model.layers.1.self_attn.v_proj.weight": "one_equal",  # ft1 = base: a zero task vector among others
    "model.layers.1.mlp.gate_proj.weight": "quantized",  # deltas on a 2⁻⁶ grid: many equal variances (top-k ties)
    "model.layers.2.mlp.up_proj.weight": "tiny",  # |τ| ~ 3e-4: sce's Σ mean(τ²) < 1e-6 (equal weights)
    "model.layers.0.mlp.down_proj.weight": "dense",  # every element changed by every model
    "model.layers.2.self_attn.q_proj.weight": "half_rows",  # rows 0-3 unchanged: arcee_fusion KL = 0 there
    "model.embed_tokens.weight": "few_rows",  # 4 changed token rows
}


def llama_config(dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "head_dim": HIDDEN // HEADS, "hidden_act": "silu", "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": INTER, "max_position_embeddings": 128, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": dtype, "use_cache": True,
        "vocab_size": VOCAB,
    }


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    hd = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * hd, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * hd, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HEADS * hd),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def build_inputs() -> dict[str, dict[str, torch.Tensor]]:
    """float32 values of the base and the fine-tunes; every stored dtype is cast from these."""
    g = torch.Generator().manual_seed(SEED)
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in ("base", *MODELS)}
    for name, shape in tensor_shapes().items():
        kind = SPECIAL.get(name)
        norm = name.endswith("norm.weight")
        b = 1.0 + 0.05 * torch.randn(shape, generator=g) if norm else 0.05 * torch.randn(shape, generator=g)
        if kind == "quantized":
            b = torch.randint(-8, 9, shape, generator=g) * 2.0**-6
        out["base"][name] = b
        for i, m in enumerate(MODELS):
            noise = 0.05 * torch.randn(shape, generator=g)
            changed = torch.rand(shape, generator=g) < 0.6
            if norm:  # norms move by whole bf16 steps near 1
                delta = torch.round(3 * torch.randn(shape, generator=g)) * 2.0**-7 * changed
            elif kind == "quantized":
                delta = torch.randint(-2, 3, shape, generator=g) * 2.0**-6
            elif kind == "tiny":
                delta = 3e-4 * torch.randn(shape, generator=g)
            elif kind == "dense":
                delta = noise
            else:
                delta = noise * changed
            if kind == "all_equal" or (kind == "one_equal" and i == 0):
                delta = torch.zeros(shape)
            elif kind == "half_rows":
                delta[:4] = 0
            elif kind == "few_rows":
                delta[4:] = 0
            out[m][name] = b + delta
    return out


# name -> (method, models (non-base, config order), dtype suffix of the inputs, parameters, dtype, out_dtype)
CASES: dict[str, tuple] = {
    # sce: select_topk 1 (default, unset), < 1, 0; int8_mask; 2 and 3 models; each input dtype
    "sce_bf16_default": ("sce", MODELS, "", {}, "bfloat16", None),
    "sce_bf16_topk05": ("sce", MODELS, "", {"select_topk": 0.5}, "bfloat16", None),
    "sce_bf16_topk03_int8": ("sce", MODELS, "", {"select_topk": 0.3, "int8_mask": True}, "bfloat16", None),
    "sce_bf16_topk0": ("sce", ("ft1", "ft2"), "", {"select_topk": 0.0}, "bfloat16", None),
    "sce_fp16_topk07": ("sce", ("ft2", "ft3"), "_fp16", {"select_topk": 0.7}, "float16", None),
    "sce_fp32_topk05": ("sce", MODELS, "_fp32", {"select_topk": 0.5}, None, None),
    "sce_fp32_dtype_bf16": ("sce", ("ft3", "ft1"), "_fp32", {"select_topk": 0.25}, "bfloat16", None),
    "sce_bf16_one_model": ("sce", ("ft2",), "", {"select_topk": 0.6}, "bfloat16", "float32"),
    # nearswap: t = 0, t = 1 (every difference below it: the other model), t between the deltas' scale
    "nearswap_bf16_t001": ("nearswap", ("ft1",), "", {"t": 0.01}, "bfloat16", None),
    "nearswap_bf16_t0": ("nearswap", ("ft2",), "", {"t": 0}, "bfloat16", None),
    "nearswap_bf16_t1": ("nearswap", ("ft3",), "", {"t": 1.0}, "bfloat16", None),
    "nearswap_fp16": ("nearswap", ("ft1",), "_fp16", {"t": 0.02}, "float16", None),
    "nearswap_fp32": ("nearswap", ("ft2",), "_fp32", {"t": 0.005}, None, None),
    # arcee_fusion: float32 results (mergekit's mask), unless out_dtype
    "arcee_fusion_bf16": ("arcee_fusion", ("ft1",), "", {}, "bfloat16", None),
    "arcee_fusion_bf16_out_bf16": ("arcee_fusion", ("ft2",), "", {}, "bfloat16", "bfloat16"),
    "arcee_fusion_fp16": ("arcee_fusion", ("ft3",), "_fp16", {}, "float16", None),
    "arcee_fusion_fp32": ("arcee_fusion", ("ft1",), "_fp32", {}, None, None),
    # ram: epsilon default, large, 0
    "ram_bf16": ("ram", MODELS, "", {}, "bfloat16", None),
    "ram_bf16_eps002": ("ram", MODELS, "", {"epsilon": 0.02}, "bfloat16", None),
    "ram_fp16": ("ram", ("ft1", "ft3"), "_fp16", {}, "float16", None),
    "ram_fp32_eps0": ("ram", MODELS, "_fp32", {"epsilon": 0}, None, None),
    # ramplus_tl: defaults, r/alpha/epsilon set, ε = 0 (NaN for a tensor no model changed), 1 model
    "ramplus_tl_bf16": ("ramplus_tl", MODELS, "", {}, "bfloat16", None),
    "ramplus_tl_bf16_r05_a1": ("ramplus_tl", MODELS, "", {"r": 0.5, "alpha": 1.0, "epsilon": 0.01}, "bfloat16", None),
    "ramplus_tl_fp16": ("ramplus_tl", ("ft2", "ft3"), "_fp16", {"r": 1.0, "alpha": 0.05}, "float16", None),
    "ramplus_tl_fp32_eps0": ("ramplus_tl", MODELS, "_fp32", {"epsilon": 0}, None, None),
    "ramplus_tl_bf16_one_model": ("ramplus_tl", ("ft1",), "", {"r": 0.3}, "bfloat16", "bfloat16"),
}


def config_text(method: str, models: tuple[str, ...], suffix: str, params: dict, dtype: str | None,
                out_dtype: str | None) -> str:
    lines = ["models:"] + [f"  - model: {m}{suffix}" for m in models]
    lines += [f"merge_method: {method}", f"base_model: base{suffix}"]
    if params:
        lines += ["parameters:"] + [f"  {k}: {json.dumps(v)}" for k, v in params.items()]
    if dtype:
        lines.append(f"dtype: {dtype}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return "\n".join(lines) + "\n"


def save_model(folder: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(llama_config(name), indent=2, sort_keys=True) + "\n")
    save_file({k: v.to(dtype).contiguous() for k, v in sorted(tensors.items())}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def run_cli(name: str) -> None:
    with mergekit_yaml(FIX / "configs" / f"{name}.yaml", FIX / "inputs") as out:
        (shard,) = out.glob("*.safetensors")
        (FIX / "outputs" / name).mkdir(parents=True)
        shutil.copyfile(shard, FIX / "outputs" / name / "model.safetensors")


def main() -> None:
    from importlib.metadata import version

    for sub in ("inputs", "configs", "outputs"):
        shutil.rmtree(FIX / sub, ignore_errors=True)
        (FIX / sub).mkdir(parents=True)
    values = build_inputs()
    for suffix, dtype in DTYPES.items():
        for model, tensors in values.items():
            save_model(FIX / "inputs" / f"{model}{suffix}", tensors, dtype)
    cases = {}
    for name, (method, models, suffix, params, dtype, out_dtype) in CASES.items():
        (FIX / "configs" / f"{name}.yaml").write_text(config_text(method, models, suffix, params, dtype, out_dtype))
        cases[name] = {"method": method, "models": [m + suffix for m in models], "base": "base" + suffix,
                       "parameters": params, "dtype": dtype, "out_dtype": out_dtype}
        print("mergekit-yaml", name, flush=True)
        run_cli(name)
    write_manifest(FIX, {
        "generator": "benchmarks/mergekit/make_method_fixtures_b.py",
        "mergekit": version("mergekit"),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "special_tensors": SPECIAL,
        "cases": cases,
    }, limit=1_500_000)


if __name__ == "__main__":
    main()
