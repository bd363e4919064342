"""Where a merge's time goes: wall seconds in each stage of the engine, on its two busy threads.

    python benchmarks/stages.py merge CONFIG OUT --force -q --max-memory 1GiB     # any `streammerge` command line

Runs the command in this process with the engine's stage functions wrapped by timers, then prints
the seconds spent in each: on the main thread, waiting for staged reads (`TensorJob.read`), for an
output buffer the writer has not given back (`BufferPool.get`), merging (the backends' `merge`, or
merging and quantizing FP8 in one pass), quantizing; on the writer's thread, hashing and copying
into the direct-write stages (`ShardWriter._write`, which includes its waits), and waiting for the
disk. Set STREAMMERGE_NO_SUPERVISOR=1 so that the merge runs in this process. Drop the page cache
of the inputs first for a cold merge (run.py's `evict`).
"""

from __future__ import annotations

import collections
import functools
import sys
import time

from streammerge.front.cli import run
from streammerge.io import writer
from streammerge.pipeline import engine, passes

SPENT: collections.defaultdict[str, float] = collections.defaultdict(float)


def timed_function(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t

    return wrapper


def timed(owner: type, name: str, label: str) -> None:
    setattr(owner, name, timed_function(getattr(owner, name), label))


def main() -> None:
    engine.prepare_tensor = timed_function(engine.prepare_tensor, "main: whole-tensor passes before the merge (prepare_tensor: trims, L1 factors)")
    timed(engine.TensorJob, "read", "main: waiting for staged reads (TensorJob.read)")
    timed(engine.BufferPool, "get", "main: waiting for an output buffer (BufferPool.get)")
    timed(engine.Prefetcher, "reached", "main: waiting for the prefetch to schedule (Prefetcher.reached)")
    timed(engine.TensorJob, "merge_quantized", "main: merging and quantizing FP8 in one pass")
    timed(engine.TensorJob, "quantize", "main: quantizing FP8 (after a merge)")
    for backend in (passes.NumpyBackend, passes.TorchBackend, passes.HooksBackend):
        timed(backend, "merge", f"main: merging ({backend.__name__})")
    timed(writer.ShardWriter, "_write", "writer: hashing and copying into stages, with its waits (ShardWriter._write)")
    timed(writer.ShardWriter, "_wait_oldest", "writer: waiting for a direct write")
    timed(writer.ShardWriter, "finish", "writer: fsync and rename (ShardWriter.finish)")
    sys.argv = ["streammerge", *sys.argv[1:]]
    t = time.perf_counter()
    try:
        run()
    except SystemExit as e:
        if e.code:
            raise
    print(f"{time.perf_counter() - t:7.2f} s  the whole command")
    for label, seconds in sorted(SPENT.items()):
        print(f"{seconds:7.2f} s  {label}")


if __name__ == "__main__":
    main()
