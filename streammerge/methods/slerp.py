"""SLERP (Shoemake 1985; mergekit's `slerp`): the base θ₀ and one other model θ₁, each tensor taken
as a vector, interpolated along the great circle between them.

    cos Ω = ⟨θ₀, θ₁⟩ / (‖θ₀‖ ‖θ₁‖)   (a norm ≤ 1e-8 counts as 1, clamped to [−1, 1])
    out   = s₀ θ₀ + s₁ θ₁,  s₀ = sin((1 − t)Ω) / sin Ω,  s₁ = sin(tΩ) / sin Ω
            (s₀, s₁ = 1 − t, t when |cos Ω| > 0.9995: nearly parallel, sin Ω ≈ 0)

One stats pass: Σθ₀², Σθ₁², Σθ₀θ₁ per row in float64 (`ops.slerp_row_sums`), rows added exactly, so
no block size changes the coefficients. Under `semantics: mergekit`, mergekit's own float32
whole-tensor arithmetic (`ops.slerp_coefficients_mergekit`), from one block holding the tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from streammerge.methods import ops
from streammerge.methods.base import Method, Rows, TensorCtx
from streammerge.methods.inputs import compiled
from streammerge.methods.registry import register
from streammerge.methods.task_vectors import T


@register
class Slerp(Method):
    name = "slerp"
    reference = "Shoemake 1985, Animating rotation with quaternion curves"
    summary = "s₀ θ₀ + s₁ θ₁, s₀ = sin((1−t)Ω)/sin Ω, s₁ = sin(tΩ)/sin Ω, cos Ω the cosine of θ₀ and θ₁"
    base = "required"
    min_models = max_models = 1
    params = (T,)
    stats_kind = "norms and dot product (float64 row sums)"
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: gram.c

    def check(self, n_models: int, has_base: bool) -> list[str]:
        problems = [] if has_base else ["base_model: slerp interpolates from base_model (t = 0) to one other model (t = 1)"]
        if n_models != 1:
            problems.append(f"models: slerp interpolates between base_model and exactly one other model; got {n_models} "
                            "besides the base (for more models use multislerp, or a task-vector method)")
        return problems

    def passes(self, ctx: TensorCtx) -> int:
        return 1

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return ctx.semantics == "mergekit"

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: Any) -> Any:
        if ctx.semantics == "mergekit":
            return ops.slerp_coefficients_mergekit(rows.base, rows.models[0], ctx.params["t"], ctx.dtype)
        # as Python floats: small tensors kept across blocks would pin the allocator's heap between
        # the blocks' big temporaries, and it would grow with each block
        kernel = compiled(ctx, rows.base, rows.models[0])
        if kernel is not None:  # the same sums: Σθ₀², Σθ₀θ₁, Σθ₁² (the Gram's pair order)
            aa, ab, bb = kernel.gram([rows.base, rows.models[0]], None, ctx.row_elems).tolist()
            return [aa, bb, ab]
        return ops.slerp_row_sums(rows.base, rows.models[0], rows.r1 - rows.r0).cpu().tolist()

    def reduce(self, ctx: TensorCtx, p: int, partials: list[Any], state: Any) -> tuple[float, float]:
        t = ctx.params["t"]
        if ctx.semantics == "mergekit":
            return partials[0] if partials else (1.0 - t, t)
        aa, bb, ab = (math.fsum(v for part in partials for v in part[k]) for k in range(3))
        return ops.slerp_coefficients(t, aa, bb, ab)

    def merge(self, ctx: TensorCtx, rows: Rows, state: tuple[float, float]) -> torch.Tensor:
        mergekit = ctx.semantics == "mergekit"
        kernel = None if ctx.dtype == torch.float64 else compiled(ctx, rows.base, rows.models[0])
        if kernel is not None:  # the same float64 arithmetic, rounded to float32
            coefs = torch.tensor([[state[0]], [state[1]]], dtype=torch.float64)
            return kernel.combine([rows.base, rows.models[0]], None, coefs, None, ctx.row_elems).reshape(rows.base.shape)
        return ops.slerp_block(rows.base, rows.models[0], state, mergekit, ctx.dtype)
