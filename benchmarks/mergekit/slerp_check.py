"""Checks streammerge's `semantics: mergekit` slerp against mergekit 0.1.5's own method on tensors
too big for the committed fixtures: more than one of mergekit's 2^20-element chunks, every float
dtype, the lerp fallback, zero tensors, t at and between the ends. Prints one line per case and
exits non-zero on any difference.

    /work/mergekit-venv/bin/python benchmarks/mergekit/slerp_check.py

It runs mergekit's registered `slerp` through its public call (one TensorGroup, as its graph adapter
passes it), and imports streammerge from this checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from streammerge.methods import ops  # noqa: E402

OPTS = ops.MergeOptions(method="slerp", slerp_sums="mergekit", positive_zeros=False)


def ours(a: torch.Tensor, b: torch.Tensor, t: float, dtype: torch.dtype) -> torch.Tensor:
    coefficients = ops.slerp_coefficients_mergekit(a, b, t, dtype)
    return ops.slerp_block(a, b, coefficients, OPTS, dtype)


def theirs(a: torch.Tensor, b: torch.Tensor, t: float, dtype: torch.dtype) -> torch.Tensor:
    (out,) = registry.get("slerp")((TensorGroup.from_tensors([a, b], base_index=0),), parameters={"t": t}, dtype=dtype)
    return out


def cases():
    g = torch.Generator().manual_seed(3)
    big = (1200, 1000)  # 1.2 M elements: two chunks, the second partial
    a = torch.randn(big, generator=g) * 0.02
    yield "wide angle", a, 0.6 * a + 0.8 * torch.randn(big, generator=g) * 0.02
    yield "small angle", a, a + 0.045 * torch.randn(big, generator=g) * 0.02
    yield "near parallel", a, a + 0.01 * torch.randn(big, generator=g) * 0.02
    yield "opposite", a, -a
    yield "zero base", torch.zeros(big), a
    yield "3 chunks, 1-D", torch.randn(2_500_000, generator=g), torch.randn(2_500_000, generator=g)
    yield "small 2-D", torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)


def main() -> int:
    failures = 0
    for label, a, b in cases():
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            for t in (0.0, 0.3, 0.71, 1.0):
                x, y = a.to(dtype), b.to(dtype)
                mine, ref = ours(x, y, t, dtype), theirs(x, y, t, dtype)
                same = mine.dtype == ref.dtype and torch.equal(mine, ref)
                failures += not same
                if not same:
                    print(f"DIFFERENT {label} {dtype} t={t}: {int((mine != ref).sum())} elements", flush=True)
        print(f"checked {label} {tuple(a.shape)}", flush=True)
    print("all identical" if not failures else f"{failures} cases differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
