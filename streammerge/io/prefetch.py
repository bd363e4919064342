"""Reads the next tensors' input bytes ahead of the merge, so that reading overlaps computing.

Bytes in the page cache are merged straight from the mapped file, and the kernel is only asked to
keep reading ahead (MADV_WILLNEED, within READAHEAD_BYTES). Bytes on disk are read with O_DIRECT,
in CHUNK requests on READERS threads, into a staging arena of our own within the memory budget, and
merged from there (`Checkpoint.view` finds them); each request starts once no shard write is in
flight (io/disk.py). What is read is given in steps: a row block of a tensor whose blocks the merge
reads once (released as it is merged), else a whole tensor.

Why not the page cache for everything: on a virtual disk, filling it costs the cores as much as
the merge does (benchmarks/io_contention.py on a 2-vCPU VM: buffered reads 0.44 CPU-s per GB, two
busy threads 51 % slower meanwhile; O_DIRECT into huge pages 0.03 CPU-s per GB, 17 % slower, and
faster reads). A cold 7B-shaped merge went from 25-27 s to 15 s.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from streammerge.io import disk, quant
from streammerge.io.memory import direct_memory
from streammerge.io.sources import Checkpoint, TensorInfo

READAHEAD_BYTES = 1 << 30  # page-cache bytes the kernel is asked to keep reading ahead (reclaimable)
ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and memory (the page size covers every disk)
CHUNK = 8 << 20  # bytes per O_DIRECT request: several in flight keep a virtual disk busy
READERS = 8  # reading threads (they wait on the disk, not on a core)
CACHED = 0.5  # a tensor at least this much in the page cache is read from there


class Arena:
    """The staging memory: one mapping of the window's size, faulted in once and then reused (a
    fresh mapping per tensor cost more kernel time in page faults than the page cache it replaces)."""

    def __init__(self, size: int):
        self.memory = direct_memory(max(ALIGN, size))
        self.free = [(0, len(self.memory))]  # (start, size), in address order
        self.cursor = 0

    def take(self, size: int) -> int | None:
        # next fit, from where the last one ended, then from the start: tensors come and go in
        # merge order, so the arena works as a ring and its free space stays in one piece
        for wrapped in (False, True):
            for k, (at, n) in enumerate(self.free):
                start = at if wrapped else max(at, self.cursor)
                if at + n - start >= size:
                    pieces = [(at, start - at)] if start > at else []
                    if at + n > start + size:
                        pieces.append((start + size, at + n - start - size))
                    self.free[k : k + 1] = pieces
                    self.cursor = start + size
                    return start
        return None

    def give(self, at: int, size: int) -> None:
        self.free.append((at, size))
        self.free.sort()
        merged = [self.free[0]]
        for a, n in self.free[1:]:
            if merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((a, n))
        self.free = merged


class Staged:
    """Bytes [lo, hi) of a file, within one stored tensor, read from disk into the arena (the
    aligned range around them)."""

    def __init__(self, info: TensorInfo, lo: int, hi: int, arena: Arena, at: int):
        self.info, self.lo, self.hi, self.arena, self.at = info, lo, hi, arena, at
        self.start, self.size = _span(lo, hi)
        self.pending = -(-self.size // CHUNK)
        self.failed = False
        self.ready = threading.Event()
        self.users = 1  # steps that read it (a tensor read by two outputs is staged once)

    def chunk_done(self, ok: bool) -> None:
        self.failed |= not ok
        self.pending -= 1
        if self.pending == 0:
            self.ready.set()

    def covers(self, offset: int, nbytes: int) -> bool:
        return self.lo <= offset and offset + nbytes <= self.hi

    def rows(self, offset: int, nbytes: int) -> torch.Tensor | None:
        """Bytes [offset, offset + nbytes) of the file (within [lo, hi)) as a tensor of the staged
        memory, once read; None if the read failed (the caller reads the mapped file instead,
        which reports why)."""
        self.ready.wait()
        if self.failed:
            return None
        return torch.frombuffer(self.arena.memory, dtype=torch.uint8, count=nbytes, offset=self.at + offset - self.start)


def cached_fraction(fd: int, offset: int, nbytes: int) -> float | None:
    """The share of a file range's pages in the page cache: Linux's cachestat (6.5+), else
    mincore of the range mapped (no page is touched); None where neither tells.

    Not reads that must not wait (RWF_NOWAIT): a miss starts the kernel's readahead, so the
    probe itself fills the pages it asks about next."""
    if nbytes <= 0 or _libc is None:
        return None
    start = offset - offset % mmap.PAGESIZE
    pages = -(-(offset + nbytes - start) // mmap.PAGESIZE)
    if _cachestat:
        rng = (ctypes.c_uint64 * 2)(offset, nbytes)
        stat = (ctypes.c_uint64 * 5)()
        if _libc.syscall(_CACHESTAT, fd, rng, stat, 0) == 0:
            return min(1.0, stat[0] / pages)
    addr = _libc.mmap(None, pages * mmap.PAGESIZE, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        resident = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(pages * mmap.PAGESIZE), resident) != 0:
            return None
        return int(torch.frombuffer(resident, dtype=torch.uint8).bitwise_and(1).sum()) / pages  # bit 0: resident
    finally:
        _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(pages * mmap.PAGESIZE))


_CACHESTAT = 451  # the same number on every Linux architecture
_cachestat = True  # tried first; the tests turn it off to check mincore
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if _libc is not None:
        _libc.syscall.restype = ctypes.c_long
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int64]
except (OSError, AttributeError):  # pragma: no cover - no C library to call
    _libc = None


class Prefetcher:
    """Runs ahead of the merge, one step after another, over what each step reads: (checkpoint,
    tensor, rows r0..r1 or None for all); stages what is on disk, asks the kernel to read ahead the
    rest. A step is a tensor's row block where the merge reads each block once, else a whole tensor.

    `window` bytes of memory at most hold the staged bytes until their step is `done` (then reused:
    no view of them may outlive it); a range bigger than half of it is read through the page cache.
    The arena takes no more than twice the largest step: the step merging and the next, which keeps
    the reads ahead (plan.py's STAGE_SHARE), and fresh memory is not free: on a VM the first touch of
    600 MB of huge pages took 0.35-5.3 s (a cold TinyLlama dare_ties merge spent 37 % of its CPU
    samples zeroing the arena's pages). The
    merge calls `reached(i)` before reading step i: its bytes are then staged (or being read) or
    left to the mapped files, never both.
    """

    def __init__(self, steps: list[list[tuple[Checkpoint, str, int | None, int | None]]], window: int, *,
                 readahead: int = READAHEAD_BYTES):
        largest = max((_step_bytes(reads) for reads in steps), default=0)
        self.steps, self.window, self.readahead = steps, min(window, 2 * largest), readahead
        self.arena = Arena(self.window)
        self.advised = self.consumed = 0  # page-cache bytes asked for, and those of finished steps
        self.scheduled = 0  # steps whose bytes are all staged or advised
        self.released = 0  # steps done (in order)
        self.held: list[list[tuple[Checkpoint, Staged]]] = [[] for _ in steps]
        self.advised_bytes = [0] * len(steps)
        self.cond = threading.Condition()
        self.stopped = False
        self.direct_fds: dict[Path, int | None] = {}
        self.readers = ThreadPoolExecutor(READERS, thread_name_prefix="streammerge-read")
        self.thread = threading.Thread(target=self._run, name="streammerge-prefetch", daemon=True)
        self.thread.start()

    # ---- the merge's side -----------------------------------------------------------------

    def reached(self, i: int) -> None:
        """Waits until step i's bytes are scheduled (staged, being read, or advised)."""
        with self.cond:
            while self.scheduled <= i and not self.stopped:
                self.cond.wait()

    def done(self, i: int) -> None:
        """Step i is merged: its staged memory goes (once no other step reads it), the window moves on."""
        with self.cond:
            for ckpt, staged in self.held[i]:
                staged.users -= 1
                if staged.users == 0:
                    ckpt.unstage(staged)
                    self.arena.give(staged.at, staged.size)
            self.held[i] = []
            self.released = max(self.released, i + 1)
            self.consumed += self.advised_bytes[i]
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()
        self.readers.shutdown(wait=True, cancel_futures=True)
        for ckpt, staged in (p for held in self.held for p in held):
            if not staged.ready.is_set():  # cancelled chunks: a view of it must not wait forever
                staged.failed = True
                staged.ready.set()
        for fd in self.direct_fds.values():
            if fd is not None:
                os.close(fd)

    # ---- the reading thread ---------------------------------------------------------------

    def _run(self) -> None:
        for i, reads in enumerate(self.steps):
            for ckpt, name, r0, r1 in reads:
                if type(ckpt) is not Checkpoint:  # computed, downloaded or adapter inputs: their own readahead
                    self._advise(i, getattr(ckpt.tensors.get(name), "nbytes", 0), lambda: ckpt.advise(name))
                    continue
                for info, lo, hi in _ranges(ckpt, name, r0, r1):
                    if not self._stage(i, ckpt, info, lo, hi):
                        self._advise(i, hi - lo, lambda: ckpt.advise_range(info.file, lo, hi))
            with self.cond:
                if self.stopped:
                    return
                self.scheduled = i + 1
                self.cond.notify_all()

    def _stage(self, i: int, ckpt: Checkpoint, info: TensorInfo, lo: int, hi: int) -> bool:
        """Stages bytes that are on disk; False to leave them to the page cache."""
        size = _span(lo, hi)[1]
        if hi <= lo or size > self.window // 2:
            return False
        fd = self._direct_fd(info.file)
        if fd is None:
            return False
        with self.cond:  # (under the lock `done` releases with: found, it is not released meanwhile)
            shared = ckpt.staged(info, lo, hi)
            if shared is not None:  # already staged for an earlier step still merging
                shared.users += 1
                self.held[i].append((ckpt, shared))
                return True
        cached = cached_fraction(ckpt.fd(info.file), lo, hi - lo)
        if cached is None or cached >= CACHED:
            return False
        with self.cond:  # room comes as earlier steps finish; then what does not fit takes the page cache
            while (at := self.arena.take(size)) is None and self.released < i and not self.stopped:
                self.cond.wait()
            if at is None:
                return self.stopped
            staged = Staged(info, lo, hi, self.arena, at)
            self.held[i].append((ckpt, staged))
        ckpt.stage(staged)
        for at in range(0, size, CHUNK):
            self.readers.submit(self._read, fd, staged, at, min(CHUNK, size - at))
        return True

    def _read(self, fd: int, staged: Staged, at: int, n: int) -> None:
        ok = False
        try:
            view = memoryview(staged.arena.memory)[staged.at + at : staged.at + at + n]
            done = 0
            disk.before_read()
            while done < n:
                got = os.preadv(fd, [view[done:]], staged.start + at + done)
                if got <= 0:
                    break
                done += got
            # a short read at the file's end is whole if it covers the range's last byte
            ok = staged.start + at + done >= min(staged.start + at + n, staged.hi)
        except OSError:
            pass
        finally:
            staged.chunk_done(ok)

    def _advise(self, i: int, nbytes: int, advise) -> None:
        with self.cond:
            while self.advised - self.consumed > self.readahead and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return
            self.advised += nbytes
            self.advised_bytes[i] += nbytes
        try:
            advise()
        except (OSError, ValueError):  # only a hint
            pass

    def _direct_fd(self, file: Path) -> int | None:
        if file not in self.direct_fds:
            try:
                self.direct_fds[file] = os.open(file, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):  # a filesystem without O_DIRECT (tmpfs), or not Linux
                self.direct_fds[file] = None
        return self.direct_fds[file]


def _step_bytes(reads: list[tuple[Checkpoint, str, int | None, int | None]]) -> int:
    """The aligned bytes a step would stage (its inputs from local files)."""
    return sum(_span(lo, hi)[1] for ckpt, name, r0, r1 in reads if type(ckpt) is Checkpoint
               for _, lo, hi in _ranges(ckpt, name, r0, r1))


def _span(lo: int, hi: int) -> tuple[int, int]:
    """The aligned file range around bytes [lo, hi): (start, size)."""
    start = lo - lo % ALIGN
    return start, -(-hi // ALIGN) * ALIGN - start


def _ranges(ckpt: Checkpoint, name: str, r0: int | None, r1: int | None) -> list[tuple[TensorInfo, int, int]]:
    """The stored bytes behind rows r0..r1 of a tensor (all of it for None): (stored tensor, lo, hi)
    of an FP8 weight and of its scale's rows, or of the tensor itself."""
    info = ckpt.tensors[name]
    if r0 is None:
        parts = [(info.weight, 0, info.weight.rows), (info.scale, 0, info.scale.rows)] if isinstance(info, quant.QuantTensor) \
            else [(info, 0, info.rows)]
    elif isinstance(info, quant.QuantTensor):
        parts = [(info.weight, r0, r1), (info.scale, *quant.scale_rows(info, r0, r1))]
    else:
        parts = [(info, r0, r1)]
    return [(t, t.offset + a * t.row_bytes, t.offset + b * t.row_bytes) for t, a, b in parts]
