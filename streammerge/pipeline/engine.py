"""Runs a plan: reads row blocks, merges them, streams the results into shards. Knows no method:
what a tensor's blocks are and how they merge is passes.py's.

Three threads share the work: a prefetcher reads the next tensors ahead (io/prefetch.py: those in
the page cache are read-only views of the mapped files, those on disk are staged into reused
memory with O_DIRECT), the main thread merges (compiled or numpy chunks on every core, or torch), a
writer hashes and writes finished blocks and then releases the staged inputs they were made of.
The memory budget bounds the output blocks in flight (a fixed pool of reusable buffers), the
working set of a block and the staged inputs; a tensor too big for it is processed in row blocks.

A tensor whose method needs whole-tensor quantities first goes through its stats passes
(passes.prepare_tensor), each reading the tensor again: from its staged memory, or the mapped
pages from the page cache when they are still there; a model-wide pass (FusionBench's global trim)
reads every tensor first.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from streammerge.errors import ConfigError, DeviceError, NonFiniteError
from streammerge.io.prefetch import Prefetcher
from streammerge.io.sources import Checkpoint
from streammerge.io.writer import ShardWriter
from streammerge.pipeline.device import device_budget, resolve_device
from streammerge.pipeline.passes import (
    Block,
    TensorJob,
    dequantized,
    global_pass_needed,
    prepare_global,
    prepare_tensor,
)
from streammerge.pipeline.plan import Plan, ShardPlan, pool_shape, write_memory

if TYPE_CHECKING:
    from streammerge.io.hub import Downloads

Progress = Callable[[int], None]  # called with the number of input bytes just processed
log = logging.getLogger(__name__)


class BufferPool:
    """A fixed set of reusable output buffers: bounds the memory of blocks waiting to be written,
    and reusing them spares the kernel from mapping and zeroing fresh pages for every block.
    Pinned when a GPU computes, so its results come back with asynchronous copies."""

    def __init__(self, capacity: int, count: int, pinned: bool = False):
        self.capacity = capacity
        self.free: queue.LifoQueue = queue.LifoQueue()  # the last returned first: buffers the writer keeps up with stay few
        for _ in range(count):
            self.free.put(torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned))

    def get(self, nbytes: int) -> torch.Tensor:
        assert nbytes <= self.capacity, (nbytes, self.capacity)
        return self.free.get()

    def put(self, buf: torch.Tensor) -> None:
        self.free.put(buf)


# ---- the pipeline ------------------------------------------------------------------------------


class _Stop(Exception):
    pass


class AsyncWriter:
    """Hashes and writes finished blocks on its own thread; their buffers go back to the pool."""

    def __init__(self, pool: BufferPool, on_shard: Callable[[dict], None] | None, memory: int):
        self.pool = pool
        self.memory = memory  # each shard's direct-write stages
        self.on_shard = on_shard
        self.cancelled = False
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.writer: ShardWriter | None = None
        self.thread = threading.Thread(target=self._run, name="streammerge-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            kind, payload = item
            try:
                if self.error is not None or self.cancelled:
                    raise _Stop
                if kind == "open":
                    self.writer = ShardWriter(*payload, memory=self.memory)
                elif kind == "data":
                    if payload[2] is not None:  # the GPU's copy into the buffer
                        payload[2].synchronize()
                    self.writer.write(payload[0])
                elif kind == "finish":
                    receipt = {"file": self.writer.path.name, "sha256": self.writer.finish(), "bytes": self.writer.file_size}
                    self.writer = None
                    if self.on_shard is not None:
                        self.on_shard(receipt)
                    payload.set_result(receipt)
                elif kind == "then":
                    payload()
            except BaseException as e:
                if self.error is None and not isinstance(e, _Stop):
                    self.error = e
                if self.writer is not None:
                    self.writer.abort()
                    self.writer = None
                if kind == "finish":
                    payload.set_exception(self.error or _Stop())
            finally:
                if kind == "data" and payload[1] is not None:
                    self.pool.put(payload[1])

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def open(self, path: Path, entries: list, metadata: dict) -> None:
        self._check()
        self.queue.put(("open", (path, entries, metadata)))

    def write(self, tensor: torch.Tensor, buffer: torch.Tensor | None = None, ready: torch.cuda.Event | None = None) -> None:
        """Queues a tensor's bytes, to be written once `ready` (a copy still arriving) is done;
        `buffer` (from the pool) goes back to the pool once written."""
        self._check()
        self.queue.put(("data", (tensor, buffer, ready)))

    def then(self, fn: Callable[[], None]) -> None:
        """Calls `fn` on the writer's thread once the blocks queued before it are written (views of
        staged inputs among them: their memory is reused after)."""
        self.queue.put(("then", fn))

    def finish(self) -> Future:
        fut: Future = Future()
        self.queue.put(("finish", fut))
        return fut

    def close(self, cancel: bool = False) -> None:
        """Stops the thread; with `cancel`, queued blocks are dropped and the open shard deleted."""
        self.cancelled = cancel
        self.queue.put(None)
        self.thread.join()
        if self.writer is not None:  # cancelled before its last block arrived
            self.writer.abort()
            self.writer = None


def compiled_kernel(mode: str):
    """The compiled C kernel's module (methods/ckernel.py) unless `mode` is "off", or None: built at
    install, it costs nothing to load; without it numpy or torch give the same bytes."""
    if mode == "off":
        return None
    try:
        from streammerge.methods import ckernel
    except ImportError as e:
        if mode == "on":
            raise ConfigError("--compile on: the compiled kernel was not built when streammerge was installed; "
                              "reinstall streammerge where a C compiler is available, or use --compile auto") from None
        log.debug("the compiled kernels are not available (%s); using numpy or torch", e)
        return None
    return ckernel


def compute_pool(threads: int, name: str = "streammerge-compute") -> ThreadPoolExecutor | None:
    """The compute threads (None for one): each runs torch on itself alone.

    The threads already split the work (a block's slices, the models' scans); a torch op in one of
    them would otherwise fan out to torch's own threads too, and two cores spent their time handing
    work back and forth (1.7 M futex calls and 7.5 s of system time in a TinyLlama slerp merge; 1.3-1.5x
    faster for the hook methods). torch's thread count is per thread, read from a process-wide value on
    a thread's first op: each compute thread settles its own at 1, then the caller's value is restored.
    """
    if threads <= 1:
        return None
    caller = torch.get_num_threads()

    def one_thread() -> None:
        torch.set_num_threads(1)
        torch.get_num_threads()  # (settles this thread's count now, before the value is restored)

    pool = ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=one_thread)
    started = threading.Barrier(threads + 1)
    for _ in range(threads):  # every thread started (each waits here, so the next task starts another)
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(caller)
    return pool


def _check_finite(job: TensorJob, block: Block, out: torch.Tensor) -> None:
    for ckpt, name, tensor in zip(job.sources, job.names, ([block.base] if job.read_base else []) + block.fts):
        tensor = dequantized(tensor)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{ckpt.tensors[name].file}: tensor {name!r} holds NaN or Inf")
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"merged tensor {job.tp.name!r} holds NaN or Inf (check the weights and lambda)")


def merged(job: TensorJob, block: Block, buf: torch.Tensor, check_finite: bool) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A block merged into `buf` from the pool: (the bytes to write, the event a GPU's copy into it
    completes). FP8 output is quantized once the block is merged, in the same pass where the
    compiled kernel runs."""
    if job.tp.quantized and not check_finite:
        fp8 = job.merge_quantized(block, buf)
        if fp8 is not None:
            return fp8, None
    out = buf[: job.out_bytes(block)].view(job.out_dtype)
    ready = job.backend.merge(block, job.spec, out)
    if ready is not None and (check_finite or job.tp.quantized):  # both read the merged block here
        ready.synchronize()
        ready = None
    if check_finite:
        _check_finite(job, block, out)
    if job.tp.quantized:
        out = job.quantize(block, out, buf)
    return out, ready


def run_plan(
    plan: Plan,
    reference: Checkpoint,
    finetuned: list[Checkpoint],
    out_dir: Path,
    *,
    progress: Progress | None = None,
    threads: int | None = None,
    compile: str = "auto",
    todo: list[ShardPlan] | None = None,
    on_shard: Callable[[dict], None] | None = None,
    check_finite: bool = False,
    device: str = "auto",
    gpu_memory: int | None = None,
    downloads: Downloads | None = None,
) -> dict[str, dict]:
    """Writes shards of the plan into `out_dir`; returns {file: {file, sha256, bytes}} per shard written.

    Args:
        compile: "auto" uses the compiled C kernel (methods/ckernel.py) when it was built at install,
            "on" requires it, "off" never uses it (the numpy kernel); the same bytes either way.
        todo: the shards to write (default: all). Whole-model quantities (a global trim threshold,
            the majority sign) still come from every tensor, so a shard's bytes never depend on
            which other shards are written with it.
        on_shard: called with each new shard's receipt as soon as the shard is in place.
        check_finite: fail on NaN or Inf in any input or merged tensor.
        device: "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N".
        gpu_memory: bytes of GPU memory for a block's working set (default: 80% of what is free);
            a whole tensor that does not fit (mergekit's sorts) merges on the CPU instead.
        downloads: fetches Hub inputs ahead of the merge and releases them after their last tensor.
    """
    todo = list(plan.shards if todo is None else todo)
    target = resolve_device(device)
    threads = threads or torch.get_num_threads()
    pool = compute_pool(threads)
    by_name = {t.name: t for t in plan.tensors}
    compiled = compiled_kernel(compile)
    budget = device_budget(target, gpu_memory)
    jobs = {t.name: TensorJob(t, plan, reference, finetuned, pool, compiled, target, budget) for t in plan.tensors}
    capacity, count = pool_shape(plan, [j.rows for j in jobs.values()])
    buffers = BufferPool(capacity, count, pinned=target.type == "cuda")
    writer = AsyncWriter(buffers, on_shard, write_memory(plan.max_memory))
    prefetch: Prefetcher | None = None
    finished = False
    current = "the model-wide pass"  # what the device works on, for an out-of-memory message
    restore = None
    if target.type == "cuda":  # pinned buffers, events and the allocator of this GPU, not of GPU 0
        restore = torch.cuda.current_device()
        torch.cuda.set_device(target)
    try:
        if downloads is not None:  # everything first when a model-wide pass reads every tensor before the output
            prelude = list(jobs.values()) if global_pass_needed(list(jobs.values())) else []
            downloads.start([(jobs[n].tp.name, jobs[n].touched) for s in todo for n in s.tensors],
                            [(j.tp.name, j.touched) for j in prelude])
        prepare_global(list(jobs.values()))
        steps = {n: jobs[n].prefetch_steps() for s in todo for n in s.tensors}
        prefetch = Prefetcher([step for n in steps for step in steps[n]], plan.staging_memory)
        futures, k = [], 0  # k: the prefetch step the merge is at

        def step_done(job: TensorJob) -> None:
            nonlocal k
            if job.passthrough:  # its blocks are views of the inputs: released once written
                writer.then(functools.partial(prefetch.done, k))
            else:
                prefetch.done(k)
            k += 1

        for shard in todo:
            entries = [e for n in shard.tensors for e in by_name[n].entries]
            writer.open(out_dir / shard.filename, entries, {"format": "pt"})
            for name in shard.tensors:
                job, current = jobs.pop(name), f"tensor {name!r}"
                by_block = len(steps[name]) > 1  # a step per block, else one for the whole tensor
                prefetch.reached(k)
                prepare_tensor(job)
                for r0, r1 in job.blocks:
                    prefetch.reached(k)
                    block = job.read(r0, r1)
                    if job.passthrough:  # same dtype, not merged: the mapped bytes go straight out
                        if check_finite:
                            _check_finite(job, block, block.base)
                        writer.write(block.base)
                    else:
                        buf = buffers.get(job.out_bytes(block))
                        out, ready = merged(job, block, buf, check_finite)
                        writer.write(out, buf, ready)
                    if progress is not None:
                        progress(block.nbytes)
                    del block
                    if by_block:
                        step_done(job)
                if job.tp.quantized:  # its scales follow the weight
                    writer.write(job.scales)
                if not by_block:
                    step_done(job)
                if downloads is not None:
                    downloads.done(name)
            futures.append(writer.finish())
        new = {r["file"]: r for r in (f.result() for f in futures)}
        finished = True
        return new
    except torch.cuda.OutOfMemoryError:
        now = f" (now {budget >> 20} MiB)" if budget else ""
        raise DeviceError(f"{target} ran out of memory on {current}: lower --gpu-memory{now}, or merge with --device cpu") from None
    finally:
        if restore is not None:
            torch.cuda.set_device(restore)
        if prefetch is not None:
            prefetch.stop()
        if downloads is not None:
            downloads.stop()
        writer.close(cancel=not finished)  # Ctrl-C or an error: no half-written shard stays behind
        if pool is not None:
            pool.shutdown()
