"""The three CPU paths give the same bytes: the numpy chunk kernel, the compiled C kernel
(ckernel.c through ckernel.py), and torch eager ops (the path of other devices); and the methods of
their own on their compiled kernels (methods/*.c) give their torch path's bytes through a merge.
Skipped when the C kernels were not built at install."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MERGE_KERNEL, compiled_kernel, shard_hashes, spy_compiled

import streammerge.methods.kernels
from streammerge.methods import kernels, ops
from streammerge.methods.mask import mask_key
from streammerge import MergeConfig, ModelSpec, merge
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.io import quant
from streammerge.io.sources import TensorInfo
from streammerge.pipeline.passes import Block, TorchBackend

ckernel = compiled_kernel()
SHAPE = TinyLlama(hidden=64, intermediate=96, layers=1, heads=4, kv_heads=2, vocab=50)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    base = random_state(SHAPE, seed=3)
    base["model.layers.0.mlp.up_proj.weight"][::7] = -0.0  # signed zeros in the base
    save_checkpoint(base, root / "base", shards=1)
    for i in range(3):
        ft = finetune_of(base, seed=20 + i, scale=0.01)
        ft["model.layers.0.mlp.up_proj.weight"][::5] = base["model.layers.0.mlp.up_proj.weight"][::5]  # zero deltas
        save_checkpoint(ft, root / f"ft{i}", shards=1)
    return root


def _bytes(tmp_path, root, method, semantics, mode, options=None, **params):
    models = tuple(ModelSpec(str(root / f"ft{i}"), {"weight": [0.5, -0.3, 0.4][i], "density": [0.5, 0.3, 0.8][i]}) for i in range(3))
    cfg = MergeConfig(method=method, base=str(root / "base"), models=models, semantics=semantics, parameters=params, seed=5)
    out = tmp_path / f"{method}-{semantics}-{mode}"
    merge(cfg, out, compile={"compiled": "on", "auto": "auto"}.get(mode, "off"), **(options or {}))
    return shard_hashes(out)


CASES = [("dare_ties", "default", {}), ("ties", "default", {"lambda": 0.7})]
SLOW_CASES = [("task_arithmetic", "default", {"normalize": True}), ("dare_linear", "peft", {}), ("ties", "peft", {"sign_method": "count"}),
              ("ties", "fusionbench", {"merge_func": "max"}), ("dare_ties", "fusionbench", {"trim_density": 0.5}),
              ("magnitude_prune", "default", {})]


@pytest.mark.parametrize(("method", "semantics", "params"), CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CASES])
def test_compiled_numpy_and_torch_give_identical_bytes(tmp_path, models, monkeypatch, caplog, method, semantics, params):
    calls = spy_compiled(monkeypatch, "merge")
    compiled = _bytes(tmp_path, models, method, semantics, "compiled", **params)
    assert calls and "unavailable" not in caplog.text  # the compiled kernel really ran
    numpy = _bytes(tmp_path, models, method, semantics, "numpy", **params)
    monkeypatch.setattr(streammerge.methods.kernels, "supported", lambda dtypes, compute: False)  # torch eager ops
    eager = _bytes(tmp_path, models, method, semantics, "torch", **params)
    assert compiled == numpy == eager


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_numpy_kernel_and_torch_give_identical_bytes(tmp_path, models, monkeypatch, method):
    # The band (top trim plus dropped outliers) runs in the numpy chunk kernel; torch eager is the reference.
    numpy = _bytes(tmp_path, models, method, "default", "numpy", gamma=0.05)
    monkeypatch.setattr(streammerge.methods.kernels, "supported", lambda dtypes, compute: False)
    assert numpy == _bytes(tmp_path, models, method, "default", "torch", gamma=0.05)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_compiled_numpy_and_torch_give_identical_bytes(tmp_path, models, monkeypatch, method, rescale):
    # DELLA ranks within rows in both CPU kernels; torch eager is the reference. A small budget splits
    # tensors into row blocks, and two threads split the blocks into ranges of whole rows.
    compiled = spy_compiled(monkeypatch, "merge")
    ranked = []
    monkeypatch.setattr(streammerge.methods.kernels, "_magprune_chunk", lambda *a, real=streammerge.methods.kernels._magprune_chunk: ranked.append(1) or real(*a))
    small = {"max_memory": 20_000, "threads": 2}
    got = _bytes(tmp_path, models, method, "default", "compiled", rescale=rescale, epsilon=0.1, options=small)
    assert compiled and not ranked  # the compiled kernel ranked every row
    numpy = _bytes(tmp_path, models, method, "default", "numpy", rescale=rescale, epsilon=0.1, options=small)
    assert ranked  # the numpy kernel really ran
    monkeypatch.setattr(streammerge.methods.kernels, "supported", lambda dtypes, compute: False)
    assert got == numpy == _bytes(tmp_path, models, method, "default", "torch", rescale=rescale, epsilon=0.1)


# ---- the compiled kernel against the numpy kernel, option by option, on hostile values ----------

N = 70_001  # over one 64K chunk, and not a multiple of the kernel's inner step


TRIM_TIE, OUTLIER_TIE = 2.0**-6, 2.0**-5  # thresholds many |τ| equal (every 13th, 17th element; the last ties below are some)


def _inputs(dtype: torch.dtype, n: int = 3):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=g)
    base[::97] = -0.0
    base[5], base[6], base[7] = float("nan"), float("inf"), -float("inf")
    base[13::13], base[17::17] = 0.5, 0.25
    fts = []
    for i in range(n):
        f = base + 0.01 * torch.randn(N, generator=g)
        f[13::13], f[17::17] = 0.5 - (-1) ** i * TRIM_TIE, 0.25 + OUTLIER_TIE  # |τ| ties at the thresholds, exact in bf16
        f[::11] = base[::11]  # zero deltas
        f[100 + i] = float("nan")
        f[200 + i] = 1e38  # overflow to inf in the weighted sums
        fts.append(f.to(dtype))
    return base.to(dtype), fts


def _spec(method: str, n: int, trims: bool, outliers: bool, **options) -> ops.TensorSpec:
    dare = method.startswith("dare")
    densities = (0.5, 0.3, 0.8, 0.6)[:n]
    return ops.TensorSpec(  # λ 1 for two models: the kernel's shortcut without it
        opts=ops.MergeOptions(method=method, **options), weights=(0.5, -0.3, 0.4, 0.25)[:n], lam=1.0 if n == 2 else 0.7, dare=dare,
        keys=tuple(mask_key(3, i, "t") for i in range(n)) if dare else (), densities=densities,
        dare_scales=tuple(1 / d for d in densities) if dare else (1.0,) * n,
        trims=tuple(ops.TrimThreshold(TRIM_TIE, 12345 + 13 * 1150 * (i + 1)) for i in range(n)) if trims else (None,) * n,
        outliers=tuple(ops.TrimThreshold(OUTLIER_TIE, 12345 + 17 * 1765) for _ in range(n)) if outliers else (), majority=-1.0)


OPTIONS = [{}, {"merge_func": "sum"}, {"merge_func": "max"}, {"sign_method": "count", "weighted_sign": False, "mean_divisor": "count"},
           {"zero_sign": "majority"}, {"normalize": True}, {"divide_by_density": True}, {"positive_zeros": False}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "dare_ties", "ties", "linear"])
def test_compiled_kernel_gives_the_numpy_kernels_bits(method, dtype):
    # Every option the kernel takes, 1-4 models (2 and 3 have steps of their own), trims with a last tie, breadcrumbs' outlier band,
    # over NaN, ±Inf, −0, zero deltas and overflowing sums: bit for bit the numpy kernel's result.
    base, fts = _inputs(dtype, 4)
    storage = np.uint16 if dtype == torch.bfloat16 else np.float32
    for options in OPTIONS:
        for n in (1, 2, 3, 4):
            for trims, outliers in ((False, False), (True, False), (True, True)):
                spec = _spec(method, n, trims, outliers, **options)
                b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts[:n]]
                want, got = np.empty(N, storage), np.empty(N, storage)
                with np.errstate(all="ignore"):
                    kernels.merge_block(spec, b, fs, want, 12345)
                assert ckernel.supports(spec, b, fs, got)
                ckernel.merge(spec, b, fs, got, 12345)
                assert want.tobytes() == got.tobytes(), (method, options, n, trims, outliers)


# DELLA: rows shorter than the kernel's 2048-element step (several per step), of one element, of a step,
# longer (one per step, up to the numpy kernel's 65536); the 2048- and 65536-wide tensors split into
# row-aligned ranges over two threads
DELLA_SHAPES = [(300, 7), (1, 1), (40, 33), (140, 2048), (9, 3000), (3, 5000), (5, 65536)]
# per model (density, epsilon): density 1 leaves τ as it is, epsilon 0 gives every rank p = density
DELLA_PARAMS = [((0.5, 0.1), (0.3, 0.2), (0.9, 0.05)), ((0.7, 0.0), (1.0, 0.15), (0.2, 0.15))]


def _della_inputs(rows: int, cols: int, dtype: torch.dtype, hostile: bool):
    """τ in steps of 2^-9: many |τ| ties, of equal and opposite signs; zero deltas; a row of zero
    deltas and one of a single |τ|; hostile: NaN, ±Inf and −0 too."""
    g = torch.Generator().manual_seed(rows * cols)
    base = torch.randn(rows, cols, generator=g) * 0.02
    step = torch.randint(-6, 7, (rows, cols), generator=g) / 512
    if rows > 2:
        base[1], step[1] = 0.0, torch.where(torch.arange(cols) % 3 == 0, -1.0, 1.0) / 256  # one |τ|, both signs
        step[2] = 0.0
    if hostile:
        base[:, ::5] = -0.0
        step[:, 3 % cols], step[:, 6 % cols] = float("nan"), float("inf")
    fts = [(base + step * (i + 1)).to(dtype) for i in range(3)]
    return base.to(dtype), fts


def _della_spec(method: str, cols: int, params, rescale: str) -> ops.TensorSpec:
    return ops.TensorSpec(opts=ops.MergeOptions(method=method, rescale=rescale), weights=(0.6, -0.3, 0.5), lam=0.8, dare=False,
                          keys=tuple(mask_key(5, i, "t") for i in range(3)), densities=tuple(d for d, _ in params),
                          dare_scales=(1.0,) * 3, trims=(None,) * 3, epsilons=tuple(e for _, e in params), della_row=cols)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_compiled_kernel_ranks_della_rows_as_the_numpy_kernel_and_torch(method, dtype):
    # Each element's rank of |τ| in its row (ties lowest index first) picks its keep threshold and p:
    # the compiled kernel's radix ranks give the numpy kernel's bits, and torch's (but for bf16 NaNs,
    # whose sign torch keeps where the CPU kernels store 0x7FC0). A block from the middle of a
    # tensor, and one whose flat indices cross 2^32: the mask hashes them.
    storage = np.uint16 if dtype == torch.bfloat16 else np.float32
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    with ThreadPoolExecutor(2) as pool:
        for rows, cols in DELLA_SHAPES:
            for hostile in (False, True):
                base, fts = _della_inputs(rows, cols, dtype, hostile)
                b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
                for params in DELLA_PARAMS:
                    for rescale in ("inverse", "none"):
                        spec = _della_spec(method, cols, params, rescale)
                        for start in (7 * cols, 2**32 - 3 * cols // 2):
                            want, got = np.empty(rows * cols, storage), np.empty(rows * cols, storage)
                            with np.errstate(all="ignore"):
                                kernels.merge_block(spec, b, fs, want, start, pool)
                            assert ckernel.supports(spec, b, fs, got)
                            ckernel.merge(spec, b, fs, got, start, pool)
                            assert want.tobytes() == got.tobytes(), (rows, cols, hostile, params, rescale, start)
                        if not hostile or dtype == torch.float32:
                            eager = torch.empty(rows * cols, dtype=dtype)
                            TorchBackend(torch.float32).merge(Block(0, rows, start, base, fts, 0), spec, eager)
                            assert eager.view(bits).numpy().tobytes() == got.tobytes(), (rows, cols, params, rescale)


@pytest.mark.parametrize("lows", [0.002, 0.05, 0.12, 0.3])
def test_compiled_della_ranks_of_keys_with_low_bits(lows):
    # The counting ranks place τ whose low 16 bits are zero by their top 16, then insert the others
    # among their key's: rows of few keys, a fraction of them with low bits (often equal ones, out of
    # index order, next to each other's runs), zeros, and up to more than the counting takes (radix
    # then). Against the numpy kernel's sort, in row lengths below and above 8 low elements per 64.
    g = np.random.default_rng(int(lows * 1000))
    for rows, cols in ((64, 2048), (30, 300), (4, 65536)):
        keys = g.choice(np.arange(0x3A00, 0x3A00 + 40, dtype=np.uint32), size=(rows, cols))
        low = np.where(g.random((rows, cols)) < lows, g.choice(np.array([1, 7, 0x8000, 0xFFFF], np.uint32), (rows, cols)), 0)
        tau = (keys << 16 | low).astype(np.uint32).view(np.float32)
        tau = np.where(g.random((rows, cols)) < 0.05, 0, tau) * np.where(g.random((rows, cols)) < 0.5, -1, 1)
        base = torch.zeros(rows, cols)
        fts = [torch.from_numpy(tau.astype(np.float32)).roll(i, dims=1) for i in range(3)]
        b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
        for method in ("della", "della_linear"):
            spec = _della_spec(method, cols, DELLA_PARAMS[0], "inverse")
            want, got = np.empty(rows * cols, np.float32), np.empty(rows * cols, np.float32)
            kernels.merge_block(spec, b, fs, want, 0, None)
            assert ckernel.supports(spec, b, fs, got)
            ckernel.merge(spec, b, fs, got, 0, None)
            assert want.tobytes() == got.tobytes(), (lows, rows, cols, method)


def test_della_ranks_that_keep_nothing_stay_on_the_numpy_kernel():
    # p < 2^-32 at the lowest ranks (density − epsilon tiny): a threshold of 0, which the kernel's
    # uint32 "last hash kept" cannot say; that merge stays on the numpy kernel, as do stats passes
    base, fts = _della_inputs(4, 100, torch.bfloat16, False)
    b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
    out = np.empty(400, np.uint16)
    assert ckernel.supports(_della_spec("della", 100, DELLA_PARAMS[0], "inverse"), b, fs, out)
    assert not ckernel.supports(_della_spec("della", 100, DELLA_PARAMS[0], "inverse"), b, fs)
    assert not ckernel.supports(_della_spec("della", 100, ((0.3, 0.3 - 1e-12), (0.5, 0.1), (0.5, 0.1)), "inverse"), b, fs, out)
    assert not ckernel.supports(_della_spec("della", kernels.CHUNK + 1, DELLA_PARAMS[0], "inverse"), b, fs, out)


def test_compiled_kernel_copies_and_converts_unmerged_tensors():
    base, _ = _inputs(torch.bfloat16)
    spec = ops.TensorSpec(opts=ops.MergeOptions(method="ties"), weights=(), lam=1.0, dare=False, keys=(), densities=(),
                          dare_scales=(), trims=(), merged=False)
    want, got = np.empty(N, np.float32), np.empty(N, np.float32)
    kernels.merge_block(spec, kernels.as_numpy(base), [], want, 0)
    ckernel.merge(spec, kernels.as_numpy(base), [], got, 0)
    assert want.tobytes() == got.tobytes()


def test_compiled_kernel_hashes_across_a_2_to_the_32_boundary():
    # The DARE mask hashes the flat index's two 32-bit halves: a block straddling 2**32 must too.
    base, fts = _inputs(torch.bfloat16)
    spec = _spec("dare_linear", 2, False, False)
    b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts[:2]]
    want, got = np.empty(N, np.uint16), np.empty(N, np.uint16)
    with np.errstate(all="ignore"):
        kernels.merge_block(spec, b, fs, want, 2**32 - 1000)
    ckernel.merge(spec, b, fs, got, 2**32 - 1000)
    assert want.tobytes() == got.tobytes()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_compiled_radix_histograms_count_as_the_numpy_kernels(method):
    # The TIES trim's exact threshold comes from two histogram passes over |τ|: the same counts.
    base, fts = _inputs(torch.bfloat16)
    spec = _spec(method, 3, False, method == "breadcrumbs")
    b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
    with np.errstate(all="ignore"):
        top = kernels.radix_hist(spec, b, fs, 777, [None] * 3, [True, False, True])
        high = [int(h.reshape(-1, 2).sum(1)[1:].argmax()) + 1 for h in kernels.radix_hist(spec, b, fs, 777, [None] * 3, [True] * 3)]  # busiest nonzero bins
        low = kernels.radix_hist(spec, b, fs, 777, high, [True] * 3)
    got_top = ckernel.radix_hist(spec, b, fs, 777, [None] * 3, [True, False, True])
    got_low = ckernel.radix_hist(spec, b, fs, 777, high, [True] * 3)
    assert [h.tolist() for h in top[::2]] == [h.tolist() for h in got_top[::2]] and not got_top[1].any()
    assert [h.tolist() for h in low] == [h.tolist() for h in got_low] and all(h.sum() for h in got_low)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_compiled_tie_scan_finds_the_numpy_kernels_tie(method):
    # The last kept tie at a TIES threshold: the same flat index, and the same count when not found.
    base, fts = _inputs(torch.bfloat16)
    spec = _spec(method, 3, False, False)
    b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
    with np.errstate(all="ignore"):
        for i in range(3):
            value = float(np.abs(kernels.deltas_chunk(spec, b[:5000], [f[:5000] for f in fs], 900, kernels._scratch(3))[1][i][4321]))
            for needed in (1, 7, 10**9):
                assert ckernel.find_tie(spec, b, fs, 900, i, value, needed) == kernels.find_tie(spec, b, fs, 900, i, value, needed)


def test_compiled_tie_scan_counts_across_chunks():
    # |τ| == 0 at every 11th element (zero deltas): the needed tie in the first, a middle and the
    # last chunk, exactly at a chunk's count, and past the last one.
    base, fts = _inputs(torch.float32)
    spec = _spec("ties", 3, False, False)
    b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
    with np.errstate(all="ignore"):
        total = kernels.find_tie(spec, b, fs, 5, 1, 0.0, 10**9)[1]
        for needed in (1, 186, 187, 188, 3000, total - 1, total, total + 1):
            assert ckernel.find_tie(spec, b, fs, 5, 1, 0.0, needed) == kernels.find_tie(spec, b, fs, 5, 1, 0.0, needed), needed


# ---- FP8 rows dequantized as the compiled kernel reads them -------------------------------------


def _fp8_rows(rows: int, cols: int, scheme: str, dtype: torch.dtype, r0: int, r1: int, seed: int,
              block: tuple[int, int] = (128, 128)) -> quant.QuantRows:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 50).clamp(-440, 440).to(dtype)
    w.view(torch.uint8)[::13, ::7] = 0x80  # −0
    if dtype == torch.float8_e4m3fn:
        w.view(torch.uint8)[3, 5] = 0x7F  # its NaN
    br, bc = (rows, cols) if scheme == "tensor" else (1, cols) if scheme == "channel" else block
    s = torch.rand(-(-rows // br), -(-cols // bc), generator=g) * 1e-3
    s = s.reshape(()) if scheme == "tensor" else s
    weight = TensorInfo("w", "F8_E4M3" if dtype == torch.float8_e4m3fn else "F8_E5M2", (rows, cols), Path("x"), 0, rows * cols)
    scale = TensorInfo("w_scale", "F32", tuple(s.shape), Path("x"), 0, 4 * s.numel())
    info = quant.QuantTensor("w", "F32", (rows, cols), Path("x"), 0, 0, weight=weight, scale=scale, block=(br, bc), scheme=scheme)
    s0, s1 = quant.scale_rows(info, r0, r1)
    return quant.QuantRows(info, w[r0:r1], s.reshape(-1, s.shape[-1] if s.dim() else 1)[s0:s1] if scheme != "tensor" else s, r0)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize(("scheme", "rows", "cols", "r0", "r1", "block"), [
    ("block", 300, 200, 0, 300, (128, 128)),  # partial edge blocks in both dimensions
    ("block", 300, 200, 130, 261, (128, 128)),  # rows starting inside a row block
    ("block", 96, 320, 17, 96, (32, 64)),  # a declared block other than 128x128
    ("channel", 70, 150, 9, 61, None),
    ("tensor", 40, 100, 3, 40, None),
])
def test_compiled_kernel_reads_fp8_rows_as_their_dequantization(dtype, scheme, rows, cols, r0, r1, block):
    # Merging FP8 rows gives the bytes of merging their float32 dequantization (quant.QuantRows.dequantize):
    # the kernel finds each element's scale from its flat position in the block.
    fts = [_fp8_rows(rows, cols, scheme, dtype, r0, r1, seed=i, block=block or (128, 128)) for i in range(3)]
    g = torch.Generator().manual_seed(9)
    base = (torch.randn(r1 - r0, cols, generator=g) * 0.01).to(torch.bfloat16)
    for method, trims in (("dare_ties", False), ("ties", True), ("linear", False)):
        spec = _spec(method, 3, trims, False)
        b = kernels.as_numpy(base)
        deq = [kernels.as_numpy(f.dequantize()) for f in fts]
        srcs = [ckernel.fp8_source(f) for f in fts]
        want, got = np.empty(base.numel(), np.uint16), np.empty(base.numel(), np.uint16)
        with np.errstate(all="ignore"):
            kernels.merge_block(spec, b, deq, want, 4321)
        assert ckernel.supports(spec, b, srcs, got)
        ckernel.merge(spec, b, srcs, got, 4321)
        assert want.tobytes() == got.tobytes(), (method, scheme)
    # an FP8 base too, and the stats passes
    spec = _spec("ties", 2, False, False)
    b, deq, srcs = ckernel.fp8_source(fts[2]), [kernels.as_numpy(f.dequantize()) for f in fts[:2]], [ckernel.fp8_source(f) for f in fts[:2]]
    deq_base = kernels.as_numpy(fts[2].dequantize())
    want, got = np.empty(base.numel(), np.float32), np.empty(base.numel(), np.float32)
    with np.errstate(all="ignore"):
        kernels.merge_block(spec, deq_base, deq, want, 0)
        hist = kernels.radix_hist(spec, deq_base, deq, 0, [None, None], [True, True])
    ckernel.merge(spec, b, srcs, got, 0)
    assert want.tobytes() == got.tobytes()
    assert [h.tolist() for h in hist] == [h.tolist() for h in ckernel.radix_hist(spec, b, srcs, 0, [None, None], [True, True])]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_compiled_kernel_decodes_every_fp8_byte_as_torch(dtype):
    # e4m3fn is decoded from its bits (a select, so it vectorizes), e5m2 by a table of torch's values:
    # each of the 256 bytes, NaNs' bits and −0 included, times a scale, is torch's float32 product.
    rows = _fp8_rows(128, 256, "block", dtype, 0, 128, 0)
    rows.weight.view(torch.uint8)[:, :] = torch.arange(256, dtype=torch.uint8).repeat(128, 1)
    spec = ops.TensorSpec(opts=ops.MergeOptions(method="ties"), weights=(), lam=1.0, dare=False, keys=(), densities=(),
                          dare_scales=(), trims=(), merged=False)
    got = np.empty(128 * 256, np.float32)
    ckernel.merge(spec, ckernel.fp8_source(rows), [], got, 0)
    assert got.tobytes() == rows.dequantize().numpy().tobytes()
    assert np.isnan(got[0x7F]) and np.signbit(got[0x80])


def test_fp8_rows_next_to_other_dtypes_go_to_the_numpy_kernel():
    # the compiled kernel loops over fine-tunes of one storage kind; a mix is dequantized instead
    f = _fp8_rows(128, 128, "block", torch.float8_e4m3fn, 0, 128, 0)
    b = np.zeros(128 * 128, np.uint16)
    assert not ckernel.supports(_spec("ties", 2, False, False), b, [ckernel.fp8_source(f), b], np.empty_like(b))


@pytest.mark.parametrize("threads", [1, 2])  # 1100 rows on 2 threads: slabs split, staged, copied back
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(300, 256), (128, 384), (1, 128), (1100, 256)])
def test_compiled_fp8_quantizer_gives_torchs_bytes_in_place(dtype, rows, cols, threads):
    # FP8 output: the scales (amax / 448, 1 for an all-zero block) and torch's round-to-nearest-even
    # e4m3fn bytes, written over the merged rows' own buffer; NaN, ±Inf, −0 and e4m3 subnormals included.
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, cols, generator=g) * torch.logspace(-12, 2, cols)).to(dtype)
    x[5:20, :128] = 0.0
    x[0, 3] = -0.0
    if rows > 200:
        x[200, 7], x[201, 130], x[202, 5] = float("nan"), -float("nan"), float("inf")
        x[260:, 128:] *= 1e-30
    want_q, want_s = quant.quantize(x)
    buf = torch.empty(x.numel() * x.element_size(), dtype=torch.uint8)
    buf.view(dtype)[:] = x.reshape(-1)
    scales = np.empty((-(-rows // 128), cols // 128), np.float32)
    with ThreadPoolExecutor(threads) as pool:
        ckernel.quantize_rows(kernels.as_numpy(buf.view(dtype)), cols, buf.numpy(), scales, pool if threads > 1 else None)
    assert buf[: x.numel()].tolist() == want_q.view(torch.uint8).reshape(-1).tolist()
    assert scales.tobytes() == want_s.numpy().tobytes()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["dare_ties", "ties", "della"])
def test_merging_and_quantizing_in_one_pass_gives_the_bytes_of_the_two_passes(method, dtype, threads):
    # FP8 output: merge_quantize merges each 128-row slab into scratch and quantizes it from there;
    # the bytes and scales of merge into the block's dtype, then quantize_rows. 260 rows: a partial
    # last slab; FP8 and bf16 inputs; DELLA ranks whole rows; the slabs split over threads.
    rows, cols = 260, 256
    if method == "della":
        base, fts = _della_inputs(rows, cols, dtype, hostile=False)
        base, fts = kernels.as_numpy(base.reshape(-1)), [kernels.as_numpy(f.reshape(-1)) for f in fts]
        spec = _della_spec(method, cols, DELLA_PARAMS[0], "inverse")
    else:
        spec = _spec(method, 3, method == "ties", False)
        base, fts = kernels.as_numpy(_inputs(dtype)[0][: rows * cols]), [ckernel.fp8_source(_fp8_rows(rows, cols, "block",
                                                                          torch.float8_e4m3fn, 0, rows, seed=i)) for i in range(3)]
    kind = np.uint16 if dtype == torch.bfloat16 else np.float32
    merged = np.empty(rows * cols, kind)
    want_q, want_s = np.empty(rows * cols, np.uint8), np.zeros((3, cols // 128), np.float32)
    got_q, got_s = np.empty(rows * cols, np.uint8), np.zeros((3, cols // 128), np.float32)
    with ThreadPoolExecutor(threads) as pool, np.errstate(all="ignore"):
        ckernel.merge(spec, base, fts, merged, 777, pool if threads > 1 else None)
        ckernel.quantize_rows(merged, cols, want_q, want_s)
        ckernel.merge_quantize(spec, base, fts, kind, cols, got_q, got_s, 777, pool if threads > 1 else None)
    assert got_q.tobytes() == want_q.tobytes() and got_s.tobytes() == want_s.tobytes()


# ---- the C kernel's own edges: subnormals, threads, a missing build -------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["dare_ties", "ties", "task_arithmetic"])
def test_compiled_kernel_keeps_subnormals_bit_for_bit(method, dtype):
    # Subnormal inputs and τ, products that underflow to ±0 or a subnormal, and sums rounding to
    # the largest float32 and past it: the C kernel flushes nothing to zero and rounds as numpy does.
    g = torch.Generator().manual_seed(1)
    tiny = torch.finfo(torch.float32).tiny
    base = torch.randn(N, generator=g) * tiny * torch.rand(N, generator=g)  # subnormals
    base[::3] = torch.randn(N, generator=g)[::3] * 1e-36
    base[1::50] = 3.0e38
    fts = [base + torch.randn(N, generator=g) * tiny * 4 for _ in range(3)]
    for f in fts:
        f[::7] = -f[::7]
    b, fs = kernels.as_numpy(base.to(dtype)), [kernels.as_numpy(f.to(dtype)) for f in fts]
    storage = np.uint16 if dtype == torch.bfloat16 else np.float32
    for options in ({}, {"merge_func": "max"}, {"normalize": True}, {"divide_by_density": True}):
        spec = _spec(method, 3, method == "ties", False, **options)
        want, got = np.empty(N, storage), np.empty(N, storage)
        with np.errstate(all="ignore"):
            kernels.merge_block(spec, b, fs, want, 99)
        ckernel.merge(spec, b, fs, got, 99)
        assert want.tobytes() == got.tobytes(), (method, options)


def test_compiled_kernel_on_threads_gives_the_one_thread_bytes_and_counts():
    # Two threads split a block (run_parallel) and keep a histogram set each: the same bytes and counts.
    g = torch.Generator().manual_seed(2)
    n = 5 * kernels.CHUNK + 12345  # more than run_parallel's one-thread limit
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    fts = [(base.float() + torch.randn(n, generator=g) * 0.002).bfloat16() for _ in range(2)]
    b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
    spec = _spec("dare_ties", 2, False, False)
    with ThreadPoolExecutor(2) as pool:
        one, two = np.empty(n, np.uint16), np.empty(n, np.uint16)
        ckernel.merge(spec, b, fs, one, 7, None)
        ckernel.merge(spec, b, fs, two, 7, pool)
        want = np.empty(n, np.uint16)
        with np.errstate(all="ignore"):
            kernels.merge_block(spec, b, fs, want, 7, pool)
            hist = kernels.radix_hist(spec, b, fs, 7, [None, None], [True, True], pool)
        assert one.tobytes() == two.tobytes() == want.tobytes()
        got = ckernel.radix_hist(spec, b, fs, 7, [None, None], [True, True], pool)
        assert [h.tolist() for h in got] == [h.tolist() for h in hist]


def test_compile_on_without_the_built_kernel_fails_in_one_line(tmp_path, models, monkeypatch, caplog):
    # Without the C kernel (installed where no C compiler was): "on" says to reinstall, "auto" merges with numpy.
    import importlib.util
    import sys

    import streammerge.methods
    from streammerge.errors import ConfigError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "streammerge.methods._ckernel" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="not built at install"):
        ckernel._library()
    monkeypatch.delattr(streammerge.methods, "ckernel")
    monkeypatch.setitem(sys.modules, "streammerge.methods.ckernel", None)  # its import fails
    with pytest.raises(ConfigError, match="reinstall streammerge where a C compiler is available") as e:
        _bytes(tmp_path, models, "ties", "default", "compiled")
    assert "\n" not in str(e.value)
    numpy = _bytes(tmp_path, models, "ties", "default", "numpy")
    assert _bytes(tmp_path, models, "ties", "default", "auto") == numpy


@pytest.mark.parametrize(("method", "n", "params"), [
    ("slerp", 1, {"t": 0.3}), ("model_stock", 3, {}), ("nuslerp", 2, {"nuslerp_flatten": False}),
    ("multislerp", 3, {}), ("karcher", 3, {}), ("ram", 3, {}), ("ramplus_tl", 3, {"r": 0.5}),
    ("nearswap", 1, {"t": 0.001}), ("sce", 3, {"select_topk": 0.5}), ("sce", 2, {}), ("arcee_fusion", 1, {})])
def test_methods_of_their_own_give_torchs_bytes_on_the_compiled_kernels(tmp_path, models, monkeypatch, method, n, params):
    calls = spy_compiled(monkeypatch, MERGE_KERNEL[method])

    def merged(mode: str) -> dict:
        specs = tuple(ModelSpec(str(models / f"ft{i}"), {"weight": [0.5, 0.3, 0.4][i]}) for i in range(n))
        cfg = MergeConfig(method=method, base=str(models / "base"), models=specs, parameters=params)
        merge(cfg, tmp_path / mode, compile=mode)
        return shard_hashes(tmp_path / mode)

    assert merged("on") == merged("off")
    assert calls
