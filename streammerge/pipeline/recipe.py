"""A recipe stage as a checkpoint: its tensors computed when read, never written (front/recipe.py).

A `StageCheckpoint` looks to the merge that reads it like the folder the stage's own run would write:
the same tensor names, shapes, output dtypes and file order (its plan's shards), and config.json and
the tokenizer files in `folder`. `view(name, r0, r1)` merges that tensor through the stage's own
TensorJob, the way the engine does, into the stage's output dtype: the bytes the stage's own run
writes, so a recipe's output is byte-identical to running its stages one after another.

A tensor is computed whole, once, and kept until another tensor of the stage is read: the merge
reading it takes its row blocks one after another (and again for its own stats passes), and a method
that needs the whole tensor needs it anyway. That is one tensor per stage in memory, at most the
stage's largest tensor (`extra_memory`). A stage with a model-wide pass (FusionBench's global trim,
the majority sign) reads every tensor of its inputs once first, as a merge does, before its first
tensor is served.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from streammerge.io.sources import DTYPES, Checkpoint, ComputedCheckpoint, TensorInfo
from streammerge.pipeline.passes import (
    TensorJob,
    global_pass_needed,
    prepare_global,
    prepare_tensor,
)
from streammerge.pipeline import engine
from streammerge.pipeline.plan import Plan, pool_shape, write_memory

log = logging.getLogger(__name__)


class StageCheckpoint(ComputedCheckpoint):
    """A recipe stage's output, computed tensor by tensor when read."""

    def __init__(self, name: str, plan: Plan, reference: Checkpoint, finetuned: list[Checkpoint], folder: Path,
                 fingerprint: str, compile: str = "auto"):
        self.name = name
        self.compile = compile  # the CPU kernel its merge runs on, as the final merge's (engine.compiled_kernel)
        self.plan = plan
        self.reference, self.finetuned = reference, finetuned
        self.path = folder  # the side files (config.json, tokenizer) the stage's own run writes
        self.fingerprint = fingerprint  # of the stage's plan and inputs (api.plan_fingerprint)
        self.by_name = {t.name: t for t in plan.tensors}
        # One fake file per output shard, offsets as the writer lays them out: the file order of the
        # folder the stage's own run writes, which decides the order of whatever reads it.
        self.files, self.tensors = [], {}
        for shard in plan.shards:
            file, offset = folder / shard.filename, 0
            self.files.append(file)
            for n in shard.tensors:
                tp = self.by_name[n]
                self.tensors[n] = TensorInfo(n, tp.out_dtype, tp.shape, file, offset, tp.nbytes)
                offset += tp.nbytes
        self._fds, self._maps, self._ends = {}, {}, {}  # Checkpoint.close() looks at these: none here
        self._lock = threading.RLock()
        self._jobs: dict[str, TensorJob] | None = None
        self._global_done = False
        self._pool: ThreadPoolExecutor | None = None
        self._held: tuple[str, torch.Tensor] | None = None  # the one tensor computed last

    @property
    def label(self) -> str:
        return f"stage {self.name}"

    @property
    def extra_memory(self) -> int:
        """Bytes this stage adds to the merge reading it: its largest output tensor, held while read,
        and the working memory of computing one tensor (its plan's estimate without the output
        buffer pool and the writer's stages, which a stage does not use: it merges into the held tensor,
        nor staged inputs: it reads its inputs when asked, not ahead)."""
        capacity, count = pool_shape(self.plan, [j.rows for j in self._built_jobs().values()])
        unused = capacity * count + write_memory(self.plan.max_memory) + self.plan.staging_memory
        return max((t.nbytes for t in self.plan.tensors), default=0) + self.plan.peak_memory - unused

    def identity(self) -> list:
        """What decides this stage's bytes, for the fingerprint of a merge that reads it."""
        return ["recipe stage", self.name, self.fingerprint]

    def file_identity(self, file: Path) -> list:
        # never a local file's [path, size, mtime, header] shape: api.changed_inputs would stat it
        return [*self.identity(), file.name, "computed"]

    def view(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        info = self.tensors[name]
        row_end = info.rows if row_end is None else row_end
        with self._lock:
            if self._held is None or self._held[0] != name:
                self._held = None  # the previous tensor goes before the next one is computed
                self._held = (name, self._compute(name))
            whole = self._held[1]
        return whole[row_start:row_end] if info.shape else whole

    def advise(self, name: str) -> None:
        """Nothing to read ahead: the tensor is computed when read."""

    def _compute(self, name: str) -> torch.Tensor:
        """The stage's output tensor `name`, as the engine merges it (passes.TensorJob) and rounds it."""
        job = self._all_jobs()[name]
        tp = job.tp
        prepare_tensor(job)
        flat = torch.empty(tp.numel, dtype=DTYPES[tp.out_dtype])
        for block in job.blocks_read():
            out = flat[block.start: block.start + (block.r1 - block.r0) * job.row_elems]
            if job.passthrough:
                out.copy_(block.base.reshape(-1))
            else:
                ready = job.backend.merge(block, job.spec, out)
                if ready is not None:
                    ready.synchronize()
        job.given_cache.clear()  # a LoRA adapter's τ, kept for the tensor's passes only
        return flat.view(tp.shape)

    def _built_jobs(self) -> dict[str, TensorJob]:
        """A TensorJob per tensor, as the engine builds them; each keeps what its passes find."""
        if self._jobs is None:
            self._pool = engine.compute_pool(torch.get_num_threads(), f"streammerge-stage-{self.name}")
            compiled = engine.compiled_kernel(self.compile)
            self._jobs = {t.name: TensorJob(t, self.plan, self.reference, self.finetuned, self._pool, compiled)
                          for t in self.plan.tensors}
        return self._jobs

    def _all_jobs(self) -> dict[str, TensorJob]:
        """The jobs, after the model-wide pass (once) when the stage's method has one."""
        jobs = self._built_jobs()
        if not self._global_done:
            self._global_done = True
            if global_pass_needed(list(jobs.values())):
                log.info("stage %s: a model-wide pass first (global trim or majority sign): every input tensor is read once more",
                         self.name)
                prepare_global(list(jobs.values()))
        return jobs

    def close(self) -> None:
        self._held = None
        self._jobs = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def expand(inputs: list[Checkpoint]) -> tuple[list[Checkpoint], list[StageCheckpoint]]:
    """The checkpoints read from disk (or the Hub) under `inputs`, stages followed down to their own
    inputs, each once; and the stages met on the way."""
    leaves: dict[int, Checkpoint] = {}
    stages: dict[int, StageCheckpoint] = {}
    todo = list(inputs)
    while todo:
        c = todo.pop(0)
        if isinstance(c, StageCheckpoint):
            if id(c) not in stages:
                stages[id(c)] = c
                todo += [c.reference, *c.finetuned]
        elif c is not None:
            leaves.setdefault(id(c), c)
    return list(leaves.values()), list(stages.values())
