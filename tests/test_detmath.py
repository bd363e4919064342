"""detmath's exp and log: within one ulp of Python's math (glibc's, correctly rounded but in rare
cases), IEEE's special values, and the same bits from the compiled kernel as from torch."""

import math

import pytest
import torch

from streammerge.methods import detmath

SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-300, -1e-300, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
           -745.2, -745.1, -744.4, -708.4, -708.3, 709.7, 709.8, -1e4, 1e4, math.inf, -math.inf, math.nan,
           math.sqrt(2), math.nextafter(math.sqrt(2), 0), 1 / math.sqrt(2), 1 + 2**-52, 1 - 2**-53]


def _inputs(log: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40000, generator=g, dtype=torch.float64) * s for s in (1e-6, 1e-2, 1.0, 30.0, 400.0)])
    if log:  # positive, over the whole exponent range, and near 1 (log p/q of nearly equal softmaxes)
        x = torch.cat([x.abs() * torch.exp2(torch.randint(-1074, 1024, x.shape, generator=g).double()),
                       1 + torch.randn(40000, generator=g, dtype=torch.float64) * 1e-7])
    return torch.cat([x, torch.tensor(SPECIAL, dtype=torch.float64)])


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many representable doubles apart, for values of one sign."""
    return (got.view(torch.int64) - want.view(torch.int64)).abs()


@pytest.mark.parametrize("name", ["exp", "log"])
def test_within_one_ulp_of_math(name):
    x = _inputs(name == "log")
    got = getattr(detmath, name)(x)

    def ref(v):
        if math.isnan(v):
            return v
        if name == "exp":
            return math.inf if v > 709.78 else math.exp(v)
        return math.inf if v == math.inf else -math.inf if v == 0 else math.nan if v < 0 else math.log(v)

    want = torch.tensor([ref(v) for v in x.tolist()], dtype=torch.float64)
    finite = want.isfinite() & (want != 0)
    assert _ulps(got[finite], want[finite]).max() <= 1
    assert _ulps(got[finite], want[finite]).eq(0).double().mean() > 0.9  # mostly correctly rounded
    same = ~finite  # 0, ±inf and NaN exactly
    assert torch.equal(got[same].nan_to_num(1.5), want[same].nan_to_num(1.5))


def test_exact_cases():
    assert detmath.exp(torch.tensor([0.0, -0.0], dtype=torch.float64)).tolist() == [1.0, 1.0]
    assert detmath.log(torch.tensor([1.0], dtype=torch.float64)).tolist() == [0.0]
    assert detmath.log(torch.tensor([-0.0], dtype=torch.float64)).tolist() == [-math.inf]
    nan = torch.tensor([math.nan], dtype=torch.float64).neg()  # a NaN keeps its bits
    for fn in (detmath.exp, detmath.log):
        assert torch.equal(fn(nan).view(torch.int64), nan.view(torch.int64))


@pytest.mark.parametrize("name", ["exp", "log"])
def test_compiled_gives_the_same_bits(name):
    ckernel = pytest.importorskip("streammerge.methods.ckernel", exc_type=ImportError)
    x = _inputs(name == "log")
    x = torch.cat([x, -x])
    want = getattr(detmath, name)(x)
    got = getattr(ckernel, f"det_{name}")(x)
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))
