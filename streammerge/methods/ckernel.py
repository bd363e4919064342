"""The compiled CPU kernels (methods/*.c, one library), through ctypes: first kernels.py's float32
arithmetic, op for op, in C (ckernel.c); then, below, the methods of their own (gram.c, ram.c,
nearswap.c, sce.c, arcee.c: each its method's torch ops, op for op).

The numpy kernel makes one pass over a chunk per operation (dozens for a TIES merge); ckernel.c
takes every 2048-element step through the whole merge while it sits in L1 cache, the DARE hash
computed per element instead of stored. It is compiled once, when streammerge is installed
(setup.py); importing this module raises ImportError when it was not (no C compiler then), and
the numpy kernel gives the same bytes.

Bits: every step is the same IEEE float32 operation, in the same order, as `kernels.merge_chunk`,
and the tests check the two give identical bytes. Inputs are read in place from the mapped files:
no staging copy. ctypes releases the GIL during a call: the pool's threads run in parallel.
Covers the task-vector family in float32 with bf16/float32/FP8 storage (`supports`), DELLA's
merge included: its steps hold whole rows, ranked within each (by counting the top 16 bits of |τ|,
or a stable radix sort of its bits);
DELLA's tables of p per rank are the numpy kernel's (kernels._della_tables).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import threading
from ctypes import POINTER, c_double, c_float, c_int32, c_int64, c_uint32, c_uint64, c_void_p

import numpy as np
import torch

from streammerge.io import quant
from streammerge.io.quant import QuantRows
from streammerge.methods import kernels, registry
from streammerge.methods.mask import keep_threshold
from streammerge.methods.ops import BRACKET_KEYS, SUB, TensorSpec, TrimThreshold


def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("streammerge.methods._ckernel")
    if spec is None or spec.origin is None:
        raise ImportError("the compiled kernel was not built at install (no C compiler?): "
                          "reinstall streammerge with a C compiler, e.g. pip install -e .")
    try:
        return ctypes.CDLL(spec.origin)
    except OSError as e:  # built for another machine or Python, say
        raise ImportError(f"the compiled kernel does not load ({e}): reinstall streammerge on this machine") from None


_KINDS = {"uint16": 0, "float32": 1, "fp8": 2}  # ckernel.c's storage kinds: bf16 as its bits, float32, FP8 rows
COPY, SUM, TIES, AVERAGE = 0, 1, 2, 3  # what the kernel does with a chunk
MERGE_SUM, MERGE_MEAN, MERGE_MAX = 0, 1, 2


class _Source(ctypes.Structure):  # ckernel.c's Source
    _fields_ = [("kind", c_int64), ("data", c_void_p), ("grid", c_void_p), ("table", c_void_p),
                ("grid_cols", c_int64), ("first", c_int64), ("cols", c_int64), ("br", c_int64), ("bc", c_int64)]


class _Model(ctypes.Structure):  # ckernel.c's Model
    _fields_ = [("src", _Source), ("weight", c_float), ("given", c_int32), ("keep_below", c_uint64),
                ("key0", c_uint32), ("key1", c_uint32), ("scale", c_float), ("density", c_float),
                ("divide", c_int32), ("trimmed", c_int32), ("outlier", c_int32),
                ("trim_value", c_float), ("out_value", c_float), ("trim_tie", c_int64), ("out_tie", c_int64),
                ("della_last", c_void_p), ("della_p", c_void_p)]


class _Merge(ctypes.Structure):  # ckernel.c's Merge
    _fields_ = [("base", _Source), ("out", _Source), ("models", POINTER(_Model)), ("n", c_int64), ("start", c_int64),
                *((f, c_int32) for f in ("mode", "dare", "band", "weighted_sign", "sign_count", "zero_majority",
                                         "merge_func", "mean_count", "normalize", "positive")),
                ("lam", c_float), ("norm", c_float), ("majority", c_float), ("della_row", c_int64)]


class _Bracket(ctypes.Structure):  # ckernel.c's Bracket
    _fields_ = [("lo", c_uint32), ("hi", c_uint32), ("hot", c_uint32 * 2), ("shift", c_int32), ("wanted", c_int32),
                ("keep", c_int32)]


class _Sce(ctypes.Structure):  # sce.c's Sce
    _fields_ = [("xs", POINTER(_Source)), ("n", c_int64), ("base", _Source), ("select", c_int32), ("value", c_float),
                ("last_tie", c_int64), ("start", c_int64)]


_lib = _library()
_lib.merge_range.argtypes = [POINTER(_Merge), c_int64, c_int64]
_lib.hist_range.argtypes = [POINTER(_Merge), c_int64, c_int64, c_void_p, c_void_p, c_int64, c_void_p]
_lib.tie_range.argtypes = [POINTER(_Merge), c_int64, c_int64, c_int64, c_float, c_int64, POINTER(c_int64)]
_lib.tie_range.restype = c_int64
_lib.tau_bits.argtypes = [POINTER(_Merge), c_void_p, c_int64, c_int32, c_int64, POINTER(_Bracket), c_void_p]
_lib.bracket_range.argtypes = [POINTER(_Merge), c_int64, c_int64, POINTER(_Bracket), c_int64, c_int64, c_int64, c_void_p,
                               c_void_p, c_void_p, c_void_p, c_int64, c_void_p]
_lib.quantize_range.argtypes = [POINTER(_Source), c_int64, c_int64, c_void_p, c_void_p]
_lib.merge_quantize_range.argtypes = [POINTER(_Merge), c_int64, c_int64, c_int64, c_void_p, c_void_p]
_lib.gram_lines.argtypes = [POINTER(_Source), c_int64, POINTER(_Source), c_int64, c_int64, c_void_p]
_lib.ram_merge.argtypes = [POINTER(_Source), c_int64, POINTER(_Source), c_float, c_void_p, c_int64, c_void_p]
_lib.ram_counts.argtypes = [POINTER(_Source), c_int64, POINTER(_Source), c_float, c_int64, c_void_p]
_lib.nearswap_merge.argtypes = [POINTER(_Source), POINTER(_Source), c_float, c_float, c_int64, c_void_p]
_lib.combine_lines.argtypes = [POINTER(_Source), c_int64, POINTER(_Source), c_void_p, c_int32, POINTER(_Source),
                               c_int64, c_int64, c_void_p]
_lib.sce_hist.argtypes = [POINTER(_Sce), c_int64, c_int64, c_void_p]
_lib.sce_ties.argtypes = [POINTER(_Sce), c_float, c_int64, c_int64, c_void_p]
_lib.sce_sums.argtypes = [POINTER(_Sce), c_int64, c_int64, c_void_p]
_lib.sce_merge.argtypes = [POINTER(_Sce), c_void_p, c_float, c_int64, c_void_p]
for _f in (_lib.det_exp_array, _lib.det_log_array):
    _f.argtypes, _f.restype = [c_void_p, c_int64, c_void_p], None
_lib.arcee_hist.argtypes = [POINTER(_Source), POINTER(_Source), c_void_p, c_int64, c_int64, c_void_p, c_int64,
                            c_void_p, c_void_p, c_void_p, c_void_p]
_lib.arcee_hist.restype = c_int64
_lib.arcee_merge.argtypes = [POINTER(_Source), POINTER(_Source), c_void_p, c_int64, c_int64, c_double, c_void_p]


def _check(ok: bool) -> None:
    if not ok:
        raise MemoryError("the compiled kernel could not allocate its scratch memory")


_TABLES: dict = {}  # FP8 dtype -> its decode table


def fp8_source(rows: QuantRows) -> tuple:
    """FP8 rows as the kernel reads them: (bytes, float32 scale grid, decode table or None for e4m3fn, first, cols, br, bc)."""
    grid, first = rows.scale_grid()
    table = _TABLES.get(rows.weight.dtype)
    if table is None and rows.weight.dtype != torch.float8_e4m3fn:  # e4m3fn: decoded from its bits
        table = _TABLES[rows.weight.dtype] = quant.decode_table(rows.weight.dtype).numpy()
    br, bc = rows.info.block
    return (rows.weight.reshape(-1).view(torch.uint8).numpy(), np.ascontiguousarray(grid.numpy()), table, int(first),
            int(rows.weight.shape[1]), int(br), int(bc))


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
    if not spec.merged:
        return base is not None
    if opts.sparsify == "magprune" and (out is None or not ranks_della(spec.della_row, spec.densities, spec.epsilons)):
        return False  # DELLA ranks in merges only
    declared = "compiled" in registry.get(opts.method).paths  # opt-in: methods/task_vectors.py
    return declared and (base is not None or opts.combine == "average")


@functools.lru_cache(maxsize=256)
def _della_tables(cols: int, density: float, epsilon: float) -> tuple[np.ndarray, np.ndarray] | None:
    """kernels._della_tables as the kernel reads them: per rank, the largest hash kept (threshold − 1,
    uint32) and p; None where a rank keeps nothing (p < 2⁻³², threshold 0: left to the numpy kernel)."""
    thr, p = kernels._della_tables(cols, density, epsilon)
    if thr.min() == 0:
        return None
    last = (thr - 1).astype(np.uint32)
    last.flags.writeable = False
    return last, p


def ranks_della(cols: int, densities: tuple[float, ...], epsilons: tuple[float, ...]) -> bool:
    """Whether the kernel ranks DELLA's rows of `cols` elements at these densities and epsilons: rows of
    at most kernels.CHUNK (the numpy kernel's too), a threshold above 0 at every rank."""
    return 0 < cols <= kernels.CHUNK and all(_della_tables(cols, d, e) is not None for d, e in zip(densities, epsilons) if d < 1)


def _source(src: np.ndarray | tuple) -> _Source:
    """An array (flat, contiguous: kernels.as_numpy's) or an FP8 source as ckernel.c's Source; the
    caller keeps `src` alive while the kernel reads it."""
    if isinstance(src, tuple):
        w, grid, table, first, cols, br, bc = src
        return _Source(_KINDS["fp8"], w.ctypes.data, grid.ctypes.data, None if table is None else table.ctypes.data,
                       grid.shape[1], first, cols, br, bc)
    if not src.flags.c_contiguous:
        raise ValueError("the compiled kernel reads contiguous arrays only")
    return _Source(_KINDS[src.dtype.name], src.ctypes.data)


def _params(spec: TensorSpec, base, fts: list, out=None, start: int = 0) -> _Merge:
    """One call's parameters: the inputs and each model's weight and sparsification (kernels.deltas_chunk)."""
    opts, n = spec.opts, len(fts)
    mode = (COPY if not spec.merged else AVERAGE if opts.combine == "average" else
            TIES if opts.combine == "ties" else SUM)
    weights = [np.float32(w) for w in spec.weights] or [np.float32(0.0)] * n
    norm = np.float32(0.0)
    for w in weights:  # (0 + w0) + w1 + ... in float32, as the numpy kernel sums (none for a copy)
        norm = norm + w
    if mode == SUM and abs(norm) < 1e-8:
        norm = np.float32(1.0)
    none = (None,) * n
    trims, outliers = spec.trims or none, spec.outliers or none
    keys = spec.keys or (0,) * n  # DARE's and DELLA's mask keys
    scales = spec.dare_scales or (1.0,) * n
    densities = spec.densities or (1.0,) * n
    given = spec.given or (False,) * n
    della = mode != COPY and opts.sparsify == "magprune"
    # DELLA: per model, its last hash kept and p per rank (none at density 1, which keeps τ as it is)
    tables = [_della_tables(spec.della_row, densities[i], spec.epsilons[i]) if della and densities[i] < 1 else None
              for i in range(n)]
    models = (_Model * max(n, 1))(*(
        _Model(_source(f), weights[i], given[i], keep_threshold(densities[i]) if spec.dare else 0,
               keys[i] & 0xFFFFFFFF, keys[i] >> 32, scales[i], densities[i],
               bool(spec.dare and scales[i] != 1.0 and opts.divide_by_density),
               trims[i] is not None, outliers[i] is not None,
               trims[i].value if trims[i] is not None else 0.0, outliers[i].value if outliers[i] is not None else 0.0,
               trims[i].last_tie if trims[i] is not None else -1,
               outliers[i].last_tie if outliers[i] is not None else -1,
               tables[i][0].ctypes.data if tables[i] is not None else None,
               tables[i][1].ctypes.data if tables[i] is not None and opts.rescale == "inverse" else None)
        for i, f in enumerate(fts)))
    merge = _Merge(
        _source(base), _source(out) if out is not None else _Source(), models, n, start,
        mode, bool(spec.dare), opts.sparsify == "band", bool(opts.weighted_sign), opts.sign_method == "count",
        opts.zero_sign == "majority", {"sum": MERGE_SUM, "mean": MERGE_MEAN, "max": MERGE_MAX}.get(opts.merge_func, MERGE_SUM),
        opts.mean_divisor == "count", bool(opts.normalize and mode in (SUM, AVERAGE)), bool(opts.positive_zeros),
        1.0 if mode == AVERAGE else spec.lam, norm, spec.majority,  # linear has no λ
        spec.della_row if della else 0)
    merge.tables = tables  # kept alive while the kernel reads them (kernels' cache may drop them)
    return merge


def merge(spec: TensorSpec, base: np.ndarray | None, fts: list[np.ndarray], out: np.ndarray, start: int, pool=None) -> None:
    """Merges flat `base`/`fts` (storage arrays, as kernels.as_numpy gives them) into flat `out`."""
    p = ctypes.byref(_params(spec, base if base is not None else fts[0], fts, out, start))

    def work(c0: int, c1: int) -> None:
        _check(_lib.merge_range(p, c0, c1) == 0)

    kernels.run_parallel(work, len(out), pool, kernels.chunk_step(spec))  # DELLA: ranges of whole rows


def find_tie(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], start: int, i: int, value: float,
             needed: int, lo: int = 0, hi: int | None = None) -> tuple[int | None, int]:
    """kernels.find_tie, compiled: model i's τ alone, over elements [lo, hi) of the block."""
    p, seen = _params(spec, base, fts, start=start), c_int64()
    hi = numel(base) if hi is None else hi
    pos = _lib.tie_range(ctypes.byref(p), i, lo, hi, np.float32(value), needed, ctypes.byref(seen))
    _check(pos != -2)
    return (None if pos < 0 else int(pos)), int(seen.value)


def _each(work, count: int, pool) -> None:
    """work(r) for r in range(count), side by side on the pool's threads when there are several."""
    if pool is None or count == 1:
        for r in range(count):
            work(r)
    else:
        for f in [pool.submit(work, r) for r in range(count)]:
            f.result()


def radix_hist(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], start: int, high: list[int | None],
               wanted: list[bool], pool=None) -> list[np.ndarray]:
    """kernels.radix_hist, compiled: the same counts."""
    n = len(fts)
    p = ctypes.byref(_params(spec, base, fts, start=start))
    tops = np.array([-1 if h is None else h for h in high], dtype=np.int64)
    want = np.array(wanted, dtype=np.uint8)
    bins = 2 * 65536 if any(h is None for h, w in zip(high, wanted) if w) else 65536  # pass 1 splits each bin in two
    # one histogram set per thread, and one thread for a tensor whose counting would cost less than
    # zeroing and adding up another set
    size = numel(base)
    ranges = kernels._chunks(size, 1 if pool is None else min(pool._max_workers, max(1, size // (16 * bins))), kernels.CHUNK)
    hists = np.zeros((len(ranges), n, bins), np.int64)

    def work(r: int) -> None:
        c0, c1 = ranges[r]
        for c in range(c0, c1, 1 << 31):  # hist_range counts in uint32
            _check(_lib.hist_range(p, c, min(c1, c + (1 << 31)), tops.ctypes.data, want.ctypes.data, bins, hists[r].ctypes.data) == 0)

    _each(work, len(ranges), pool)
    return list(hists.sum(axis=0))


SAMPLE_RUNS, SAMPLE_RUN = 2048, 32  # the bracket's sample: 65536 |τ| from 2048 runs spread over the block
LONGEST_RUN = 256  # ckernel.h's CHUNK: tau_bits' runs are at most this long


def _brackets(selects: list) -> ctypes.Array:
    """ckernel.c's Brackets for the models whose selection is pending (the others not wanted)."""
    out = (_Bracket * len(selects))()
    for b, s in zip(out, selects):
        if s is not None:
            hot = [*s.hot, 0xFFFFFFFF, 0xFFFFFFFF][:2]  # no |τ| has these bits
            b.lo, b.hi, b.hot[0], b.hot[1], b.shift, b.wanted, b.keep = s.lo, s.hi, hot[0], hot[1], s.shift, 1, s.keeps
    return out


def sample_starts(size: int) -> np.ndarray:
    """Where the bracket's SAMPLE_RUNS runs start in a block of `size` elements: the golden ratio's
    multiples (mod 1), in order. Evenly spread, and on no row length's grid: runs a row apart would
    sample the same columns (one FP8 scale block's, say)."""
    return (np.sort((np.arange(SAMPLE_RUNS) * 0.6180339887498949) % 1.0) * (size - SAMPLE_RUN)).astype(np.int64)


def tau_bits(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], start: int, wanted: list[bool],
             sample: bool = True) -> np.ndarray:
    """|τ_i|'s bits (uint32, one row per model; zeros for those not wanted): at the sample's runs
    (`sample_starts`), or of every element."""
    size = numel(base)
    m = SAMPLE_RUN if sample else LONGEST_RUN
    at = sample_starts(size) if sample else np.arange(0, size, m, dtype=np.int64)
    out = np.zeros((len(fts), len(at) * m), np.uint32)
    brackets = (_Bracket * len(fts))(*(_Bracket(wanted=int(w)) for w in wanted))
    p = _params(spec, base, fts, start=start)
    _check(_lib.tau_bits(ctypes.byref(p), at.ctypes.data, len(at), m, size, brackets, out.ctypes.data) == 0)
    return out if sample else out[:, :size]


KEPT_BYTES = 16 << 20  # per thread range, all selects together: the values inside the brackets kept to settle
# a key (within the plan's per-thread scratch allowance, plan.SCRATCH_BYTES)


def bracket_pass(spec: TensorSpec, base: np.ndarray, fts: list[np.ndarray], start: int, selects: list,
                 pool=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """One pass of ops.BracketSelect for each select (None: not counted), select q of model
    q mod len(fts): how many |τ| lie above its bracket, the histogram inside (BRACKET_KEYS keys,
    split in two), per hot value how many equal it in each sub-block of SUB elements, and the values
    counted inside where the select keeps them (else None, as where more than the range's share of
    KEPT_BYTES were)."""
    size, count = numel(base), len(selects)
    p, brackets = ctypes.byref(_params(spec, base, fts, start=start)), _brackets(selects)
    bins, subs = 2 * BRACKET_KEYS, -(-size // SUB)
    ranges = kernels._chunks(size, 1 if pool is None else pool._max_workers, SUB)  # sub-blocks whole in one range
    above, hists = np.zeros((len(ranges), count), np.int64), np.zeros((len(ranges), count, bins), np.int64)
    hot = np.zeros((count, 2, subs), np.int64)
    keeping = sum(s is not None and s.keeps for s in selects)
    cap = KEPT_BYTES // 4 // keeping if keeping else 0
    kept = np.empty((len(ranges), count, cap), np.uint32)  # pages touched only as values are kept
    kept_count = np.zeros((len(ranges), count), np.int64)

    def work(r: int) -> None:
        c0, c1 = ranges[r]
        for c in range(c0, c1, 1 << 30):  # bracket_range counts in uint32
            _check(_lib.bracket_range(p, c, min(c1, c + (1 << 30)), brackets, count, bins, subs, above[r].ctypes.data,
                                      hists[r].ctypes.data, hot.ctypes.data, kept[r].ctypes.data, cap,
                                      kept_count[r].ctypes.data) == 0)

    _each(work, len(ranges), pool)
    values: list[np.ndarray | None] = []
    for q, s in enumerate(selects):
        whole = s is not None and s.keeps and not (kept_count[:, q] > cap).any()  # every value inside was kept
        values.append(np.concatenate([kept[r, q, : kept_count[r, q]] for r in range(len(ranges))]) if whole else None)
    return above.sum(axis=0), hists.sum(axis=0), hot, values


def quantize_rows(x: np.ndarray, cols: int, dst: np.ndarray, scales: np.ndarray, pool=None) -> None:
    """quant.quantize_rows' bytes and scales from the merged rows `x` (bf16 bits or float32, flat),
    the 128-row slabs split over the pool's threads. Each thread writes its own slabs' bytes into a
    staging array (in place, one thread's bytes would land on another's unread input), then they
    are copied into dst: one copy of a byte per element."""
    slab = 128 * cols
    if not scales.flags.c_contiguous or not dst.flags.c_contiguous:
        raise ValueError("the compiled kernel writes contiguous arrays only")
    if pool is None or len(x) <= 2 * slab:
        _check(_lib.quantize_range(ctypes.byref(_source(x)), len(x) // cols, cols, dst.ctypes.data, scales.ctypes.data) == 0)
        return
    staged = np.empty(len(x), np.uint8)

    def work(c0: int, c1: int) -> None:
        part = _source(x[c0:c1])
        _check(_lib.quantize_range(ctypes.byref(part), (c1 - c0) // cols, cols, staged[c0:].ctypes.data,
                                   scales[c0 // slab :].ctypes.data) == 0)

    kernels.run_parallel(work, len(x), pool, slab)
    dst[: len(x)] = staged


def merge_quantize(spec: TensorSpec, base, fts: list, dtype: np.dtype, cols: int, dst: np.ndarray, scales: np.ndarray,
                   start: int, pool=None) -> None:
    """merge into `dtype` (uint16: bf16 bits, or float32) then quantize_rows, in one pass: each 128-row
    slab merged into scratch that stays in cache and quantized from there, slabs split over the
    pool's threads. FP8 bytes into `dst` (uint8, rows x cols), scales into `scales`: the same bytes."""
    if not scales.flags.c_contiguous or not dst.flags.c_contiguous:
        raise ValueError("the compiled kernel writes contiguous arrays only")
    first = base if base is not None else fts[0]
    p = ctypes.byref(_params(spec, first, fts, np.empty(0, dtype), start))

    def work(c0: int, c1: int) -> None:
        _check(_lib.merge_quantize_range(p, c0 // cols, c1 // cols, cols, dst.ctypes.data, scales.ctypes.data) == 0)

    kernels.run_parallel(work, numel(first), pool, 128 * cols)


# ---- the methods of their own (methods/base.py): torch rows in, torch results out ----------------

_TORCH_KINDS = {torch.bfloat16: _KINDS["uint16"], torch.float32: _KINDS["float32"]}


def readable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels read these tensors in place (CPU, bf16 or float32, contiguous, not empty);
    None counts as readable."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in _TORCH_KINDS and t.is_contiguous() and t.numel() > 0)
               for t in tensors)


def _tensor_source(t: torch.Tensor) -> _Source:
    """A `readable` tensor as ckernel.h's Source; the caller keeps `t` alive while the kernel reads it."""
    return _Source(_TORCH_KINDS[t.dtype], t.data_ptr())


def _sources(tensors: list[torch.Tensor]):
    return (_Source * len(tensors))(*map(_tensor_source, tensors))


def _one(t: torch.Tensor | None):
    return None if t is None else ctypes.byref(_tensor_source(t))


def gram(xs: list[torch.Tensor], minus: torch.Tensor | None, width: int) -> torch.Tensor:
    """gram.gram_stats' sums, compiled: float64 [pairs, lines], Σ over each `width`-element line of
    (x_i − minus)(x_j − minus) for the pairs i <= j in order (`readable` inputs of one size)."""
    k, lines = len(xs), xs[0].numel() // width
    out = torch.empty(k * (k + 1) // 2, lines, dtype=torch.float64)
    _check(_lib.gram_lines(_sources(xs), k, _one(minus), width, lines, out.data_ptr()) == 0)
    return out


def combine(xs: list[torch.Tensor], minus: torch.Tensor | None, coefs: torch.Tensor, add: torch.Tensor | None,
            width: int) -> torch.Tensor:
    """gram.combine's float32 result, compiled: add + Σ_i coefs[i] (x_i − minus) per `width`-element line,
    flat; coefs float64 [k, lines] (a coefficient per line) or [k, 1] (one for every line)."""
    lines = xs[0].numel() // width
    coefs = coefs.to(torch.float64).contiguous()
    out = torch.empty(xs[0].numel(), dtype=torch.float32)
    _check(_lib.combine_lines(_sources(xs), len(xs), _one(minus), coefs.data_ptr(), coefs.shape[1] != 1,
                              _one(add), width, lines, out.data_ptr()) == 0)
    return out


def ram_merge(models: list[torch.Tensor], base: torch.Tensor, eps: float, scales: tuple[float, ...] | None) -> torch.Tensor:
    """ram._merge's float32 result (default semantics), compiled, flat; scales: RAM+'s λ_t (None: ram)."""
    out = torch.empty(base.numel(), dtype=torch.float32)
    lam = None if scales is None else (c_float * len(scales))(*scales)
    _check(_lib.ram_merge(_sources(models), len(models), _one(base), eps, lam, base.numel(), out.data_ptr()) == 0)
    return out


def ram_counts(models: list[torch.Tensor], base: torch.Tensor, eps: float) -> torch.Tensor:
    """RAM+'s (shared, unique) counts per model, int64 [2, models], compiled."""
    counts = torch.empty(2, len(models), dtype=torch.int64)
    _check(_lib.ram_counts(_sources(models), len(models), _one(base), eps, base.numel(), counts.data_ptr()) == 0)
    return counts


def nearswap_merge(base: torch.Tensor, model: torch.Tensor, t: float, floor: float) -> torch.Tensor:
    """nearswap's float32 result (default semantics), compiled, flat."""
    out = torch.empty(base.numel(), dtype=torch.float32)
    _check(_lib.nearswap_merge(_one(base), _one(model), t, floor, base.numel(), out.data_ptr()) == 0)
    return out


def _sce(base: torch.Tensor, models: list[torch.Tensor], keep: TrimThreshold | None, start: int) -> _Sce:
    """sce.c's inputs: `readable` θ₀ and models of one size, and the selection (None: every τ)."""
    xs = _sources(models)  # (the structure keeps it alive)
    if keep is None:
        return _Sce(xs, len(models), _tensor_source(base))
    return _Sce(xs, len(models), _tensor_source(base), 1, keep.value, keep.last_tie, start)


def sce_hist(base: torch.Tensor, models: list[torch.Tensor], high: int | None) -> torch.Tensor:
    """ops.radix_hist_high (high None) or ops.radix_hist_low(·, high) of sce's variance, compiled."""
    hist = torch.zeros(2 * 65536 if high is None else 65536, dtype=torch.int64)
    _check(_lib.sce_hist(ctypes.byref(_sce(base, models, None, 0)), base.numel(), -1 if high is None else high,
                         hist.data_ptr()) == 0)
    return hist


def sce_ties(base: torch.Tensor, models: list[torch.Tensor], value: float) -> torch.Tensor:
    """How many of each row's variances equal `value` (int64 [rows]), compiled."""
    rows, width = base.shape
    ties = torch.empty(rows, dtype=torch.int64)
    _check(_lib.sce_ties(ctypes.byref(_sce(base, models, None, 0)), value, width, rows, ties.data_ptr()) == 0)
    return ties


def sce_sums(base: torch.Tensor, models: list[torch.Tensor], keep: TrimThreshold | None, start: int) -> torch.Tensor:
    """Σ τ̂_t² per model and row (float64 [models, rows], base.row_sums' tree), compiled."""
    rows, width = base.shape
    sums = torch.empty(len(models), rows, dtype=torch.float64)
    _check(_lib.sce_sums(ctypes.byref(_sce(base, models, keep, start)), width, rows, sums.data_ptr()) == 0)
    return sums


def sce_merge(base: torch.Tensor, models: list[torch.Tensor], keep: TrimThreshold | None, start: int,
              weights: tuple[float, ...], floor: float) -> torch.Tensor:
    """sce's merged rows (float32, base's shape), compiled; the weights and floor rounded to float32 as
    torch rounds a Python float scalar for a float32 tensor."""
    out = torch.empty(base.shape, dtype=torch.float32)
    w = np.array(weights, dtype=np.float32)
    _check(_lib.sce_merge(ctypes.byref(_sce(base, models, keep, start)), w.ctypes.data, np.float32(floor), base.numel(),
                          out.data_ptr()) == 0)
    return out


# arcee_fusion (arcee.c): θ₀ `a`, θ₁ `b`, `readable`, of one size, in softmax rows of `last` elements

_scratch = threading.local()  # per compute thread: arcee_kl_hist's rows, arcee_hist's counters (left zeroed) and output


def det_exp(x: torch.Tensor) -> torch.Tensor:
    """detmath.exp of a float64 CPU tensor, in C."""
    return _det(_lib.det_exp_array, x)


def det_log(x: torch.Tensor) -> torch.Tensor:
    """detmath.log of a float64 CPU tensor, in C."""
    return _det(_lib.det_log_array, x)


def _det(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    fn(x.data_ptr(), x.numel(), out.data_ptr())
    return out


def arcee_kl_hist(a: torch.Tensor, b: torch.Tensor, last: int) -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray]]:
    """A block's first pass, reading it once: KL(softmax θ₁ + ε ‖ softmax θ₀ + ε) of each softmax row,
    clamped at 0 (float64 [rows]), and the importance's first histogram (as arcee_hist's)."""
    kl = torch.empty(a.numel() // last, dtype=torch.float64)
    size = 3 * last + 128  # arcee.c's row_kl: x, y and the sums' work, float64; ckernel.h's CHUNK of float32s
    if getattr(_scratch, "work", None) is None or len(_scratch.work) < size:
        _scratch.work = torch.empty(size, dtype=torch.float64)  # reused: fresh ones cost page faults
    return kl, _arcee_hist(a, b, kl, last, [], _scratch.work.data_ptr())


def arcee_hist(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, last: int,
               highs: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The importance's histogram (ops.radix_hist_high without highs, else ops.radix_hist_low of each
    high, one after the other) as the bins it fills and their counts, int64."""
    if len(highs) > 3:  # (arcee.c selects at most three order statistics at once)
        raise ValueError(f"arcee_hist takes at most 3 highs, got {len(highs)}")
    return _arcee_hist(a, b, kl, last, highs, None)


def _arcee_hist(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, last: int, highs: list[int],
                work: int | None) -> tuple[np.ndarray, np.ndarray]:
    """arcee_hist's call; work: row_kl's buffer (the first histogram computes kl first), else None."""
    size = 65536 * max(2, len(highs))
    if getattr(_scratch, "counts", None) is None or len(_scratch.counts) < size:
        _scratch.counts, _scratch.out = np.zeros(size, np.uint32), np.empty((2, size), np.int64)
    tops, out = np.array(highs, np.int64), _scratch.out
    nb = _lib.arcee_hist(_one(a), _one(b), kl.data_ptr(), last, a.numel(), tops.ctypes.data, len(highs),
                         _scratch.counts.ctypes.data, out[0].ctypes.data, out[1].ctypes.data, work)
    _check(nb != -1)
    if nb == -2:  # as torch.bincount refuses it
        raise RuntimeError("arcee_fusion: an importance is a NaN with its sign bit set "
                           "(bincount only supports non-negative inputs)")
    return out[0, :nb].copy(), out[1, :nb].copy()


def arcee_merge(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, last: int, threshold: float) -> torch.Tensor:
    """θ₁ where the importance >= threshold, else θ₀: float32, flat."""
    out = torch.empty(a.numel(), dtype=torch.float32)
    _check(_lib.arcee_merge(_one(a), _one(b), kl.data_ptr(), last, a.numel(), threshold, out.data_ptr()) == 0)
    return out
