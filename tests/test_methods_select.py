"""sce, nearswap, arcee_fusion, ram and ramplus_tl through their Method hooks (methods.run_tensor):

- `semantics: mergekit` gives the bytes of the real mergekit-yaml 0.1.5 on every tensor of every
  config under tests/fixtures/mergekit_methods_b (benchmarks/mergekit/make_method_fixtures_b.py);
- the default semantics gives the same bytes for any row-block split (streamed exact statistics);
- each method on tiny inputs worked out by hand (or by an independent float64 reference);
- bad parameters are ConfigErrors naming the tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MERGE_KERNEL, awkward, needs_compiled, skip_other_capability, spy_compiled
from safetensors.torch import load_file

from streammerge.errors import ConfigError
from streammerge.methods import Rows, TensorCtx, get, ops, run_tensor

FIX = Path(__file__).parent / "fixtures" / "mergekit_methods_b"
CASES = json.loads((FIX / "manifest.json").read_text())["cases"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.element_size()])


def ctx(method: str, shape, params, semantics="default", dtype=None, out=torch.float32, name="t") -> TensorCtx:
    return TensorCtx(name=name, shape=tuple(shape), semantics=semantics, params=params, dtype=dtype,
                     out_dtype=out, has_base=True)


def merge(method: str, base, models, semantics="default", rows_per_block=None, **params) -> torch.Tensor:
    c = ctx(method, base.shape, params, semantics)
    return run_tensor(get(method), c, base, models, rows_per_block)


# ---- mergekit's bytes ------------------------------------------------------------------------


_inputs: dict[str, dict[str, torch.Tensor]] = {}


def _load(model: str) -> dict[str, torch.Tensor]:
    if model not in _inputs:
        _inputs[model] = load_file(FIX / "inputs" / model / "model.safetensors")
    return _inputs[model]


@pytest.mark.parametrize("case", sorted(CASES))
def test_mergekit_bytes(case):
    """Every tensor, rounded to the dtype mergekit wrote (float32 for arcee_fusion and ramplus_tl
    without out_dtype: their float32 mask/λ promote the result), bit for bit; the elementwise methods
    also with one row per block."""
    skip_other_capability(FIX, case)
    c = CASES[case]
    method = get(c["method"])
    base, models = _load(c["base"]), [_load(m) for m in c["models"]]
    expected = load_file(FIX / "outputs" / case / "model.safetensors")
    assert set(expected) == set(base)
    for name, want in expected.items():
        tc = ctx(c["method"], want.shape, c["parameters"], "mergekit", DTYPES[c["dtype"]], want.dtype, name)
        for step in (None,) if method.whole_tensor(tc) else (None, 1):
            got = run_tensor(method, tc, base[name], [m[name] for m in models], step).to(want.dtype)
            assert torch.equal(bits(got), bits(want)), f"{case}: {name} (rows per block {step})"


def test_mergekit_fixture_branches():
    """The fixtures reach the branches they are meant to: ramplus_tl's NaN (ε = 0, a model with no
    contribution), sce's equal weights (tiny deltas), partial ties at sce's variance threshold."""
    nan = load_file(FIX / "outputs" / "ramplus_tl_fp32_eps0" / "model.safetensors")
    assert nan["model.layers.0.self_attn.k_proj.weight"].isnan().all()
    base = _load("base")["model.layers.1.mlp.gate_proj.weight"].float()
    tv = [_load(m)["model.layers.1.mlp.gate_proj.weight"].float() - base for m in ("ft1", "ft2", "ft3")]
    var = torch.stack(tv).var(dim=0, unbiased=False).reshape(-1)
    k = int(int((var != 0).sum()) * 0.5)
    kth = var.sort(descending=True).values[k - 1]
    assert (var > kth).sum() < k < (var >= kth).sum()  # only some of the ties are kept
    tiny = [_load(m)["model.layers.2.mlp.up_proj.weight"].float() - _load("base")["model.layers.2.mlp.up_proj.weight"].float()
            for m in ("ft1", "ft2", "ft3")]
    assert sum(float(t.square().mean()) for t in tiny) < 1e-6


def test_default_close_to_mergekit_in_float32():
    """With float32 everywhere the default is mergekit's formula, up to rounding: where they differ
    by design (ties at sce's threshold, ramplus_tl's NaN) is left out, and so is arcee_fusion (its
    float32 KL of nearly equal rows is rounding noise, and deltas on a grid put importances exactly at
    the threshold, where float32 and float64 round either way; its bytes are the test above's)."""
    for case, c in CASES.items():
        if c["dtype"] is not None or c["out_dtype"] is not None or c["method"] == "arcee_fusion":
            continue
        base, models = _load(c["base"]), [_load(m) for m in c["models"]]
        expected = load_file(FIX / "outputs" / case / "model.safetensors")
        for name, want in expected.items():
            if want.isnan().any() or (c["method"] == "sce" and _tied(base[name], [m[name] for m in models],
                                                                    c["parameters"].get("select_topk", 1.0))):
                continue
            got = merge(c["method"], base[name], [m[name] for m in models], **c["parameters"])
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=f"{case}: {name}")


def _tied(base, models, density) -> bool:
    """Whether sce's k-th largest variance has equal values beside it (torch.topk's pick among them is
    its own; the default keeps the lowest flat indices)."""
    if density >= 1:
        return False
    var = torch.stack([m - base for m in models]).var(dim=0, unbiased=False).reshape(-1)
    k = int(int((var != 0).sum()) * density)
    return k > 0 and int((var == var.sort(descending=True).values[k - 1]).sum()) > 1


# ---- default semantics: any block split, the same bytes ----------------------------------------


def _inputs_for(shape, n, dtype, seed, grid=False):
    g = torch.Generator().manual_seed(seed)
    if grid:  # values on a coarse grid: many equal variances and importances (ties)
        base = torch.randint(-4, 5, shape, generator=g) * 0.25
        models = [base + torch.randint(-2, 3, shape, generator=g) * 0.25 for _ in range(n)]
    else:
        base = 0.05 * torch.randn(shape, generator=g)
        models = [base + 0.02 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


SPLIT_CASES = [
    ("sce", 3, {"select_topk": 0.3}),
    ("sce", 2, {"select_topk": 1.0}),
    ("sce", 3, {"select_topk": 0.0}),
    ("nearswap", 1, {"t": 0.01}),
    ("arcee_fusion", 1, {}),
    ("ram", 3, {"epsilon": 1e-3}),
    ("ramplus_tl", 3, {"r": 0.5, "alpha": 0.3, "epsilon": 1e-3}),
]


@pytest.mark.parametrize("method,n,params", SPLIT_CASES, ids=[f"{m}-{n}-{p}" for m, n, p in SPLIT_CASES])
@pytest.mark.parametrize("shape", [(13, 23), (3, 4, 6), (11,), ()], ids=str)
def test_default_any_block_split(method, n, params, shape):
    for dtype, grid in ((torch.bfloat16, False), (torch.float32, True)):
        base, models = _inputs_for(shape, n, dtype, seed=len(shape) + n, grid=grid)
        whole = merge(method, base, models, **params)
        for step in (4, 1):
            got = merge(method, base, models, rows_per_block=step, **params)
            assert torch.equal(bits(got), bits(whole)), f"{method} {shape} {dtype} rows per block {step}"


COMPILED = {"ram", "ramplus_tl", "nearswap"}  # compiled kernels tested here (sce and arcee_fusion: below)


@needs_compiled
@pytest.mark.parametrize("method,n,params", [c for c in SPLIT_CASES if c[0] in COMPILED], ids=str)
@pytest.mark.parametrize("shape", [(37, 29), (3, 4, 6), (11,), ()], ids=str)
def test_compiled_kernels_give_the_torch_bytes(method, n, params, shape, monkeypatch):
    """Whatever the inputs: bf16 or float32, on a grid (ties, whole counts), |τ| at ε itself and the
    floats beside it (RAM's count compares in float32), signed zeros, huge values, NaN."""
    eps = params.get("epsilon", 0.0)
    calls = spy_compiled(monkeypatch, MERGE_KERNEL[method])
    params = {**params, "t": 0.0137} if method == "nearswap" else params  # (w inside (0, 1) mostly; t rounds in float32)
    for dtype, grid in ((torch.bfloat16, False), (torch.float32, True), (torch.float32, False)):
        base, models = _inputs_for(shape, n, dtype, seed=len(shape) + n, grid=grid)
        if models[0].numel() > 8 and dtype == torch.float32:
            edge = torch.tensor(eps, dtype=torch.float32)
            near = [edge, torch.nextafter(edge, torch.tensor(1.0)), torch.nextafter(edge, torch.tensor(0.0)), -edge]
            flat = models[0].reshape(-1)
            base.reshape(-1)[: len(near)] = 0.0  # τ = v exactly
            for i, v in enumerate(near + [torch.tensor(-0.0), torch.tensor(3e38), torch.tensor(math.nan)]):
                flat[i] = v
        for step in (None, 4):
            want = merge(method, base, models, rows_per_block=step, **params)
            c = ctx(method, base.shape, params)
            got = run_tensor(get(method), replace(c, compiled=True), base, models, step)
            assert torch.equal(bits(got), bits(want)), f"{method} {shape} {dtype} {step}"
        if get(method).passes(c):  # the stats alone (a clamped λ could hide a wrong count)
            rows = Rows(0, c.rows, base.reshape(c.rows, -1), [m.reshape(c.rows, -1) for m in models])
            assert torch.equal(get(method).stats(replace(c, compiled=True), 0, rows, None), get(method).stats(c, 0, rows, None))
    assert calls


def test_default_empty_tensor():
    for method, n, params in SPLIT_CASES:
        base, models = torch.zeros(0, 4), [torch.zeros(0, 4)] * n
        assert merge(method, base, models, rows_per_block=1, **params).shape == (0, 4)


# ---- by hand -------------------------------------------------------------------------------------


def test_sce_by_hand():
    base = torch.zeros(1, 4)
    t1, t2 = torch.tensor([[1.0, 2, 0, -1]]), torch.tensor([[3.0, -2, 0, 1]])
    # variances 1, 4, 0, 1: 3 non-zero, k = int(3 · 0.5) = 1 keeps element 1 only; equal mean squares;
    # its vote 2 − 2 = 0 elects +, so only model 1 agrees
    assert torch.equal(merge("sce", base, [t1, t2], select_topk=0.5), torch.tensor([[0.0, 2, 0, 0]]))
    # everything kept: mean squares 1.5 and 3.5, weights 0.3 and 0.7; ties of the vote elect +
    want = torch.tensor([[0.3 * 1 + 0.7 * 3, 2, 0, 1]])
    torch.testing.assert_close(merge("sce", base, [t1, t2]), want)
    # four equal variances, k = 2: the two lowest flat indices are kept, in one block or one row each
    t1, t2 = torch.tensor([1.0, -1, 1, -1, 5]), torch.tensor([-1.0, 1, -1, 1, 5])
    for step in (None, 1):
        assert torch.equal(merge("sce", torch.zeros(5), [t1, t2], rows_per_block=step, select_topk=0.5),
                           torch.tensor([1.0, 1, 0, 0, 0]))
    # Σ mean(τ²) = 1.25e-8 < 1e-6: equal weights (not 0.8 and 0.2)
    t1, t2 = torch.tensor([[2e-4, 0]]), torch.tensor([[1e-4, 0]])
    torch.testing.assert_close(merge("sce", torch.zeros(1, 2), [t1, t2]), torch.tensor([[1.5e-4, 0]]))


def test_nearswap_by_hand():
    base, ft = torch.tensor([0.0, 0, 0, 1]), torch.tensor([0.5, 0.05, 0, 1.2])
    # weights t/|Δ| = 0.2, 2 → 1, 0.1/1e-6 → 1, 0.5
    torch.testing.assert_close(merge("nearswap", base, [ft], t=0.1), torch.tensor([0.1, 0.05, 0, 1.1]))
    for sem in ("default", "mergekit"):
        assert torch.equal(merge("nearswap", base, [ft], sem, t=0.0), base)
        assert torch.equal(merge("nearswap", base, [ft], sem, t=1.0), ft)


def _arcee_reference(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """arcee_fusion in Python floats, from the formula."""
    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / math.fsum(e) + 1e-8 for v in e]

    imp = []
    for a, b in zip(base.double().tolist(), ft.double().tolist()):
        p, q = softmax(b), softmax(a)
        kl = math.fsum(x * math.log(x / y) for x, y in zip(p, q))
        imp.append([abs(v - u) * kl for u, v in zip(a, b)])
    flat = sorted(v for row in imp for v in row)
    n = len(flat)
    q1, q2, q3 = flat[(n - 1) // 4], flat[(n - 1) // 2], flat[3 * (n - 1) // 4]
    threshold = q2 + 1.5 * (q3 - q1)
    return torch.tensor([[v if i >= threshold else u for u, v, i in zip(ra, rb, ri)]
                         for ra, rb, ri in zip(base.tolist(), ft.tolist(), imp)])


def test_arcee_fusion_by_hand():
    base = torch.zeros(5, 3)
    ft = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 0, 2], [0.1, 0, 0], [0, -3, 0.5]])
    want = _arcee_reference(base, ft)
    # KL per row (q uniform): 0, 0.1233, 0.4330, 0.00166, 0.3561; times |Δ|: ten zeros and 1.7e-4,
    # 0.1233, 0.178, 0.866, 1.068. Quantiles at sorted indices 3, 7, 10: 0, 0, 1.7e-4, so the
    # threshold is 1.5 · 1.7e-4: row 3's 0.1 stays at the base, the other changes are taken
    assert torch.equal(want, torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 0, 2], [0, 0, 0], [0, -3, 0.5]]))
    for step in (None, 1):
        assert torch.equal(merge("arcee_fusion", base, [ft], rows_per_block=step), want)
    # a vector: one softmax over all of it, in passes; every importance 0 keeps the fine-tune
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, generator=g), torch.randn(9, generator=g)
    for step in (None, 2, 1):
        assert torch.equal(merge("arcee_fusion", a, [b], rows_per_block=step), _arcee_reference(a[None], b[None])[0])
    assert torch.equal(merge("arcee_fusion", a, [a.clone()]), a)


def test_ram_by_hand():
    base = torch.zeros(6)
    t1 = torch.tensor([0.5, 0.5, 0.5, 0, 0, 1e-6])  # 1e-6 ≤ ε: not a contribution
    t2 = torch.tensor([0.3, 0.0, 0, 0, 0, 0])
    t3 = torch.tensor([0.1, 0.0, 0, 0.2, 0, 0])
    # element 0: three contributors, their mean; 1-3: one contributor, its whole delta
    torch.testing.assert_close(merge("ram", base, [t1, t2, t3]), torch.tensor([0.3, 0.5, 0.5, 0.2, 0, 0]))
    # ρ: model 1 shares 1 position and has 2 alone (0.5), model 3 shares 1 and has 1 (1 → α = 1):
    # λ = 1 + 0.5·0.5 = 1.25 and 1 + 0.5·1 = 1.5
    got = merge("ramplus_tl", base, [t1, t2, t3], r=0.5, alpha=1.0)
    torch.testing.assert_close(got, torch.tensor([0.3, 0.625, 0.625, 0.3, 0, 0]))
    # α caps ρ: both λ = 1 + 0.5·0.2
    got = merge("ramplus_tl", base, [t1, t2, t3], r=0.5, alpha=0.2)
    torch.testing.assert_close(got, torch.tensor([0.3, 0.55, 0.55, 0.22, 0, 0]))
    # ε = 0 and a model that changes nothing: mergekit's NaN, the default's λ = 1
    zero = torch.zeros(6)
    assert merge("ramplus_tl", base, [t1, zero], "mergekit", epsilon=0.0).isnan().all()
    assert torch.equal(merge("ramplus_tl", base, [t1, zero], epsilon=0.0), merge("ram", base, [t1, zero], epsilon=0.0))



# ---- arcee_fusion on the compiled kernels (arcee.c): torch's bytes --------------------------------


def _awkward_pair(shape, dtypes, seed):
    """θ₀, θ₁ in dtypes: magnitudes over 2^±8, unchanged elements, equal changes (ties), signed zeros,
    subnormals, huge values (an importance that overflows to inf), and in a matrix an all-negative
    softmax row."""
    g = torch.Generator().manual_seed(seed)
    a = 0.05 * torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 9, shape, generator=g).float())
    b = a + 0.02 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6)
    a, b = a.reshape(-1), b.reshape(-1)
    a[::5], b[::5] = 0.5, 0.75
    a[1::7], b[1::7] = -0.0, 0.0
    a[2::11], b[3::11] = 1e-39, -1e-39
    a[4::13] = b[4::13] = -3e38
    b[6::17] = 3e38
    if len(shape) > 1:  # a softmax row all negative (its max)
        last = shape[-1]
        a[:last], b[:last] = -a[:last].abs() - 1e-3, -b[:last].abs() - 1e-3
    return a.reshape(shape).to(dtypes[0]), b.reshape(shape).to(dtypes[1])


ARCEE_DTYPES = [(torch.bfloat16,) * 2, (torch.float32,) * 2, (torch.float32, torch.bfloat16)]


@needs_compiled
@pytest.mark.parametrize("dtypes", ARCEE_DTYPES, ids=["bf16", "f32", "mixed"])
@pytest.mark.parametrize("shape", [(37, 24), (5, 6, 8), (50,), (3, 1), ()], ids=str)
def test_arcee_fusion_compiled_gives_the_torch_bytes(shape, dtypes, monkeypatch):
    calls = {name: spy_compiled(monkeypatch, name) for name in ("arcee_kl_hist", "arcee_hist", "arcee_merge")}
    method = get("arcee_fusion")
    base, ft = _awkward_pair(shape, dtypes, 1)
    c = ctx("arcee_fusion", shape, {})
    for step in (None, 3, 1):
        want = run_tensor(method, c, base, [ft], rows_per_block=step)
        got = run_tensor(method, replace(c, compiled=True), base, [ft], rows_per_block=step)
        assert torch.equal(bits(got), bits(want)), step
    assert calls["arcee_merge"] and bool(calls["arcee_kl_hist"]) == (len(shape) > 1)  # a matrix's first pass
    assert calls["arcee_hist"] or len(shape) > 1  # (a matrix's second pass only where the first left a quantile)


@needs_compiled
@pytest.mark.parametrize("dtypes", ARCEE_DTYPES, ids=["bf16", "f32", "mixed"])
@pytest.mark.parametrize("shape", [(37, 24), (5, 6, 8), (9, 2048), (40,), (2, (1 << 18) + 5)], ids=str)  # (a row past the scratch)
def test_arcee_fusion_compiled_stats_are_torchs(shape, dtypes):
    """The passes' results themselves, where the merge's float32 output would hide a difference: the
    KL per row (float64 bits), both histograms (pass 2 for every quantile, settled or not), the threshold."""
    method = get("arcee_fusion")
    base, ft = _awkward_pair(shape, dtypes, 5)
    c = ctx("arcee_fusion", shape, {})
    rows = Rows(0, c.rows, base.reshape(c.rows, c.row_elems), [ft.reshape(c.rows, c.row_elems)])
    states = []
    for compiled in (False, True):
        c = replace(c, compiled=compiled)
        state, out = None, []
        for p in range(method.passes(c)):
            if p == method.passes(c) - 1:
                for s in state.selects:
                    s.found = None  # pass 2 for each
            part = method.stats(c, p, rows, state)
            out.append(part)
            state = method.reduce(c, p, [part], state)
        states.append((state, out))
    (t, t_parts), (k, k_parts) = states
    if len(shape) > 1:
        assert torch.equal(k.row_kl.view(torch.int64), t.row_kl.view(torch.int64))
    else:
        assert (k.maxima, k.sums, k.kl) == (t.maxima, t.sums, t.kl)
    for parts in (t_parts, k_parts):  # a matrix's first pass: its KLs and the first histogram
        parts[-2] = parts[-2][1] if len(shape) > 1 else parts[-2]
    for size, tp, kp in zip((2 * 65536, 65536 * 3), t_parts[-2:], k_parts[-2:]):
        assert (ops.summed_hist([kp], size) == ops.summed_hist([tp], size)).all()
    assert [s.result() for s in k.selects] == [s.result() for s in t.selects]
    assert k.threshold == t.threshold


@needs_compiled
def test_arcee_fusion_compiled_histograms_count_as_torchs():
    # importances with chosen bits (KL 1: |θ₁ − θ₀| itself): low 16 bits 0, 1, 0x8000, 0xFFFF under a
    # few top 16 bits, zeros and inf; the kernel's (bins, counts) add up to torch's bincounts
    from streammerge.methods import ckernel

    g = torch.Generator().manual_seed(0)
    tops, lows = torch.tensor([0x0000, 0x0001, 0x3C00, 0x3C01, 0x7F7F]), torch.tensor([0, 1, 0x8000, 0xFFFF])
    bits_ = torch.cat([(tops[:, None] << 16 | lows).reshape(-1), torch.tensor([0x7F800000])])
    imp = bits_[torch.randint(0, len(bits_), (6, 40), generator=g)].to(torch.int32).view(torch.float32)
    base = torch.where(torch.rand(6, 40, generator=g) < 0.5, -0.0, 0.0)
    ft = imp * torch.where(torch.rand(6, 40, generator=g) < 0.5, -1.0, 1.0)  # |θ₁ − θ₀| = imp
    kl = torch.ones(12, dtype=torch.float64)
    for highs in ([], [0x3C00], [0x0000, 0x3C01, 0x7F7F]):
        got = ckernel.arcee_hist(base, ft, kl, 20, highs)
        want = ops.radix_hist_high(imp) if not highs else torch.cat([ops.radix_hist_low(imp, h) for h in highs])
        assert (ops.summed_hist([got], len(want)) == want.numpy()).all()


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_arcee_fusion_compiled_meets_nan_and_inf_as_torch(dtype):
    # A NaN or inf input makes NaN KLs and importances; where one has its sign bit set torch's
    # bincount refuses it, and the kernel raises too; else the same bytes.
    g = torch.Generator().manual_seed(2)
    base, ft = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    cases = [(base, ft.index_put((torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan")))),
             (base.index_put((torch.tensor([1]), torch.tensor([1])), torch.tensor(float("nan"))), ft),
             (base.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))), ft),
             (torch.full((6, 8), -3e38), torch.full((6, 8), 3e38))]  # |Δ| = inf, KL 0: inf · 0
    raised = []
    for a, b in cases:
        out = []
        for compiled in (False, True):
            try:
                out.append(bits(run_tensor(get("arcee_fusion"), replace(ctx("arcee_fusion", (6, 8), {}), compiled=compiled),
                                           a.to(dtype), [b.to(dtype)], rows_per_block=4)))
            except RuntimeError as e:
                assert "non-negative" in str(e)
                out.append(None)
        assert (out[0] is None) == (out[1] is None) and (out[0] is None or torch.equal(out[0], out[1]))
        raised.append(out[0] is None)
    assert raised[-1]


# ---- declarations and errors ---------------------------------------------------------------------


def test_declarations():
    decl = {m: (get(m).base, get(m).min_models, get(m).max_models, {p.name: (p.default, p.per_model) for p in get(m).params})
            for m in ("sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")}
    assert decl == {
        "sce": ("required", 1, None, {"select_topk": (1.0, False), "int8_mask": (False, False)}),
        "nearswap": ("required", 1, 1, {"t": (None, False)}),
        "arcee_fusion": ("required", 1, 1, {}),
        "ram": ("required", 1, None, {"epsilon": (1e-5, False)}),
        "ramplus_tl": ("required", 1, None, {"r": (0.1, False), "alpha": (0.2, False), "epsilon": (1e-5, False)}),
    }
    assert get("nearswap").check(2, True) == ["models: nearswap takes at most 1 model(s) besides the base, got 2"]


@pytest.mark.parametrize("method,params,message", [
    ("nearswap", {}, "needs parameter t"),
    ("nearswap", {"t": -0.1}, "t must be in [0, inf)"),
    ("sce", {"select_topk": 1.5}, "select_topk must be in [0, 1]"),
    ("ram", {"epsilon": float("nan")}, "epsilon must be a number"),
    ("ramplus_tl", {"alpha": -1}, "alpha must be in [0, inf)"),
])
def test_bad_parameters(method, params, message):
    base = torch.zeros(2, 2)
    models = [base] if method == "nearswap" else [base, base]
    for sem in ("default", "mergekit"):
        with pytest.raises(ConfigError, match="^layer\\.w: .*" + re.escape(message)):
            run_tensor(get(method), ctx(method, (2, 2), params, sem, name="layer.w"), base, models)


# ---- the compiled kernels (sce.c) give torch's bytes ----------------------------------------------


def _sce_inputs(shape, n, dtypes, kind):
    """θ₀ and n models, in dtypes (θ₀'s first): "awkward" (conftest.awkward: τ² overflows float32, NaN weights),
    "finite" (its huge values 3e18), "grid" (ties in the variance, at the threshold too), "tiny" (Σ mean τ² < 1e-6:
    equal weights), "lopsided" (the last model alone moves every 5th element, by its weight < 1e-6: the clamp)."""
    g = torch.Generator().manual_seed(n)
    if kind == "grid":
        base, models = _inputs_for(shape, n, torch.float32, seed=n, grid=True)
    else:
        base = torch.randn(shape, generator=g)
        models = [base + (1e-5 if kind == "tiny" else 0.1) * torch.randn(shape, generator=g) for _ in range(n)]
    if kind == "lopsided":
        for t in (base, *models[:-1]):
            t.view(-1)[::5] = 0.0
        models[-1] = base.clone()
        models[-1].view(-1)[::5] = 1e-5 * torch.randn(base.view(-1)[::5].shape, generator=g)
    if kind in ("awkward", "finite"):
        huge = -3e38 if kind == "awkward" else -3e18
        base = awkward(base, dtypes[0], 0, huge)
        base = torch.where(base == 0, -base, base)  # its signed zeros opposite the models': some τ are −0
        models = [awkward(m, d, 1 + i, huge) for i, (m, d) in enumerate(zip(models, dtypes[1:]))]
    return base.to(dtypes[0]).reshape(shape), [m.to(d).reshape(shape) for m, d in zip(models, dtypes[1:])]


def _same_partials(method, c: TensorCtx, base, models, step) -> set[int]:
    """Each pass's partial results, block by block, on the kernels and in torch (the merge's float32 could hide a
    difference in them), the state reduced from torch's; returns the passes that ran."""
    rows = c.rows
    b, ms = base.reshape(rows, -1), [m.reshape(rows, -1) for m in models]
    blocks = [Rows(r, min(r + step, rows), b[r : r + step], [m[r : r + step] for m in ms]) for r in range(0, rows, step)]

    def plain(x):
        if isinstance(x, np.ndarray):
            return x.tolist()
        return bits(x).tolist() if isinstance(x, torch.Tensor) else tuple(map(plain, x)) if isinstance(x, tuple) else x

    ran, state = set(), None
    for p in range(method.passes(c)):
        want = [method.stats(c, p, r, state) for r in blocks]
        assert [plain(method.stats(replace(c, compiled=True), p, r, state)) for r in blocks] == [plain(x) for x in want], p
        ran |= {p} if any(x is not None for x in want) else set()
        state = method.reduce(c, p, want, state)
    return ran


@needs_compiled
@pytest.mark.parametrize("n,topk", [(3, 0.3), (2, 1.0), (1, 0.5), (2, 0.999)])  # n = 1: k = 0, no variance
@pytest.mark.parametrize("shape", [(37, 24), (5, 6, 8), (50,), (3, 2053)], ids=str)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 4, (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)],
                         ids=["bf16", "mixed"])
@pytest.mark.parametrize("kind", ["awkward", "finite", "grid", "tiny", "lopsided"])
def test_sce_compiled_gives_the_torch_bytes(kind, dtypes, shape, n, topk, monkeypatch):
    """sce.c's merge and each pass's partials are torch's bits, in any block split."""
    method = get("sce")
    base, models = _sce_inputs(shape, n, dtypes, kind)
    c = ctx("sce", shape, {"select_topk": topk})
    calls = spy_compiled(monkeypatch, "sce_merge")
    for step in (None, 3, 1):
        want = run_tensor(method, c, base, models, step)
        got = run_tensor(method, replace(c, compiled=True), base, models, step)
        assert torch.equal(bits(got), bits(want)), step
    assert calls
    ran = _same_partials(method, c, base, models, 3)
    if (kind, n, topk) == ("finite", 3, 0.3):  # every pass ran: the threshold's low 16 bits, some of its ties kept
        assert ran == {0, 1, 2, 3} and not want.isnan().any()


@needs_compiled
@pytest.mark.parametrize("n", [2, 3, 5])
def test_sce_kernels_variance_is_torchs(n):
    """Every bit of the variance (which the merge reads only through the threshold), through the kernels'
    histograms: the low 16 bits in each top-16-bit bin it fills; and ties per row at some of its values."""
    from streammerge.methods import ckernel, ops
    from streammerge.methods.sce import _variance

    base, models = _sce_inputs((37, 61), n, [torch.float32, torch.bfloat16] * 3, "finite")
    b, ms = base.reshape(37, -1), [m.reshape(37, -1) for m in models]
    var = _variance([m.float() - b.float() for m in ms])
    assert torch.equal(ckernel.sce_hist(b, ms, None), ops.radix_hist_high(var))
    for high in (var.view(torch.int32) >> 16).unique().tolist():
        assert torch.equal(ckernel.sce_hist(b, ms, high), ops.radix_hist_low(var, high)), high
    for value in var.reshape(-1)[::97].tolist():
        assert torch.equal(ckernel.sce_ties(b, ms, value), (var == value).sum(dim=1)), value


@pytest.mark.parametrize("method,params", [("sce", {"select_topk": 0.3}), ("arcee_fusion", {})])
def test_a_pass_with_nothing_to_find_reads_no_block(method, params, monkeypatch):
    """sce: every tie at its threshold kept (pass 2 has none to place); arcee_fusion: θ₁ = θ₀ but for
    one row, so pass 1 settles every quantile at 0. The loop over the blocks (run_tensor's, as the
    engine's) then runs no stats for those passes, and the bytes are those of any block split."""
    base, models = _inputs_for((64, 48), 3 if method == "sce" else 1, torch.bfloat16, seed=2)
    if method == "arcee_fusion":
        models = [torch.cat([models[0][:1], base[1:]])]
    cls, ran, skipped = type(get(method)), [], []
    stats, skips = cls.stats, cls.skips
    monkeypatch.setattr(cls, "stats", lambda self, c, p, rows, state: ran.append(p) or stats(self, c, p, rows, state))
    monkeypatch.setattr(cls, "skips", lambda self, c, p, state: skips(self, c, p, state) and not skipped.append(p))
    whole = merge(method, base, models, **params)
    assert skipped and not set(skipped) & set(ran)
    monkeypatch.undo()
    assert torch.equal(bits(merge(method, base, models, rows_per_block=5, **params)), bits(whole))
