"""Throughput of the merge kernels on one TinyLlama MLP-sized tensor (5632 x 2048, bf16), 2 fine-tunes.

    python benchmarks/kernels.py

Prints M elements/s for: the DARE mask, the numpy chunk kernel (1 and all threads), the
compiled C kernel (ckernel.py, 1 and all threads), DELLA in both kernels against the torch eager
path (rows of 2048), the radix passes that find the exact TIES threshold, and the bracket selection
that finds it for a tensor in memory.
"""

from __future__ import annotations

import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor

import torch

from streammerge.methods import kernels, ops
from streammerge.methods import ckernel
from streammerge.methods.mask import keep_mask_into, mask_key
from streammerge.pipeline.passes import Block, NumpyBackend, TorchBackend

N = 5632 * 2048


def rate(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return N * repeat / (time.perf_counter() - t) / 1e6


def spec(method: str) -> ops.TensorSpec:
    dare, della = method.startswith("dare"), method.startswith("della")
    trims = (ops.TrimThreshold(0.0015, -1),) * 2 if method == "ties" else (None, None)
    return ops.TensorSpec(opts=ops.MergeOptions(method=method), weights=(0.5, 0.5), lam=1.0, dare=dare,
                          keys=tuple(mask_key(0, i, "t") for i in range(2)) if dare or della else (), densities=(0.5, 0.5),
                          dare_scales=(2.0, 2.0) if dare else (1.0, 1.0), trims=trims,
                          epsilons=(0.15, 0.15) if della else (), della_row=2048 if della else 0)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(N, generator=gen) * 0.02).bfloat16()
    fts = [(base.float() + torch.randn(N, generator=gen) * 0.002).bfloat16() for _ in range(2)]
    out = torch.empty(N, dtype=torch.bfloat16)
    b, f, o = kernels.as_numpy(base), [kernels.as_numpy(x) for x in fts], kernels.as_numpy(out)
    pool = ThreadPoolExecutor(torch.get_num_threads())
    keep = torch.empty(N, dtype=torch.bool)
    print(f"DARE mask (numpy, 1 thread): {rate(lambda: keep_mask_into(123, 0, keep, 0.5)):.0f} M elem/s")
    for method in ("task_arithmetic", "dare_linear", "dare_ties", "ties"):
        sp = spec(method)
        one = rate(lambda: kernels.merge_block(sp, b, f, o, 0, None))
        many = rate(lambda: kernels.merge_block(sp, b, f, o, 0, pool))
        comp1 = rate(lambda: ckernel.merge(sp, b, f, o, 0, None))
        comp = rate(lambda: ckernel.merge(sp, b, f, o, 0, pool))
        print(f"{method:16s} numpy 1 thread {one:5.0f}, numpy {pool._max_workers} threads {many:5.0f}, "
              f"compiled 1 thread {comp1:5.0f}, {pool._max_workers} threads {comp:5.0f} M elem/s")
    for method in ("della", "della_linear"):
        sp = spec(method)
        one = rate(lambda: kernels.merge_block(sp, b, f, o, 0, None))
        many = rate(lambda: kernels.merge_block(sp, b, f, o, 0, pool))
        comp1 = rate(lambda: ckernel.merge(sp, b, f, o, 0, None))
        comp = rate(lambda: ckernel.merge(sp, b, f, o, 0, pool))
        block = Block(0, N // 2048, 0, base.view(-1, 2048), [x.view(-1, 2048) for x in fts], 0)
        eager = rate(lambda: TorchBackend(torch.float32).merge(block, sp, out), repeat=1)
        print(f"{method:16s} numpy 1 thread {one:5.0f}, numpy {pool._max_workers} threads {many:5.0f}, "
              f"compiled 1 thread {comp1:5.0f}, {pool._max_workers} threads {comp:5.0f}, torch eager {eager:5.0f} M elem/s")
    sp = spec("dare_ties")
    print(f"radix pass 1 (2 models): {rate(lambda: kernels.radix_hist(sp, b, f, 0, [None, None], [True, True], pool)):.0f} M elem/s")
    print(f"radix pass 2 (2 models): {rate(lambda: kernels.radix_hist(sp, b, f, 0, [15300, 15300], [True, True], pool)):.0f} M elem/s")
    print(f"radix pass 1, compiled:  {rate(lambda: ckernel.radix_hist(sp, b, f, 0, [None, None], [True, True], pool)):.0f} M elem/s")
    print(f"radix pass 2, compiled:  {rate(lambda: ckernel.radix_hist(sp, b, f, 0, [15300, 15300], [True, True], pool)):.0f} M elem/s")
    # the bracket selection that replaced them for a tensor in memory: its pass alone, then the whole
    # selection (sample, pass, the last kept tie) of both models' median |τ|
    sp = replace(spec("ties"), trims=(None, None))
    sample = ckernel.tau_bits(sp, b, f, 0, [True, True])
    selects = [ops.BracketSelect(N // 2, N, sample[i]) for i in range(2)]
    for threads, p in ((1, None), (pool._max_workers, pool)):
        print(f"bracket pass, compiled, {threads} thread(s): {rate(lambda: ckernel.bracket_pass(sp, b, f, 0, selects, p)):.0f} M elem/s")
    block = Block(0, N // 2048, 0, base.view(-1, 2048), [x.view(-1, 2048) for x in fts], 0)
    select = NumpyBackend(pool, compiled=ckernel).select
    print(f"bracket selection, compiled, {pool._max_workers} threads: {rate(lambda: select(block, sp, [N // 2, N // 2], 'exact')):.0f} M elem/s")


if __name__ == "__main__":
    main()
