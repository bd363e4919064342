"""Reads the next tensors' input bytes ahead of the merge, so that reading overlaps computing.

A tensor whose bytes are in the page cache is merged straight from the mapped file, and the kernel
is only asked to keep reading ahead (MADV_WILLNEED, within READAHEAD_BYTES). A tensor whose bytes
are on disk is read with O_DIRECT, in aligned chunks on a few threads, into memory of our own,
staged within a window of the memory budget, and merged from there (`Checkpoint.view` finds it).

Why not the page cache for everything: on a virtual disk, filling the page cache costs the guest's
cores as much as the merge does. Measured on a 2-core VM reading 16.1 GB side by side: buffered
reads took 7.2 s of kernel time, and two busy threads ran 58 % slower while they went on; O_DIRECT
reads took 0.8 s, and the busy threads ran at full speed. A cold merge through the page cache took
about its warm time plus the read time; staged, it takes about the longer of the two.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from streammerge.io import quant
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
        # page-aligned, as O_DIRECT needs; private, so it counts as the process's anonymous memory
        # and may take huge pages: a request is then a few contiguous segments, not one per 4 KiB
        # page, and a virtual disk serves a deep queue of them (2.3-2.6 GB/s against 1.3 here)
        self.memory = mmap.mmap(-1, max(ALIGN, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            self.memory.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # only a hint
            pass
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
    """One tensor's bytes read from disk into the arena: the aligned file range around them."""

    def __init__(self, info: TensorInfo, arena: Arena, at: int):
        self.info, self.arena, self.at = info, arena, at
        self.start, self.size = _span(info)
        self.pending = -(-self.size // CHUNK)
        self.failed = False
        self.ready = threading.Event()
        self.users = 1  # jobs that read it (a tensor read by two outputs is staged once)

    def chunk_done(self, ok: bool) -> None:
        self.failed |= not ok
        self.pending -= 1
        if self.pending == 0:
            self.ready.set()

    def rows(self, offset: int, nbytes: int) -> torch.Tensor | None:
        """Bytes [offset, offset + nbytes) of the file as a tensor of the staged memory, once read;
        None if the read failed (the caller reads the mapped file instead, which reports why)."""
        self.ready.wait()
        if self.failed:
            return None
        return torch.frombuffer(self.arena.memory, dtype=torch.uint8, count=nbytes, offset=self.at + offset - self.start)


def cached_fraction(fd: int, offset: int, nbytes: int) -> float | None:
    """The share of a file range in the page cache (Linux's cachestat, 6.5+); None where unknown."""
    if _libc is None or nbytes <= 0:
        return None
    rng = (ctypes.c_uint64 * 2)(offset, nbytes)
    stat = (ctypes.c_uint64 * 5)()
    if _libc.syscall(_CACHESTAT, fd, rng, stat, 0) != 0:
        return None
    pages = -(-(offset % mmap.PAGESIZE + nbytes) // mmap.PAGESIZE)
    return min(1.0, stat[0] / pages)


_CACHESTAT = 451  # the same number on every Linux architecture
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _libc = None


class Prefetcher:
    """Runs ahead of the merge, one job (output tensor) after another, over the (checkpoint,
    tensor) pairs each job reads: stages those on disk, asks the kernel to read ahead the others.

    `window` bytes of memory hold the staged tensors until their job is `done` (then reused: no
    view of them may outlive it); a tensor bigger than half of it is read through the page cache.
    The merge calls `reached(i)` before reading job i: its tensors are then staged (or being read)
    or left to the mapped files, never both.
    """

    def __init__(self, jobs: list[list[tuple[Checkpoint, str]]], window: int, *, readahead: int = READAHEAD_BYTES):
        self.jobs, self.window, self.readahead = jobs, window, readahead
        self.arena = Arena(window)
        self.advised = self.consumed = 0  # page-cache bytes asked for, and those of finished jobs
        self.scheduled = 0  # jobs whose tensors are all staged or advised
        self.released = 0  # jobs done (in order)
        self.held: list[list[tuple[Checkpoint, Staged]]] = [[] for _ in jobs]
        self.advised_bytes = [0] * len(jobs)
        self.cond = threading.Condition()
        self.stopped = False
        self.direct_fds: dict[Path, int | None] = {}
        self.readers = ThreadPoolExecutor(READERS, thread_name_prefix="streammerge-read")
        self.thread = threading.Thread(target=self._run, name="streammerge-prefetch", daemon=True)
        self.thread.start()

    # ---- the merge's side -----------------------------------------------------------------

    def reached(self, i: int) -> None:
        """Waits until job i's tensors are scheduled (staged, being read, or advised)."""
        with self.cond:
            while self.scheduled <= i and not self.stopped:
                self.cond.wait()

    def done(self, i: int) -> None:
        """Job i is merged: its staged memory goes (once no other job reads it), the window moves on."""
        with self.cond:
            for ckpt, staged in self.held[i]:
                staged.users -= 1
                if staged.users == 0:
                    ckpt.unstage(staged.info)
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
        for i, pairs in enumerate(self.jobs):
            for ckpt, name in pairs:
                if type(ckpt) is not Checkpoint:  # computed, downloaded or adapter inputs: their own readahead
                    self._advise(i, getattr(ckpt.tensors.get(name), "nbytes", 0), lambda: ckpt.advise(name))
                    continue
                for info in _parts(ckpt, name):
                    if not self._stage(i, ckpt, info):
                        self._advise(i, info.nbytes, lambda: ckpt.advise_part(info))
            with self.cond:
                if self.stopped:
                    return
                self.scheduled = i + 1
                self.cond.notify_all()

    def _stage(self, i: int, ckpt: Checkpoint, info: TensorInfo) -> bool:
        """Stages a tensor that is on disk; False to leave it to the page cache."""
        start, size = _span(info)
        if info.nbytes == 0 or size > self.window // 2:
            return False
        fd = self._direct_fd(info.file)
        if fd is None:
            return False
        shared = ckpt.staged(info)
        if shared is not None:  # already staged for an earlier job still merging
            with self.cond:
                shared.users += 1
                self.held[i].append((ckpt, shared))
            return True
        cached = cached_fraction(fd, info.offset, info.nbytes)
        if cached is None or cached >= CACHED:
            return False
        with self.cond:  # room comes as earlier jobs finish; then what does not fit takes the page cache
            while (at := self.arena.take(size)) is None and self.released < i and not self.stopped:
                self.cond.wait()
            if at is None:
                return self.stopped
            staged = Staged(info, self.arena, at)
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
            while done < n:
                got = os.preadv(fd, [view[done:]], staged.start + at + done)
                if got <= 0:
                    break
                done += got
            # a short read at the file's end is whole if it covers the tensor's last byte
            ok = staged.start + at + done >= min(staged.start + at + n, staged.info.offset + staged.info.nbytes)
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


def _span(info: TensorInfo) -> tuple[int, int]:
    """The aligned file range around a tensor's bytes: (start, size)."""
    start = info.offset - info.offset % ALIGN
    return start, -(-(info.offset + info.nbytes) // ALIGN) * ALIGN - start


def _parts(ckpt: Checkpoint, name: str) -> list[TensorInfo]:
    """The stored tensors behind a name: an FP8 weight and its scale, or the tensor itself."""
    info = ckpt.tensors[name]
    if isinstance(info, quant.QuantTensor):
        return [info.weight, info.scale]
    return [info]
