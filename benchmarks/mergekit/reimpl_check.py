"""Independent re-implementation of mergekit 0.1.5's arithmetic (from
SEMANTICS_NOTES.md), checked bit for bit against tests/fixtures/mergekit.

Pure torch + safetensors + pyyaml; does not import mergekit.  Run with the
mergekit venv (or any venv with torch 2.13 CPU, safetensors, pyyaml):

    python benchmarks/mergekit/reimpl_check.py

Every elementwise op in compute dtype D is modelled explicitly as "do it in
float32 on D-representable values, round to D" (rnd), sums over models as a
sequential float32 accumulation rounded once, so the script documents the
rounding points rather than re-running mergekit's torch calls on D tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tie_order import std_sort_perm  # noqa: E402

FIX = HERE.parent.parent / "tests" / "fixtures" / "mergekit"
F32 = torch.float32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16,
          "float32": torch.float32, None: None}
STATS = {"trim_calls": 0, "trim_model_checked": 0, "index_rule_diff_tensors": 0}


def rnd(x: torch.Tensor, D: torch.dtype) -> torch.Tensor:
    """Round float32 values to dtype D (RNE) and return them as float32."""
    assert x.dtype == F32
    return x if D == F32 else x.to(D).to(F32)


def seq_sum(xs, D):
    """sum over dim 0 of a stacked [n, ...] D tensor: float32 accumulation in
    model order, one rounding to D at the end."""
    acc = xs[0].clone()
    for x in xs[1:]:
        acc = acc + x
    return rnd(acc, D)


def full_sum(x: torch.Tensor, D) -> torch.Tensor:
    """tensor.sum() over all elements in dtype D (0-dim result, in D).
    For D=bf16/fp16: exact sum rounded to f32 then to D.  For D=f32 the
    float32 reduction order of torch matters; we call torch's own f32 sum on
    a contiguous tensor of the same shape, exactly as mergekit does."""
    if D == F32:
        return x.contiguous().sum()
    return rnd(x.double().sum().to(F32), D)


# ---------------------------------------------------------------- trim (TIES)
def trim_keep_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """keep mask of mergekit's magnitude(): the first k of the unstable
    descending CPU argsort of |d| (as float32)."""
    n = d.numel()
    if density >= 1:
        return torch.ones_like(d, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(d, dtype=torch.bool)
    k = max(1, int(density * n))  # python float product, truncated
    a = d.abs().reshape(-1)  # float32 already
    order = torch.argsort(a, descending=True)
    STATS["trim_calls"] += 1
    if n <= 300_000:  # cross-check the libstdc++ introsort model
        assert order.tolist() == std_sort_perm(a.tolist()), "tie model mismatch"
        STATS["trim_model_checked"] += 1
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    stable = torch.zeros(n, dtype=torch.bool)
    stable[torch.sort(a, descending=True, stable=True).indices[:k]] = True
    if not torch.equal(stable, keep):
        STATS["index_rule_diff_tensors"] += 1
    return keep.reshape(d.shape)


# ---------------------------------------------------------------- DARE
def l1_rescale(full: torch.Tensor, masked: torch.Tensor, W) -> torch.Tensor:
    """rescaled_masked_tensor(..., l1): scale the masked delta by the 0-dim W
    tensor rnd(||full||_1 / ||masked||_1) unless either norm is < 1e-7."""
    before = full_sum(full.abs(), W)
    after = full_sum(masked.abs(), W)
    eps = rnd(torch.tensor(1e-7, dtype=F32), W) if W != F32 else 1e-7
    if before < eps or after < eps:
        return masked
    factor = rnd(before / after, W)  # the factor itself is rounded to W
    return rnd(masked * factor, W)


def dare(d: torch.Tensor, density: float, mask: torch.Tensor, rescale: bool, D):
    if density >= 1:
        return d  # mergekit draws no mask at all
    # CPU: work dtype is D for bf16 (and f32); float16 works in float32
    W = F32 if D == torch.float16 else D
    masked = rnd(d * mask.to(F32), W)  # exact
    if rescale:
        masked = l1_rescale(d, masked, W)
    return rnd(masked, D)


# ---------------------------------------------------------------- methods
GTA = {  # name: (consensus, sparsification, default normalize, default rescale)
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_ties": (True, "random", False, True),
    "dare_linear": (False, "random", False, True),
}


def gta_merge(method, name, base, fts, weights, densities, params, D, masks,
              model_names):
    consensus, sparsification, def_norm, def_rescale = GTA[method]
    normalize = params.get("normalize", def_norm)
    rescale = params.get("rescale", def_rescale)
    lam = float(params.get("lambda", 1.0))
    deltas = []
    for i, ft in enumerate(fts):
        d = rnd(ft - base, D)
        if sparsification == "magnitude":
            keep = trim_keep_mask(d, densities[i])
            trimmed = d * keep  # exact
            if rescale and densities[i] < 1:  # not the default for ties
                trimmed = l1_rescale(d, trimmed, D)
            d = trimmed
        elif sparsification == "random":
            d = dare(d, densities[i], masks[f"{model_names[i]}/{name}"], rescale, D)
        deltas.append(d)
    # weights become a tensor of dtype D (rounded from the python float)
    w = [rnd(torch.tensor(x, dtype=torch.float64).to(F32), D) if D == F32 else
         torch.tensor(x, dtype=torch.float64).to(D).to(F32) for x in weights]
    deltas = [rnd(d * wi, D) for d, wi in zip(deltas, w)]
    if consensus:
        s = seq_sum(deltas, D)
        majority = torch.where(s >= 0, 1.0, -1.0)
        masks_i = [torch.sign(d) == majority for d in deltas]  # sign(0)=0: out
        mixed = seq_sum([d * m for d, m in zip(deltas, masks_i)], D)
        divisor = seq_sum([wi * m for wi, m in zip(w, masks_i)], D)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = seq_sum(deltas, D)
        divisor = seq_sum([wi.reshape(()) for wi in w], D)
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if normalize:
        mixed = rnd(mixed / divisor, D)
    if lam != 1:
        mixed = rnd(mixed * torch.tensor(lam, dtype=F32), D)
    return rnd(base + mixed, D)


def linear_merge(tensors, weights, params, D):
    normalize = params.get("normalize", True)
    acc_dtype = torch.float64 if D == torch.float64 else F32
    w = [torch.tensor(float(x), dtype=acc_dtype) for x in weights]
    result = torch.zeros_like(tensors[0], dtype=acc_dtype)
    for t, wi in zip(tensors, w):
        # addcmul_: fused multiply-add, one float32 rounding (AVX2/AVX512)
        result = (result.double() + t.double() * wi.double()).to(acc_dtype)
    if normalize:
        den = w[0].clone()
        for wi in w[1:]:
            den = den + wi
        result = result / den
    return result.to(D)


# ---------------------------------------------------------------- driver
def load_inputs():
    models = {m: load_file(str(FIX / "inputs" / m / "model.safetensors"))
              for m in ("base", "ft1", "ft2", "ft3")}
    masks = load_file(str(FIX / "inputs" / "masks.safetensors"))
    return models, masks


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_config(name, models, masks):
    cfg = yaml.safe_load((FIX / "configs" / f"{name}.yaml").read_text())
    method = cfg["merge_method"]
    D = DTYPES[cfg.get("dtype")]
    out_dtype = DTYPES[cfg.get("out_dtype")]
    params = cfg.get("parameters") or {}
    entries = cfg["models"]
    names = [e["model"] for e in entries]
    weights = [float(e["parameters"]["weight"]) for e in entries]
    densities = [float(e["parameters"].get("density", 1.0)) for e in entries]
    base_name = cfg.get("base_model")
    ref = load_file(str(FIX / "outputs" / name / "model.safetensors"))
    bad = []
    for tname, expected in ref.items():
        raw = [models[n][tname] for n in names]
        if base_name:
            raw_base = models[base_name][tname]
        group = raw + ([raw_base] if base_name else [])
        # load-time cast to config dtype; without dtype: promote all inputs
        Dc = D
        if Dc is None:
            Dc = group[0].dtype
            for t in group[1:]:
                Dc = torch.promote_types(Dc, t.dtype)
        fts = [t.to(Dc).to(F32) for t in raw]
        if method == "linear":
            out = linear_merge([t.to(Dc) for t in raw], weights, params, Dc)
        else:
            base = raw_base.to(Dc).to(F32)
            out = gta_merge(method, tname, base, fts, weights, densities, params,
                            Dc, masks, names).to(Dc)
        if out_dtype is not None:
            out = out.to(out_dtype)
        if out.dtype != expected.dtype or not torch.equal(bits(out), bits(expected)):
            ndiff = (out.float() != expected.float()).sum().item() if out.dtype == expected.dtype else -1
            bad.append((tname, ndiff))
    return len(ref), bad


def main():
    models, masks = load_inputs()
    failures = 0
    for cfg_path in sorted((FIX / "configs").glob("*.yaml")):
        name = cfg_path.stem
        n, bad = run_config(name, models, masks)
        status = "OK  " if not bad else "FAIL"
        print(f"{status} {name:28s} {n - len(bad)}/{n} tensors bit-identical"
              + (f"  mismatches: {bad[:4]}" if bad else ""))
        failures += bool(bad)
    print(f"trim calls: {STATS['trim_calls']}, tie order cross-checked against "
          f"the libstdc++ model: {STATS['trim_model_checked']}, tensors whose kept "
          f"set differs from lowest-index-first: {STATS['index_rule_diff_tensors']}")
    print("PASS" if not failures else f"{failures} config(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
