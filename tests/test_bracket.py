"""TIES' exact trim thresholds by bracket selection (ops.BracketSelect, NumpyBackend.select), against a sort."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from streammerge.methods import kernels, ops
from streammerge.methods.mask import mask_key
from streammerge.pipeline import passes

ckernel = pytest.importorskip("streammerge.methods.ckernel", exc_type=ImportError)

N = 3 * 2**19 + 77  # over BRACKET_MIN, not a multiple of a chunk or a sub-block


def _spec(n: int, dare: bool = False) -> ops.TensorSpec:
    return ops.TensorSpec(opts=ops.MergeOptions(method="dare_ties" if dare else "ties"), weights=(0.5,) * n, lam=1.0,
                          dare=dare, keys=tuple(mask_key(1, i, "t") for i in range(n)) if dare else (),
                          densities=(0.5,) * n, dare_scales=(2.0,) * n if dare else (1.0,) * n, trims=(None,) * n)


def _block(base: torch.Tensor, fts: list[torch.Tensor], start: int = 0) -> passes.Block:
    return passes.Block(0, 1, start, base, fts, 0)


def _expected(tau: torch.Tensor, k: int | None, rule: str, start: int) -> ops.TrimThreshold | None:
    """What the trim keeps, from a sort of |τ|'s bit patterns (NaN above everything, as the radix passes)."""
    if k is None:
        return None
    if k == 0:
        return ops.TrimThreshold(float("inf"), -1)
    bits = tau.abs().view(torch.int32).numpy()
    value_bits = np.sort(bits)[::-1][k - 1]
    greater, ties = int((bits > value_bits).sum()), np.flatnonzero(bits == value_bits)
    keep = len(ties) if rule == "inclusive" else k - greater
    value = float(np.array([value_bits], np.int32).view(np.float32)[0])
    if np.isnan(value):  # no |τ| compares equal to NaN, so which ties are kept does not matter: the radix passes say all
        return ops.TrimThreshold(value, -1 if keep == 0 else ops.ALL_TIES)
    last = ops.ALL_TIES if keep == len(ties) else -1 if keep == 0 else start + int(ties[keep - 1])
    return ops.TrimThreshold(value, last)


def _check(base, fts, ranks, rule="exact", pool=None, start=0):
    """select's thresholds, rank q of model q mod n, against the sort's."""
    got = passes.NumpyBackend(pool, compiled=ckernel).select(_block(base, fts, start), _spec(len(fts)), ranks, rule)
    assert got is not None  # the bracket held
    for q, k in enumerate(ranks):
        want = _expected(fts[q % len(fts)].float() - base.float(), k, rule, start)
        assert (got[q] is None) == (want is None), q
        if want is not None:
            assert np.float32(got[q].value).tobytes() == np.float32(want.value).tobytes() and got[q].last_tie == want.last_tie, (q, k, got[q], want)


def _bf16_inputs(scales: tuple[float, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(N, generator=g) * 0.02).bfloat16()
    return base, [(base.float() + torch.randn(N, generator=g) * s).bfloat16() for s in scales]


@pytest.mark.parametrize("rule", ["exact", "inclusive"])
def test_bf16_task_vectors_with_hot_values(rule, monkeypatch):
    # τ of bf16 weights: few distinct values; with a small spread most τ are 0 or one ulp (hot values,
    # their partly kept ties found in one sub-block)
    base, fts = _bf16_inputs((0.002, 0.0002, 0.00005))
    n = N
    scanned = []
    find_tie = ckernel.find_tie
    monkeypatch.setattr(ckernel, "find_tie", lambda *a: scanned.append(a[-1] - a[-2]) or find_tie(*a))
    with ThreadPoolExecutor(2) as pool:
        for ranks in ([n // 2, n // 2, n // 2], [1, n // 3, n - 1], [None, 0, 12345], [n // 10, 2 * n // 3, n // 2 + 1]):
            _check(base, fts, ranks, rule, pool, start=1000)
    _check(base, fts, [n // 2, 7, n - 5], rule, None)
    if rule == "exact":  # inclusive keeps every tie: nothing to find
        assert scanned and max(scanned) <= ops.SUB  # every partly kept tie sat at a hot value


@pytest.mark.parametrize("size", [N, 5000])
def test_two_ranks_per_model_in_one_pass(size):
    # breadcrumbs' upper and outlier ranks of each model, selected together
    base, fts = _bf16_inputs((0.002, 0.0002))
    base, fts = base[:size], [f[:size] for f in fts]
    with ThreadPoolExecutor(2) as pool:
        _check(base, fts, [size // 2, size // 3, size // 100, None], pool=pool)
        _check(base, fts, [size // 2 + size // 100, 0, size // 100, 7], "inclusive", pool)


@pytest.mark.parametrize(("kept", "most_passes"), [(ckernel.KEPT_BYTES, 1), (8000, 2)])
def test_float32_task_vectors_settle_from_kept_values_or_narrow(kept, most_passes, monkeypatch):
    # float32 τ: the k-th largest's key spans several patterns; the values kept inside the bracket
    # settle it in the same pass, or (too many to keep) the next pass narrows the bracket
    monkeypatch.setattr(ckernel, "KEPT_BYTES", kept)
    passes_taken = []
    add = ops.BracketSelect.add
    monkeypatch.setattr(ops.BracketSelect, "add", lambda self, *a: add(self, *a) or passes_taken.append(self.passes))
    g = torch.Generator().manual_seed(1)
    base = torch.randn(N, generator=g)
    fts = [base + torch.randn(N, generator=g) * s for s in (0.01, 1.0)]
    fts[0][::7] = base[::7]  # exact zeros
    fts[1][100::13] = base[100::13] + 0.25  # a tie at 0.25
    fts[1][5] = float("nan")
    fts[1][9] = float("inf")
    with ThreadPoolExecutor(2) as pool:
        for ranks in ([N // 2, N // 2], [N // 7, int((fts[1] - base).abs().gt(0.25).sum()) + 10], [3, 2], [N - 1, N]):
            _check(base, fts, ranks, "exact", pool)
    assert max(passes_taken) == most_passes


def test_dare_masked_task_vectors():
    base, fts = _bf16_inputs((0.002, 0.001), seed=2)
    spec = _spec(2, dare=True)
    backend = passes.NumpyBackend(None, compiled=ckernel)
    got = backend.select(_block(base, fts), spec, [N // 4, N // 3], "exact")
    b, fs = kernels.as_numpy(base), [kernels.as_numpy(f) for f in fts]
    deltas = np.empty((2, N), np.float32)  # the numpy kernel's DARE-masked τ, chunk by chunk
    for c in range(0, N, kernels.CHUNK):
        _, ds = kernels.deltas_chunk(spec, b[c : c + kernels.CHUNK], [f[c : c + kernels.CHUNK] for f in fs], c, kernels._scratch(2))
        deltas[:, c : c + len(ds[0])] = ds
    for i, k in enumerate([N // 4, N // 3]):
        assert got[i] == _expected(torch.from_numpy(deltas[i]), k, "exact", 0)


def test_a_missed_bracket_decides_nothing():
    # the sampled runs hold small values, every other element a large one: the sample's bracket
    # lies far below the k-th largest, and select says so (the radix passes then run)
    base = torch.zeros(N)
    ft = torch.full((N,), 5.0)
    backend = passes.NumpyBackend(None, compiled=ckernel)
    for a in ckernel.sample_starts(N):
        ft[a : a + ckernel.SAMPLE_RUN] = 0.001 * (1 + a % 7)
    assert backend.select(_block(base, [ft]), _spec(1), [N // 2], "exact") is None


@pytest.mark.parametrize("size", [1, 300, 4096 + 17, passes.BRACKET_MIN - 1])
@pytest.mark.parametrize("rule", ["exact", "inclusive"])
def test_small_blocks_select_every_tau(size, rule):
    g = torch.Generator().manual_seed(size)
    base = torch.randn(size, generator=g)
    fts = [base + torch.randn(size, generator=g).mul(0.1).round(decimals=1) for _ in range(3)]  # ties
    fts[1][::3] = base[::3]
    fts[2][size // 2] = float("nan")
    ranks = [max(1, size // 2), None if size > 1 else 1, size]
    _check(base, fts, ranks, rule, start=5)
    _check(base, fts, [0, 1, max(1, size // 3)], rule)


def test_bracket_select_walks_keys_and_narrows():
    # a bracket over float32 patterns wider than 2^11: the first pass finds the key, the next the value
    values = np.arange(0x3F800000, 0x3F800000 + 100_000, 37, dtype=np.uint32)
    k = 1000
    sel = ops.BracketSelect(k, len(values), values[::3])
    assert sel.shift > 0
    for _ in range(3):
        if sel.found is not None:
            break
        inside = values[(values >= sel.lo) & (values <= sel.hi)]
        hist = np.zeros(2 * ops.BRACKET_KEYS, np.int64)
        np.add.at(hist, 2 * ((inside >> sel.shift) - (sel.lo >> sel.shift)).astype(np.int64)
                  + ((inside & ((1 << sel.shift) - 1)) != 0), 1)
        sel.add(int((values > sel.hi).sum()), hist, np.zeros((len(sel.hot), 1), np.int64))
    want = np.sort(values)[::-1][k - 1]
    assert sel.found == (float(np.array([want]).view(np.float32)[0]), k - 1, 1)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_merges_give_the_radix_passes_bytes_in_any_row_blocks(tmp_path, monkeypatch, method):
    # MLP weights over BRACKET_MIN elements, merged whole and in row blocks (views of the staged
    # tensor, selected as one block), against the radix passes over the blocks
    from conftest import shard_hashes

    from streammerge import MergeConfig, ModelSpec, merge
    from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint

    shape = TinyLlama(hidden=256, intermediate=1088, layers=1, heads=4, kv_heads=2, vocab=40)
    base = random_state(shape, seed=1)
    save_checkpoint(base, tmp_path / "base", shards=1, config=shape.config_json(torch.bfloat16))
    for i in range(2):
        save_checkpoint(finetune_of(base, seed=10 + i, scale=0.01), tmp_path / f"ft{i}", shards=1,
                        config=shape.config_json(torch.bfloat16))
    assert shape.intermediate * shape.hidden >= passes.BRACKET_MIN
    cfg = MergeConfig(method=method, base=str(tmp_path / "base"), seed=7,
                      models=tuple(ModelSpec(str(tmp_path / f"ft{i}"), {"weight": 0.5, "density": 0.4}) for i in range(2)))
    merge(cfg, tmp_path / "whole")
    merge(cfg, tmp_path / "blocks", max_memory=400_000)
    monkeypatch.setattr(passes.NumpyBackend, "select", lambda *a: None)
    merge(cfg, tmp_path / "radix", max_memory=400_000)
    assert shard_hashes(tmp_path / "whole") == shard_hashes(tmp_path / "blocks") == shard_hashes(tmp_path / "radix")


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fp8_rows_select_as_their_dequantization(scheme):
    # FP8 rows as stored (the kernel dequantizes as it reads) select the thresholds of their float32 dequantization
    from test_ckernel import _fp8_rows

    rows, cols = 1024, 384  # over BRACKET_MIN
    base, *fts = (_fp8_rows(rows, cols, scheme, torch.float8_e4m3fn, 0, rows, seed) for seed in (1, 2, 3))
    backend, spec, ranks = passes.NumpyBackend(None, compiled=ckernel), _spec(2), [rows * cols // 2, rows * cols // 5]
    got = backend.select(_block(base, fts), spec, ranks, "exact")
    want = backend.select(_block(base.dequantize(), [f.dequantize() for f in fts]), spec, ranks, "exact")
    assert got is not None and got == want
    for i, k in enumerate(ranks):
        assert want[i] == _expected(fts[i].dequantize().reshape(-1) - base.dequantize().reshape(-1), k, "exact", 0)


@pytest.mark.parametrize("case", ["all_equal", "all_zero", "nan_heavy", "two_values", "outlier_rows"])
def test_degenerate_task_vectors(case):
    # τ with one value, none, a third NaN, two values, or rows of wildly different scales: the
    # bracket settles them or misses (None), and what it settles is the sort's answer
    g = torch.Generator().manual_seed(7)
    n = passes.BRACKET_MIN + 1000
    base = torch.randn(n, generator=g)
    tau = {"all_equal": torch.full((n,), 0.5), "all_zero": torch.zeros(n),
           "nan_heavy": torch.where(torch.rand(n, generator=g) < 0.3, torch.tensor(float("nan")), torch.randn(n, generator=g)),
           "two_values": torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(0.25), torch.tensor(-1.0)),
           "outlier_rows": torch.randn(n, generator=g) * torch.logspace(-6, 3, n).reshape(-1)}[case]
    fts = [base + tau]
    backend = passes.NumpyBackend(None, compiled=ckernel)
    for rule in ("exact", "inclusive"):
        for k in (1, n // 1000, n // 3, n // 2, n - 1, n):
            got = backend.select(_block(base, fts), _spec(1), [k], rule)
            if got is not None:
                want = _expected(fts[0] - base, k, rule, 0)
                assert np.float32(got[0].value).tobytes() == np.float32(want.value).tobytes(), (case, rule, k)
                assert got[0].last_tie == want.last_tie, (case, rule, k, got[0], want)


@pytest.mark.parametrize("rule", ["exact", "inclusive"])
def test_torch_path_thresholds_with_nan_task_vectors(rule):
    # the torch backend's top-k (one whole block) with NaN τ, at, around and below the NaNs: the
    # sort's answer (it raised IndexError, and counted no NaN above a finite threshold)
    import types

    g = torch.Generator().manual_seed(3)
    n = 5000
    base = torch.zeros(n)
    ft = torch.randn(n, generator=g).round(decimals=2)  # ties
    ft[::50] = float("nan")
    job = types.SimpleNamespace(blocks_read=lambda: iter([_block(base, [ft])]), spec=_spec(1),
                                backend=passes.TorchBackend(torch.float32, torch.device("cpu")))
    for k in (0, 1, 50, 100, 101, 150, 2500, n):
        (got,) = passes._sorted_thresholds(job, [k], rule)
        want = _expected(ft - base, k, rule, 0)
        assert got.value == want.value or (np.isnan(got.value) and np.isnan(want.value)), (k, got, want)
        assert got.last_tie == want.last_tie, (k, got, want)
