"""The merge math: pure functions over tensors. No I/O, no globals, any device.

Notation (as in docs/methods.md): θ₀ base, θ_t fine-tune t, τ_t = θ_t − θ₀ its task vector, w_t its
weight, λ the global scale. Every function works on a *block of rows* of a tensor; whatever needs the
whole tensor (a top-k threshold, an L1 norm) is computed beforehand into `TensorStats`, so a tensor
merged in one block or in many gives the same bits.

| method          | sparsify each τ_t          | combine                                        |
| --------------- | -------------------------- | ---------------------------------------------- |
| task_arithmetic | -                          | θ₀ + λ Σ w_t τ_t                   (Ilharco 2023) |
| magnitude_prune | top_k                      | θ₀ + λ Σ w_t τ̂_t                                |
| ties            | top_k                      | θ₀ + λ disjoint_merge(elect(τ̂))    (Yadav 2023)  |
| dare_linear     | dare                       | θ₀ + λ Σ w_t τ̂_t                   (Yu 2024)     |
| dare_ties       | dare (then top_k if asked) | θ₀ + λ disjoint_merge(elect(τ̂))                |
| breadcrumbs     | band                       | θ₀ + λ Σ w_t τ̂_t                   (Davari 2023) |
| breadcrumbs_ties| band                       | θ₀ + λ disjoint_merge(elect(τ̂))                |
| della           | magprune                   | θ₀ + λ disjoint_merge(elect(τ̂))    (Deep 2024)   |
| della_linear    | magprune                   | θ₀ + λ Σ w_t τ̂_t                                |
| linear          | -                          | Σ w_t θ_t / Σ w_t                                |
| slerp           | -                          | s0 θ₀ + s1 θ₁, one other model     (Shoemake 1985) |

- top_k (TIES "trim"): keep the k = int(d · density) largest |τ|; ties at the threshold are kept
  lowest flat index first, so the result never depends on chunking, device or threads.
- dare: keep each element with probability density (the counter-based mask of `mask.py`), scale
  kept ones by 1/density so E[dare(τ)] = τ (DARE, Yu et al. 2024, eq. 2).
- band (Model Breadcrumbs): with t = int(density·d) and o = int(gamma·d), drop the o' = min(o, d − t)
  largest |τ| (outliers) and keep the next t: top_k(o' + t) minus top_k(o'), ties as in top_k.
- magprune (DELLA): within each row, rank r = 0..c−1 by |τ| (ties lowest index first); keep with
  p = (density − ε) + r/(c−1)·2·ε, the counter-based mask at a per-element threshold; kept ÷ p.
- elect: γ = sign(Σ_t w_t τ̂_t) ("sum") or sign(Σ_t sign(τ̂_t)) ("count"); γ = 0 → +1.
- disjoint_merge over models whose τ̂_t is non-zero with sign γ: mean Σwτ̂/Σw, sum Σwτ̂, max γ·max|τ̂|.
- slerp: the whole tensors as vectors, Ω their angle, s0 = sin((1−t)Ω)/sin Ω, s1 = sin(tΩ)/sin Ω
  (lerp's 1−t, t when nearly parallel); the norms and the dot product come from a stats pass.

The presets (`mergekit`, `peft`, `fusionbench`) only change the options below; the op order is
mergekit's, so that with its compute dtype (e.g. bf16) every rounding step falls where its does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from streammerge.methods.base import row_sums_

Sparsify = Literal["none", "trim", "dare", "band", "magprune"]
Combine = Literal["sum", "ties", "average", "copy"]


@dataclass(frozen=True)
class MergeOptions:
    """Everything about *how* a method computes, resolved from the config and the semantics preset."""

    method: str
    merge_func: Literal["mean", "sum", "max"] = "mean"  # ties family: the disjoint merge
    normalize: bool = False  # sum family: divide Σ w τ by Σ w; linear: divide by Σ w
    sign_method: Literal["sum", "count"] = "sum"
    weighted_sign: bool = True  # peft elects on unweighted deltas
    mean_divisor: Literal["weight", "count"] = "weight"  # peft divides by the number of agreeing models
    zero_sign: Literal["positive", "majority"] = "positive"  # fusionbench: γ = 0 takes the global majority sign
    # exact: int(d·density), ties lowest index first; inclusive: FusionBench's int(d·K)+1 and every tie;
    # argsort: mergekit's max(1, int(d·density)) in torch.argsort order (whole tensors only)
    trim_rule: Literal["exact", "inclusive", "argsort"] = "exact"
    rescale: Literal["none", "inverse", "l1"] = "inverse"  # DARE: ÷density (DELLA ÷p), or mergekit's L1 ratio
    divide_by_density: bool = False  # DARE's rescale as a float32 division (PEFT, FusionBench), not × 1/density
    dare_scope: Literal["all", "linear"] = "linear"
    trim_scope: Literal["tensor", "global"] = "tensor"
    compute_dtype: torch.dtype | None = torch.float32  # None: the promotion of the inputs' dtypes
    fused_linear: bool = False  # mergekit's linear accumulates with a fused multiply-add
    # Merged zeros are written as +0 (a +0 added last), as every float32 path (numpy, compiled,
    # torch) does. mergekit's own bits keep a zero's sign.
    positive_zeros: bool = True

    @property
    def whole_tensors(self) -> bool:
        """mergekit's sorts and L1 rescale see a whole tensor at once; so must we, to match it."""
        sorted_whole = self.sparsify in ("trim", "band", "magprune") and self.trim_rule == "argsort"
        return sorted_whole or (self.sparsify != "none" and self.rescale == "l1")

    def as_strings(self) -> dict[str, str]:
        """The fields, as the manifest and the fingerprint record them (not the cached lookups below)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    # looked up once: the kernels read these for every chunk
    @functools.cached_property
    def sparsify(self) -> Sparsify:
        """The method's sparsifier (methods/task_vectors.py); "none" for a method of its own (hooks)."""
        return getattr(_method(self.method), "sparsify", "none")

    @functools.cached_property
    def combine(self) -> Combine | None:
        """The method's combiner; None for a method that merges through its own hooks (methods/base.py)."""
        return getattr(_method(self.method), "combine", None)


def _method(name: str):
    from streammerge.methods import (
        registry,  # methods import ops: resolved at call time
    )

    return registry.get(name)


@dataclass(frozen=True)
class TensorSpec:
    """Everything about merging one tensor except its data: the plan's parameters plus the
    whole-tensor quantities the stats passes found."""

    opts: MergeOptions
    weights: tuple[float, ...]
    lam: float
    dare: bool
    keys: tuple[int, ...]  # DARE mask keys, per model
    densities: tuple[float, ...]
    dare_scales: tuple[float, ...]  # 1/density, 1, or mergekit's L1 ratio
    trims: tuple[TrimThreshold | None, ...]  # per model; None keeps everything
    majority: float = 1.0
    merged: bool = True
    given: tuple[bool, ...] = ()  # per model: its rows are τ itself (a LoRA adapter, lora.py), not θ
    outliers: tuple[TrimThreshold | None, ...] = ()  # breadcrumbs: per model, the top-|τ| band dropped
    gammas: tuple[float, ...] = ()  # breadcrumbs: outlier share per model
    epsilons: tuple[float, ...] = ()  # della: keep-probability spread per model
    della_row: int = 0  # della: elements per ranked row (the CPU kernels step by whole rows)
    scale: float = 1.0  # an unmerged tensor's factor (passthrough's `scale`)
    ctx: Any = None  # a method of its own (methods/base.py): its TensorCtx
    state: Any = None  # ... and what its stats passes found


# ---------------------------------------------------------------------------------------------
# task vectors


def task_vectors(base: torch.Tensor, finetuned: Sequence[torch.Tensor], given: Sequence[bool] = ()) -> torch.Tensor:
    """τ_t = θ_t − θ₀ for every model, stacked: shape [n, *base.shape], in base's (compute) dtype.

    Fine-tunes in a narrower dtype are promoted inside the subtraction, without a converted copy.
    Where `given[t]`, finetuned[t] already is τ_t (a LoRA adapter's) and is only converted.
    """
    out = torch.empty((len(finetuned), *base.shape), dtype=base.dtype, device=base.device)
    for i, ft in enumerate(finetuned):
        if given and given[i]:
            out[i].copy_(ft)
            continue
        wider = ft.dtype != base.dtype and torch.finfo(ft.dtype).bits > torch.finfo(base.dtype).bits
        torch.sub(ft.to(base.dtype) if wider else ft, base, out=out[i])
    return out


# ---------------------------------------------------------------------------------------------
# trim: exact top-k by radix selection over float bit patterns


@dataclass(frozen=True)
class TrimThreshold:
    """Keep |τ| > value, and the elements equal to it up to flat index `last_tie`.

    Ties at the threshold are kept lowest flat index first, so the kept set depends only on the
    tensor; `last_tie` = −1 keeps no tie, ALL_TIES keeps every one.
    """

    value: float
    last_tie: int


ALL_TIES = 2**63 - 1


def _abs_bits(abs_block: torch.Tensor) -> torch.Tensor:
    """Bit patterns of non-negative floats as int32: their integer order is their float order."""
    return abs_block.reshape(-1).float().view(torch.int32)


def radix_hist_high(abs_block: torch.Tensor) -> torch.Tensor:
    """Pass 1 of the selection: a histogram of the top 16 bits of |τ|, each bin split in two: bin
    2·top counts the elements whose low 16 bits are zero, 2·top + 1 the others (131072 bins)."""
    bits = _abs_bits(abs_block)
    return torch.bincount((bits >> 16 << 1) | ((bits & 0xFFFF) != 0), minlength=2 * 65536)


def radix_hist_low(abs_block: torch.Tensor, high: int) -> torch.Tensor:
    """Pass 2: a histogram of the low 16 bits of the elements whose top 16 bits are `high`."""
    bits = _abs_bits(abs_block)
    return torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=65536)


def sparse_hist(hist) -> tuple[np.ndarray, np.ndarray]:
    """A histogram (torch or numpy) as the bins it fills and their counts, int64: what a slice hands
    its method's reduce (a dense one per slice, kept until the reduce, would be 1 MiB each)."""
    hist = hist.cpu().numpy() if isinstance(hist, torch.Tensor) else hist
    bins = np.flatnonzero(hist)
    return bins, hist[bins].astype(np.int64)


def summed_hist(partials: list, size: int) -> np.ndarray:
    """The slices' (bins, counts) added into one histogram of `size` bins (in numpy: torch would
    spread these small ops over threads, between the compute threads' work)."""
    hist = np.zeros(size, dtype=np.int64)
    for bins, counts in partials:
        np.add.at(hist, bins, counts)
    return hist


def radix_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element (1-based), and how many elements lie above that bin."""
    above_or_at = np.cumsum(hist[::-1])  # above_or_at[j] = count in bins >= 65535 - j
    j = int(np.searchsorted(above_or_at, k))
    above = int(above_or_at[j - 1]) if j > 0 else 0
    return 65535 - j, above


class RadixSelect:
    """Exact k-th largest |τ| over any number of blocks, in two passes, holding two 64K-bin histograms.

    Pass 1 counts the top 16 bits of each float32 bit pattern, which finds the bin of the k-th
    largest; pass 2 counts the low 16 bits inside that bin. The same for one block, many blocks, or
    every tensor of a model (the global trim domain). Histograms may come from torch or numpy; they
    are summed with numpy (small torch ops between the compute threads' work cost milliseconds each).

    Pass 1 also counts, per bin, the elements whose low 16 bits are zero: the bin's smallest value.
    When the k-th largest is one of them, pass 1 has found it and pass 2 is skipped (`found`). That
    is the usual case: τ of bf16 weights, a − b with |a − b| below |b|, has at most 8 significant
    bits, all in the top 16.
    """

    def __init__(self, k: int):
        self.k = k
        self.hist = np.zeros(2 * 65536, dtype=np.int64)  # pass 1: radix_hist_high's split bins
        self.high: int | None = None  # None during pass 1
        self.above_high = 0
        self.found: tuple[float, int, int] | None = None  # result() when pass 1 settled it

    def add(self, hist) -> None:
        self.hist += hist.cpu().numpy() if isinstance(hist, torch.Tensor) else hist

    def end_pass(self) -> None:
        """Call after pass 1."""
        split = self.hist.reshape(65536, 2)
        self.high, self.above_high = radix_bin(split[:, 0] + split[:, 1], self.k)  # (sum(axis=1): ~10x slower)
        zero_low, nonzero_low = (int(c) for c in split[self.high])
        if self.k - self.above_high > nonzero_low:  # the k-th largest is the bin's smallest value
            self.found = (_float(self.high << 16), self.above_high + nonzero_low, zero_low)
        self.hist = np.zeros(65536, dtype=np.int64)

    def result(self) -> tuple[float, int, int]:
        """After pass 2 (or pass 1 when `found`): (the k-th largest value, count strictly greater, count equal)."""
        if self.found is not None:
            return self.found
        low, above_low = radix_bin(self.hist, self.k - self.above_high)
        return _float((self.high << 16) | low), self.above_high + above_low, int(self.hist[low])


SUB = 65536  # elements per sub-block of the bracket pass's counts of hot values (ckernel.h's SUB)
BRACKET_KEYS = 2049  # a bracket's keys: its width >> shift is below 2^11


class BracketSelect:
    """Exact k-th largest |τ| of one block, usually in one pass that only compares most elements.

    A sample of the block's |τ| places a bracket of bit patterns [lo, hi] around the k-th largest,
    four standard deviations of the sample rank wide. The pass (ckernel's bracket_range) counts the
    elements above `hi` in a loop that vectorizes and histograms only those inside, by
    key = (v >> shift) − (lo >> shift), each key split like RadixSelect's pass 1 by whether its low
    `shift` bits are zero. Two values frequent in the sample (`hot`: τ of bf16 weights takes few
    values, and exact zeros are common) are counted apart, per sub-block of SUB elements, so that a
    partly kept tie at one of them is then found by scanning one sub-block. When the k-th largest
    lies in a key of several patterns (float32 τ, FP8's dequantized τ), the values the pass kept
    inside the bracket settle it; where there were too many to keep, the next pass narrows the
    bracket to that key (2^11 times narrower each time). When it lies outside the bracket, `missed`: the caller falls back to
    RadixSelect. The sample only decides how fast: the result is exact either way.
    """

    def __init__(self, k: int, numel: int, sample: np.ndarray):
        self.k = k
        size, q = len(sample), k / numel
        margin = 4 * math.sqrt(size * q * (1 - q)) + 16
        top, bottom = int(q * size - margin), int(q * size + margin)  # ranks from the largest, 0-based
        ranks = [size - 1 - r for r in (top, bottom) if 0 <= r < size]  # the same, from the smallest
        s = np.partition(sample, ranks) if ranks else sample
        hi = int(s[size - 1 - top]) if top >= 0 else 0x7FFFFFFF  # every |τ| bit pattern is at most 0x7FFFFFFF
        lo = int(s[size - 1 - bottom]) if bottom < size else 0
        inside = sample[(sample >= lo) & (sample <= hi)]
        step = max(1, len(inside) // 4096)  # a hot value is frequent in any share of them
        values, counts = np.unique(inside[::step], return_counts=True)
        frequent = np.argsort(counts, kind="stable")[::-1][:2]
        self.hot = [int(values[j]) for j in frequent if counts[j] * step * 1024 >= size]  # 1/1024 of the sample or more
        # the pass keeps the values inside where most have low bits (float32 τ, FP8's dequantized τ): a
        # key then holds several values, settled from them; τ of bf16 weights is settled by the key's
        # smallest value, and keeping its values would only cost fresh memory
        self.keeps = len(inside) > 0 and 2 * int(np.count_nonzero(inside & 0xFFFF)) > len(inside)
        self.found: tuple[float, int, int] | None = None  # (value, count greater, count equal)
        self.hot_subs: np.ndarray | None = None  # the last pass's hot-value counts per sub-block
        self.missed = False
        self.passes = 0
        self._bracket(lo, hi)

    def _bracket(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.shift = max(0, (hi - lo).bit_length() - 11)

    def _slot(self, v: int) -> int:
        return 2 * ((v >> self.shift) - (self.lo >> self.shift)) + ((v & ((1 << self.shift) - 1)) != 0)

    def add(self, above: int, hist: np.ndarray, hot_subs: np.ndarray, values: np.ndarray | None = None) -> None:
        """After a pass: sets `found`, or narrows the bracket for another pass, or sets `missed`.
        `hot_subs`: per hot value, how many equal it in each sub-block (kept: they locate a tie).
        `values`: the pass's values inside the bracket other than the hot ones (all of them, or None),
        which settle a key of several patterns without another pass."""
        self.passes += 1
        self.hot_subs = hot_subs
        hot_counts = [int(c) for c in hot_subs.sum(axis=1)]
        hist = hist.copy()
        for v, count in zip(self.hot, hot_counts):
            if self.lo <= v <= self.hi:
                hist[self._slot(v)] += count
        keys = hist.reshape(-1, 2)
        above_or_at = above + np.cumsum(keys.sum(axis=1)[::-1])  # above_or_at[j]: above key BRACKET_KEYS − 1 − j, or at it
        j = int(np.searchsorted(above_or_at, self.k))
        if above >= self.k or j == len(above_or_at):  # the k-th largest is above or below the bracket
            self.missed = True
            return
        key, greater = BRACKET_KEYS - 1 - j, int(above_or_at[j - 1]) if j else above
        zero_low, nonzero_low = (int(c) for c in keys[key])
        pattern = ((self.lo >> self.shift) + key) << self.shift  # the key's smallest pattern
        if self.k - greater > nonzero_low:  # the k-th largest is that smallest pattern
            self.found = (_float(pattern), greater + nonzero_low, zero_low)
        elif values is not None and (found := self._among(values, hot_counts, pattern, nonzero_low, greater)) is not None:
            self.found = found
        elif self.passes == 3:  # 2^33 patterns narrowed: cannot happen, but never loop
            self.missed = True
        else:
            self._bracket(max(self.lo, pattern + 1), min(self.hi, pattern + (1 << self.shift) - 1))

    def _among(self, values: np.ndarray, hot_counts: Sequence[int], pattern: int, larger: int, greater: int) -> tuple[float, int, int] | None:
        """The k-th largest among the key's values above its smallest `pattern` (`larger` of them,
        `greater` elements above the key): the kept values there and the hot values there."""
        top = pattern | ((1 << self.shift) - 1)
        above_pattern = values[(values > pattern) & (values <= top)]
        kinds, counts = np.unique(above_pattern, return_counts=True)
        extra = [(v, c) for v, c in zip(self.hot, hot_counts) if pattern < v <= top and c]
        if extra:
            kinds = np.concatenate([kinds, np.array([v for v, _ in extra], kinds.dtype)])
            counts = np.concatenate([counts, np.array([c for _, c in extra], counts.dtype)])
            order = np.argsort(kinds, kind="stable")
            kinds, counts = kinds[order], counts[order]
        if int(counts.sum()) != larger:  # not every value was kept (cannot happen): narrow instead
            return None
        above_or_at = np.cumsum(counts[::-1])  # from the largest
        j = int(np.searchsorted(above_or_at, self.k - greater))
        return _float(int(kinds[::-1][j])), greater + (int(above_or_at[j - 1]) if j else 0), int(counts[::-1][j])


def _float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def trim_rank(numel: int, density: float, rule: str) -> int | None:
    """Which k-th largest |τ| the threshold is: None keeps everything, 0 keeps nothing.

    `exact` keeps k = int(numel·density) elements; `inclusive` (FusionBench) thresholds at its
    kthvalue(numel − int(numel·K)), i.e. the (int(numel·K)+1)-th largest, and keeps every tie.
    """
    k = int(numel * density)
    if k >= numel:
        return None
    return k + 1 if rule == "inclusive" else k


def argsort_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's trim: the first max(1, int(d·density)) of torch.argsort(|τ|, descending) (unstable).

    Sorted on the CPU whatever the device: an unstable sort orders equal values its own way on each
    device, and the CPU's order is the one that gives mergekit's bytes (and the same on a GPU).
    """
    flat = delta.abs().reshape(-1).float().cpu()
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True)[:k]] = True
    return keep.view(delta.shape).to(delta.device)


def breadcrumbs_ranks(numel: int, density: float, gamma: float) -> tuple[int | None, int | None]:
    """Model Breadcrumbs' band as two top-k ranks: keep top_k(upper) minus top_k(outliers).

    mergekit: t = int(density·d) kept, o = int(gamma·d) outliers, fewer outliers when t + o > d.
    `upper` None keeps everything above the band (no small values dropped); `outliers` None drops
    nothing at the top (no mask to apply).
    """
    if density >= 1:
        return None, None
    target, n_top = int(density * numel), int(gamma * numel)
    n_top = numel - target - max(0, numel - target - n_top)
    upper = n_top + target
    return (None if upper >= numel else upper), (n_top or None)


def band_keep(abs_block: torch.Tensor, upper: TrimThreshold | None, outliers: TrimThreshold | None, start: int) -> torch.Tensor:
    """Keep-mask of a block: in the top `upper` and not in the top `outliers` (None: no bound)."""
    keep = trim_keep(abs_block, upper, start) if upper is not None else torch.ones_like(abs_block, dtype=torch.bool)
    if outliers is not None:
        keep &= ~trim_keep(abs_block, outliers, start)
    return keep


def outliers_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's breadcrumbs mask: ascending torch.sort of |τ| (unstable, so on the CPU as in
    argsort_keep), keep [n_bot, n_bot + t)."""
    flat = delta.abs().reshape(-1).float().cpu()
    n = flat.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.sort(flat, descending=False).indices[n_bot : n_bot + target]] = True
    return keep.view(delta.shape).to(delta.device)


def trim_keep(abs_block: torch.Tensor, t: TrimThreshold, start: int) -> torch.Tensor:
    """Keep-mask of a block whose first element has flat index `start`."""
    value = torch.tensor(t.value, dtype=abs_block.dtype)  # 0-dim on the CPU: a scalar to any device, no sync
    keep = abs_block > value
    end = start + abs_block.numel()
    if t.last_tie < start:
        return keep
    equal = abs_block == value
    if t.last_tie < end - 1:  # the block holding the last kept tie
        index = torch.arange(start, end, device=abs_block.device).view(abs_block.shape)
        equal &= index <= t.last_tie
    return keep | equal


# ---------------------------------------------------------------------------------------------
# DARE


def dare(delta: torch.Tensor, keep: torch.Tensor, scale: float, divisor: float | None = None) -> torch.Tensor:
    """Drop-and-rescale in place: τ ⊙ m · scale (Yu et al. 2024). `scale` is 1/density, 1, or mergekit's L1 ratio;
    with `divisor`, τ ⊙ m ÷ divisor instead (PEFT's and FusionBench's rescale: one ulp from × 1/density)."""
    delta.mul_(keep)
    if divisor is not None:
        delta.div_(divisor)
    elif scale != 1.0:
        delta.mul_(scale)
    return delta


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor, work: torch.dtype | None = None) -> float:
    """mergekit's rescale since 2025: ‖τ‖₁ / ‖τ ⊙ m‖₁ over the whole tensor (1 when either is ~0).

    As mergekit computes it: torch sums in the work dtype, the ratio rounded to that dtype. DARE
    and DELLA work in bf16 for bf16, else float32; the magnitude sparsifiers (trim, breadcrumbs) in
    the tensor's own dtype (pass `work=delta.dtype`). Summed on the CPU: a device sums in its own
    order, and a different last bit of the factor would change every element.
    """
    work = work or (torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32)
    before, after = delta.to(work).cpu().abs().sum(), kept.to(work).cpu().abs().sum()
    if before < 1e-7 or after < 1e-7:
        return 1.0
    return (before / after).item()


# ---------------------------------------------------------------------------------------------
# DELLA's magnitude-ranked keep probabilities (MagPrune, Deep et al. 2024)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float, mergekit: bool = False) -> torch.Tensor:
    """Keep probability of each element: p = (density − ε) + r/(c − 1)·2·ε, r its rank by |τ| in its row.

    Rows are the tensor viewed as [shape[0], −1] (a 1-D tensor is one row), so row blocks suffice.
    Default: ranks 0..c−1 by a stable ascending sort (ties lowest index first), p in float64 (a
    single-column row gets p = density). `mergekit`: mergekit's own arithmetic, bit for bit — its
    unstable argsort, ranks and p in the work dtype (bf16 for bf16, else float32).
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    if mergekit:
        work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
        # unstable sorts, on the CPU as in argsort_keep
        ranks = torch.argsort(rows.abs().cpu(), dim=1, descending=False).argsort(dim=1).to(delta.device, work) + 1
        lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        return ((density - epsilon) + rank_norm * 2 * epsilon).view(delta.shape)
    cols = rows.shape[1]
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=rows.device).expand_as(order))
    return della_rank_probabilities(cols, density, epsilon, rows.device)[ranks].view(delta.shape)


def della_rank_probabilities(cols: int, density: float, epsilon: float, device: torch.device | None = None) -> torch.Tensor:
    """p of the ranks 0..cols−1 of a row of `cols` elements, float64 (the default rule; one column: density).

    p depends on the rank alone, so it is computed once per rank and looked up: by the torch path
    above and by the numpy kernel (kernels.py), which must give the same float64 values.
    """
    rank_norm = torch.arange(cols, dtype=torch.float64, device=device) / (cols - 1) if cols > 1 else \
        torch.full((1,), 0.5, dtype=torch.float64, device=device)
    return (density - epsilon) + rank_norm * 2 * epsilon


def keep_thresholds(p: torch.Tensor) -> torch.Tensor:
    """Per-element mask thresholds floor(p·2³²) as int64 (p in [0, 1]; exact: scaling by 2³² is exact)."""
    return torch.floor(p.double() * 4294967296.0).to(torch.int64)


def della(delta: torch.Tensor, keep: torch.Tensor, p: torch.Tensor | None, scale: float) -> torch.Tensor:
    """MagPrune in place: τ ⊙ m, each kept element ÷ its p (DELLA), or × a whole-tensor factor (mergekit's L1)."""
    delta.mul_(keep)
    if p is not None:
        delta.div_(p.to(delta.dtype))
    elif scale != 1.0:
        delta.mul_(scale)
    return delta


# ---------------------------------------------------------------------------------------------
# elect + disjoint merge (TIES, Yadav et al. 2023, §3)


def sign_score(voters: torch.Tensor, opts: MergeOptions) -> torch.Tensor:
    """Σ_t v_t ("sum") or Σ_t sign(v_t) ("count") over the models' votes v_t."""
    return (voters.sign() if opts.sign_method == "count" else voters).sum(dim=0)


def elect(voters: torch.Tensor, opts: MergeOptions, majority: float) -> torch.Tensor:
    """γ, the elected sign per element, in voters' dtype (+1/−1; 0 possible only under fusionbench).

    `voters` are the sparsified task vectors [n, ...], weighted unless the preset votes unweighted
    (PEFT): with a negative weight a model votes against its own delta, as in mergekit.
    """
    score = sign_score(voters, opts)
    if opts.zero_sign == "majority":
        gamma = score.sign()
        return torch.where(gamma == 0, torch.tensor(majority, dtype=gamma.dtype), gamma)
    return (score >= 0).to(voters.dtype) * 2 - 1


def agreement(voters: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """1 where a model's vote is non-zero with the elected sign, else 0 (in voters' dtype)."""
    # FusionBench tests γ > 0 rather than equality: with γ = 0 it takes the negative deltas.
    positive = gamma > 0
    return torch.where(positive, voters > 0, voters < 0).to(voters.dtype)


# ---------------------------------------------------------------------------------------------
# one block


def column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """One weight per model as a [n, 1, ...] tensor in `like`'s dtype and device, to broadcast over
    `like` [n, ...]. Sent without waiting: a blocking copy would stall a GPU's queued work every block."""
    w = torch.tensor(weights, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return w.to(like.device, non_blocking=True)


def merge_block(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: Sequence[float],
    lam: float,
    opts: MergeOptions,
    majority: float = 1.0,
) -> torch.Tensor:
    """Combines sparsified task vectors `deltas` [n, ...] onto `base`; all in the compute dtype.

    The op order is mergekit's (weights in the compute dtype, λ a Python scalar), so in bf16 every
    rounding matches it; in float32 this is the formula in the module docstring.
    """
    w = column(weights, deltas)
    if opts.combine == "ties":
        weighted = deltas * w
        voters = weighted if opts.weighted_sign else deltas
        gamma = elect(voters, opts, majority)
        agree = agreement(voters, gamma)
        if opts.merge_func == "max":
            merged = (deltas.abs() * agree).amax(dim=0) * gamma
        else:
            weighted.mul_(agree)
            merged = weighted.sum(dim=0)
            if opts.merge_func == "mean":
                divisor = agree.sum(dim=0) if opts.mean_divisor == "count" else (w * agree).sum(dim=0)
                merged /= divisor.masked_fill_(divisor == 0, 1)
    else:
        merged = (deltas * w).sum(dim=0)
        if opts.normalize:
            divisor = w.sum(dim=0)
            merged /= divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    if lam != 1:
        merged *= lam
    out = base + merged
    if opts.positive_zeros:
        out += 0.0  # −0 + 0 = +0; nothing else changes
    return out


def linear_block(models: Sequence[torch.Tensor], weights: Sequence[float], opts: MergeOptions, dtype: torch.dtype) -> torch.Tensor:
    """Weighted average Σ w_t θ_t / Σ w_t (model soups, Wortsman et al. 2022); θ₀ is not used."""
    if opts.fused_linear:
        # mergekit: R = fma(θ_t, w_t, R) in float32 (torch addcmul_ on AVX2/512), emulated exactly
        # in float64 so the bits do not depend on the CPU's instruction set.
        w32 = [torch.tensor(w, dtype=torch.float32) for w in weights]
        acc = torch.zeros(models[0].shape, dtype=torch.float32, device=models[0].device)
        for m, w in zip(models, w32):
            acc = (acc.double() + m.double() * w.item()).float()
        if opts.normalize:
            total = w32[0]
            for w in w32[1:]:
                total = total + w
            acc /= total
        return acc.to(dtype)
    stacked = torch.stack([m.to(dtype) for m in models])
    w = column(weights, stacked)
    out = (stacked * w).sum(dim=0)
    if opts.normalize:
        out /= w.sum(dim=0)
    if opts.positive_zeros:
        out += 0.0
    return out


# ---------------------------------------------------------------------------------------------
# SLERP (Shoemake 1985): θ₀ and θ₁ as two vectors, interpolated along the great circle between them

SLERP_EPS = 1e-8  # a norm at or below this is taken as 1 (mergekit's guard against ÷0)
SLERP_DOT_THRESHOLD = 0.9995  # |cos Ω| above this: (anti)parallel, sin Ω ~ 0, so lerp instead
MERGEKIT_SLERP_CHUNK = 1 << 20  # mergekit sums its norms and dot product over chunks of this many elements


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(s0, s1) with slerp(θ₀, θ₁; t) = s0·θ₀ + s1·θ₁, from ‖θ₀‖², ‖θ₁‖² and ⟨θ₀, θ₁⟩, in float64.

    cos Ω = ⟨θ₀, θ₁⟩ / (‖θ₀‖ ‖θ₁‖) clamped to [−1, 1] (a norm ≤ 1e-8 counts as 1), then
    s0 = sin((1 − t)Ω) / sin Ω and s1 = sin(tΩ) / sin Ω; when |cos Ω| > 0.9995, s0 = 1 − t, s1 = t.
    t = 0 gives (1, 0) and t = 1 gives (0, 1) exactly.
    """
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na, nb = (na if na > SLERP_EPS else 1.0), (nb if nb > SLERP_EPS else 1.0)
    dot = min(1.0, max(-1.0, ab / na / nb))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def slerp_row_sums(base: torch.Tensor, other: torch.Tensor, rows: int) -> torch.Tensor:
    """Per row of a block, float64 [3, rows]: Σθ₀², Σθ₁², Σθ₀θ₁.

    Each row is summed by a tree fixed by the row length alone (its first half plus its last half,
    again and again until one element is left), in elementwise float64 ops: the same bits on any
    device and thread count, and rows are whole in every block. The caller adds the rows exactly
    (math.fsum), so the block size changes nothing either.
    """
    a, b = base.reshape(rows, -1).double(), other.reshape(rows, -1).double()
    out = torch.empty((3, rows), dtype=torch.float64, device=a.device)
    work = torch.empty_like(a)
    for k, (x, y) in enumerate(((a, a), (b, b), (a, b))):
        out[k] = row_sums_(torch.mul(x, y, out=work))
    return out


def slerp_coefficients_mergekit(base: torch.Tensor, other: torch.Tensor, t: float, dtype: torch.dtype) -> tuple[float, float]:
    """mergekit 0.1.5's (s0, s1) for one whole tensor, bit for bit: the inputs in its dtype, then
    float32 torch ops (float64 for float64): each norm the norm of the norms of 2²⁰-element chunks,
    the dot product of the normalized chunks summed chunk by chunk, and the coefficients from
    float32 acos/sin. Returned as Python floats (exactly the float32 values)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # on the CPU whatever the device: whole-tensor reductions sum in each device's own order (as ops.l1_rescale)
    a, b = base.to(dtype).cpu().reshape(1, -1), other.to(dtype).cpu().reshape(1, -1)
    spans = [(s, s + MERGEKIT_SLERP_CHUNK) for s in range(0, a.shape[1], MERGEKIT_SLERP_CHUNK)]

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([torch.linalg.vector_norm(x[:, s:e].to(work), dim=1, keepdim=True) for s, e in spans])
        n = torch.linalg.vector_norm(parts, dim=0)
        return torch.where(n > SLERP_EPS, n, 1)

    tt = torch.tensor([[t]], dtype=work)
    if not spans:  # an empty tensor: nothing to interpolate
        return (1 - tt).item(), tt.item()
    na, nb = norm(a), norm(b)
    dot = torch.stack([(a[:, s:e].to(work) / na * (b[:, s:e].to(work) / nb)).sum(dim=1, keepdim=True) for s, e in spans])
    dot = dot.sum(dim=0).clamp(-1, 1)
    lerp = dot.abs() > SLERP_DOT_THRESHOLD
    omega = torch.acos(torch.where(lerp, 0, dot))
    s0 = torch.where(lerp, 1 - tt, torch.sin((1 - tt) * omega) / torch.sin(omega))
    s1 = torch.where(lerp, tt, torch.sin(tt * omega) / torch.sin(omega))
    return s0.item(), s1.item()


def slerp_block(base: torch.Tensor, other: torch.Tensor, coefficients: tuple[float, float], mergekit: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """s0·θ₀ + s1·θ₁ over a block, elementwise. Default: in float64 (products and sum each rounded
    once), then float32 (or float64 for float64 inputs). mergekit: its float32 ops on the inputs
    in its dtype `dtype`, the result rounded to that dtype."""
    s0, s1 = coefficients
    if mergekit:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return (base.to(dtype).to(work) * s0 + other.to(dtype).to(work) * s1).to(dtype)
    out = base.to(torch.float64, copy=True).mul_(s0)
    out += other.to(torch.float64, copy=True).mul_(s1)
    out += 0.0  # −0 + 0 = +0, as every default path writes its zeros
    # to float32 explicitly: torch converts float64 to bf16/f16 through float32 anyway, on every device
    return out if dtype == torch.float64 else out.float()
