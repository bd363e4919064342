"""Speed of model_stock, nuslerp, multislerp and karcher through `run_tensor` (the methods' own
arithmetic: stats pass + merge pass over row blocks, in memory, no I/O), default semantics.

    python benchmarks/methods_new_a.py [--rows-per-block 512] [--repeat 3]

One 4096 x 4096 float32 tensor (16.8M parameters) per input: a base and 2 or 3 fine-tunes. Prints
the best of `--repeat` runs as M params/s of output (the slerp-shaped methods read every input
twice: once for the Gram matrix, once to merge).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from streammerge import ops
from streammerge.methods import TensorCtx, registry, run_tensor

CASES = [  # label, method, params, fine-tunes, with a base
    ("model_stock (3 fine-tunes)", "model_stock", {}, 3, True),
    ("model_stock filter_wise (3)", "model_stock", {"filter_wise": True}, 3, True),
    ("nuslerp (2, base)", "nuslerp", {"weight": (0.4, 0.6)}, 2, True),
    ("nuslerp row_wise (2, base)", "nuslerp", {"weight": (0.4, 0.6), "nuslerp_flatten": False,
                                               "nuslerp_row_wise": True}, 2, True),
    ("multislerp (3, base)", "multislerp", {"weight": (1.0, 1.0, 1.0)}, 3, True),
    ("karcher (3)", "karcher", {}, 3, False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-block", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shape = (4096, 4096)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen) * 0.02
    fts = [base + 0.002 * torch.randn(shape, generator=gen) for _ in range(3)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows_per_block} rows per block")
    print("| method | s | M params/s |\n|---|---|---|")
    for label, name, params, n, with_base in CASES:
        ctx = TensorCtx("bench", shape, "default", params, None, torch.float32, has_base=with_base)
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            run_tensor(registry.get(name), ctx, base if with_base else None, fts[:n], rows_per_block=args.rows_per_block)
            best = min(best, time.perf_counter() - start)
        print(f"| {label} | {best:.2f} | {base.numel() / best / 1e6:.1f} |", flush=True)
    # for scale, in the same run: the engine's own slerp arithmetic (ops.py), the same blocks
    best, opts, step = float("inf"), ops.MergeOptions(method="slerp"), args.rows_per_block
    for _ in range(args.repeat):
        start = time.perf_counter()
        sums = torch.cat([ops.slerp_row_sums(base[r:r + step], fts[0][r:r + step], min(step, shape[0] - r))
                          for r in range(0, shape[0], step)], dim=1)
        coefs = ops.slerp_coefficients(0.5, *(math.fsum(row.tolist()) for row in sums))
        torch.cat([ops.slerp_block(base[r:r + step], fts[0][r:r + step], coefs, opts, torch.float32)
                   for r in range(0, shape[0], step)])
        best = min(best, time.perf_counter() - start)
    print(f"| slerp (ops.py, reference) | {best:.2f} | {base.numel() / best / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
