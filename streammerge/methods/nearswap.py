"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; mergekit's `nearswap`).

Takes the other model's value where it is close to the base's, and stays near the base elsewhere:

    w = clamp(t / max(|θ₁ − θ₀|, 1e-6), 0, 1)
    θ = w · θ₁ + (1 − w) · θ₀

Elements closer than t move all the way to θ₁; farther ones move by t/|θ₁ − θ₀| of the way. t = 0
gives θ₀; a t at least as large as every difference gives θ₁. Elementwise: no stats passes, and
any row-block split gives the same bytes under either semantics. Default: float32 (float64 inputs
stay float64); mergekit: the same ops in its dtype.
"""

from __future__ import annotations

import torch

from .base import Method, Param, Rows, TensorCtx
from .inputs import compiled, resolved, work_dtype
from .registry import register

DIFF_FLOOR = 1e-6  # mergekit's guard against ÷0: differences below it count as this


@register
class NearSwap(Method):
    name = "nearswap"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    summary = "w·θ₁ + (1 − w)·θ₀ with w = clamp(t / |θ₁ − θ₀|, 0, 1)"
    base = "required"
    min_models = 1
    max_models = 1
    params = (
        Param("t", None, low=0.0, per_model=False,
              doc="distance (in weight units) below which θ₁ replaces θ₀; required"),
    )
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: nearswap.c

    def passes(self, ctx: TensorCtx) -> int:
        resolved(self, ctx)  # checks t before any block
        return 0

    def merge(self, ctx: TensorCtx, rows: Rows, state) -> torch.Tensor:
        kernel = compiled(ctx, rows.base, rows.models[0])
        if kernel is not None:  # the same float32 operations, in one pass
            return kernel.nearswap_merge(rows.base, rows.models[0], resolved(self, ctx)["t"], DIFF_FLOOR).reshape(rows.base.shape)
        work = work_dtype(ctx, rows)
        a, b = rows.base.to(work), rows.models[0].to(work)
        w = (resolved(self, ctx)["t"] / (a - b).abs().clamp(min=DIFF_FLOOR)).clamp(min=0, max=1)
        out = w * b + (1 - w) * a
        return out if ctx.semantics == "mergekit" else out.add_(0.0)  # default: −0 → +0
