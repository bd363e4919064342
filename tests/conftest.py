"""Shared test helpers."""

from __future__ import annotations

import contextlib
import signal
from typing import Callable

import pytest
import torch

import streammerge.engine
import streammerge.kernels


@pytest.fixture
def inject_masks(monkeypatch) -> Callable:
    """Replaces the counter-based DARE (and DELLA) mask, in both backends, by `masks(model_index, tensor, start, count)`."""

    def install(masks: Callable[[int, str, int, int], torch.Tensor]) -> None:
        monkeypatch.setattr(streammerge.engine, "mask_key", lambda seed, i, name: (i, name))

        def keep_mask(key, start, count, density, device=None):
            return masks(key[0], key[1], start, count).bool()

        def keep_mask_into(key, start, out, density):
            out.copy_(masks(key[0], key[1], start, out.numel()).bool().view(out.shape))

        def keep_mask_varying(key, start, thresholds):  # DELLA: the injected mask, whatever the probabilities
            return masks(key[0], key[1], start, thresholds.numel()).bool().view(thresholds.shape)

        monkeypatch.setattr(streammerge.engine, "keep_mask", keep_mask)
        monkeypatch.setattr(streammerge.engine, "keep_mask_varying", keep_mask_varying)
        monkeypatch.setattr(streammerge.kernels, "keep_mask_into", keep_mask_into)

    return install


@contextlib.contextmanager
def no_hang(seconds: int = 5):
    """Fails the test (instead of blocking forever) if the body takes longer than `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
