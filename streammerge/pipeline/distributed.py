"""Splitting one merge over workers: which worker this process is, and the little talk they need.

Two ways to launch, both splitting by output shard (`plan.assign_workers`):
- torchrun: a gloo process group exchanges statuses and waits at barriers; no tensor is ever sent.
  Rank 0 prepares the output folder first and writes the index once every rank is done.
- Independent workers (`--rank/--world-size`, defaulting from a Slurm job array): they never talk;
  `streammerge finalize OUT` writes the index when all of them are done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from streammerge.errors import ConfigError, WorkerError

T = TypeVar("T")

# Workers finish their shards at different times; the final exchange waits for the slowest one.
TIMEOUT = timedelta(hours=48)


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (or any launcher setting its env:// variables)."""
    env = os.environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return None


def slurm_array_env() -> tuple[int, int] | None:
    """(rank, world size) of a Slurm job array task: its index from the array's first index."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return None


def check_worker(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"worker rank {rank} of world size {world_size}: the rank must be in 0..world_size-1")


def init_torchrun() -> tuple[int, int]:
    """Joins torchrun's process group (gloo: CPU only, nothing but small objects goes over it)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Group:
    """The torchrun process group, as this module uses it."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @staticmethod
    def current() -> Group | None:
        return Group() if dist.is_available() and dist.is_initialized() else None

    def all_statuses(self, error: BaseException | None) -> None:
        """Every rank says whether it succeeded; raises on every rank if any failed, naming them."""
        mine = None
        if error is not None:  # "" for a rank that only learned of another's failure
            mine = "" if isinstance(error, WorkerError) else (str(error) or type(error).__name__)
        statuses: list[str | None] = [None] * self.world_size
        dist.all_gather_object(statuses, mine)
        failed = [(r, m) for r, m in enumerate(statuses) if m]
        if error is not None and (len(failed) == 1 and failed[0][0] == self.rank or not failed):
            raise error
        if failed:
            raise WorkerError("; ".join(f"rank {r} of {self.world_size} failed: {m}" for r, m in failed))

    def rank0_first(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on rank 0, then (once it succeeded) on the other ranks; a failure on rank 0
        fails every rank."""
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as e:
                self.all_statuses(e)
                raise
            self.all_statuses(None)
            return result
        self.all_statuses(None)
        return fn()
