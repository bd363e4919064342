"""Arcee Fusion (Arcee AI, https://arcee.ai; mergekit's `arcee_fusion`): keep the other model's
value only where it changed both much and where it matters.

    importance = |θ₁ − θ₀| · KL(p ‖ q),  p = softmax(θ₁) + 1e-8, q = softmax(θ₀) + 1e-8
                 (softmax and KL along the last dimension: one KL per row of a matrix, one per vector)
    threshold  = Q₂ + 1.5 · (Q₃ − Q₁) of the importance over the whole tensor
    θ          = θ₁ where importance ≥ threshold, else θ₀

Q_j is mergekit's quantile rule, no interpolation: the sorted importances' element floor(q·(n − 1)),
q = 1/4, 1/2, 3/4. Default semantics, streamed: the importance of a row needs only that row (float64
softmax and KL, with detmath's exp and log: the same bits whatever the block and the machine; the
softmax normalized by one reciprocal per row), its KL computed once per
softmax row in a first pass; the three order statistics come from an exact radix selection over row
blocks (a high-16-bit histogram, counted in that first pass, then a low-16-bit pass).
A vector's softmax spans all of it: three passes first find its maxima, Σexp and KL (float64 partial
sums added exactly), then the two histogram passes. The compiled kernels (arcee.c, `compiled`) give
the same bits, exp and log included (detmath's operations, spelled out in C).
mergekit semantics: its ops in its dtype over the whole tensor, its result in float32 (mergekit
multiplies by a float32 mask); above 10⁶ elements mergekit takes its quantiles from a random sample
(torch's global RNG), which is not reproducible: the exact quantiles are used there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from streammerge.methods import detmath, ops

from .base import Method, Rows, TensorCtx, row_sums, row_sums_, total
from .inputs import compiled, work_dtype
from .registry import register

EPS = 1e-8  # added to both softmaxes, mergekit's guard against log(0)
QUANTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5
SAMPLE_LIMIT = 1_000_000  # mergekit samples above this many elements


def quantile_ranks(n: int) -> list[int]:
    """mergekit's quantiles as ranks from the top (k-th largest, 1-based): index floor(q·(n − 1)) ascending."""
    return [n - (int(q * 4) * (n - 1)) // 4 for q in QUANTILES]


@dataclass
class _State:
    # a vector's softmax: (θ₁, θ₀) maxima, then Σexp, then KL (passes 0-2)
    maxima: tuple[float, float] = (0.0, 0.0)
    sums: tuple[float, float] = (1.0, 1.0)
    kl: float = 0.0
    row_kl: torch.Tensor | None = None  # a matrix's KL per softmax row (pass 0), float64
    selects: list[ops.RadixSelect] = field(default_factory=list)
    threshold: float = 0.0


@register
class ArceeFusion(Method):
    name = "arcee_fusion"
    mergekit_out_dtype = "float32"  # mergekit computes it in float32 and never casts it back
    reference = "https://arcee.ai"
    summary = "θ₁ where |θ₁ − θ₀|·KL(softmax θ₁ ‖ softmax θ₀) ≥ Q₂ + 1.5·IQR, else θ₀"
    base = "required"
    min_models = 1
    max_models = 1
    params = ()
    paths = frozenset({"torch", "compiled"})  # torch: on the CPU; compiled: arcee.c
    stats_kind = "importance quantiles (radix histograms); a vector's softmax (float64 sums)"

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return ctx.semantics == "mergekit"  # softmax, sort and quantiles over the whole tensor

    def passes(self, ctx: TensorCtx) -> int:
        if ctx.semantics == "mergekit" or ctx.numel == 0:
            return 0
        # a vector's (or scalar's) softmax needs the whole of it: its maxima, Σexp, KL, then the
        # selection's two histogram passes; a matrix's KL per row, and with it the first histogram
        return 5 if len(ctx.shape) <= 1 else 2

    def skips(self, ctx: TensorCtx, p: int, state: _State | None) -> bool:
        return p == self.passes(ctx) - 1 and not _highs(state)  # pass 1 settled every quantile

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: _State | None):
        if p == self.passes(ctx) - 1 and not _highs(state):  # pass 1 settled every quantile
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        kernel = compiled(ctx, rows.base, rows.models[0])  # the same bits, the inputs read in place
        # (as stored then: a vector's passes widen them to float64, exactly either way)
        a, b = (rows.base, rows.models[0]) if kernel is not None else _inputs(ctx, rows)
        if len(ctx.shape) > 1:
            if p == 0:  # as Python floats: small tensors kept across blocks would pin the allocator's heap
                if kernel is not None:  # the KLs and the histogram in one pass over the block
                    kl, hist = kernel.arcee_kl_hist(a, b, ctx.shape[-1])
                else:
                    kl = _row_kl(ctx, a, b)
                    hist = _histogram(a, b, kl, ctx.shape[-1], [], None)
                return kl.tolist(), hist
        else:
            if p == 0:
                return b.max().item() if b.numel() else -torch.inf, a.max().item() if a.numel() else -torch.inf
            if p == 1:
                return _exp_terms(b, state.maxima[0]), _exp_terms(a, state.maxima[1])
            if p == 2:
                return _kl_terms(b, a, state)
        kl, last = _row_kl_of(ctx, state, rows.r0, a.numel())
        if p == 3:  # a vector's: the selection's pass 1
            return _histogram(a, b, kl, last, [], kernel)
        return _histogram(a, b, kl, last, _highs(state), kernel)  # the selection's pass 2 (a matrix's pass 1, a vector's 4)

    def reduce(self, ctx: TensorCtx, p: int, partials: list, state: _State | None) -> _State:
        state = state or _State()
        if len(ctx.shape) > 1 and p == 0:
            state.row_kl = torch.tensor([v for part, _ in partials for v in part], dtype=torch.float64)
            partials = [hist for _, hist in partials]
        elif len(ctx.shape) <= 1 and p < 3:
            if p == 0:
                state.maxima = (max(x[0] for x in partials), max(x[1] for x in partials))
            elif p == 1:
                state.sums = (total([x[0] for x in partials]), total([x[1] for x in partials]))
            else:
                state.kl = max(total(partials), 0.0)
            return state
        if p < self.passes(ctx) - 1:  # the selection's pass 1
            hist = ops.summed_hist(partials, 2 * 65536)  # the three selections share the histogram
            state.selects = [ops.RadixSelect(k) for k in quantile_ranks(ctx.numel)]
            for s in state.selects:
                s.add(hist)
                s.end_pass()
            return state
        highs = _highs(state)
        hists = ops.summed_hist(partials, 65536 * len(highs)).reshape(-1, 65536)
        for s in state.selects:
            if s.found is None:
                s.add(hists[highs.index(s.high)])
        q1, q2, q3 = (s.result()[0] for s in state.selects)
        state.threshold = q2 + IQR_FACTOR * (q3 - q1)  # float64 from the float32 order statistics
        return state

    def merge(self, ctx: TensorCtx, rows: Rows, state: _State | None) -> torch.Tensor:
        if ctx.semantics == "mergekit":
            return _mergekit(ctx, rows)
        if ctx.numel == 0:
            return _inputs(ctx, rows)[0]
        kl, last = _row_kl_of(ctx, state, rows.r0, rows.base.numel())
        kernel = compiled(ctx, rows.base, rows.models[0])
        if kernel is not None:
            return kernel.arcee_merge(rows.base, rows.models[0], kl, last, state.threshold).reshape(rows.base.shape)
        a, b = _inputs(ctx, rows)
        keep = _importance(a, b, kl, last).double() >= state.threshold
        return torch.where(keep.to(a.device), b, a)


def _row_kl_of(ctx: TensorCtx, state: _State, r0: int, numel: int) -> tuple[torch.Tensor, int]:
    """The KL of each softmax row of a block from row r0 (a vector's one KL), and the rows' length."""
    if len(ctx.shape) <= 1:
        return torch.tensor([state.kl], dtype=torch.float64), max(1, numel)
    last = ctx.shape[-1]  # softmax rows: the last dimension (a block row may hold several)
    first = r0 * ctx.row_elems // last  # the block's first softmax row
    return state.row_kl[first : first + numel // last], last


def _importance(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, last: int) -> torch.Tensor:
    """|θ₁ − θ₀| · KL of the element's softmax row (kl: the block's, rows of `last` elements), float64
    rounded to float32 once (≥ 0: radix-selectable)."""
    diff = (b - a).abs().double().cpu()
    return (diff.reshape(-1, last) * kl[:, None]).float().reshape(diff.shape)


def _histogram(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, last: int, highs: list[int], kernel):
    """The selection's pass 1 (no highs: ops.radix_hist_high) or pass 2 (ops.radix_hist_low of each
    high, one after the other) over a block's importances, as the bins they fill and their counts:
    dense histograms, one per slice, would cost the reduce more than the counting."""
    if kernel is not None:
        return kernel.arcee_hist(a, b, kl, last, highs)
    imp = _importance(a, b, kl, last)
    return ops.sparse_hist(ops.radix_hist_high(imp) if not highs else torch.cat([ops.radix_hist_low(imp, h) for h in highs]))


def _highs(state: _State) -> list[int]:
    """The top 16 bits whose low 16 bits pass 2 counts (the selections pass 1 did not settle)."""
    return sorted({s.high for s in state.selects if s.found is None})


def _row_kl(ctx: TensorCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(softmax θ₁ ‖ softmax θ₀) of each softmax row (the last dimension) of a block, float64, ≥ 0
    (arcee.c's row_kl: the same operations)."""
    last = ctx.shape[-1]
    x, y = b.double().cpu().reshape(-1, last), a.double().cpu().reshape(-1, last)
    p = _softmax_rows(x) + EPS
    q = _softmax_rows(y) + EPS
    return row_sums_(p * detmath.log(p / q)).clamp(min=0)  # ≥ 0 but for rounding; summed in the product's own buffer


def _inputs(ctx: TensorCtx, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    work = work_dtype(ctx, rows)
    return rows.base.to(work), rows.models[0].to(work)


def _softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """softmax along each row of a float64 CPU matrix: exp(x − max) · (1 / Σ), the sum by a fixed tree
    (one division per row)."""
    e = detmath.exp(x - x.max(dim=1, keepdim=True).values)
    return e * (1.0 / row_sums(e))[:, None]


def _exp_terms(x: torch.Tensor, m: float) -> torch.Tensor:
    """A vector's exp(x − max), one float64 partial per element (added exactly by the reduce)."""
    return detmath.exp(x.double().cpu().reshape(-1) - m)


def _kl_terms(b: torch.Tensor, a: torch.Tensor, state: _State) -> torch.Tensor:
    """A vector's p·log(p/q) per element, float64."""
    p = detmath.exp(b.double().cpu().reshape(-1) - state.maxima[0]) * (1.0 / state.sums[0]) + EPS
    q = detmath.exp(a.double().cpu().reshape(-1) - state.maxima[1]) * (1.0 / state.sums[1]) + EPS
    return p * detmath.log(p / q)


def _mergekit(ctx: TensorCtx, rows: Rows) -> torch.Tensor:
    """mergekit 0.1.5's arcee_fusion over the whole tensor, in its dtype, on the CPU; float32 out
    (float64 for float64 work), as mergekit's float32 mask promotes it."""
    work = work_dtype(ctx, rows)
    if ctx.numel == 0:
        return rows.base.to(work)
    a = rows.base.to(work).cpu().reshape(ctx.shape)
    b = rows.models[0].to(work).cpu().reshape(ctx.shape)
    p = F.softmax(b, dim=-1) + EPS
    q = F.softmax(a, dim=-1) + EPS
    imp = (b - a).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(imp.reshape(-1)).values  # the whole tensor even above SAMPLE_LIMIT (see above)
    at = (torch.tensor(QUANTILES) * (ordered.numel() - 1)).long()  # float32 product, truncated
    q1, q2, q3 = ordered[at]
    mask = (imp >= q2 + IQR_FACTOR * (q3 - q1)).float()
    out = a + (b - a) * mask
    return out.reshape(rows.base.shape).to(rows.base.device)
