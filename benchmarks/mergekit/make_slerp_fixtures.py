"""Build the mergekit 0.1.5 slerp fixtures under tests/fixtures/mergekit_slerp/.

Run with the interpreter of the mergekit venv (see install.sh):

    /work/mergekit-venv/bin/python benchmarks/mergekit/make_slerp_fixtures.py

A 5-layer bf16 Llama (hidden 8) and one fine-tune, also stored as float16 and float32 (each cast
once from the same float32 values), merged by the real ``mergekit-yaml`` (CPU) with the configs
below. Most tensors of the fine-tune are 0.6·θ₀ + 0.8·noise (cos Ω ≈ 0.6, far from the lerp
fallback); the norms move by 2⁻⁹ steps (cos Ω > 0.9995: mergekit's lerp), and a few tensors are
chosen to hit each branch (SPECIAL below): equal, opposite, nearly parallel, just below the
threshold, and all-zero tensors.

Layout (FIX = tests/fixtures/mergekit_slerp):
    FIX/inputs/{base,ft}{,_fp16,_fp32}/config.json + model.safetensors
    FIX/configs/<name>.yaml      model paths relative to FIX/inputs (mergekit runs there)
    FIX/outputs/<name>/model.safetensors
    FIX/manifest.json            sha256 of every file, versions
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from mergekit_run import mergekit_yaml, write_manifest  # beside this script
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIX = HERE.parent.parent / "tests" / "fixtures" / "mergekit_slerp"
SEED = 20251122
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 8, 16, 5, 2, 1, 32
DTYPES = {"": torch.bfloat16, "_fp16": torch.float16, "_fp32": torch.float32}

# tensor -> how the fine-tune relates to the base there (and which branch of slerp that takes)
SPECIAL = {
    "model.layers.1.self_attn.k_proj.weight": "equal",  # cos Ω = 1: lerp
    "model.layers.2.mlp.up_proj.weight": "opposite",  # cos Ω = -1: lerp
    "model.layers.3.self_attn.v_proj.weight": "near",  # cos Ω ≈ 0.99995: lerp
    "model.layers.0.mlp.gate_proj.weight": "below",  # cos Ω ≈ 0.999: slerp with a small angle
    "model.layers.4.post_attention_layernorm.weight": "zero_base",  # ‖θ₀‖ = 0 (taken as 1)
    "model.layers.4.input_layernorm.weight": "zero_ft",  # ‖θ₁‖ = 0
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


def build_inputs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """float32 values of the base and the fine-tune; every stored dtype is cast from these."""
    g = torch.Generator().manual_seed(SEED)
    base, ft = {}, {}
    for name, shape in tensor_shapes().items():
        noise = 0.05 * torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            b = 1.0 + 0.05 * torch.randn(shape, generator=g)
            f = b + torch.round(3 * torch.randn(shape, generator=g)) * 2.0**-9
        else:
            b = 0.05 * torch.randn(shape, generator=g)
            f = 0.6 * b + 0.8 * noise
        kind = SPECIAL.get(name)
        if kind == "equal":
            f = b.clone()
        elif kind == "opposite":
            f = -b
        elif kind == "near":
            f = b + 0.01 * noise
        elif kind == "below":
            f = b + 0.045 * noise
        elif kind == "zero_base":
            b = torch.zeros(shape)
        elif kind == "zero_ft":
            f = torch.zeros(shape)
        base[name], ft[name] = b, f
    return base, ft


CONFIGS = {
    # the base listed among the models, a scalar t
    "slerp_bf16_scalar": """\
models:
  - model: base
  - model: ft
merge_method: slerp
base_model: base
parameters:
  t: 0.3
dtype: bfloat16
""",
    # the base not listed (mergekit adds it); a model-level t, which mergekit ignores; no dtype
    "slerp_bf16_unlisted": """\
models:
  - model: ft
    parameters:
      t: 0.9
merge_method: slerp
base_model: base
parameters:
  t: 0.7
""",
    # the community form: slices, a t gradient per self_attn / mlp, a fallback value
    "slerp_bf16_gradient_filters": """\
slices:
  - sources:
      - model: base
        layer_range: [0, 5]
      - model: ft
        layer_range: [0, 5]
merge_method: slerp
base_model: base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    # the slice's t wins over the top-level one
    "slerp_bf16_slice_t": """\
slices:
  - sources:
      - model: ft
        layer_range: [0, 5]
      - model: base
        layer_range: [0, 5]
    parameters:
      t: [0.1, 0.9]
merge_method: slerp
base_model: base
parameters:
  t: 0.5
dtype: bfloat16
""",
    "slerp_bf16_t0": """\
models:
  - model: ft
merge_method: slerp
base_model: base
parameters:
  t: 0
dtype: bfloat16
""",
    "slerp_bf16_t1": """\
models:
  - model: ft
merge_method: slerp
base_model: base
parameters:
  t: 1.0
dtype: bfloat16
""",
    # bf16 inputs computed in float32 (dtype), written as bf16 (out_dtype)
    "slerp_bf16_dtype_fp32": """\
models:
  - model: ft
merge_method: slerp
base_model: base
parameters:
  t: 0.45
dtype: float32
out_dtype: bfloat16
""",
    "slerp_fp16": """\
models:
  - model: ft_fp16
merge_method: slerp
base_model: base_fp16
parameters:
  t: [0.2, 0.8]
dtype: float16
""",
    "slerp_fp32": """\
models:
  - model: ft_fp32
merge_method: slerp
base_model: base_fp32
parameters:
  t: 0.45
""",
    # float32 inputs cast to bf16 when loaded (dtype), merged and written in bf16
    "slerp_fp32_dtype_bf16": """\
models:
  - model: ft_fp32
merge_method: slerp
base_model: base_fp32
parameters:
  t: 0.6
dtype: bfloat16
""",
}


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
    base, ft = build_inputs()
    for suffix, dtype in DTYPES.items():
        save_model(FIX / "inputs" / f"base{suffix}", base, dtype)
        save_model(FIX / "inputs" / f"ft{suffix}", ft, dtype)
    for name, text in CONFIGS.items():
        (FIX / "configs" / f"{name}.yaml").write_text(text)
        print("mergekit-yaml", name, flush=True)
        run_cli(name)
    write_manifest(FIX, {
        "generator": "benchmarks/mergekit/make_slerp_fixtures.py",
        "mergekit": version("mergekit"),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "special_tensors": SPECIAL,
    }, limit=400_000)


if __name__ == "__main__":
    main()
