"""The fast CPU kernel: kernels.py's float32 arithmetic, op for op, compiled by numba.

The numpy kernel makes one pass over a chunk per operation (dozens for a TIES merge); here every
2048-element step goes through the whole merge while it sits in L1 cache, in loops LLVM vectorizes,
the DARE hash computed per element instead of stored. It compiles in ~3-4 s the first time on a
machine and loads from numba's disk cache in ~0.4 s after that (torch.compile took 10-30 s).

Bits: every step is the same IEEE float32 operation, in the same order, as `kernels.merge_chunk`
(numba compiles without fast-math, so no fused multiply-add and no reassociation), and the tests
check the two give identical bytes. Inputs are read in place from the mapped files: no staging copy.
Covers the task-vector family in float32 with bf16/float32 storage, except DELLA's row ranking
(`supports`); the rest stays on the numpy kernel.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit
from numba.extending import overload

from streammerge.io import quant
from streammerge.io.quant import QuantRows
from streammerge.methods import kernels, registry
from streammerge.methods.mask import _C1, _C2, keep_threshold
from streammerge.methods.ops import ALL_TIES, TensorSpec

CHUNK = 2048  # elements per inner step: the per-model scratch rows stay in L1
_KINDS = ("uint16", "float32", "fp8")  # bf16 as its bits, float32, FP8 rows with their scales (fp8_source)

# what the kernel does with a chunk (an int, so one compiled function serves every method)
COPY, SUM, TIES, AVERAGE = 0, 1, 2, 3
MERGE_SUM, MERGE_MEAN, MERGE_MAX = 0, 1, 2


_TABLES: dict = {}  # FP8 dtype -> its decode table


def fp8_source(rows: QuantRows) -> tuple:
    """FP8 rows as the kernel reads them: (bytes, float32 scale grid, decode table, first, cols, br, bc)."""
    grid, first = rows.scale_grid()
    table = _TABLES.get(rows.weight.dtype)
    if table is None:
        table = _TABLES[rows.weight.dtype] = quant.decode_table(rows.weight.dtype).numpy()
    br, bc = rows.info.block
    return (rows.weight.reshape(-1).view(torch.uint8).numpy(), np.ascontiguousarray(grid.numpy()), table, np.int64(first),
            np.int64(rows.weight.shape[1]), np.int64(br), np.int64(bc))


def numel(src: np.ndarray | tuple) -> int:
    return len(src[0] if isinstance(src, tuple) else src)


def _kind(src: np.ndarray | tuple) -> str:
    return "fp8" if isinstance(src, tuple) else src.dtype.name


def supports(spec: TensorSpec, base, fts: list, out: np.ndarray | None = None) -> bool:
    """Whether the kernel merges (or, without `out`, histograms) these storage arrays (or FP8
    sources, `fp8_source`)."""
    opts = spec.opts
    arrays = [a for a in (base, *fts, out) if a is not None]
    if not all(_kind(a) in _KINDS for a in arrays) or len({_kind(f) for f in fts}) > 1:
        return False
    if out is not None and _kind(out) == "fp8":
        return False
    if not spec.merged:
        return base is not None
    declared = "compiled" in registry.get(opts.method).paths  # opt-in: methods/task_vectors.py
    return declared and (base is not None or opts.combine == "average")


_M32 = np.uint64(0xFFFFFFFF)
_K1, _K2 = np.uint64(_C1), np.uint64(_C2)
f0, f1 = np.float32(0.0), np.float32(1.0)
# error_model numpy: x/0 is inf or NaN as in IEEE, no exception; cached on disk after the first compile
JIT = dict(nogil=True, cache=True, error_model="numpy")


@njit(**JIT)
def fmix32(x):  # MurmurHash3's finalizer on a value < 2**32 held in 64 bits (mask.py)
    x ^= x >> np.uint64(16)
    x = (x * _K1) & _M32
    x ^= x >> np.uint64(13)
    x = (x * _K2) & _M32
    return x ^ (x >> np.uint64(16))

# load/store are chosen by the storage dtype when the kernel is typed (numba's overload)
def load(src, c, m, out):
    """float32 of src[c:c+m] into out[:m], exactly (bf16: its bits shifted into the high half)."""

def store(x, out, c, m):
    """float32 -> the output's storage, rounding to nearest even as torch does (bf16 NaN -> 0x7FC0)."""

@overload(load)
def _load(src, c, m, out):
    if isinstance(src, numba.types.BaseTuple):  # FP8 rows (`fp8_source`): byte -> float32 by table, times its block's scale
        def fp8(src, c, m, out):
            w, grid, table, first, cols, br, bc = src
            row, col = c // cols, c % cols
            j = 0
            while j < m:  # a run of elements sharing one scale: within a column block and a row
                run = min(m - j, bc - col % bc, cols - col)
                s = grid[(first + row) // br, col // bc]
                part, dst = w[c + j : c + j + run], out[j : j + run]
                for k in range(run):
                    dst[k] = table[part[k]] * s  # fp32(W)·fp32(s), one rounding, as quant.QuantRows.dequantize
                j += run
                col += run
                if col == cols:
                    row, col = row + 1, 0
        return fp8

    if src.dtype == numba.types.uint16:
        def bf16(src, c, m, out):
            part = src[c : c + m]  # indices from 0: no negative-index check in the loop
            bits = out.view(np.uint32)
            for j in range(m):
                bits[j] = np.uint32(part[j]) << np.uint32(16)
        return bf16

    def f32(src, c, m, out):
        part = src[c : c + m]
        for j in range(m):
            out[j] = part[j]
    return f32

@overload(store)
def _store(x, out, c, m):
    if out.dtype == numba.types.uint16:
        def bf16(x, out, c, m):
            part = out[c : c + m]
            bits = x.view(np.uint32)
            for j in range(m):
                v = bits[j]
                r = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                part[j] = np.uint16(0x7FC0) if x[j] != x[j] else np.uint16(r)
        return bf16

    def f32(x, out, c, m):
        part = out[c : c + m]
        for j in range(m):
            part[j] = x[j]
    return f32

@njit(**JIT)
def sign(x):  # np.sign: NaN stays NaN, ±0 -> +0
    return f1 if x > f0 else (-f1 if x < f0 else (f0 if x == f0 else x))

@njit(**JIT)
def trim(d, m, idx0, value, last_tie, drop):
    """Keeps |d| > value and the ties at it up to flat index last_tie (kernels._trim_chunk); `drop` removes them instead."""
    for j in range(m):
        a = abs(d[j])
        keep = a > value or (a == value and idx0 + j <= last_tie)
        if drop:
            keep = not keep
        d[j] = d[j] * (f1 if keep else f0)

@njit(**JIT)
def deltas(base, fts, c, m, idx0, b, d, sparsify):
    """θ₀ into b and τ_i (DARE, then the trims) into d[i] for elements [c, c+m) (kernels.deltas_chunk)."""
    given, dare, thr, k0, k1, scale, divide, density, trimmed, trim_value, trim_tie, band, outlier, out_value, out_tie = sparsify
    load(base, c, m, b)
    for i in range(len(fts)):
        di = d[i]
        load(fts[i], c, m, di)
        if not given[i]:
            for j in range(m):
                di[j] = di[j] - b[j]
        if dare:
            t, key0, key1 = thr[i], k0[i], k1[i]
            for j in range(m):
                idx = np.uint64(idx0 + j)
                h = fmix32(fmix32((idx & _M32) ^ key0) ^ (idx >> np.uint64(32)) ^ key1)
                di[j] = di[j] * (f1 if h < t else f0)
            if divide[i]:
                for j in range(m):
                    di[j] = di[j] / density[i]
            elif scale[i] != f1:
                for j in range(m):
                    di[j] = di[j] * scale[i]
        if trimmed[i]:
            trim(di, m, idx0, trim_value[i], trim_tie[i], False)
        if outlier[i]:
            trim(di, m, idx0, out_value[i], out_tie[i], True)
        if band and (trimmed[i] or outlier[i]) and scale[i] != f1:
            for j in range(m):
                di[j] = di[j] * scale[i]


@njit(**JIT)
def merge_range(base, fts, out, lo, hi, start, sparsify, mode, weights, lam,
                weighted_sign, sign_count, zero_majority, merge_func, mean_count, normalize, norm, majority, positive):
    """Merges elements [lo, hi) of the flat inputs into `out` (kernels.merge_chunk's steps, per element)."""
    n = len(fts)
    b = np.empty(CHUNK, np.float32)
    d = np.empty((n, CHUNK), np.float32)
    acc = np.empty(CHUNK, np.float32)
    score, gamma, side, div = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32)
    for c in range(lo, hi, CHUNK):
        m = min(CHUNK, hi - c)
        if mode == COPY:
            load(base, c, m, b)
            store(b, out, c, m)
            continue
        if mode == AVERAGE:  # θ_i themselves, no base
            for i in range(n):
                load(fts[i], c, m, d[i])
        else:
            deltas(base, fts, c, m, start + c, b, d, sparsify)
        # the combine, a model at a time: every loop below is plain enough for LLVM to vectorize
        if mode == TIES:
            for j in range(m):
                score[j] = f0
            for i in range(n):
                di, wi = d[i], weights[i]
                for j in range(m):
                    v = di[j] * wi if weighted_sign else di[j]
                    score[j] = score[j] + (sign(v) if sign_count else v)
            for j in range(m):
                if zero_majority:
                    g = sign(score[j])
                    g = majority if g == f0 else g
                    gamma[j], side[j] = g, (f1 if g > f0 else -f1)
                else:
                    gamma[j] = side[j] = f1 if score[j] >= f0 else -f1
                acc[j] = f0
                div[j] = f0
            for i in range(n):
                di, wi = d[i], weights[i]
                for j in range(m):
                    w = di[j] * wi
                    agree = f1 if (w if weighted_sign else di[j]) * side[j] > f0 else f0
                    if merge_func == MERGE_MAX:
                        x = abs(di[j]) * agree
                        # np.maximum: the first when it is >= or NaN, else the second
                        acc[j] = x if i == 0 or not (acc[j] >= x or acc[j] != acc[j]) else acc[j]
                    else:
                        acc[j] = acc[j] + w * agree
                        if merge_func == MERGE_MEAN:  # only the mean divides
                            div[j] = div[j] + (agree if mean_count else agree * wi)
            for j in range(m):
                if merge_func == MERGE_MAX:
                    acc[j] = acc[j] * gamma[j]
                elif merge_func == MERGE_MEAN:
                    acc[j] = acc[j] / (f1 if div[j] == f0 else div[j])
        else:
            for j in range(m):
                acc[j] = f0
            for i in range(n):
                di, wi = d[i], weights[i]
                for j in range(m):
                    acc[j] = acc[j] + di[j] * wi
            if normalize:
                for j in range(m):
                    acc[j] = acc[j] / norm
        for j in range(m):
            x = acc[j] * lam if lam != f1 else acc[j]
            x = x if mode == AVERAGE else b[j] + x
            acc[j] = x + f0 if positive else x  # −0 + 0 = +0
        store(acc, out, c, m)


@njit(**JIT)
def hist_range(base, fts, lo, hi, start, sparsify, high, wanted, hists):
    """Adds to hists[i] the histogram of |τ_i|'s top 16 bits, split by whether the low 16 bits are
    zero (high[i] < 0; bin 2·top + (low != 0)), or of the low 16 bits of the elements whose top bits
    are high[i], over elements [lo, hi) (kernels.radix_hist)."""
    n, bins = len(fts), hists.shape[1]
    b = np.empty(CHUNK, np.float32)
    d = np.empty((n, CHUNK), np.float32)
    counts = np.zeros((n, 4, bins + 1), np.uint32)  # hi - lo <= 2**31 elements (radix_hist): no overflow
    for c in range(lo, hi, CHUNK):
        m = min(CHUNK, hi - c)
        deltas(base, fts, c, m, start + c, b, d, sparsify)
        for i in range(n):
            if not wanted[i]:
                continue
            bits = d[i].view(np.uint32)
            h, top = counts[i], high[i]
            if top < 0:  # four interleaved counters: |τ| clusters in few bins, and one counter per bin
                for j in range(m):  # would make every increment wait for the previous one
                    v = bits[j] & np.uint32(0x7FFFFFFF)  # |τ|
                    h[j & 3, ((v >> np.uint32(15)) & np.uint32(0xFFFFFFFE)) | np.uint32((v & np.uint32(0xFFFF)) != 0)] += 1
            else:  # the low bits inside bin `top`; the others counted in a spare bin (no branch)
                top32 = np.uint32(top)
                for j in range(m):
                    v = bits[j] & np.uint32(0x7FFFFFFF)
                    h[j & 3, v & np.uint32(0xFFFF) if (v >> np.uint32(16)) == top32 else np.uint32(bins)] += 1
    for i in range(n):
        for k in range(4):
            hists[i] += counts[i, k, :bins]


@njit(**JIT)
def tie_range(base, ft, lo, hi, start, sparsify, value, needed):
    """Scans τ of one model over [lo, hi) in flat order for the `needed`-th element with |τ| == value:
    (its flat index, or -1, and how many such elements were seen) (kernels.find_tie)."""
    b = np.empty(CHUNK, np.float32)
    d = np.empty((1, CHUNK), np.float32)
    seen = 0
    for c in range(lo, hi, CHUNK):
        m = min(CHUNK, hi - c)
        deltas(base, ft, c, m, start + c, b, d, sparsify)
        for j in range(m):
            if abs(d[0, j]) == value:
                seen += 1
                if seen == needed:
                    return start + c + j, seen
    return -1, seen


@njit(**JIT)
def quantize_range(x, cols, dst, scales):
    """quant.quantize_rows, compiled: rows of x (storage, flat) as float8_e4m3fn bytes into dst and
    their per-128x128-block scales into scales (⌈rows/128⌉ × cols/128). dst may be x's own buffer: an
    element's byte is written after its own value and every earlier one are read, and a slab's
    bytes land on slabs already done."""
    rows, blocks = len(x) // cols, cols // 128
    y = np.empty(cols, np.float32)
    bits = y.view(np.uint32)
    amax = np.empty(blocks, np.float32)
    for r in range(0, rows, 128):
        h = min(128, rows - r)
        amax[:] = f0
        for i in range(h):
            load(x, (r + i) * cols, cols, y)
            for k in range(blocks):
                a = amax[k]
                for j in range(k * 128, k * 128 + 128):
                    v = abs(y[j])
                    a = v if v > a or v != v else a  # torch's amax: NaN wins
                amax[k] = a
        s = scales[r // 128]
        for k in range(blocks):
            s[k] = amax[k] / np.float32(448.0) if amax[k] > f0 else f1  # an all-zero (or NaN) block keeps 1
        for i in range(h):
            c = (r + i) * cols
            load(x, c, cols, y)
            for k in range(blocks):
                sk = s[k]
                for j in range(k * 128, k * 128 + 128):
                    v = y[j] / sk
                    y[j] = np.float32(448.0) if v > np.float32(448.0) else (np.float32(-448.0) if v < np.float32(-448.0) else v)
            out = dst[c : c + cols]
            for j in range(cols):  # float32 -> e4m3fn, to nearest even (c10's fp8e4m3fn_from_fp32_value)
                b = bits[j]
                a = b & np.uint32(0x7FFFFFFF)
                if a > np.uint32(0x7F800000):  # NaN
                    q = np.uint32(0x7F)
                elif a < np.uint32(0x3C800000):  # below 2^-6: a subnormal step is 2^-9
                    q = np.uint32(np.rint(abs(y[j]) * np.float32(512.0)))
                else:  # round the mantissa to 3 bits, rebias the exponent from 127 to 7
                    q = ((a + np.uint32(0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20)) - np.uint32(960)
                out[j] = np.uint8(q | ((b >> np.uint32(24)) & np.uint32(0x80)))


def quantize_rows(x: np.ndarray, cols: int, dst: np.ndarray, scales: np.ndarray, pool=None) -> None:
    """quant.quantize_rows' bytes and scales from the merged rows `x` (bf16 bits or float32, flat),
    the 128-row slabs split over the pool's threads. Each thread writes its own slabs' bytes into a
    staging array (in place, one thread's bytes would land on another's unread input), then they
    are copied into dst: one copy of a byte per element."""
    slab = 128 * cols
    if pool is None or len(x) <= 2 * slab:
        quantize_range(x, cols, dst, scales)
        return
    staged = np.empty(len(x), np.uint8)

    def work(c0: int, c1: int) -> None:
        quantize_range(x[c0:c1], cols, staged[c0:c1], scales[c0 // slab : -(-c1 // slab)])

    kernels.run_parallel(work, len(x), pool, slab)
    dst[: len(x)] = staged


def _f32(xs) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def merge(spec: TensorSpec, base: np.ndarray | None, fts: list[np.ndarray], out: np.ndarray, start: int, pool=None) -> None:
    """Merges flat `base`/`fts` (storage arrays, as kernels.as_numpy gives them) into flat `out`."""
    opts, n = spec.opts, len(fts)
    mode = (COPY if not spec.merged else AVERAGE if opts.combine == "average" else
            TIES if opts.combine == "ties" else SUM)
    weights = _f32(spec.weights) if spec.weights else _f32([0.0] * max(n, 1))
    norm = np.float32(0.0)
    for w in weights:  # (0 + w0) + w1 + ... in float32, as the numpy kernel sums
        norm = norm + w
    if mode == SUM and abs(norm) < 1e-8:
        norm = np.float32(1.0)
    normalize = opts.normalize and mode in (SUM, AVERAGE)
    args = (
        _sparsify(spec), mode,
        weights, np.float32(1.0 if mode == AVERAGE else spec.lam),  # linear has no λ
        bool(opts.weighted_sign), opts.sign_method == "count", opts.zero_sign == "majority",
        {"sum": MERGE_SUM, "mean": MERGE_MEAN, "max": MERGE_MAX}.get(opts.merge_func, MERGE_SUM),
        opts.mean_divisor == "count", bool(normalize), norm, np.float32(spec.majority), bool(opts.positive_zeros),
    )
    src = base if base is not None else fts[0]
    inputs = tuple(fts) if fts else (src,)

    def work(c0: int, c1: int) -> None:
        merge_range(src, inputs, out, c0, c1, start, *args)

    kernels.run_parallel(work, len(out), pool)


def _sparsify(spec: TensorSpec) -> tuple:
    """`deltas`' per-model parameters, as arrays."""
    opts, n = spec.opts, len(spec.weights)
    none = (None,) * n
    trims, outliers = spec.trims or none, spec.outliers or none
    keys = spec.keys if spec.dare else (0,) * n
    scales = spec.dare_scales or (1.0,) * n
    return (
        np.array(spec.given or (False,) * n, dtype=np.bool_), bool(spec.dare),
        np.array([keep_threshold(d) if spec.dare else 0 for d in (spec.densities or (1.0,) * n)], dtype=np.uint64),
        np.array([k & 0xFFFFFFFF for k in keys], dtype=np.uint64), np.array([k >> 32 for k in keys], dtype=np.uint64),
        _f32(scales),
        np.array([bool(spec.dare and s != 1.0 and opts.divide_by_density) for s in scales], dtype=np.bool_),
        _f32(spec.densities or (1.0,) * n),
        np.array([t is not None for t in trims], dtype=np.bool_),
        _f32([t.value if t is not None else 0.0 for t in trims]),
        np.array([t.last_tie if t is not None else -1 for t in trims], dtype=np.int64).clip(-1, ALL_TIES),
        opts.sparsify == "band",
        np.array([t is not None for t in outliers], dtype=np.bool_),
        _f32([t.value if t is not None else 0.0 for t in outliers]),
        np.array([t.last_tie if t is not None else -1 for t in outliers], dtype=np.int64),
    )


def find_tie(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], start: int, i: int, value: float,
             needed: int) -> tuple[int | None, int]:
    """kernels.find_tie, compiled: model i's τ alone (its parameters sliced out of the others')."""
    one = tuple(p[i : i + 1] if isinstance(p, np.ndarray) else p for p in _sparsify(spec))
    pos, seen = tie_range(base, (fts[i],), 0, numel(base), start, one, np.float32(value), needed)
    return (None if pos < 0 else int(pos)), int(seen)


def radix_hist(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], start: int, high: list[int | None],
               wanted: list[bool], pool=None) -> list[np.ndarray]:
    """kernels.radix_hist, compiled: the same counts."""
    n = len(fts)
    args = (_sparsify(spec), np.array([-1 if h is None else h for h in high], dtype=np.int64), np.array(wanted, dtype=np.bool_))
    # one histogram set per thread (zeroing one per range would cost more than the counting)
    size = numel(base)
    workers = 1 if pool is None or size <= 4 * kernels.CHUNK else pool._max_workers
    per = -(-size // workers)
    bins = 2 * 65536 if any(h is None for h, w in zip(high, wanted) if w) else 65536
    hists = np.zeros((workers, n, bins), np.int64)

    def work(w: int) -> None:
        end = min(size, (w + 1) * per)
        for c in range(w * per, end, 1 << 31):  # hist_range counts in uint32
            hist_range(base, tuple(fts), c, min(end, c + (1 << 31)), start, *args, hists[w])

    if workers == 1:
        work(0)
    else:
        for f in [pool.submit(work, w) for w in range(workers)]:
            f.result()
    for w in range(1, workers):
        hists[0] += hists[w]
    return list(hists[0])
