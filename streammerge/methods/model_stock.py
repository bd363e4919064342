"""Model Stock (Jang, Yun & Han 2024, arXiv 2403.19522; mergekit's `model_stock`).

With N fine-tunes θ_i of a base θ₀ and their task vectors τ_i = θ_i − θ₀, the average angle between
the task vectors says how far to move from θ₀ towards the fine-tunes' average:

    cos θ = mean over pairs i < j of ⟨τ_i, τ_j⟩ / max(‖τ_i‖ ‖τ_j‖, 1e-6), each clamped to [−1, 1]
    t     = N cos θ / (1 + (N − 1) cos θ)                 (0 when |1 + (N − 1) cos θ| < 1e-6)
    out   = t · (1/N) Σ_i θ_i + (1 − t) · θ₀

per tensor, or per row (`filter_wise`: each line along the last dimension; a 1-D tensor is one).
The 1e-6 clamp and the singular guard are mergekit's. Default: one stats pass of the task vectors'
Gram matrix (float64 row sums, exact over rows), t in float64, the output in float64 then float32.
`semantics: mergekit`: mergekit 0.1.5's torch ops on the whole tensor in its `dtype`.
"""

from __future__ import annotations

import torch

from streammerge.errors import ConfigError

from .base import Method, Param, Rows, TensorCtx
from .gram import combine, cut, gram_reduce, gram_stats, mergekit_inputs, param
from .registry import register

EPS_NORM = 1e-6  # mergekit clamps ‖τ_i‖ ‖τ_j‖ from below by this
EPS_SINGULAR = 1e-6  # |1 + (N − 1) cos θ| below this: no finite t; keep the base


@register
class ModelStock(Method):
    name = "model_stock"
    reference = "arXiv:2403.19522"
    summary = "θ₀ + t·(mean θ_i − θ₀), t = N cos/(1 + (N−1) cos), cos the mean pairwise cosine of the τ_i"
    base = "required"
    min_models = 2
    params = (Param("filter_wise", False, kind=bool, per_model=False, per_tensor=False,
                    doc="one t per row (line along the last dimension) instead of per tensor"),)
    stats_kind = "Gram of the task vectors (float64 row sums)"
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: gram.c

    def lines(self, ctx: TensorCtx) -> str:
        return cut(ctx, "rows" if param(ctx, self, "filter_wise") else "tensor")

    def passes(self, ctx: TensorCtx) -> int:
        return 0 if ctx.semantics == "mergekit" else 1

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return ctx.semantics == "mergekit"

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: object) -> object:
        if len(rows.models) < 2:
            raise ConfigError(f"{ctx.name}: model_stock needs at least 2 fine-tunes, got {len(rows.models)}")
        return gram_stats(ctx, self.lines(ctx), rows.r0, rows.models, minus=rows.base)

    def reduce(self, ctx: TensorCtx, p: int, partials: list, state: object) -> torch.Tensor:
        gram = gram_reduce(ctx, self.lines(ctx), partials)
        count = gram.shape[0]
        norms = gram.diagonal().T.sqrt()  # [N, lines]
        cos = [(gram[i, j] / (norms[i] * norms[j]).clamp(min=EPS_NORM)).clamp(-1, 1)
               for i in range(count) for j in range(i + 1, count)]
        cos = sum(cos) / len(cos)  # float64 [lines]; elementwise adds in pair order (no reduction kernel)
        denominator = 1 + (count - 1) * cos
        singular = denominator.abs() < EPS_SINGULAR
        return torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))

    def merge(self, ctx: TensorCtx, rows: Rows, state: torch.Tensor | None) -> torch.Tensor:
        if ctx.semantics == "mergekit":
            return self._mergekit(ctx, rows)
        t, count = state, len(rows.models)
        coefs = torch.stack([1 - t] + [t / count] * count)
        return combine(ctx, self.lines(ctx), rows, [rows.base, *rows.models], coefs)

    def _mergekit(self, ctx: TensorCtx, rows: Rows) -> torch.Tensor:
        """mergekit 0.1.5's op sequence (its dtype, its reductions), reimplemented."""
        if len(rows.models) < 2:
            raise ConfigError(f"{ctx.name}: model_stock needs at least 2 fine-tunes, got {len(rows.models)}")
        w0, *ws = mergekit_inputs(ctx, [rows.base, *rows.models])
        if not param(ctx, self, "filter_wise"):
            w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        elif w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        deltas = [w - w0 for w in ws]
        cos = []
        for i, a in enumerate(deltas):
            for b in deltas[i + 1 :]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cos.append(((a * b).sum(dim=-1) / norms.clamp(min=EPS_NORM)).clamp(-1, 1))
        cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        count = len(ws)
        denominator = 1 + (count - 1) * cos_theta
        singular = denominator.abs() < EPS_SINGULAR
        t = torch.where(singular, torch.zeros_like(cos_theta),
                        count * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
        out = t * (sum(ws) / count) + (1 - t) * w0
        return out.reshape(rows.r1 - rows.r0, -1).to(rows.base.device)
