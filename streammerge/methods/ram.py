"""RAM and RAM+ (Reinforced Agent Merging, arXiv:2601.13572; mergekit's `ram`, `ramplus_tl`).

A position where one model alone changed the base keeps that model's whole delta (merging would
dilute it); positions several models changed take their mean:

    τ̂_t = τ_t where |τ_t| > ε, else 0;   c = #{t : |τ_t| > ε}   (contributors per position)
    ram:         θ = θ₀ + Σ_t (τ̂_t if c = 1, else τ̂_t / c)
    ramplus_tl:  the unique deltas also scaled by λ_t = 1 + r · clamp(ρ_t, 0, α), with
                 ρ_t = shared_t / max(unique_t, ε) over this tensor: shared_t (unique_t) the number of
                 positions where model t contributes with others (alone)

Both are elementwise but for ramplus_tl's counts, integers from one stats pass (exact for any block
split). Default: float32 (float64 inputs stay float64), ρ and λ in float64, a model with no unique
position gets λ = 1. mergekit semantics: its ops in its dtype; ramplus_tl's λ is a float32 tensor
that promotes the result to float32 (and is NaN for a model with no position, shared or unique, when
ε = 0, which turns that whole tensor into NaN, as in mergekit).
"""

from __future__ import annotations

import torch

from .base import Method, Param, Rows, TensorCtx
from .inputs import compiled, resolved, work_dtype
from .registry import register


def _contributions(ctx: TensorCtx, rows: Rows, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """τ [n, r, c] in the work dtype, which of its elements contribute (|τ| > ε), and c per position."""
    work = work_dtype(ctx, rows)
    base = rows.base.to(work)
    tv = torch.stack([m.to(work) - base for m in rows.models])
    nonzero = tv.abs() > eps
    return tv, nonzero, nonzero.sum(dim=0, keepdim=True)


EPSILON = Param("epsilon", 1e-5, low=0.0, per_model=False, doc="a delta counts when |τ| > epsilon")


@register
class Ram(Method):
    name = "ram"
    reference = "arXiv:2601.13572"
    summary = "θ₀ + Σ_t τ̂_t · (1 where t alone changed the position, else 1/c)"
    base = "required"
    min_models = 1
    params = (EPSILON,)
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: ram.c

    def passes(self, ctx: TensorCtx) -> int:
        resolved(self, ctx)  # checks epsilon before any block
        return 0

    def merge(self, ctx: TensorCtx, rows: Rows, state) -> torch.Tensor:
        return _merge(ctx, rows, resolved(self, ctx)["epsilon"], None)


@register
class RamPlusTL(Method):
    name = "ramplus_tl"
    mergekit_out_dtype = "float32"  # mergekit computes it in float32 and never casts it back
    reference = "arXiv:2601.13572"
    summary = "ram with each model's unique deltas × (1 + r·clamp(shared/unique, 0, alpha)), counted per tensor"
    base = "required"
    min_models = 1
    params = (
        Param("r", 0.1, low=0.0, per_model=False, doc="strength of the unique deltas' boost"),
        Param("alpha", 0.2, low=0.0, per_model=False, doc="cap on the shared/unique ratio ρ"),
        EPSILON,
    )
    stats_kind = "shared and unique counts per model (integers)"
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: ram.c

    def passes(self, ctx: TensorCtx) -> int:
        resolved(self, ctx)  # checks r, alpha, epsilon before any block
        return 1

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state) -> torch.Tensor:
        eps = resolved(self, ctx)["epsilon"]
        kernel = compiled(ctx, rows.base, *rows.models)
        if kernel is not None:
            return kernel.ram_counts(rows.models, rows.base, eps)
        _, nonzero, count = _contributions(ctx, rows, eps)
        n = nonzero.shape[0]
        shared = (nonzero & (count > 1)).reshape(n, -1).sum(dim=1)
        unique = (nonzero & (count == 1)).reshape(n, -1).sum(dim=1)
        return torch.stack([shared, unique]).cpu()  # int64 [2, n]

    def reduce(self, ctx: TensorCtx, p: int, partials: list, state) -> tuple[float, ...] | torch.Tensor:
        shared, unique = sum(partials)
        r, alpha, eps = (resolved(self, ctx)[k] for k in ("r", "alpha", "epsilon"))
        if ctx.semantics == "mergekit":  # its float32 tensor ops on the counts
            rho = shared / unique.clamp(min=eps)
            return 1 + r * rho.clamp(min=0, max=alpha)
        lam = []
        for s, u in zip(shared.tolist(), unique.tolist()):
            div = max(u, eps)
            rho = s / div if div > 0 else 0.0  # u = 0: λ scales nothing
            lam.append(1.0 + r * min(max(rho, 0.0), alpha))
        return tuple(lam)

    def merge(self, ctx: TensorCtx, rows: Rows, state) -> torch.Tensor:
        return _merge(ctx, rows, resolved(self, ctx)["epsilon"], state)


def _merge(ctx: TensorCtx, rows: Rows, eps: float, lam) -> torch.Tensor:
    """θ₀ + Σ_t τ̂_t · (λ_t where c = 1, else 1/c); λ None is ram (λ = 1)."""
    kernel = compiled(ctx, rows.base, *rows.models)
    if kernel is not None:  # the same float32 operations, in one pass
        return kernel.ram_merge(rows.models, rows.base, eps, lam).reshape(rows.base.shape)
    tv, nonzero, count = _contributions(ctx, rows, eps)
    base = rows.base.to(tv.dtype)
    if ctx.semantics == "mergekit":
        kept = tv * nonzero
        unique = kept * (count == 1)
        if lam is not None:
            unique = unique * lam.to(tv.device).view(-1, 1, 1)
        merged = (unique + kept * (count > 1) / count.clamp(min=1)).sum(dim=0)
        return base + merged
    # default: model by model, in a fixed order whatever the block
    alone = count[0] == 1
    divisor = count[0].clamp(min=1).to(tv.dtype)
    merged = torch.zeros_like(base)
    for t in range(tv.shape[0]):
        scale = 1.0 if lam is None else lam[t]
        part = torch.where(alone, tv[t] * scale if scale != 1.0 else tv[t], tv[t] / divisor)
        merged += part.masked_fill_(~nonzero[t], 0)
    return (base + merged).add_(0.0)  # −0 → +0, as the other default paths
