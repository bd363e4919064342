"""Karcher mean (mergekit's `karcher`; the Riemannian centre of mass on the sphere, Karcher 1977;
mergekit cites arXiv 2603.04972): every input treated as a vector x_i = ‖x_i‖ u_i, the weighted
Karcher mean μ of the unit vectors u_i, rescaled by the weighted mean norm. Equal weights α_i = 1/N.

    valid: ‖x_i‖ > tol (none: the output is 0), â_i = α_i / Σ_valid α
    μ ← normalize(Σ â_i u_i), or the first valid u_i when that sum's norm < tol
    repeat max_iter times:   T = Σ_valid â_i · θ_i · d_i / ‖d_i‖,  d_i = u_i − cos θ_i μ,  cos θ_i = ⟨μ, u_i⟩
        (terms with θ_i < tol skipped); stop when ‖T‖ < tol; μ ← normalize(cos ‖T‖ μ + sin ‖T‖ T/‖T‖)
    out = (Σ_i α_i ‖x_i‖) · μ

Every step keeps μ a combination of the u_i, so the default runs the iteration on the N mixing
coefficients from the inputs' Gram matrix (one stats pass, float64 row sums, exact over blocks) and
writes out = Σ_i c_i x_i per block (float64, then float32): no whole-tensor buffer. mergekit divides
by sin θ_i where the default divides by ‖d_i‖ (equal in exact arithmetic; at an antipode, where the
direction is undefined, d_i is 0 and mergekit's float32 term vanishes, the default skips terms with
‖d_i‖ < tol too). A base, when given, is one more input, after the models (mergekit's order for an
unlisted base_model; a config that lists it under models passes it there). `semantics: mergekit`:
mergekit 0.1.5's torch ops on the whole tensors in its `dtype` (norms in float32, or float64).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import Method, Param, Rows, TensorCtx
from .gram import combine, gram_reduce, gram_stats, mergekit_inputs, param
from .registry import register


@register
class Karcher(Method):
    name = "karcher"
    reference = "mergekit 0.1.5 `karcher` (arXiv 2603.04972); Karcher 1977"
    summary = "(mean ‖x_i‖) · the Karcher mean of x_i/‖x_i‖ on the unit sphere, equal weights"
    base = "optional"
    base_is_input: ClassVar[bool] = True  # the base is averaged like the models (placed last)
    min_models = 1
    params = (
        Param("max_iter", 10, kind=int, low=0, per_model=False, doc="Riemannian gradient steps at most"),
        Param("tol", 1e-5, low=0.0, per_model=False, doc="norms, angles and steps below this count as zero"),
    )
    stats_kind = "Gram of the inputs (float64 row sums)"
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: gram.c

    def passes(self, ctx: TensorCtx) -> int:
        return 0 if ctx.semantics == "mergekit" else 1

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return ctx.semantics == "mergekit"

    @staticmethod
    def inputs(rows: Rows) -> list[torch.Tensor]:
        return rows.models + ([] if rows.base is None else [rows.base])

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: object) -> object:
        return gram_stats(ctx, "tensor", rows.r0, self.inputs(rows))

    def reduce(self, ctx: TensorCtx, p: int, partials: list, state: object) -> torch.Tensor:
        """The coefficients c_i of out = Σ_i c_i x_i, float64 [N, 1]."""
        gram = gram_reduce(ctx, "tensor", partials)[:, :, 0].tolist()
        count = len(gram)
        max_iter, tol = int(param(ctx, self, "max_iter")), param(ctx, self, "tol")
        if count == 1:
            return torch.ones(1, 1, dtype=torch.float64)
        # Python floats throughout (no BLAS, no vectorized libm: the same bits on any machine)
        norms = [math.sqrt(gram[i][i]) for i in range(count)]
        valid = [i for i in range(count) if norms[i] > tol]
        coefs = torch.zeros(count, 1, dtype=torch.float64)
        if not valid:
            return coefs
        k = len(valid)
        # the unit vectors' Gram matrix over the valid inputs; μ = Σ_j mu[j] u_j
        g = [[gram[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]

        def norm(c: list[float]) -> float:
            return math.sqrt(max(0.0, math.fsum(c[i] * g[i][j] * c[j] for i in range(k) for j in range(k))))

        alpha = 1.0 / k  # equal α_i, renormalized over the valid inputs
        length = norm([alpha] * k)
        mu = [float(j == 0) for j in range(k)] if length < tol else [alpha / length] * k
        for _ in range(max_iter):
            tangent = [0.0] * k
            for i in range(k):
                cos = min(1.0, max(-1.0, math.fsum(g[i][j] * mu[j] for j in range(k))))
                direction = [-cos * m for m in mu]
                direction[i] += 1.0
                length = norm(direction)
                if math.acos(cos) < tol or length < tol:  # at μ, or its antipode (no direction)
                    continue
                step_i = alpha * math.acos(cos) / length
                tangent = [x + step_i * d for x, d in zip(tangent, direction)]
            step = norm(tangent)
            if step < tol:
                break
            mu = [math.cos(step) * m + math.sin(step) / step * x for m, x in zip(mu, tangent)]
            length = norm(mu)
            if length > tol:
                mu = [m / length for m in mu]
        scale = math.fsum(norms) / count
        for j, i in enumerate(valid):
            coefs[i, 0] = scale * mu[j] / norms[i]
        return coefs

    def merge(self, ctx: TensorCtx, rows: Rows, state: torch.Tensor | None) -> torch.Tensor:
        if ctx.semantics == "mergekit":
            return self._mergekit(ctx, rows)
        return combine(ctx, "tensor", rows, self.inputs(rows), state)

    def _mergekit(self, ctx: TensorCtx, rows: Rows) -> torch.Tensor:
        """mergekit 0.1.5's op sequence (its dtype, its reductions, its .item() branches), reimplemented."""
        xs = mergekit_inputs(ctx, self.inputs(rows))
        out = xs[0] if len(xs) == 1 else _karcher_mergekit(xs, int(param(ctx, self, "max_iter")), param(ctx, self, "tol"))
        return out.reshape(rows.r1 - rows.r0, -1).to(rows.models[0].device)


def _fold(values: list) -> object:
    """Python's sum as a left fold from 0 (Python ≥ 3.12's sum of floats compensates; mergekit ran on 3.11)."""
    acc = 0
    for v in values:
        acc = acc + v
    return acc


def _karcher_mergekit(xs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    work = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x.to(work)) for x in xs]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return _fold([x * 0 for x in xs])
    alpha_sum = _fold([alphas[i] for i in valid])
    alpha = [alphas[i] / alpha_sum for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for a, u in zip(alpha, us):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = us[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alpha, us):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step = torch.linalg.vector_norm(tangent.to(work))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(work))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return _fold([a * n for a, n in zip(alphas, norms)]) * mean
