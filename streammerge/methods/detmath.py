"""exp and log of float64 tensors as fixed sequences of IEEE-754 operations: the same bits on every
CPU and GPU, in torch and in C.

torch's own exp and log come from MKL, Sleef or CUDA's libdevice, each free to differ in the last bit
from the others and from one instruction set to the next. A method whose bytes must not depend on the
machine (arcee_fusion's default semantics) takes these instead: +, −, ×, ÷ (each rounded once, never
fused), comparisons and exact bit moves, the same ones in the same order as arcee.c's `det_exp` and
`det_log` (the tests compare their bits). Both are within one ulp of the true value (tested against
Python's math).

    exp(x) = 2^k · e^r,  k = round(x / ln 2),  r = x − k·ln 2  (|r| ≤ ln 2 / 2; ln 2 in two parts, the
             first with 32 significant bits so k times it is exact)
             e^r = 1 + (r + r²·P(r)),  P the Taylor terms 1/2! … 1/13! (the rest is below 1e-17)
             2^k applied as two powers of two, so a result near the range's ends rounds once

    log(x) = k·ln 2 + log(1 + f),  x = 2^k·(1 + f),  √½ ≤ 1 + f < √2  (a subnormal x scaled by 2^54)
             log(1 + f) = f − (f²/2 − s·(f²/2 + R)),  s = f / (2 + f),
             R = 2s²/3 + 2s⁴/5 + … + 2s²⁰/21  (2·atanh(s)'s series; the rest is below 1e-17)

The polynomials go by Estrin's scheme (pairs, then pairs of pairs), whose short dependency chains let
the C loops run four lanes at a time.
"""

from __future__ import annotations

import math

import torch

SHIFTER = float.fromhex("0x1.8p52")  # x + SHIFTER − SHIFTER rounds x to an integer (|x| < 2^51), ties to even
INV_LN2 = float.fromhex("0x1.71547652b82fep+0")
LN2_HI = float.fromhex("0x1.62e42ffp-1")  # ln 2's leading 32 bits
LN2_LO = float.fromhex("-0x1.718432a1b0e26p-35")  # ln 2 − LN2_HI
EXP_LIMIT = 1100.0  # |x| beyond it gives 0 or inf all the same: the clamp keeps k within two powers of two
SQRT2 = float.fromhex("0x1.6a09e667f3bcdp+0")
EXP_TERMS = [1 / math.factorial(j) for j in range(2, 14)]  # 1/2! … 1/13!, correctly rounded (as C's folding)
LOG_TERMS = [2 / (2 * j + 3) for j in range(10)]  # 2/3 … 2/21


def _estrin(x: torch.Tensor, coef: list[float]) -> torch.Tensor:
    """coef[0] + coef[1]·x + … (an even number of terms) by Estrin's scheme: pairs (c + c'·x), then
    pairs of those with x², x⁴, … (an odd one out carried up as is). arcee.c spells out the same tree
    for its two polynomials."""
    terms = [coef[j] + coef[j + 1] * x for j in range(0, len(coef), 2)]
    power = x * x
    while len(terms) > 1:
        terms = [terms[j] + terms[j + 1] * power if j + 1 < len(terms) else terms[j] for j in range(0, len(terms), 2)]
        power = power * power
    return terms[0]


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k of integer-valued float64 k, |k| ≤ 1022, exactly (from its exponent bits)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def exp(x: torch.Tensor) -> torch.Tensor:
    """e^x of a float64 tensor (see the module's docstring); NaN stays itself, −inf gives 0, +inf inf."""
    c = x.clamp(-EXP_LIMIT, EXP_LIMIT)
    k = (c * INV_LN2 + SHIFTER) - SHIFTER
    r = (c - k * LN2_HI) - k * LN2_LO
    e = 1.0 + (r + (r * r) * _estrin(r, EXP_TERMS))  # (r·r: arcee.c's r2, _estrin's first power)
    k1 = (k * 0.5 + SHIFTER) - SHIFTER
    out = (e * _pow2(k1)) * _pow2(k - k1)
    return torch.where(x.isnan(), x, out)


def log(x: torch.Tensor) -> torch.Tensor:
    """The natural log of a float64 tensor (see the module's docstring); log 0 = −inf, log of a
    negative NaN, log inf = inf, NaN stays itself."""
    tiny = x < float.fromhex("0x1p-1022")
    bits = torch.where(tiny, x * float.fromhex("0x1p54"), x).view(torch.int64)
    m = ((bits & ((1 << 52) - 1)) | (1023 << 52)).view(torch.float64)  # in [1, 2)
    big = m > SQRT2
    m = torch.where(big, m * 0.5, m)
    k = (((bits >> 52) & 0x7FF) - 1023 + big.to(torch.int64) - torch.where(tiny, 54, 0)).to(torch.float64)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    hfsq = 0.5 * f * f
    r = z * _estrin(z, LOG_TERMS)
    out = k * LN2_HI + (f - (hfsq - (s * (hfsq + r) + k * LN2_LO)))
    out = torch.where(x == math.inf, x, out)
    out = torch.where(x == 0, -math.inf, out)
    out = torch.where(x < 0, math.nan, out)
    return torch.where(x.isnan(), x, out)
