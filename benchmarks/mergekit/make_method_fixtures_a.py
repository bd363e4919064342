"""Build the mergekit 0.1.5 fixtures of model_stock, nuslerp, multislerp and karcher under
tests/fixtures/mergekit_methods_a/.

Run with the interpreter of the mergekit venv (see install.sh):

    /work/main/benchmarks/mergekit/.venv/bin/python benchmarks/mergekit/make_method_fixtures_a.py

A 5-layer Llama (hidden 8), a base and three fine-tunes a, b, c, stored in bf16 and also in fp16 and
fp32 (each cast once from the same float32 values), merged by the real ``mergekit-yaml`` (CPU) with
the configs below. Most tensors of a fine-tune are θ₀ + τ with task vectors that share a common
part (pairwise cos ≈ 0.36); the tensors in SPECIAL reach the other branches: zero tensors and zero
task vectors (the norm clamps, multislerp's and karcher's zero-mean fallbacks, karcher's all-zero
result), equal and opposite tensors of norm exactly 1 (cos exactly ±1: nuslerp's colinear lerp,
model_stock's singular denominator, karcher's antipodes), nearly parallel task vectors, and two
[4, 8] tensors whose rows / columns each hit one of those cases (filter_wise, nuslerp per row and
per column).

None of these four methods is random. Their bytes depend on torch's CPU reductions (norms, sums,
dot products), whose order can change with the device (a GPU sums in another order) and, for tensors
over 32,768 elements, with the thread count; these tensors are small, so single-threaded.

Layout (FIX = tests/fixtures/mergekit_methods_a):
    FIX/inputs/{base,a,b,c}{,_fp16,_fp32}/config.json + model.safetensors
    FIX/configs/<name>.yaml      model paths relative to FIX/inputs (mergekit runs there)
    FIX/outputs/<name>/model.safetensors
    FIX/manifest.json            sha256 of every file, versions, the special tensors
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from make_slerp_fixtures import save_model, tensor_shapes  # beside this script: the same tiny Llama
from mergekit_run import mergekit_yaml, write_manifest

HERE = Path(__file__).resolve().parent
FIX = HERE.parent.parent / "tests" / "fixtures" / "mergekit_methods_a"
SEED = 20260116
DTYPES = {"": torch.bfloat16, "_fp16": torch.float16, "_fp32": torch.float32}
MODELS = ("base", "a", "b", "c")

# tensor -> how the models relate there (the branch each method takes is in the module docstring)
SPECIAL = {
    "model.layers.0.self_attn.k_proj.weight": "zero",  # θ₀ = a = b = 0, c random
    "model.layers.0.self_attn.v_proj.weight": "same",  # θ₀ = 0, a = b of norm exactly 1
    "model.layers.1.self_attn.k_proj.weight": "opposite",  # θ₀ = 0, a of norm 1, b = -a
    "model.layers.1.self_attn.v_proj.weight": "parallel",  # τ_b = 2 τ_a (up to rounding)
    "model.layers.2.self_attn.k_proj.weight": "no_delta",  # a = b = θ₀, c random
    "model.layers.2.self_attn.v_proj.weight": "one_zero_delta",  # a = θ₀
    "model.layers.3.self_attn.k_proj.weight": "near",  # τ_b = τ_a + 1e-4 noise
    "model.layers.3.self_attn.v_proj.weight": "rows",  # rows: all zero, a = b, b = -a, random
    "model.layers.4.self_attn.v_proj.weight": "columns",  # columns 0-2 as rows 0-2 above
    "model.layers.4.input_layernorm.weight": "same_delta",  # a 1-D tensor with τ_b = τ_a
}


def _unit_pattern(n: int, g: torch.Generator) -> torch.Tensor:
    """n values, 16 of them ±0.25 and the rest 0: norm exactly 1 in every dtype."""
    v = torch.zeros(n)
    idx = torch.randperm(n, generator=g)[:16]
    v[idx] = 0.25 * torch.where(torch.rand(16, generator=g) < 0.5, -1.0, 1.0)
    return v


def build_inputs() -> dict[str, dict[str, torch.Tensor]]:
    """float32 values of every model; each stored dtype is cast from these."""
    g = torch.Generator().manual_seed(SEED)
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODELS}
    for name, shape in tensor_shapes().items():
        if name.endswith("norm.weight"):
            base, scale = 1.0 + 0.05 * torch.randn(shape, generator=g), 2.0**-6
        else:
            base, scale = 0.05 * torch.randn(shape, generator=g), 0.02
        shared = torch.randn(shape, generator=g)
        a, b, c = (base + scale * (0.6 * shared + 0.8 * torch.randn(shape, generator=g)) for _ in range(3))
        kind = SPECIAL.get(name)
        if kind == "zero":
            base, a, b = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
        elif kind == "same":
            base, a = torch.zeros(shape), _unit_pattern(shape[0] * shape[1], g).reshape(shape)
            b = a.clone()
        elif kind == "opposite":
            base, a = torch.zeros(shape), _unit_pattern(shape[0] * shape[1], g).reshape(shape)
            b = -a
        elif kind == "parallel":
            b = base + 2 * (a - base)
        elif kind == "no_delta":
            a, b = base.clone(), base.clone()
        elif kind == "one_zero_delta":
            a = base.clone()
        elif kind == "near":
            b = a + 1e-4 * torch.randn(shape, generator=g)
        elif kind in ("rows", "columns"):
            # lines 0-2 (rows, or columns of the transpose) have θ₀ = 0: all zero; a = b (norm 1); b = -a
            t = (lambda x: x) if kind == "rows" else (lambda x: x.T)
            base, a, b = t(base.clone()), t(a.clone()), t(b.clone())
            base[:3] = 0
            a[0], b[0] = 0, 0
            n = a.shape[1]  # a line's length: 8 for rows, 4 for columns; four ±0.5 give norm 1
            a[1] = b[1] = torch.cat([0.5 * torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.zeros(n - 4)])
            a[2] = torch.cat([0.5 * torch.tensor([1.0, 1.0, -1.0, 1.0]), torch.zeros(n - 4)])
            b[2] = -a[2]
            base, a, b = t(base).contiguous(), t(a).contiguous(), t(b).contiguous()
        elif kind == "same_delta":
            b = a.clone()
        for m, v in zip(MODELS, (base, a, b, c)):
            out[m][name] = v
    return out


def _models(*entries: str) -> str:
    """A `models:` list: "a" or "a:0.3" (a weight)."""
    lines = ["models:"]
    for e in entries:
        name, _, w = e.partition(":")
        lines.append(f"  - model: {name}")
        if w:
            lines.append(f"    parameters: {{weight: {w}}}")
    return "\n".join(lines) + "\n"


def _config(method: str, models: str, *, base: str | None = None, params: str = "", dtype: str = "",
            out_dtype: str = "") -> str:
    text = models + f"merge_method: {method}\n"
    text += f"base_model: {base}\n" if base else ""
    text += f"parameters: {{{params}}}\n" if params else ""
    text += f"dtype: {dtype}\n" if dtype else ""
    text += f"out_dtype: {out_dtype}\n" if out_dtype else ""
    return text


CONFIGS = {
    # model_stock: a base and at least two fine-tunes; filter_wise per row (1-D: the whole tensor)
    "model_stock_bf16": _config("model_stock", _models("a", "b"), base="base", dtype="bfloat16"),
    "model_stock_bf16_3": _config("model_stock", _models("base", "a", "b", "c"), base="base"),
    "model_stock_bf16_filter_wise": _config("model_stock", _models("a", "b"), base="base",
                                            params="filter_wise: true", dtype="bfloat16"),
    "model_stock_fp16_filter_wise_3": _config("model_stock", _models("a_fp16", "b_fp16", "c_fp16"), base="base_fp16",
                                              params="filter_wise: true", dtype="float16"),
    "model_stock_fp32": _config("model_stock", _models("a_fp32", "b_fp32", "c_fp32"), base="base_fp32"),
    "model_stock_bf16_dtype_fp32": _config("model_stock", _models("a", "b"), base="base", dtype="float32",
                                           out_dtype="bfloat16"),
    # nuslerp: exactly two models, of the models or (with a base) of their task vectors
    "nuslerp_bf16": _config("nuslerp", _models("a:0.3", "b:0.7"), dtype="bfloat16"),
    "nuslerp_bf16_base": _config("nuslerp", _models("a:1", "b:2"), base="base", dtype="bfloat16"),
    "nuslerp_bf16_rows": _config("nuslerp", _models("a:0.6", "b:0.4"), params="nuslerp_flatten: false"),
    "nuslerp_bf16_base_row_wise": _config("nuslerp", _models("a:0.25", "b:0.75"), base="base",
                                          params="nuslerp_flatten: false, nuslerp_row_wise: true", dtype="bfloat16"),
    "nuslerp_bf16_zero_total": _config("nuslerp", _models("a:1", "b:-1"), base="base", dtype="bfloat16"),
    "nuslerp_bf16_flatten_row_wise": _config("nuslerp", _models("a:0.5", "b:0.2"), params="nuslerp_row_wise: true"),
    "nuslerp_fp16_base_rows": _config("nuslerp", _models("a_fp16:0.3", "b_fp16:0.7"), base="base_fp16",
                                      params="nuslerp_flatten: false", dtype="float16"),
    "nuslerp_fp32_row_wise": _config("nuslerp", _models("a_fp32:0.4", "b_fp32:0.6"),
                                     params="nuslerp_flatten: false, nuslerp_row_wise: true"),
    "nuslerp_fp32_base": _config("nuslerp", _models("a_fp32:0.3", "b_fp32:0.9"), base="base_fp32"),
    # multislerp: any number of models, optionally around a base
    "multislerp_bf16": _config("multislerp", _models("a:1", "b:1"), dtype="bfloat16"),
    "multislerp_bf16_base_3": _config("multislerp", _models("a:1", "b:2", "c:3"), base="base", dtype="bfloat16"),
    "multislerp_bf16_single": _config("multislerp", _models("a:0.5"), dtype="bfloat16"),
    "multislerp_bf16_single_base": _config("multislerp", _models("a:0.5"), base="base", dtype="bfloat16"),
    "multislerp_bf16_unnormalized": _config("multislerp", _models("a:0.5", "b:0.3"), base="base",
                                            params="normalize_weights: false, eps: 1.0e-6"),
    "multislerp_bf16_unequal": _config("multislerp", _models("a:0.7", "b:0.3", "c:0.2")),
    "multislerp_fp16_3": _config("multislerp", _models("a_fp16:0.2", "b_fp16:0.3", "c_fp16:0.5"), dtype="float16"),
    "multislerp_fp32_base": _config("multislerp", _models("a_fp32:1", "b_fp32:1"), base="base_fp32"),
    # karcher: every input, the base too when given (last when not listed); equal weights
    "karcher_bf16": _config("karcher", _models("a", "b"), dtype="bfloat16"),
    "karcher_bf16_3": _config("karcher", _models("a", "b", "c"), dtype="bfloat16"),
    "karcher_bf16_base": _config("karcher", _models("a", "b"), base="base", dtype="bfloat16"),
    "karcher_bf16_base_listed": _config("karcher", _models("b", "base", "c"), base="base"),
    "karcher_bf16_single": _config("karcher", _models("c"), dtype="bfloat16"),
    "karcher_bf16_params": _config("karcher", _models("a", "b", "c"), params="max_iter: 2, tol: 1.0e-3",
                                   dtype="bfloat16"),
    "karcher_bf16_max_iter_0": _config("karcher", _models("a", "c"), params="max_iter: 0"),
    "karcher_bf16_dtype_fp32": _config("karcher", _models("a", "b", "c"), dtype="float32", out_dtype="bfloat16"),
    "karcher_fp16": _config("karcher", _models("a_fp16", "b_fp16", "c_fp16"), dtype="float16"),
    "karcher_fp32": _config("karcher", _models("a_fp32", "b_fp32", "c_fp32")),
}


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
    for model, tensors in build_inputs().items():
        for suffix, dtype in DTYPES.items():
            save_model(FIX / "inputs" / f"{model}{suffix}", tensors, dtype)
    for name, text in CONFIGS.items():
        (FIX / "configs" / f"{name}.yaml").write_text(text)
        print("mergekit-yaml", name, flush=True)
        run_cli(name)
    write_manifest(FIX, {
        "generator": "benchmarks/mergekit/make_method_fixtures_a.py",
        "mergekit": version("mergekit"),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "special_tensors": SPECIAL,
    }, limit=1_500_000)


if __name__ == "__main__":
    main()
