"""Multi-SLERP (mergekit's `multislerp`; C. Goddard, "multislerp", goddard.blog): barycentric
interpolation of N models on the hypersphere, or, given a base, of their task vectors.

    v_i = θ_i, or τ_i = θ_i − θ₀ with a base;  w_i / Σ_j w_j with `normalize_weights` (the default)
    u_i = v_i / (‖v_i‖ + ε),  m = Σ_i w_i u_i
    out = [θ₀ +] (Σ_i w_i ‖v_i‖) · cos(ε) · m / ‖m‖

mergekit projects the u_i to the tangent space at m/‖m‖, averages there and maps back; at the
weighted mean itself the weighted tangent vectors sum to zero, so that step leaves m/‖m‖ times
cos(‖0‖ + ε), which is the formula above. When ‖m‖ < ε (e.g. two opposite vectors with equal
weights), two models fall back to lerp, w₀ v₀ + w₁ v₁ [+ θ₀]; more are an error, as in mergekit.
One model gives that model. Default: one stats pass of the Gram matrix of the v_i (float64 row
sums, exact over blocks), the N coefficients of out = [θ₀ +] Σ_i c_i v_i in float64, the output in
float64 then float32. `semantics: mergekit`: mergekit 0.1.5's torch ops on the whole tensor in its
`dtype` (with float16, ε = 1e-8 rounds to 0 in ‖v_i‖ + ε: a zero v_i gives NaN, as in mergekit).
"""

from __future__ import annotations

import math

import torch

from streammerge.errors import ConfigError

from .base import Method, Param, Rows, TensorCtx
from .gram import combine, gram_reduce, gram_stats, mergekit_inputs, param
from .registry import register


@register
class Multislerp(Method):
    name = "multislerp"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    summary = "[θ₀ +] (Σ w_i ‖v_i‖) · normalize(Σ w_i v_i/‖v_i‖): barycentric slerp of the models or task vectors"
    base = "optional"
    min_models = 1
    params = (
        Param("weight", None, doc="w_i, the barycentric weights"),
        Param("normalize_weights", True, kind=bool, per_model=False, per_tensor=False, doc="divide the weights by their sum"),
        Param("eps", 1e-8, low=0.0, low_open=True, per_model=False, doc="added to each norm before dividing"),
    )
    stats_kind = "Gram of the models or task vectors (float64 row sums)"
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: gram.c

    def passes(self, ctx: TensorCtx) -> int:
        return 0 if ctx.semantics == "mergekit" else 1

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return ctx.semantics == "mergekit"

    def weights(self, ctx: TensorCtx, n: int) -> list[float]:
        weights = param(ctx, self, "weight")
        if weights is None or len(weights) != n:
            raise ConfigError(f"{ctx.name}: multislerp needs a weight for each of its {n} models, got {weights!r}")
        return list(weights)

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: object) -> object:
        return gram_stats(ctx, "tensor", rows.r0, rows.models, minus=rows.base)

    def reduce(self, ctx: TensorCtx, p: int, partials: list, state: object) -> torch.Tensor:
        """The coefficients c_i of out = [θ₀ +] Σ_i c_i v_i, float64 [N, 1]."""
        gram = gram_reduce(ctx, "tensor", partials)[:, :, 0]
        n = gram.shape[0]
        w = self.weights(ctx, n)
        if n == 1:
            return torch.ones(1, 1, dtype=torch.float64)
        if param(ctx, self, "normalize_weights"):
            total = math.fsum(w)
            if total == 0:
                raise ConfigError(f"{ctx.name}: multislerp's weights sum to 0; set normalize_weights: false or change them")
            w = [x / total for x in w]
        eps = param(ctx, self, "eps")
        g = gram.tolist()
        norms = [math.sqrt(g[i][i]) for i in range(n)]
        a = [w[i] / (norms[i] + eps) for i in range(n)]  # m = Σ a_i v_i
        mean_norm = math.sqrt(max(0.0, math.fsum(a[i] * g[i][j] * a[j] for i in range(n) for j in range(n))))
        if mean_norm < eps:
            if n == 2:
                return torch.tensor(w, dtype=torch.float64).reshape(2, 1)
            raise ConfigError(f"{ctx.name}: multislerp's weighted mean of the unit vectors is zero (opposite vectors "
                              "whose weights balance out); change the weights")
        scale = math.fsum(wi * ni for wi, ni in zip(w, norms)) * math.cos(eps) / mean_norm
        return torch.tensor([[c * scale] for c in a], dtype=torch.float64)

    def merge(self, ctx: TensorCtx, rows: Rows, state: torch.Tensor | None) -> torch.Tensor:
        if ctx.semantics == "mergekit":
            return self._mergekit(ctx, rows)
        if len(rows.models) == 1:  # the model itself, as mergekit (no interpolation)
            return combine(ctx, "tensor", rows, rows.models, state)
        return combine(ctx, "tensor", rows, rows.models, state, add=rows.base, minus=rows.base)

    def _mergekit(self, ctx: TensorCtx, rows: Rows) -> torch.Tensor:
        """mergekit 0.1.5's op sequence (its dtype, its reductions), reimplemented."""
        device, count = rows.models[0].device, len(rows.models)
        weights = self.weights(ctx, count)
        inputs = mergekit_inputs(ctx, rows.models + ([] if rows.base is None else [rows.base]))
        models, base = inputs[:count], (inputs[count] if rows.base is not None else None)
        if count == 1:
            return models[0].reshape(rows.r1 - rows.r0, -1).to(device)
        eps = param(ctx, self, "eps")
        x = torch.stack(models)
        if base is not None:
            x -= base
        flat = x.view(count, -1)
        w = torch.tensor(weights, dtype=x.dtype)
        if param(ctx, self, "normalize_weights"):
            w = w / w.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * w.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if count != 2:
                raise ConfigError(f"{ctx.name}: multislerp's weighted mean of the unit vectors is zero (opposite "
                                  "vectors whose weights balance out); change the weights")
            out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        else:
            mean = mean / mean_norm
            tangents = units - (units * mean).sum(-1, keepdim=True) * mean
            tangent = (tangents * w.view(-1, 1)).sum(0)
            tangent_norm = torch.norm(tangent) + eps
            out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
            out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
        if base is not None:
            out = out + base
        return out.reshape(rows.r1 - rows.r0, -1).to(device)
