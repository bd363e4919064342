"""Where a merge's arithmetic runs: which device, how much of its memory, and how blocks get there.

The engine (engine.py) is the same on every device; a GPU only changes the backend's first and
last steps: input blocks go through `Staging`, results come back with an event to wait for.
"""

from __future__ import annotations

import logging
import os

import torch

from streammerge.errors import ConfigError

log = logging.getLogger(__name__)

GPU_SHARE = 0.8  # of the GPU memory free at the start, by default: the rest for the allocator's slack and others


def resolve_device(device: str) -> torch.device:
    """auto -> the GPU if there is one; cuda -> this process's GPU (under torchrun, the one of this
    node's worker: LOCAL_RANK), always with its index; CUDA asked for without CUDA -> the CPU, with a warning."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if device == "auto":
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        target = None
    if target is None or target.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if target.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA is not available (torch %s, no GPU found): merging on the CPU, with the same bytes", torch.__version__)
        return torch.device("cpu")
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return target


def device_budget(target: torch.device, gpu_memory: int | None) -> int | None:
    """Bytes of GPU memory for one block's working set: `gpu_memory`, or a share of what is free now."""
    if target.type != "cuda":
        return None
    if gpu_memory is not None:
        return gpu_memory
    free, _ = torch.cuda.mem_get_info(target)
    return int(free * GPU_SHARE)


class Staging:
    """Moves input blocks to a GPU through reusable pinned buffers, two sets used in turn: the next
    block is read from disk into one set while the GPU still copies and merges the other. A set is
    refilled only once the copies out of it are done (the event recorded after them)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.sets: list[list[torch.Tensor]] = [[], []]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def send(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors on the device; the copies are queued, not waited for."""
        turn, self.turn = self.turn, 1 - self.turn
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()
        buffers = self.sets[turn]
        moved = []
        for i, t in enumerate(tensors):
            nbytes = t.numel() * t.element_size()
            if i == len(buffers):
                buffers.append(torch.empty(0, dtype=torch.uint8))
            if buffers[i].numel() < nbytes:
                buffers[i] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            staged = buffers[i][:nbytes].view(t.dtype).view(t.shape)
            staged.copy_(t)  # the disk read, when the page cache does not hold the block yet
            moved.append(staged.to(self.device, non_blocking=True))
        self.copied[turn] = record_event(self.device)
        return moved


def record_event(device: torch.device) -> torch.cuda.Event | None:
    """An event marking the work queued so far on `device` (None on the CPU, where work is done when queued)."""
    return torch.cuda.current_stream(device).record_event() if device.type == "cuda" else None
