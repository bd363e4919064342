"""NuSLERP (mergekit's `nuslerp`): spherical interpolation of two models, or, given a base, of
their task vectors, with the interpolation factor from two weights (Shoemake 1985 for slerp itself).

    t = w₁ / (w₀ + w₁)    (0.5 when |w₀ + w₁| < 1e-6)
    v_i = θ_i, or τ_i = θ_i − θ₀ with a base
    cos Ω = ⟨v₀, v₁⟩ / (max(‖v₀‖, 1e-7) · max(‖v₁‖, 1e-7)), clamped to [−1, 1]
    out = [θ₀ +] (sin((1 − t)Ω) v₀ + sin(tΩ) v₁) / sin Ω,   or (1 − t) v₀ + t v₁ when 1 − cos² Ω ≤ 1e-16

over the whole tensor (`nuslerp_flatten`, the default), else per line along the last dimension, or
per line along the first dimension with `nuslerp_row_wise` (a 2-D weight's columns: mergekit
transposes dimension 0 to the end); a 1-D tensor is one line. Default: one stats pass (‖v₀‖², ‖v₁‖²,
⟨v₀, v₁⟩ per line, float64, exact over blocks), the coefficients in float64, the output in float64
then float32. `semantics: mergekit`: mergekit 0.1.5's torch ops on the whole tensor in its `dtype`.
"""

from __future__ import annotations

import math

import torch

from streammerge.errors import ConfigError

from .base import Method, Param, Rows, TensorCtx
from .gram import combine, cut, gram_reduce, gram_stats, mergekit_inputs, param
from .registry import register

EPS_NORM = 1e-7  # mergekit divides by max(‖v‖, this)
EPS_COLINEAR = 1e-8  # (anti)parallel when 1 − cos² ≤ this²: lerp
EPS_WEIGHTS = 1e-6  # |w₀ + w₁| below this: t = 0.5


@register
class Nuslerp(Method):
    name = "nuslerp"
    reference = "mergekit (Goddard et al., arXiv 2403.13257); slerp: Shoemake 1985"
    summary = "[θ₀ +] slerp(v₀, v₁; t = w₁/(w₀ + w₁)) of the models or task vectors, per tensor, row or column"
    base = "optional"
    min_models = 2
    max_models = 2
    params = (
        Param("weight", None, doc="w_i: t = w₁/(w₀ + w₁), the second model's share"),
        Param("nuslerp_flatten", True, kind=bool, per_model=False, per_tensor=False, doc="one slerp over the whole tensor"),
        Param("nuslerp_row_wise", False, kind=bool, per_model=False, per_tensor=False,
              doc="without flatten: per line along the first dimension (a weight's columns), not the last"),
    )
    stats_kind = "‖v₀‖², ‖v₁‖², ⟨v₀, v₁⟩ per tensor/row/column (float64 row sums)"
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: gram.c

    def lines(self, ctx: TensorCtx) -> str:
        if param(ctx, self, "nuslerp_flatten"):
            return "tensor"
        return cut(ctx, "columns" if param(ctx, self, "nuslerp_row_wise") else "rows")

    def passes(self, ctx: TensorCtx) -> int:
        return 0 if ctx.semantics == "mergekit" else 1

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return ctx.semantics == "mergekit"

    def t(self, ctx: TensorCtx) -> float:
        weights = param(ctx, self, "weight")
        if weights is None or len(weights) != 2:
            raise ConfigError(f"{ctx.name}: nuslerp needs a weight for each of its two models, got {weights!r}")
        total = weights[0] + weights[1]
        return 0.5 if abs(total) < EPS_WEIGHTS else weights[1] / total

    @staticmethod
    def vectors(rows: Rows) -> list[torch.Tensor]:
        """The models, whose task vectors (less the base, when given) are interpolated."""
        if len(rows.models) != 2:
            raise ConfigError(f"nuslerp takes exactly 2 models besides the base, got {len(rows.models)}")
        return rows.models

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: object) -> object:
        return gram_stats(ctx, self.lines(ctx), rows.r0, self.vectors(rows), minus=rows.base)

    def reduce(self, ctx: TensorCtx, p: int, partials: list, state: object) -> torch.Tensor:
        """(s₀, s₁) per line, float64 [2, lines]."""
        t = self.t(ctx)
        gram = gram_reduce(ctx, self.lines(ctx), partials)
        # ‖v_i‖² clamped as mergekit clamps ‖v_i‖ (a zero vector is then orthogonal to anything);
        # sin²Ω from the Gram determinant: exactly 0 for exactly (anti)parallel vectors
        sq0, sq1 = gram[0, 0].clamp(min=EPS_NORM**2), gram[1, 1].clamp(min=EPS_NORM**2)
        det = (sq0 * sq1 - gram[0, 1].square()).clamp(min=0)
        colinear = (det <= EPS_COLINEAR**2 * (sq0 * sq1)).tolist()
        # sin and atan2 per line in Python's math: torch's vectorized ones may differ by CPU in the last bit
        s0, s1 = [], []
        for lerp, d, g01 in zip(colinear, det.sqrt().tolist(), gram[0, 1].tolist()):
            omega = math.atan2(d, g01)
            s0.append(1 - t if lerp else math.sin((1 - t) * omega) / math.sin(omega))
            s1.append(t if lerp else math.sin(t * omega) / math.sin(omega))
        return torch.tensor([s0, s1], dtype=torch.float64)

    def merge(self, ctx: TensorCtx, rows: Rows, state: torch.Tensor | None) -> torch.Tensor:
        if ctx.semantics == "mergekit":
            return self._mergekit(ctx, rows)
        return combine(ctx, self.lines(ctx), rows, self.vectors(rows), state, add=rows.base, minus=rows.base)

    def _mergekit(self, ctx: TensorCtx, rows: Rows) -> torch.Tensor:
        """mergekit 0.1.5's op sequence (its dtype, its reductions), reimplemented."""
        t = self.t(ctx)
        if len(rows.models) != 2:
            raise ConfigError(f"{ctx.name}: nuslerp takes exactly 2 models besides the base, got {len(rows.models)}")
        flatten, row_wise = param(ctx, self, "nuslerp_flatten"), param(ctx, self, "nuslerp_row_wise")
        if rows.base is None:
            out = _slerp_mergekit(t, *mergekit_inputs(ctx, rows.models), row_wise, flatten)
        else:
            base, m0, m1 = mergekit_inputs(ctx, [rows.base, *rows.models])
            out = base + _slerp_mergekit(t, m0 - base, m1 - base, row_wise, flatten)
        return out.reshape(rows.r1 - rows.r0, -1).to(rows.models[0].device)


def _slerp_mergekit(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:  # lines along dimension 0: move it last (a view, as mergekit reduces over it)
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=EPS_NORM)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=EPS_NORM)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS_COLINEAR**2
    omega = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)
