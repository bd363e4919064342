"""Per-tensor pipeline throughput of the torch path on a device (the GPU path of `--device cuda`).

    python benchmarks/gpu.py                    # cuda if present, else cpu
    python benchmarks/gpu.py --device cpu

One Llama-2-7B MLP tensor (11008 x 4096, bf16) from a base and 2 fine-tunes, as the engine sees it
(a row block of mapped CPU memory). For each method it times the whole per-block pipeline of
`passes.TorchBackend.merge`: staging through pinned buffers, host-to-device copies, the arithmetic
and the asynchronous copy of the result into the pinned CPU output buffer, repeated blocks
overlapping as in the engine; and, apart, the host-to-device copy alone
and the arithmetic alone on resident data. Prints M elements/s and input GB/s; compare the input
GB/s with the read floor of `benchmarks/run.py --device ...` on the same machine.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from kernels import spec  # benchmarks/kernels.py: the same tensor specs

from streammerge.pipeline.passes import Block, TorchBackend

ROWS, COLS = 11008, 4096
N = ROWS * COLS


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up: allocations, pinned buffers, kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(ROWS, COLS, generator=gen) * 0.02).bfloat16()
    fts = [(base.float() + torch.randn(ROWS, COLS, generator=gen) * 0.002).bfloat16() for _ in range(2)]
    in_bytes = 3 * N * 2
    block = Block(0, ROWS, 0, base, fts, in_bytes)
    out = torch.empty(N, dtype=torch.bfloat16, pin_memory=device.type == "cuda")  # as the engine's output pool
    backend = TorchBackend(torch.float32, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), tensor {ROWS}x{COLS} bf16, base + 2 fine-tunes ({in_bytes / 1e9:.2f} GB in)")

    if device.type == "cuda":
        s = timed(lambda: backend._on_device(block), device, args.repeat)
        print(f"staging + host-to-device copy alone: {in_bytes / s / 1e9:.1f} GB/s")
    resident = replace(block, base=base.to(device), fts=[t.to(device) for t in fts])
    cpu_backend = TorchBackend(torch.float32, torch.device("cpu"))  # resident data: no staging
    for method in ("task_arithmetic", "dare_linear", "dare_ties", "ties"):
        sp = spec(method)
        whole = timed(lambda: backend.merge(block, sp, out), device, args.repeat)
        dev_out = torch.empty(N, dtype=torch.bfloat16, device=device)
        compute = timed(lambda: cpu_backend.merge(resident, sp, dev_out), device, args.repeat)
        print(f"{method:16s} pipeline {N / whole / 1e6:7.0f} M elem/s ({in_bytes / whole / 1e9:5.2f} GB/s in), "
              f"arithmetic alone {N / compute / 1e6:7.0f} M elem/s")


if __name__ == "__main__":
    main()
