"""The CPU hot path: `ops`' float32 arithmetic, op for op, over cache-sized chunks with numpy.

Eager torch makes one pass over memory per operation, so a TIES merge of a tensor costs dozens of
passes. Here each chunk of 64K elements is read once from the input buffers, goes through every
operation while it sits in L2 cache, and is written once to the output buffer. numpy ufuncs on
preallocated scratch arrays have little per-call overhead and release the GIL, so chunks run on all
cores. Every step is the same IEEE float32 operation, in the same order, as in `ops.merge_block`
(including torch's sum over models, which starts from +0), so both paths give the same bits; the
tests check it. Only float32 compute goes through here; mergekit's bf16 arithmetic stays in `ops`.

DELLA ranks |τ| within rows, so its chunks hold whole rows (as many as fit in a chunk; a tensor with
longer rows stays on torch, see `plan.uses_chunk_kernel`), and a row's ranks come from one sort of
distinct integer keys that orders exactly as the torch path's stable sort.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from streammerge.methods.mask import keep_mask_into, keep_mask_varying
from streammerge.methods.ops import (
    TensorSpec,
    TrimThreshold,
    della_rank_probabilities,
    keep_thresholds,
)

CHUNK = 1 << 16  # elements per chunk; measured best on this 2-core machine (2^15..2^18 tried)
STAT_CHUNK = 1 << 18  # elements per histogram call: 64K bins cost per call, but np.bincount copies its input to int64

_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}
_F32_ZERO = np.float32(0.0)
# DELLA's sort keys: |τ|'s bits above, the element's position in its chunk (< CHUNK) below
_POS_BITS = (CHUNK - 1).bit_length()
_POS = np.arange(CHUNK, dtype=np.int64)
_POS.flags.writeable = False


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor; bf16 is seen as its uint16 bit patterns."""
    flat = t.reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else flat.numpy()


def supported(dtypes: list[torch.dtype], compute: torch.dtype) -> bool:
    return compute == torch.float32 and all(d in _STORAGE for d in dtypes)


def load_f32(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Exact conversion to float32 (bf16: its bits shifted into the high half)."""
    if src.dtype == np.float32:
        return src
    if src.dtype == np.uint16:
        bits = out.view(np.uint32)
        bits[...] = src
        np.left_shift(bits, 16, out=bits)
        return out
    out[...] = src
    return out


def store(x: np.ndarray, out: np.ndarray, scratch: np.ndarray, nan: np.ndarray) -> None:
    """float32 -> the output dtype, rounding to nearest even as torch does (bf16 NaN -> 0x7FC0)."""
    if out.dtype != np.uint16:
        out[...] = x
        return
    bits = x.view(np.uint32)
    bias = scratch.view(np.uint32)
    np.right_shift(bits, 16, out=bias)
    np.bitwise_and(bias, 1, out=bias)
    np.add(bias, 0x7FFF, out=bias)
    np.add(bias, bits, out=bias)
    np.right_shift(bias, 16, out=bias)
    out[...] = bias
    np.isnan(x, out=nan)
    if nan.any():
        out[nan] = 0x7FC0


class _Scratch:
    """Per-thread chunk buffers, allocated once."""

    def __init__(self, n: int):
        self.base = np.empty(CHUNK, np.float32)
        self.d = np.empty((n, CHUNK), np.float32)
        self.v = np.empty((n, CHUNK), np.float32)  # weighted deltas / votes
        self.a = np.empty(CHUNK, np.float32)
        self.acc = np.empty(CHUNK, np.float32)
        self.div = np.empty(CHUNK, np.float32)
        self.gamma = np.empty(CHUNK, np.float32)
        self.tmp = np.empty(CHUNK, np.float32)
        self.keep = np.empty(CHUNK, np.bool_)
        self.b1 = np.empty(CHUNK, np.bool_)
        self.b2 = np.empty(CHUNK, np.bool_)
        self.agree = np.empty((n, CHUNK), np.float32)
        self.order = np.empty(CHUNK, np.int64)  # DELLA: sort keys, then each rank's position
        self.thr = np.empty(CHUNK, np.int64)  # DELLA: per-element mask thresholds
        self.p = np.empty(CHUNK, np.float32)  # DELLA: per-element keep probabilities


_local = threading.local()


def _scratch(n: int) -> _Scratch:
    s = getattr(_local, "scratch", None)
    if s is None or s.d.shape[0] < n:
        s = _local.scratch = _Scratch(n)
    return s


def _plus_minus_one(condition: np.ndarray, out: np.ndarray) -> np.ndarray:
    """+1.0 where true, −1.0 where false, as torch's `cond.to(float) * 2 - 1`."""
    out[...] = condition
    np.multiply(out, np.float32(2), out=out)
    return np.subtract(out, np.float32(1), out=out)


def _seq_sum(xs: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """((0 + x0) + x1) + ...: torch's sum over the model dimension, bit for bit."""
    np.add(xs[0], _F32_ZERO, out=out)
    for x in xs[1:]:
        np.add(out, x, out=out)
    return out


def deltas_chunk(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], start: int, s: _Scratch) -> tuple[np.ndarray, list[np.ndarray]]:
    """θ₀ and τ_t (DARE and trim applied) of one chunk in float32."""
    m = len(base)
    b = load_f32(base, s.base[:m])
    ds = []
    for i, ft in enumerate(fts):
        d = s.d[i, :m]
        if spec.given and spec.given[i]:  # τ itself: a LoRA adapter's rebuilt delta
            np.copyto(d, load_f32(ft, d))
        else:
            np.subtract(load_f32(ft, d), b, out=d)
        if spec.dare:
            keep = s.keep[:m]
            keep_mask_into(spec.keys[i], start, torch.from_numpy(keep), spec.densities[i])
            np.multiply(d, keep, out=d)
            if spec.dare_scales[i] != 1.0 and spec.opts.divide_by_density:  # as ops.dare
                np.divide(d, np.float32(spec.densities[i]), out=d)
            elif spec.dare_scales[i] != 1.0:
                np.multiply(d, np.float32(spec.dare_scales[i]), out=d)
        if spec.opts.sparsify == "magprune" and spec.densities[i] < 1:
            _magprune_chunk(d, spec, i, start, s)
        t, o = spec.trims[i], (spec.outliers[i] if spec.outliers else None)
        if t is not None:
            _trim_chunk(d, t, start, s)
        if o is not None:  # breadcrumbs: the top band (outliers) goes too; a mask multiply keeps τ's sign
            _trim_chunk(d, o, start, s, drop=True)
        if (t is not None or o is not None) and spec.opts.sparsify == "band" and spec.dare_scales[i] != 1.0:
            np.multiply(d, np.float32(spec.dare_scales[i]), out=d)
        ds.append(d)
    return b, ds


def _trim_chunk(d: np.ndarray, t: TrimThreshold, start: int, s: _Scratch, drop: bool = False) -> None:
    """Keeps the elements in the top set `t` describes (ops.trim_keep), or with `drop` removes them."""
    m = len(d)
    a, keep = np.abs(d, out=s.a[:m]), s.keep[:m]
    value = np.float32(t.value)
    if t.last_tie < start:  # every tie in this chunk lies after the last kept one
        np.greater(a, value, out=keep)
    elif t.last_tie >= start + m - 1:
        np.greater_equal(a, value, out=keep)
    else:  # the chunk holding the last kept tie: ties up to it are kept
        np.greater(a, value, out=keep)
        cut = t.last_tie - start + 1
        keep[:cut] |= a[:cut] == value
    if drop:
        np.logical_not(keep, out=keep)
    np.multiply(d, keep, out=d)


@functools.lru_cache(maxsize=256)
def _della_tables(cols: int, density: float, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Per rank 0..cols−1: the mask threshold floor(p·2³²) (int64) and p in float32, from ops' float64 p."""
    p = della_rank_probabilities(cols, density, epsilon)
    thr, p32 = keep_thresholds(p).numpy(), p.float().numpy()
    thr.flags.writeable = p32.flags.writeable = False  # shared by every thread
    return thr, p32


def _magprune_chunk(d: np.ndarray, spec: TensorSpec, i: int, start: int, s: _Scratch) -> None:
    """DELLA's MagPrune of whole rows in place, as TorchBackend.deltas does it with ops.della_probabilities,
    keep_mask_varying and ops.della: rank |τ| within each row (ties lower index first), keep each element
    with its rank's p, divide the kept ones by p in float32 (rescale: inverse)."""
    m, cols = len(d), spec.della_row
    thr_by_rank, p_by_rank = _della_tables(cols, spec.densities[i], spec.epsilons[i])
    # Non-negative floats: integer order is float order. NaNs rank above everything, as in torch;
    # their order among themselves differs from torch's but shows nowhere: NaN·0 and NaN/p stay NaN.
    bits = np.abs(d, out=s.a[:m]).view(np.int32)
    # Keys (|τ| bits, position) are distinct and order as the stable sort's (|τ|, index), so numpy's
    # fast unstable sort of int64 (over 15x its stable argsort of the floats here) gives exactly that order.
    order = s.order[:m]
    order[...] = bits
    np.left_shift(order, _POS_BITS, out=order)
    np.bitwise_or(order, _POS[:m], out=order)
    rows = order.reshape(m // cols, cols)
    rows.sort(axis=1)
    np.bitwise_and(rows, CHUNK - 1, out=rows)  # row r, rank k -> the element's position in the chunk
    thr = s.thr[:m]
    thr[rows] = thr_by_rank
    keep = keep_mask_varying(spec.keys[i], start, torch.from_numpy(thr)).numpy()
    np.multiply(d, keep, out=d)
    if spec.opts.rescale == "inverse":
        p = s.p[:m]
        p[rows] = p_by_rank
        np.divide(d, p, out=d)


def merge_chunk(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], out: np.ndarray, start: int) -> None:
    """Merges one chunk into `out` (the output dtype's storage), as ops.merge_block would."""
    m = len(base)
    s = _scratch(len(fts))
    opts = spec.opts
    if not spec.merged:
        store(load_f32(base, s.base[:m]), out, s.tmp[:m], s.b1[:m])
        return
    if opts.combine == "average":
        terms = []
        for i, ft in enumerate(fts):
            x = load_f32(ft, s.d[i, :m])
            terms.append(np.multiply(x, np.float32(spec.weights[i]), out=s.v[i, :m]))
        acc = _seq_sum(terms, s.acc[:m])
        if opts.normalize:
            np.divide(acc, _seq_sum([np.float32(w) for w in spec.weights], np.empty((), np.float32)), out=acc)
        if opts.positive_zeros:
            np.add(acc, _F32_ZERO, out=acc)
        store(acc, out, s.tmp[:m], s.b1[:m])
        return

    b, ds = deltas_chunk(spec, base, fts, start, s)
    w = [np.float32(x) for x in spec.weights]
    weighted = [np.multiply(d, w[i], out=s.v[i, :m]) for i, d in enumerate(ds)]
    if opts.combine == "ties":
        voters = weighted if opts.weighted_sign else ds
        if opts.sign_method == "count":
            signs = [np.sign(v, out=s.agree[i, :m]) for i, v in enumerate(voters)]
            score = _seq_sum(signs, s.acc[:m])
        else:
            score = _seq_sum(voters, s.acc[:m])
        gamma = s.gamma[:m]
        if opts.zero_sign == "majority":
            np.sign(score, out=gamma)
            gamma[gamma == 0] = np.float32(spec.majority)
        else:
            _plus_minus_one(np.greater_equal(score, _F32_ZERO, out=s.b1[:m]), gamma)
        # agreement: where(γ > 0, v > 0, v < 0) is exactly v·γ' > 0 with γ' = +1 if γ > 0 else −1
        # (FusionBench's γ = 0 takes the negative side); one multiply and compare, no masked copy.
        side = gamma
        if opts.zero_sign == "majority":
            side = _plus_minus_one(np.greater(gamma, _F32_ZERO, out=s.b1[:m]), s.tmp[:m])
        agree = []
        for i, v in enumerate(voters):
            a = s.agree[i, :m]
            np.multiply(v, side, out=a)
            np.greater(a, _F32_ZERO, out=s.b2[:m])
            a[...] = s.b2[:m]
            agree.append(a)
        if opts.merge_func == "max":
            mags = [np.multiply(np.abs(d, out=s.tmp[:m]), agree[i], out=s.v[i, :m]) for i, d in enumerate(ds)]
            merged = s.acc[:m]
            merged[...] = mags[0]
            for x in mags[1:]:
                np.maximum(merged, x, out=merged)
            np.multiply(merged, gamma, out=merged)
        else:
            for i in range(len(weighted)):
                np.multiply(weighted[i], agree[i], out=weighted[i])
            merged = _seq_sum(weighted, s.acc[:m])
            if opts.merge_func == "mean":
                if opts.mean_divisor == "count":
                    div = _seq_sum(agree, s.div[:m])
                else:
                    wa = [np.multiply(a, w[i], out=s.d[i, :m]) for i, a in enumerate(agree)]
                    div = _seq_sum(wa, s.div[:m])
                div[div == 0] = np.float32(1)
                np.divide(merged, div, out=merged)
    else:
        merged = _seq_sum(weighted, s.acc[:m])
        if opts.normalize:
            div = _seq_sum(w, np.empty((), np.float32))
            if abs(div) < 1e-8:
                div = np.float32(1)
            np.divide(merged, div, out=merged)
    if spec.lam != 1:
        np.multiply(merged, np.float32(spec.lam), out=merged)
    np.add(b, merged, out=merged)
    if opts.positive_zeros:
        np.add(merged, _F32_ZERO, out=merged)  # −0 + 0 = +0
    store(merged, out, s.tmp[:m], s.b1[:m])


def chunk_step(spec: TensorSpec) -> int:
    """Elements per chunk: CHUNK, or for DELLA the most whole rows that fit in it (it ranks within rows;
    `plan.uses_chunk_kernel` sends longer rows to torch)."""
    if spec.opts.sparsify != "magprune" or not spec.merged:
        return CHUNK
    assert 0 < spec.della_row <= CHUNK, spec.della_row
    return CHUNK // spec.della_row * spec.della_row


def _chunks(total: int, parts: int, step: int) -> list[tuple[int, int]]:
    """Splits [0, total) into about `parts` ranges aligned to `step`."""
    per = max(step, -(-total // parts) // step * step)
    return [(c, min(c + per, total)) for c in range(0, total, per)]


def _quiet(fn):
    """Runs `fn` with numpy's floating-point warnings off: NaN/Inf inputs give NaN/Inf results here
    exactly as torch's arithmetic does, silently (--check-finite reports them in one line); a
    RuntimeWarning on stderr would only break that line. Set per call: numpy's error state is per thread."""

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return quiet


def run_parallel(fn, total: int, pool: ThreadPoolExecutor | None, step: int = CHUNK) -> None:
    """Calls fn(c0, c1) over `step`-aligned ranges covering [0, total), on the pool's threads."""
    fn = _quiet(fn)
    if pool is None or total <= 4 * CHUNK:
        fn(0, total)
        return
    for f in [pool.submit(fn, c0, c1) for c0, c1 in _chunks(total, 4 * pool._max_workers, step)]:
        f.result()


def merge_block(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], out: np.ndarray, start: int, pool=None) -> None:
    """Merges a whole block (flat arrays) chunk by chunk; `start` is its first flat element index."""
    step = chunk_step(spec)

    def work(c0: int, c1: int) -> None:
        for c in range(c0, c1, step):
            e = min(c + step, c1)
            merge_chunk(spec, base[c:e], [f[c:e] for f in fts], out[c:e], start + c)

    run_parallel(work, len(base), pool, step)


# ---- stats passes: radix histograms and the last kept tie ---------------------------------


def _abs_bits(spec: TensorSpec, base, fts, c, e, start, s, i) -> np.ndarray:
    _, ds = deltas_chunk(spec, base[c:e], [f[c:e] for f in fts], start + c, s)
    return np.abs(ds[i], out=s.a[: e - c]).view(np.int32)


def radix_hist(spec: TensorSpec, base, fts, start: int, high: list[int | None], wanted: list[bool], pool=None) -> list[np.ndarray]:
    """Per model, the histogram of |τ|'s top 16 bits (high[i] None; each bin split by whether the low
    16 bits are zero, as ops.radix_hist_high) or of the low 16 bits of the elements whose top bits
    equal high[i]. `spec.trims` must be None for the models being selected."""
    n = len(fts)
    lock = threading.Lock()
    bins = 2 * 65536 if any(h is None for h, w in zip(high, wanted) if w) else 65536
    hists = [np.zeros(bins, np.int64) for _ in range(n)]
    step = chunk_step(spec)

    def work(c0: int, c1: int) -> None:
        s = _scratch(n)
        local = [np.zeros(bins, np.int64) for _ in range(n)]
        keys = [np.empty(STAT_CHUNK, np.int32) for _ in range(n)]
        fill = [0] * n
        for c in range(c0, c1, step):
            e = min(c + step, c1)
            _, ds = deltas_chunk(spec, base[c:e], [f[c:e] for f in fts], start + c, s)
            for i, d in enumerate(ds):
                if not wanted[i]:
                    continue
                bits = np.abs(d, out=s.a[: e - c]).view(np.int32)
                if high[i] is None:
                    k = np.right_shift(bits, 15, out=keys[i][fill[i] : fill[i] + e - c])
                    np.bitwise_and(k, ~1, out=k)
                    low = np.bitwise_and(bits, 0xFFFF, out=s.tmp[: e - c].view(np.int32))
                    np.bitwise_or(k, np.not_equal(low, 0, out=s.b1[: e - c]), out=k)
                    fill[i] += len(k)
                else:
                    sel = bits[np.right_shift(bits, 16, out=s.tmp[: e - c].view(np.int32)) == high[i]]
                    np.bitwise_and(sel, 0xFFFF, out=sel)
                    keys[i][fill[i] : fill[i] + len(sel)] = sel
                    fill[i] += len(sel)
                if fill[i] > STAT_CHUNK - CHUNK:
                    local[i] += np.bincount(keys[i][: fill[i]], minlength=bins)
                    fill[i] = 0
        for i in range(n):
            if fill[i]:
                local[i] += np.bincount(keys[i][: fill[i]], minlength=bins)
        with lock:
            for i in range(n):
                hists[i] += local[i]

    run_parallel(work, len(base), pool, step)
    return hists


@_quiet
def find_tie(spec: TensorSpec, base, fts, start: int, i: int, value: float, needed: int) -> tuple[int | None, int]:
    """Scans in flat order for the `needed`-th element with |τ_i| == value.

    Returns (its flat index or None, how many ties this block held before reaching it).
    """
    s = _scratch(len(fts))
    v = np.float32(value)
    seen, step = 0, chunk_step(spec)
    for c in range(0, len(base), step):
        e = min(c + step, len(base))
        bits = _abs_bits(spec, base, fts, c, e, start, s, i)
        hits = np.flatnonzero(bits.view(np.float32) == v)
        if seen + len(hits) >= needed:
            return start + c + int(hits[needed - seen - 1]), needed
        seen += len(hits)
    return None, seen


@_quiet
def sign_total(spec: TensorSpec, base, fts, start: int) -> float:
    """Σ of the raw elected signs over a block (FusionBench's majority sign)."""
    s = _scratch(len(fts))
    total, step = 0.0, chunk_step(spec)
    for c in range(0, len(base), step):
        e = min(c + step, len(base))
        m = e - c
        _, ds = deltas_chunk(spec, base[c:e], [f[c:e] for f in fts], start + c, s)
        voters = [np.multiply(d, np.float32(spec.weights[i]), out=s.v[i, :m]) for i, d in enumerate(ds)] if spec.opts.weighted_sign else ds
        if spec.opts.sign_method == "count":
            voters = [np.sign(v, out=s.agree[i, :m]) for i, v in enumerate(voters)]
        total += float(np.sign(_seq_sum(voters, s.acc[:m])).sum(dtype=np.float64))
    return total
