"""Throughput of sce, nearswap, arcee_fusion, ram and ramplus_tl through their Method hooks
(methods.run_tensor: every stats pass and the merge pass, in memory, no I/O), default semantics.

    PYTHONPATH=. python benchmarks/methods_new_b.py [--rows-per-block 1024] [--repeat 3]

One 4096 x 4096 float32 tensor (16.8M parameters), a base and 3 fine-tunes (nearswap and
arcee_fusion take one), deltas of 2% of the weights' scale on 60% of the elements. Prints M params/s
(parameters of the output tensor per second, best of --repeat) per method, and how many passes over
the blocks each took (the engine reads the inputs once per pass).
"""

from __future__ import annotations

import argparse
import time

import torch

from streammerge.methods import TensorCtx, get, run_tensor

CASES = [
    ("sce", 3, {"select_topk": 1.0}),
    ("sce", 3, {"select_topk": 0.1}),
    ("nearswap", 1, {"t": 1e-3}),
    ("arcee_fusion", 1, {}),
    ("ram", 3, {}),
    ("ramplus_tl", 3, {}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-block", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shape = (4096, 4096)
    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(shape, generator=g)
    models = [base + 4e-4 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6) for _ in range(3)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {shape[0]}x{shape[1]} float32, "
          f"{args.rows_per_block} rows per block")
    for name, n, params in CASES:
        method = get(name)
        ctx = TensorCtx(name="bench", shape=shape, semantics="default", params=params, dtype=None,
                        out_dtype=torch.float32, has_base=True)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            run_tensor(method, ctx, base, models[:n], args.rows_per_block)
            best = min(best, time.perf_counter() - t0)
        print(f"{name:13s} models={n} {str(params):24s} passes={method.passes(ctx) + 1}  "
              f"{base.numel() / best / 1e6:8.1f} M params/s  ({best:.2f} s)")


if __name__ == "__main__":
    main()
