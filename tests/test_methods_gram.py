"""model_stock, nuslerp, multislerp and karcher (streammerge/methods/): mergekit 0.1.5's bytes under
`semantics: mergekit` (tests/fixtures/mergekit_methods_a, made by the real mergekit-yaml), and under
the default semantics: the same bytes for any row-block split, closed forms on hand-made vectors,
agreement with mergekit's op sequence run in float64, each method's input contract, and the
compiled kernels' bytes (gram.c, slerp too)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import awkward, needs_compiled, spy_compiled
from safetensors.torch import load_file

from streammerge.errors import ConfigError
from streammerge.methods import Rows, TensorCtx, registry, run_tensor
from streammerge.methods.gram import combine, gram_reduce, gram_stats, line_count

FIX = Path(__file__).parent / "fixtures" / "mergekit_methods_a"
NAMES = sorted(p.stem for p in (FIX / "configs").glob("*.yaml"))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
METHODS = ("model_stock", "nuslerp", "multislerp", "karcher")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ---- mergekit's bytes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs():
    return {p.name: load_file(p / "model.safetensors") for p in (FIX / "inputs").iterdir()}


@pytest.mark.parametrize("name", NAMES)
def test_mergekit_bytes(inputs, name):
    """Every tensor of a fixture config through run_tensor, parameters resolved as mergekit does (the
    configs use scalars only); a base listed under `models:` is the base, except for karcher, where
    the base is one more input in the listed order."""
    cfg = yaml.safe_load((FIX / "configs" / f"{name}.yaml").read_text())
    method = registry.get(cfg["merge_method"])
    listed = [m["model"] for m in cfg["models"]]
    weights = {m["model"]: (m.get("parameters") or {}).get("weight") for m in cfg["models"]}
    base = cfg.get("base_model")
    base_in_order = method.name == "karcher" and base in listed
    models = listed if base_in_order else [m for m in listed if m != base]
    params = dict(cfg.get("parameters") or {})
    if weights[models[0]] is not None:
        params["weight"] = tuple(float(weights[m]) for m in models)
    dtype = DTYPES.get(cfg.get("dtype"))
    expected = load_file(FIX / "outputs" / name / "model.safetensors")
    differ = []
    for tensor, want in expected.items():
        b = None if base is None or base_in_order else inputs[base][tensor]
        ms = [inputs[m][tensor] for m in models]
        out_dtype = DTYPES.get(cfg.get("out_dtype")) or dtype or ms[0].dtype
        ctx = TensorCtx(tensor, tuple(want.shape), "mergekit", params, dtype, out_dtype, has_base=b is not None)
        got = run_tensor(method, ctx, b, ms, rows_per_block=1).to(out_dtype)  # whole_tensor: one block anyway
        if got.dtype != want.dtype or not torch.equal(_bits(got), _bits(want)):
            differ.append(tensor)
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ from mergekit, e.g. {differ[:3]}"


def test_fixtures_reach_the_branches(inputs):
    """The special tensors are what the generator says (cos exactly ±1 in bf16, zeros)."""
    a, b = inputs["a"], inputs["b"]
    name = "model.layers.1.self_attn.k_proj.weight"  # opposite, norm 1
    assert torch.equal(a[name], -b[name]) and a[name].float().norm().item() == 1.0
    rows = "model.layers.3.self_attn.v_proj.weight"
    assert not a[rows][0].any() and torch.equal(a[rows][1], b[rows][1]) and torch.equal(a[rows][2], -b[rows][2])
    cols = "model.layers.4.self_attn.v_proj.weight"
    assert not a[cols][:, 0].any() and torch.equal(a[cols][:, 2], -b[cols][:, 2])


# ---- default semantics --------------------------------------------------------------------------


def _ctx(shape, params, *, base=True, semantics="default", dtype=None, out=torch.float32) -> TensorCtx:
    return TensorCtx("t", tuple(shape), semantics, params, dtype, out, has_base=base)


def _inputs(shape, n, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)
    models = [base + 0.1 * (0.6 * shared + 0.8 * torch.randn(shape, generator=g)) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


CASES = [  # (method, params, number of models, with a base)
    ("model_stock", {"filter_wise": False}, 2, True),
    ("model_stock", {"filter_wise": True}, 3, True),
    ("nuslerp", {"weight": (0.3, 0.7)}, 2, False),
    ("nuslerp", {"weight": (1.0, 2.0), "nuslerp_flatten": False}, 2, True),
    ("nuslerp", {"weight": (1.0, 2.0), "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, True),
    ("nuslerp", {"weight": (0.5, 0.5), "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, False),
    ("multislerp", {"weight": (1.0, 2.0, 3.0)}, 3, True),
    ("multislerp", {"weight": (0.5, 0.3), "normalize_weights": False, "eps": 1e-6}, 2, False),
    ("multislerp", {"weight": (1.0,)}, 1, True),
    ("karcher", {}, 3, False),
    ("karcher", {"max_iter": 3, "tol": 1e-4}, 2, True),
]


@pytest.mark.parametrize("shape", [(37, 24), (5, 6, 8), (50,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{len(c[1])}-{c[2]}{'b' if c[3] else ''}")
def test_any_block_split_gives_the_same_bytes(case, shape):
    name, params, n, with_base = case
    method = registry.get(name)
    base, models = _inputs(shape, n)
    base = base if with_base else None
    ctx = _ctx(shape, params, base=with_base)
    whole = run_tensor(method, ctx, base, models)
    assert whole.dtype == torch.float32 and whole.shape == shape and torch.isfinite(whole).all()
    for step in (7, 4, 1):
        assert torch.equal(run_tensor(method, ctx, base, models, rows_per_block=step), whole), step


def test_column_gram_is_exact_for_any_split():
    """The per-column sums join aligned power-of-two spans: 1 row per block, odd blocks and one
    block give the same float64 bits."""
    ctx = _ctx((23, 5), {})
    xs = [torch.randn(23, 5, dtype=torch.float64) for _ in range(2)]

    def gram(step):
        parts = [gram_stats(ctx, "columns", r, [x[r : r + step] for x in xs]) for r in range(0, 23, step)]
        return gram_reduce(ctx, "columns", parts)

    g = gram(23)
    assert g.shape == (2, 2, 5)
    for step in (1, 2, 3, 5, 8, 16):
        assert torch.equal(gram(step), g)
    assert torch.allclose(g[0, 1], (xs[0] * xs[1]).sum(0), rtol=1e-14, atol=0)
    # a block's partial: at most about 2·log2(rows) spans of [pairs, columns]
    assert len(gram_stats(ctx, "columns", 3, [x[3:22] for x in xs])) <= 2 * math.ceil(math.log2(19))


def _vec(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_model_stock_closed_forms():
    """Per row (filter_wise): orthogonal τ → t = 0 (the base); parallel → t = 1 (the average);
    opposite → the singular guard keeps the base; cos = 1/2 → t = 2·½/(1 + ½) = 2/3 (the paper's
    t = N cos/(1 + (N − 1) cos))."""
    method = registry.get("model_stock")
    base = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    t1 = torch.tensor([[1.0, 0, 0], [1.0, 2.0, 0], [0, 1.0, 0], [1.0, 0, 0]], dtype=torch.float64)
    t2 = torch.tensor([[0, 1.0, 0], [2.0, 4.0, 0], [0, -1.0, 0], [0.5, math.sqrt(0.75), 0]], dtype=torch.float64)
    out = run_tensor(method, _ctx((4, 3), {"filter_wise": True}, out=torch.float64), base, [base + t1, base + t2])
    t = torch.tensor([0.0, 1.0, 0.0, 2 / 3], dtype=torch.float64)[:, None]
    assert torch.allclose(out, base + t * (t1 + t2) / 2, rtol=0, atol=1e-15)
    whole = run_tensor(method, _ctx((4, 3), {}, out=torch.float64), base, [base + t1, base + t2])
    cos = (t1 * t2).sum() / (t1.norm() * t2.norm())
    assert torch.allclose(whole, base + 2 * cos / (1 + cos) * (t1 + t2) / 2, rtol=0, atol=1e-14)


def test_nuslerp_closed_forms():
    """Orthogonal unit vectors: t = w₁/(w₀ + w₁) = 3/4 gives cos(3π/8) e₀ + sin(3π/8) e₁; equal ones
    the lerp; weights summing to 0 give t = ½; a zero vector is taken at a right angle."""
    method = registry.get("nuslerp")
    e0, e1 = _vec(1, 0, 0, 0), _vec(0, 1, 0, 0)

    def run(v0, v1, w, base=None):
        ctx = _ctx((4,), {"weight": w}, base=base is not None, out=torch.float64)
        return run_tensor(method, ctx, base, [v0, v1], rows_per_block=1)

    want = math.cos(3 * math.pi / 8) * e0 + math.sin(3 * math.pi / 8) * e1
    assert torch.allclose(run(e0, e1, (1.0, 3.0)), want, atol=1e-15)
    assert torch.allclose(run(2 * e0, 2 * e0, (1.0, 3.0)), 2 * e0, atol=1e-15)
    assert torch.allclose(run(e0, e1, (1.0, -1.0)), (e0 + e1) / math.sqrt(2), atol=1e-15)
    base = _vec(1, 2, 3, 4)
    assert torch.allclose(run(base + 0 * e0, base + e1, (1.0, 1.0), base), base + e1 / math.sqrt(2), atol=1e-15)
    # exactly opposite rows are colinear whatever the rounding of their norms: the lerp, bit for bit
    v0 = torch.randn(7, 5, dtype=torch.float64)
    rows = run_tensor(method, _ctx((7, 5), {"weight": (0.6, 0.4), "nuslerp_flatten": False}, base=False,
                                   out=torch.float64), None, [v0, -v0], rows_per_block=3)
    assert torch.equal(rows, 0.6 * v0 + 0.4 * -v0)
    # per column (row_wise, flatten off) = the flat slerp of each column
    v0, v1 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    ctx = _ctx((6, 3), {"weight": (0.2, 0.5), "nuslerp_flatten": False, "nuslerp_row_wise": True}, base=False,
               out=torch.float64)
    cols = run_tensor(method, ctx, None, [v0, v1], rows_per_block=2)
    for c in range(3):
        ctx_c = _ctx((6,), {"weight": (0.2, 0.5)}, base=False, out=torch.float64)
        assert torch.allclose(cols[:, c], run_tensor(method, ctx_c, None, [v0[:, c], v1[:, c]]), atol=1e-14)


def test_multislerp_closed_forms():
    """Two orthogonal vectors of norms 2 and 4, equal weights: the mean norm 3 along their bisector;
    opposite ones with equal weights fall back to the lerp (0); three balanced ones are an error."""
    method = registry.get("multislerp")
    e0, e1 = _vec(1, 0, 0), _vec(0, 1, 0)
    ctx = _ctx((3,), {"weight": (1.0, 1.0)}, base=False, out=torch.float64)
    assert torch.allclose(run_tensor(method, ctx, None, [2 * e0, 4 * e1]), 3 * (e0 + e1) / math.sqrt(2), atol=1e-15)
    assert torch.equal(run_tensor(method, ctx, None, [e0, -e0]), torch.zeros(3, dtype=torch.float64))
    ctx3 = _ctx((3,), {"weight": (1.0, 1.0, 1.0)}, base=False, out=torch.float64)
    with pytest.raises(ConfigError, match="weighted mean"):
        run_tensor(method, ctx3, None, [e0, -e0, 0 * e1])
    with pytest.raises(ConfigError, match="sum to 0"):
        run_tensor(method, _ctx((3,), {"weight": (1.0, -1.0)}, base=False), None, [e0, e1])
    one = _ctx((3,), {"weight": (0.5,)}, out=torch.float64)
    assert torch.equal(run_tensor(method, one, _vec(9, 9, 9), [e1]), e1)  # one model: that model


def test_karcher_closed_forms():
    """Two vectors: the slerp midpoint of their directions times their mean norm. Three: the result's
    direction μ satisfies the Karcher condition Σ log_μ(u_i) = 0. All zero: zero."""
    method = registry.get("karcher")
    u1, u2 = _vec(1, 0, 0), _vec(math.cos(1.0), math.sin(1.0), 0)
    out = run_tensor(method, _ctx((3,), {}, base=False, out=torch.float64), None, [2 * u1, 5 * u2])
    assert torch.allclose(out, 3.5 * _vec(math.cos(0.5), math.sin(0.5), 0), atol=1e-15)
    xs = [_vec(1, 0.2, 0), _vec(0, 2, 0.5), _vec(0.3, 0, 3)]
    ctx = _ctx((3,), {"max_iter": 100, "tol": 1e-12}, base=False, out=torch.float64)
    out = run_tensor(method, ctx, None, xs)
    mu = out / out.norm()
    units = [x / x.norm() for x in xs]
    grad = sum(torch.acos(u @ mu) * (u - (u @ mu) * mu) / (u - (u @ mu) * mu).norm() for u in units)
    assert grad.norm() < 1e-10
    assert math.isclose(out.norm().item(), sum(x.norm().item() for x in xs) / 3, rel_tol=1e-14)
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(run_tensor(method, ctx, None, [zero, zero]), zero)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{len(c[1])}-{c[2]}{'b' if c[3] else ''}")
def test_default_agrees_with_mergekits_ops_in_float64(case):
    """float64 inputs: mergekit's op sequence (the mergekit preset) computes in float64 too, so the
    streamed coefficients must give the same result to rounding (karcher: to its tol)."""
    name, params, n, with_base = case
    method = registry.get(name)
    base, models = _inputs((16, 12), n, dtype=torch.float64, seed=3)
    base = base if with_base else None
    mine = run_tensor(method, _ctx((16, 12), params, base=with_base, out=torch.float64), base, models, rows_per_block=5)
    ref = run_tensor(method, _ctx((16, 12), params, base=with_base, semantics="mergekit", out=torch.float64), base, models)
    assert torch.allclose(mine, ref, rtol=0, atol=1e-6 if name == "karcher" else 1e-12)


# ---- declarations: what the config layer validates ------------------------------------------------


def test_input_contracts():
    ms, nu, msl, ka = (registry.get(n) for n in METHODS)
    assert ms.check(2, True) == [] and ms.check(1, True) and ms.check(2, False)
    assert nu.check(2, False) == [] and nu.check(2, True) == [] and nu.check(3, True) and nu.check(1, False)
    assert msl.check(1, False) == [] and msl.check(5, True) == [] and msl.check(0, True)
    assert ka.check(1, False) == [] and ka.check(3, True) == [] and ka.base_is_input
    declared = {m: {p.name: (p.default, p.kind, p.per_model) for p in registry.get(m).params} for m in METHODS}
    assert declared == {
        "model_stock": {"filter_wise": (False, bool, False)},
        "nuslerp": {"weight": (None, float, True), "nuslerp_flatten": (True, bool, False),
                    "nuslerp_row_wise": (False, bool, False)},
        "multislerp": {"weight": (None, float, True), "normalize_weights": (True, bool, False),
                       "eps": (1e-8, float, False)},
        "karcher": {"max_iter": (10, int, False), "tol": (1e-5, float, False)},
    }
    for m in METHODS:
        method = registry.get(m)
        ctx = _ctx((4, 4), {}, semantics="mergekit")
        assert method.whole_tensor(ctx) and method.passes(ctx) == 0
        assert not method.whole_tensor(_ctx((4, 4), {})) and method.passes(_ctx((4, 4), {})) == 1


def test_bad_inputs_are_config_errors():
    nu, ms = registry.get("nuslerp"), registry.get("model_stock")
    base, models = _inputs((4, 4), 3, dtype=torch.float32)
    with pytest.raises(ConfigError, match="weight"):
        run_tensor(nu, _ctx((4, 4), {}, base=False), None, models[:2])
    with pytest.raises(ConfigError, match="exactly 2"):
        run_tensor(nu, _ctx((4, 4), {"weight": (1.0, 1.0, 1.0)}, base=False), None, models)
    with pytest.raises(ConfigError, match="at least 2"):
        ms.stats(_ctx((4, 4), {}), 0, Rows(0, 4, base, models[:1]), None)


def test_default_arithmetic_is_float64_then_float32():
    """bf16 inputs: t from exact float64 sums, then (1 − t)·θ₀ + Σ (t/N)·θ_i in float64, in that
    order, rounded once to float32 (no step in bf16)."""
    base, models = _inputs((9, 16), 2, dtype=torch.bfloat16, seed=5)
    got = run_tensor(registry.get("model_stock"), _ctx((9, 16), {}), base, models, rows_per_block=4)
    b, (m1, m2) = base.double(), (m.double() for m in models)
    t1, t2 = m1 - b, m2 - b
    dot = [math.fsum((x * y).reshape(-1).tolist()) for x, y in ((t1, t2), (t1, t1), (t2, t2))]
    cos = dot[0] / (math.sqrt(dot[1]) * math.sqrt(dot[2]))
    t = 2 * cos / (1 + cos)
    assert torch.equal(got, ((1 - t) * b + (t / 2) * m1 + (t / 2) * m2).float())


@pytest.mark.parametrize("name", METHODS)
def test_default_writes_zeros_as_positive(name):
    """A merged zero is +0 (the engine's default paths write no −0), whatever the inputs' signs."""
    neg = torch.full((2, 3), -0.0)
    params = {"weight": (1.0, 1.0)} if name in ("nuslerp", "multislerp") else {}
    out = run_tensor(registry.get(name), _ctx((2, 3), params), neg, [neg, neg])
    assert torch.equal(_bits(out), torch.zeros(2, 3, dtype=torch.int32))


# ---- the compiled kernels (gram.c) give torch's bytes ---------------------------------------------


COMPILED_CASES = [*CASES, ("slerp", {"t": 0.3}, 1, True)]


@needs_compiled
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 4, (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)],
                         ids=["bf16", "mixed"])
@pytest.mark.parametrize("shape", [(37, 24), (5, 6, 8), (50,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: f"{c[0]}-{len(c[1])}-{c[2]}{'b' if c[3] else ''}")
def test_compiled_kernels_give_the_torch_bytes(case, shape, dtypes, monkeypatch):
    name, params, n, with_base = case
    method = registry.get(name)
    base, models = _inputs(shape, n, torch.float32, seed=4)
    base = awkward(base, dtypes[0], 0).reshape(shape) if with_base else None
    models = [awkward(m, d, 1 + i).reshape(shape) for i, (m, d) in enumerate(zip(models, dtypes[1:]))]
    ctx = _ctx(shape, params, base=with_base)
    lines_cut = name == "nuslerp" and params.get("nuslerp_row_wise") and len(shape) > 1  # "columns": torch only
    calls = spy_compiled(monkeypatch, "combine")
    for step in (None, 3):
        torch_bytes = run_tensor(method, ctx, base, models, rows_per_block=step)
        compiled = run_tensor(method, replace(ctx, compiled=True), base, models, rows_per_block=step)
        assert torch.equal(compiled.view(torch.int32), torch_bytes.view(torch.int32)), step
    assert bool(calls) != bool(lines_cut)  # the kernel took the merge wherever it covers the cut


@needs_compiled
@pytest.mark.parametrize("shape", [(37, 24), (5, 6, 8), (3, 1)], ids=["2d", "3d", "one-column"])
@pytest.mark.parametrize("lines", ["tensor", "rows"])
@pytest.mark.parametrize("task_vectors", [False, True])
def test_compiled_gram_and_combine_are_torchs_float64_bits(shape, lines, task_vectors):
    """The kernels alone, where a method's float32 output would hide a float64 difference: the
    sums' tree and the combination's op order, signed zeros included (negative coefficients)."""
    base, models = _inputs(shape, 3, torch.float32, seed=9)
    base = awkward(base, torch.bfloat16, 0).reshape(shape)
    xs = [awkward(m, d, 1 + i).reshape(shape) for i, (m, d) in enumerate(zip(models, (torch.float32, torch.bfloat16, torch.float32)))]
    rows = Rows(0, shape[0], base.reshape(shape[0], -1), [x.reshape(shape[0], -1) for x in xs])
    ctx = _ctx(shape, {})
    minus = rows.base if task_vectors else None
    torch_sums = gram_stats(ctx, lines, 0, rows.models, minus=minus)
    assert torch.equal(gram_stats(replace(ctx, compiled=True), lines, 0, rows.models, minus=minus), torch_sums)
    count = line_count(ctx, lines)
    coefs = torch.randn(3, count, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    coefs[1] = -coefs[1].abs()
    for add in (None, rows.base):
        want = combine(ctx, lines, rows, rows.models, coefs, add=add, minus=minus)
        got = combine(replace(ctx, compiled=True), lines, rows, rows.models, coefs, add=add, minus=minus)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
