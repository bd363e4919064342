"""Two builds of the compiled kernel, alternated in one process: M elements/s (1 thread), same bytes?

    cp streammerge/methods/_ckernel.*.so /tmp/old.so     # before a change
    python setup.py build_ext --inplace                  # after it
    python benchmarks/kernel_ab.py /tmp/old.so streammerge/methods/_ckernel.*.so [METHOD ...]

On a shared VM the speed of the same build drifts by a third within minutes; calling the two builds
in turn, best of 7 each, compares them under the same drift. The inputs are kernels.py's: a
5632 x 2048 base and 2 fine-tunes, in bf16, then the fine-tunes as FP8 (e4m3fn, 128 x 128 blocks).
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kernels import N, spec
from streammerge.io import quant
from streammerge.io.sources import TensorInfo
from streammerge.methods import ckernel, kernels

ROWS, COLS = 5632, 2048


def fp8_finetune(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(ROWS, COLS, generator=g) * 50).clamp(-440, 440).to(torch.float8_e4m3fn)
    s = torch.rand(ROWS // 128, COLS // 128, generator=g) * 1e-3
    weight = TensorInfo("w", "F8_E4M3", (ROWS, COLS), Path("w"), 0, ROWS * COLS)
    scale = TensorInfo("w_scale", "F32", tuple(s.shape), Path("w"), 0, 4 * s.numel())
    info = quant.QuantTensor("w", "F32", (ROWS, COLS), Path("w"), 0, 0, weight=weight, scale=scale, block=(128, 128),
                             scheme="block")
    return ckernel.fp8_source(quant.QuantRows(info, w, s, 0))


def main() -> None:
    builds = {"old": ctypes.CDLL(sys.argv[1]), "new": ctypes.CDLL(sys.argv[2])}
    for lib in builds.values():
        lib.merge_range.argtypes = ckernel._lib.merge_range.argtypes
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(N, generator=gen) * 0.02).bfloat16()
    bf16 = [kernels.as_numpy((base.float() + torch.randn(N, generator=gen) * 0.002).bfloat16()) for _ in range(2)]
    inputs = {"bf16": bf16, "FP8": [fp8_finetune(i) for i in range(2)]}
    base = kernels.as_numpy(base)
    outs = {k: np.empty(N, np.uint16) for k in builds}
    for kind, fts in inputs.items():
        for method in sys.argv[3:] or ["task_arithmetic", "dare_linear", "dare_ties", "ties", "della"]:
            sp, best = spec(method), dict.fromkeys(builds, float("inf"))
            for _ in range(7):
                for k, lib in builds.items():
                    ckernel._lib = lib
                    t = time.perf_counter()
                    ckernel.merge(sp, base, fts, outs[k], 0, None)
                    best[k] = min(best[k], time.perf_counter() - t)
            print(f"{kind:4s} {method:16s} old {N / best['old'] / 1e6:5.0f}, new {N / best['new'] / 1e6:5.0f} M elem/s: "
                  f"x{best['old'] / best['new']:.2f}, same bytes: {np.array_equal(outs['old'], outs['new'])}")


if __name__ == "__main__":
    main()
