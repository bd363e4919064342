"""Benchmark: what reading the inputs costs the cores a merge computes on (why io/prefetch.py reads
files on disk with O_DIRECT rather than through the page cache).

    python benchmarks/io_contention.py --data /data/bench-7b12     # base/, ft1/, ft2/ as run.py makes them

For each way of reading every input file once from a cold page cache (buffered reads, the way the
page cache fills a mapped file; O_DIRECT into 4 KiB pages; O_DIRECT into huge pages, as the
prefetcher's staging memory), reports:
  - alone: the read's throughput and the CPU time the kernel charged to it;
  - under load: the read's throughput while two processes spin on the cores (as a merge's compute
    threads do), and how much slower those spinners ran meanwhile than on an idle machine.
"""

from __future__ import annotations

import argparse
import mmap
import os
import queue
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Event, Process, Queue
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import evict, input_files  # noqa: E402

STEP = 8 << 20
SPIN_S = 6.0


def _spin(q: Queue, stop, seconds: float) -> None:
    n, start = 0, time.perf_counter()
    while not stop.is_set() and time.perf_counter() - start < seconds:
        for _ in range(100_000):
            n += 1
    q.put(n / (time.perf_counter() - start))


def spinners(seconds: float = SPIN_S):
    """Two processes spinning side by side, until `stop` is set or `seconds` pass; (stop, rate()),
    rate() being their millions of loop steps per second once they end."""
    q: Queue = Queue()
    stop = Event()
    procs = [Process(target=_spin, args=(q, stop, seconds)) for _ in range(2)]
    for p in procs:
        p.start()

    def rate() -> float:
        for p in procs:
            p.join()
        return sum(q.get() for _ in procs) / 1e6

    return stop, rate


def read_files(files: list[Path], mode: str, threads: int = 8) -> int:
    """Reads every file once in STEP pieces on `threads` threads; returns the bytes read."""
    tasks = [(f, off) for f in files for off in range(0, f.stat().st_size, STEP)]
    free: queue.Queue = queue.Queue()
    for _ in range(threads):
        if mode == "buffered":
            free.put(bytearray(STEP))
        else:
            buf = mmap.mmap(-1, STEP, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if mode == "direct-huge":
                buf.madvise(mmap.MADV_HUGEPAGE)
            free.put(buf)
    flags = os.O_RDONLY | (0 if mode == "buffered" else os.O_DIRECT)

    def one(task: tuple[Path, int]) -> int:
        path, off = task
        buf = free.get()
        fd = os.open(path, flags)
        try:
            return os.preadv(fd, [buf], off)
        finally:
            os.close(fd)
            free.put(buf)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, tasks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    args = ap.parse_args()
    files = input_files(args.data)
    idle = spinners()[1]()
    print(f"two spinners on an idle machine: {idle:.1f} M steps/s")
    print("\n| reads | alone (GB/s) | kernel CPU s per GB | under load (GB/s) | spinners slowed by |\n|---|---|---|---|---|")
    for mode in ("buffered", "direct-4k", "direct-huge"):
        evict(files)
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        n = read_files(files, mode)
        alone_s = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_stime - r0.ru_stime) + (r1.ru_utime - r0.ru_utime)
        evict(files)
        stop, rate = spinners(seconds=3600)  # for as long as the read takes
        time.sleep(0.2)
        t = time.perf_counter()
        n_loaded = read_files(files, mode)
        loaded_s = time.perf_counter() - t
        stop.set()
        loaded = rate()
        print(f"| {mode} | {n / 1e9 / alone_s:.2f} | {cpu / (n / 1e9):.2f} | {n_loaded / 1e9 / loaded_s:.2f} | "
              f"{100 * (1 - loaded / idle):.0f} % |", flush=True)


if __name__ == "__main__":
    main()
