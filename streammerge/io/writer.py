"""Writes safetensors shards as a stream: header first, then each tensor's bytes in offset order.

safetensors' own `save_file` needs every tensor in memory at once; a merge produces tensors one row
block at a time, so the layout is written here, by the format's rules: 8-byte little-endian header
length, the JSON header padded with spaces to a multiple of 8, then the data. A shard is written
under a temporary name, hashed as it is written, flushed to disk and only then renamed into place.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from streammerge.errors import OutputError
from streammerge.io import disk
from streammerge.io.memory import direct_memory

STAGE = 8 << 20  # bytes per direct write (at most)
DEPTH = 4  # direct writes in flight: one at a time got 0.5 GB/s on a virtual disk busy with the merge's reads
STAGE_MEMORY = (DEPTH + 1) * STAGE  # the stages: one being filled, DEPTH being written
ALIGN = 4096  # direct I/O offsets and sizes: a multiple of the logical block size (4096 covers every disk)


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """The complete header (length prefix included) for tensors laid out in the given order.

    Args:
        entries: (name, dtype name, shape, nbytes) in the order their bytes will follow.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Streams one shard to `<path>.partial`, renamed to `path` by `finish()`.

    Written with O_DIRECT where the file system takes it: the bytes go from an aligned staging
    buffer to the disk without a copy into the page cache, which on a fast disk costs more CPU than
    the merge's arithmetic (benchmarks/README.md), and the final fsync then has little left to do.
    A direct write waits for the disk, so up to DEPTH of them run on threads of their own while the
    next stage is hashed and filled. Elsewhere (tmpfs, some network file systems) plain buffered writes.

    Example:
        >>> w = ShardWriter(out / "model-00001-of-00001.safetensors", entries)   # doctest: +SKIP
        >>> for block in blocks: w.write(block)                                  # doctest: +SKIP
        >>> sha256 = w.finish()                                                  # doctest: +SKIP
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str],
                 memory: int = STAGE_MEMORY):
        """`memory`: bytes for the direct-write stages (a small budget gets smaller stages)."""
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self.expected = sum(e[3] for e in entries)
        self.written = 0  # tensor data bytes so far
        header = safetensors_header(entries, metadata)
        self.file_size = len(header) + self.expected
        self._sha = hashlib.sha256()
        self._stage: mmap.mmap | None = None  # O_DIRECT: page-aligned bytes waiting for a full stage
        self._free: list[mmap.mmap] = []  # stages to fill next
        self._pending: collections.deque[tuple[Future, mmap.mmap]] = collections.deque()  # direct writes, oldest first
        self._io: ThreadPoolExecutor | None = None
        self._fill = 0
        self._offset = 0  # where the bytes written next (the stage's, when direct) go in the file
        self._stage_bytes = max(ALIGN, min(STAGE, memory // (DEPTH + 1)) // ALIGN * ALIGN)
        self._fd = -1
        try:
            self._fd = self._open()
        except OSError as e:
            raise OutputError(f"{self.tmp}: cannot create: {e.strerror or e}") from None
        self._write(header)

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        if direct and self.file_size >= self._stage_bytes and not os.environ.get("STREAMMERGE_BUFFERED_WRITES"):
            stages = [direct_memory(self._stage_bytes) for _ in range(DEPTH + 1)]  # before the file: nothing to undo if these fail
            try:
                fd = os.open(self.tmp, flags | direct, 0o644)
            except OSError as e:
                for stage in stages:
                    stage.close()
                if e.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                    raise
            else:
                self._stage, self._free = stages[0], stages[1:]
                self._io = ThreadPoolExecutor(DEPTH, thread_name_prefix="streammerge-direct-io")
                return fd
        return os.open(self.tmp, flags, 0o644)

    def _write(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        try:
            data = memoryview(data)
            while len(data):
                if self._stage is None:  # buffered writes (no direct I/O here)
                    self._write_at(data, self._offset)
                    self._offset += len(data)
                    return
                n = min(len(data), self._stage_bytes - self._fill)
                self._stage[self._fill : self._fill + n] = data[:n]
                self._fill += n
                data = data[n:]
                if self._fill == self._stage_bytes:  # written behind, at its place in the file
                    if not self._free:
                        self._wait_oldest()
                    self._pending.append((self._io.submit(self._write_behind, self._stage, self._offset), self._stage))
                    self._stage, self._fill = self._free.pop(), 0
                    self._offset += self._stage_bytes
        except OSError as e:
            _drop_views(e)
            self.abort()
            raise OutputError(f"{self.path}: write failed: {e.strerror or e} (disk full?)") from None

    def _write_behind(self, data, offset: int) -> None:
        with disk.writing():
            self._write_at(data, offset)

    def _write_at(self, data, offset: int) -> None:
        data = memoryview(data)
        while len(data):
            try:
                n = os.pwrite(self._fd, data, offset)
            except OSError as e:  # a file system that opens with O_DIRECT but refuses the write: buffered
                if e.errno != errno.EINVAL or not self._direct():
                    raise
                self._buffered()
                continue
            if 0 < n < len(data):  # a short direct write leaves the rest unaligned: buffered from here on
                self._buffered()
            data, offset = data[n:], offset + n

    def _wait_oldest(self) -> None:
        """Waits for the oldest direct write (raising its error); its stage is free again."""
        done, stage = self._pending.popleft()
        try:
            done.result()
        finally:
            self._free.append(stage)

    def _direct(self) -> bool:
        return bool(fcntl.fcntl(self._fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    def _buffered(self) -> None:
        """Turns off O_DIRECT for the rest of the file (the unaligned tail, or after a short write)."""
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def _close_stages(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)  # (after an error too: no write may land once the file is gone)
            self._io = None
        stages = [self._stage, *self._free]
        while self._pending:
            done, stage = self._pending.popleft()
            stages.append(stage)
            if done.exception() is not None:  # a write behind failed, uncollected:
                _drop_views(done.exception())  # its frames' views would keep the stage from closing
        for stage in stages:
            if stage is not None:
                stage.close()
        self._stage, self._free = None, []

    def write(self, tensor: torch.Tensor) -> None:
        """Appends the bytes of a contiguous CPU tensor (a whole tensor or its next row block)."""
        data = memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")
        self.written += len(data)
        self._write(data)

    def finish(self) -> str:
        """Flushes to disk, renames into place and returns the shard's sha256 (hex)."""
        if self.written != self.expected:
            self.abort()
            raise OutputError(f"{self.path}: internal error, wrote {self.written} of {self.expected} data bytes")
        try:
            if self._stage is not None:
                while self._pending:
                    self._wait_oldest()
                aligned = self._fill - self._fill % ALIGN
                with memoryview(self._stage) as stage, disk.writing():
                    self._write_at(stage[:aligned], self._offset)
                    self._buffered()
                    self._write_at(stage[aligned : self._fill], self._offset + aligned)
                self._close_stages()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.path)
        except OSError as e:
            _drop_views(e)
            self.abort()
            raise OutputError(f"{self.path}: cannot finish: {e.strerror or e} (disk full?)") from None
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Closes and deletes the partial file; the shard never appears under its final name. Never
        raises: it runs while an error (often a full disk) is already on its way."""
        self._close_stages()
        try:
            if self._fd >= 0:
                os.close(self._fd)
        except OSError:
            pass
        self._fd = -1
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _drop_views(error: BaseException) -> None:
    """Clears the finished frames of a failed write: their locals (views of a staging buffer) would
    keep the buffer from closing for as long as the error lives."""
    traceback.clear_frames(error.__traceback__)


def write_json_atomic(path: Path, obj: object) -> None:
    """Writes JSON to a temporary name, flushes and renames it, so readers see all of it or nothing."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def copy_file_atomic(src: Path, dst: Path) -> None:
    write_bytes_atomic(dst, src.read_bytes())  # side files: configs and tokenizers, a few MB at most


def write_bytes_atomic(path: Path, data: bytes) -> None:
    # A name of our own: workers of a split merge may write the same (identical) file at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = " (disk full?)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OutputError(f"{path}: cannot write: {e.strerror or e}{full}") from None


def fsync_dir(path: Path) -> None:
    """Makes the renames inside a folder durable (a rename lives in the folder's own metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> tuple[int, str]:
    """Reads a whole file: its size and sha256 (hex). Raises OSError."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
