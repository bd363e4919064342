"""The exact k-th largest |τ| by radix selection (ops.RadixSelect), against a sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streammerge.methods import ops


def _select(values: torch.Tensor, k: int, blocks: int = 3) -> tuple[tuple[float, int, int], bool]:
    """RadixSelect over `blocks` pieces as the merge drives it; and whether pass 1 settled it."""
    sel = ops.RadixSelect(k)
    for part in values.chunk(blocks):
        sel.add(ops.radix_hist_high(part))
    sel.end_pass()
    settled = sel.found is not None
    for part in values.chunk(blocks):
        sel.add(ops.radix_hist_low(part, sel.high))  # pass 2 runs here either way: result() must not change
    return sel.result(), settled


def _sorted(values: torch.Tensor, k: int) -> tuple[float, int, int]:
    value = values.sort(descending=True).values[k - 1]
    return float(value), int((values > value).sum()), int((values == value).sum())


def test_bf16_task_vectors_are_settled_by_pass_1():
    # τ = a − b of bf16 weights, |τ| mostly below |b|: at most 8 significant bits, low 16 bits zero
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(50_000, generator=gen) * 0.02).bfloat16()
    ft = (base.float() + torch.randn(50_000, generator=gen) * 0.002).bfloat16()
    tau = (ft.float() - base.float()).abs()
    settled_count = 0
    for k in (1, 7, 100, 12_345, 25_000, 49_999, 50_000):
        got, settled = _select(tau, k)
        assert got == _sorted(tau, k), k
        settled_count += settled
    assert settled_count >= 5  # the shortcut really runs


@pytest.mark.parametrize("seed", range(3))
def test_float32_values_need_pass_2_and_get_the_same_answer(seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(20_000, generator=gen).abs()
    values[::17] = values[5]  # ties
    values[::29] = 0.0
    values[3::31] = 0.5  # low 16 bits zero: the bin's smallest value, a settled case when k lands on it
    for k in (1, 2, 500, 1176, 10_000, 19_000, 20_000):
        got, _ = _select(values, k)
        assert got == _sorted(values, k), k
    half = int((values > 0.5).sum()) + 1  # the k-th largest is exactly 0.5
    got, settled = _select(values, half)
    assert settled and got == _sorted(values, half)


def test_split_histogram_counts_zero_and_nonzero_low_bits():
    values = torch.tensor([1.0, 1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), 0.0, 3.0])
    hist = ops.radix_hist_high(values)
    top = 0x3F80  # 1.0 = 0x3F800000
    assert hist[2 * top].item() == 2 and hist[2 * top + 1].item() == 1 and hist[0].item() == 1 and hist.sum().item() == 5
