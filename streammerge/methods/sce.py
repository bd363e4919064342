"""SCE: Select, Calculate, Erase (Wan et al. 2024, FuseChat 2, arXiv:2408.07990; mergekit's `sce`).

    τ_t = θ_t − θ₀
    Select:    τ̂_t = τ_t on the k = int(nnz(v) · select_topk) positions of largest v = Var_t(τ_t)
               (population variance across the models; every position when select_topk ≥ 1)
    Calculate: w_t = mean(τ̂_t²) / Σ_s mean(τ̂_s²)   (1/n when that sum is below 1e-6)
    Erase:     γ = +1 where Σ_t τ̂_t ≥ 0, else −1;  a_t = [sign(τ̂_t) = γ]
    θ = θ₀ + Σ_t w_t a_t τ̂_t / max(Σ_t w_t a_t, 1e-6)

Default semantics, in streamed passes over row blocks (float32 work, float64 inputs stay float64):
  0. a 64K-bin histogram of the high 16 bits of v's float32 bits, and the count of v = 0 → k
  1. the low-16-bit histogram inside the k-th largest's bin → the threshold value (ops.RadixSelect)
  2. per-row counts of v equal to the threshold, when only some of those ties are kept: ties are kept
     lowest flat index first (ops.TrimThreshold), so any block split selects the same positions
  3. Σ τ̂_t² per model as float64 row sums, added exactly → w_t
With select_topk ≥ 1 only pass 3 runs. Where the compiled kernels take the rows (CPU, bf16/float32,
`inputs.compiled`) the passes and the merge run in C (sce.c: the same operations, the same bits).
mergekit semantics: its torch ops over the whole tensor in its dtype (torch.var, torch.topk's choice
among equal variances, float sums of its dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streammerge.methods import ops

from .base import Method, Param, Rows, TensorCtx, row_sums, total
from .inputs import compiled, resolved, work_dtype
from .registry import register

WEIGHT_FLOOR = 1e-6  # mergekit: Σ mean(τ̂²) below this gives equal weights; the divisor is clamped to it


@dataclass
class _State:
    k: int = 0
    select: ops.RadixSelect | None = None
    value: float = math.inf  # keep v > value, and the ties v == value described by tie_row/tie_keep
    tie_row: int = -1  # the row holding the last kept tie; -1: every tie is kept (or none, if value is inf)
    tie_keep: int = 0  # how many ties of tie_row are kept
    partial_ties: int = 0  # when only some ties at the threshold are kept, how many (pass 2 finds where)
    weights: tuple[float, ...] = ()


@register
class Sce(Method):
    name = "sce"
    reference = "arXiv:2408.07990"
    summary = "θ₀ + Σ w_t a_t τ̂_t / Σ w_t a_t: τ̂ on the top select_topk of Var_t(τ), w_t ∝ mean(τ̂_t²), a_t sign agreement"
    base = "required"
    min_models = 1
    params = (
        Param("select_topk", 1.0, low=0.0, high=1.0, per_model=False,
              doc="share of the positions (of those with non-zero variance) kept, by largest variance across models"),
        Param("int8_mask", False, kind=bool, per_model=False, per_tensor=False,
              doc="accepted for mergekit configs; no effect on the result (as in mergekit)"),
    )
    stats_kind = "variance top-k (radix histograms, per-row tie counts), Σ τ̂² per model (float64 row sums)"
    paths = frozenset({"torch", "compiled", "gpu"})  # compiled: sce.c

    # ---- passes ------------------------------------------------------------------------------

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return ctx.semantics == "mergekit"  # torch.var/topk/mean over the whole tensor, as mergekit

    def passes(self, ctx: TensorCtx) -> int:
        if ctx.semantics == "mergekit":
            resolved(self, ctx)  # checks the parameters
            return 0
        return 4 if self._selects(ctx) else 1

    def skips(self, ctx: TensorCtx, p: int, state: _State | None) -> bool:
        # pass 1 when pass 1's histogram settled the threshold (RadixSelect.found); pass 2 when every
        # tie at it is kept (or none is)
        return self._selects(ctx) and (p == 1 and (state.select is None or state.select.found is not None)
                                       or p == 2 and not state.partial_ties)

    def _selects(self, ctx: TensorCtx) -> bool:
        return resolved(self, ctx)["select_topk"] < 1

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: _State | None):
        kernel = compiled(ctx, rows.base, *rows.models)  # sce.c: the same ops, the same bits
        if p == self.passes(ctx) - 1:  # the weights pass: Σ τ̂² per model, per row
            if kernel is not None:
                return kernel.sce_sums(rows.base, rows.models, self._threshold(ctx, rows, state), rows.start)
            tv = self._selected(ctx, rows, self._task_vectors(ctx, rows), state)
            return torch.stack([row_sums(t * t) for t in tv])
        if p == 1 and (state.select is None or state.select.found):  # pass 1 settled the threshold
            return None
        if p == 2 and not state.partial_ties:  # nothing to locate
            return None
        if kernel is not None:
            if p == 0:
                hist = kernel.sce_hist(rows.base, rows.models, None)
                return ops.sparse_hist(hist), int(hist[0])  # bin 0 holds the variances +0 (a variance is never −0)
            if p == 1:
                return ops.sparse_hist(kernel.sce_hist(rows.base, rows.models, state.select.high))
            return kernel.sce_ties(rows.base, rows.models, state.value)
        var = _variance(self._task_vectors(ctx, rows))
        if p == 0:
            hist = ops.radix_hist_high(var)
            return ops.sparse_hist(hist), int(hist[0])
        if p == 1:
            return ops.sparse_hist(ops.radix_hist_low(var, state.select.high))
        return (var == state.value).sum(dim=1).cpu()  # p == 2: ties per row

    def reduce(self, ctx: TensorCtx, p: int, partials: list, state: _State | None) -> _State:
        if p == self.passes(ctx) - 1:
            n = partials[0].shape[0]  # [models, rows] per block
            means = [total([x[t] for x in partials]) / ctx.numel for t in range(n)] if ctx.numel else [0.0] * n
            s = math.fsum(means)
            state = state or _State()
            state.weights = tuple(m / s for m in means) if abs(s) >= WEIGHT_FLOOR else (1.0 / n,) * n
            return state
        if p == 0:
            zeros = sum(z for _, z in partials)
            k = int((ctx.numel - zeros) * resolved(self, ctx)["select_topk"])
            state = _State(k=max(k, 0))
            if state.k > 0:
                state.select = ops.RadixSelect(state.k)
                state.select.add(ops.summed_hist([hist for hist, _ in partials], 2 * 65536))
                state.select.end_pass()
            return state
        if p == 1:
            if state.select is not None:
                if state.select.found is None:
                    state.select.add(ops.summed_hist(partials, 65536))
                state.value, greater, equal = state.select.result()
                kept = state.k - greater  # ≥ 1: the k-th largest is a tie
                state.partial_ties = kept if kept < equal else 0
            return state
        if state.partial_ties:  # p == 2: the row where the kept ties run out
            upto = torch.cat(partials).cumsum(0)
            state.tie_row = int(torch.searchsorted(upto, state.partial_ties))
            state.tie_keep = state.partial_ties - (int(upto[state.tie_row - 1]) if state.tie_row else 0)
        return state

    # ---- the merge -----------------------------------------------------------------------------

    def merge(self, ctx: TensorCtx, rows: Rows, state: _State | None) -> torch.Tensor:
        if ctx.semantics == "mergekit":
            return _mergekit(ctx, rows, resolved(self, ctx))
        kernel = compiled(ctx, rows.base, *rows.models)
        if kernel is not None:  # sce.c: the ops below, the same bits
            return kernel.sce_merge(rows.base, rows.models, self._threshold(ctx, rows, state), rows.start, state.weights,
                                    WEIGHT_FLOOR)
        tv = self._selected(ctx, rows, self._task_vectors(ctx, rows), state)
        work = tv[0].dtype
        # the vote Σ τ̂_t and the sums below run model by model: fixed order, any block split
        score = tv[0].clone()
        for t in tv[1:]:
            score += t
        positive = score >= 0
        num = torch.zeros_like(score)
        den = torch.zeros_like(score)
        for t, w in zip(tv, state.weights):
            agree = torch.where(positive, t > 0, t < 0)
            ew = agree.to(work) * w
            num += t * ew
            den += ew
        out = rows.base.to(work) + num / den.clamp(min=WEIGHT_FLOOR)
        return out.add_(0.0)  # −0 → +0, as the other default paths

    def _task_vectors(self, ctx: TensorCtx, rows: Rows) -> list[torch.Tensor]:
        work = work_dtype(ctx, rows)
        base = rows.base.to(work)
        return [m.to(work) - base for m in rows.models]

    def _selected(self, ctx: TensorCtx, rows: Rows, tv: list[torch.Tensor], state: _State | None) -> list[torch.Tensor]:
        """τ̂: τ where the variance is among the k largest (ties lowest flat index first), else 0."""
        threshold = self._threshold(ctx, rows, state)
        if threshold is None:
            return tv
        keep = ops.trim_keep(_variance(tv), threshold, rows.start)
        return [torch.where(keep, t, 0) for t in tv]

    def _threshold(self, ctx: TensorCtx, rows: Rows, state: _State | None) -> ops.TrimThreshold | None:
        """The variances τ̂ keeps in this block: None, every one (select_topk ≥ 1); none when k = 0."""
        if not self._selects(ctx):
            return None
        if state.k == 0:
            return ops.TrimThreshold(math.inf, -1)
        return ops.TrimThreshold(state.value, self._last_tie(ctx, rows, state))

    def _last_tie(self, ctx: TensorCtx, rows: Rows, state: _State) -> int:
        """The flat index of the last kept tie, as ops.trim_keep reads it for this block."""
        if state.tie_row < 0:
            return ops.ALL_TIES
        cols = ctx.row_elems
        if rows.r0 <= state.tie_row < rows.r1:  # the row's own variances (elementwise: the block's bits)
            i = state.tie_row - rows.r0
            row = Rows(state.tie_row, state.tie_row + 1, rows.base[i : i + 1], [m[i : i + 1] for m in rows.models])
            ties = torch.nonzero(_variance(self._task_vectors(ctx, row))[0] == state.value).reshape(-1)
            return state.tie_row * cols + int(ties[state.tie_keep - 1])
        # a block before the row keeps all its ties, one after it none: any index between says so
        return state.tie_row * cols - 1


def _variance(tv: list[torch.Tensor]) -> torch.Tensor:
    """Var_t(τ_t) per position (population, two-pass), in the work dtype model by model (a fixed
    order: the same bits in any block), as float32 for the radix selection."""
    mean = tv[0].clone()
    for t in tv[1:]:
        mean += t
    mean /= len(tv)
    acc = (tv[0] - mean).square_()
    for t in tv[1:]:
        acc += (t - mean).square_()
    return acc.div_(len(tv)).float()


def _mergekit(ctx: TensorCtx, rows: Rows, params: dict) -> torch.Tensor:
    """mergekit 0.1.5's sce over the whole tensor: its op sequence in its dtype, on the CPU (its
    reductions and topk's order among equal values are the CPU's)."""
    work = work_dtype(ctx, rows)
    base = rows.base.to(work).cpu()
    tv = torch.stack([m.to(work).cpu() - base for m in rows.models])  # [n, rows, cols]
    n = tv.shape[0]
    mask_dtype = torch.int8 if params["int8_mask"] else work
    density = params["select_topk"]
    if density < 1:
        if density <= 0:
            mask = torch.zeros_like(tv[0], dtype=mask_dtype)
        else:
            var = torch.var(tv, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * density)  # a float32 product, as mergekit's
            mask = torch.zeros_like(var, dtype=mask_dtype)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tv = tv * mask.unsqueeze(0)
    # erase: the sign of the column sum elects, a zero τ̂ never agrees
    elected = (tv.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    agree = tv.sign().to(mask_dtype) == elected
    # calculate: mean squares in the work dtype, their sum as a Python float
    means = tv.square().reshape(n, -1).mean(dim=1)
    s = torch.sum(means).item()
    weights = torch.ones_like(means) / n if abs(s) < WEIGHT_FLOOR else means / s
    weights = weights.view(n, 1, 1) * agree
    merged = (tv * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=WEIGHT_FLOOR)
    return (base + merged).to(rows.base.device)
