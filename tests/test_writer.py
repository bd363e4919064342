"""The shard writer's direct I/O: the bytes on disk are the safetensors layout whatever path wrote them."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

import streammerge.errors
import streammerge.io.writer
from streammerge.io.writer import STAGE, ShardWriter


def _write_shard(path, pieces: int = 7) -> dict[str, torch.Tensor]:
    """A shard just over two staging buffers, written in uneven blocks, with an unaligned tail."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(STAGE // 4 + 1001, generator=g), "b": torch.randn(3, STAGE // 8 + 7, generator=g).bfloat16()}
    entries = [(n, "F32" if t.dtype == torch.float32 else "BF16", tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()]
    w = ShardWriter(path, entries, {"format": "pt"})
    for t in tensors.values():
        flat = t.reshape(-1)
        step = -(-flat.numel() // pieces)
        for i in range(0, flat.numel(), step):
            w.write(flat[i : i + step])
    digest = w.finish()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not path.with_name(path.name + ".partial").exists()
    return tensors


def _check(path, tensors) -> None:
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_a_big_shard_is_written_with_direct_io(tmp_path, monkeypatch):
    opened = []
    real = os.open
    monkeypatch.setattr(streammerge.io.writer.os, "open", lambda p, flags, mode=0o777: opened.append(flags) or real(p, flags, mode))
    tensors = _write_shard(tmp_path / "s.safetensors")
    if not any(f & os.O_DIRECT for f in opened):
        pytest.skip("this file system refuses O_DIRECT (the buffered path is what ran)")
    _check(tmp_path / "s.safetensors", tensors)


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, mode)

    monkeypatch.setattr(streammerge.io.writer.os, "open", no_direct)
    _check(tmp_path / "s.safetensors", _write_shard(tmp_path / "s.safetensors"))


def test_a_short_direct_write_goes_on_buffered(tmp_path, monkeypatch):
    real = os.pwrite
    calls = []

    def short(fd, data, offset):
        calls.append(len(data))
        return real(fd, memoryview(data)[: 3 * 4096] if len(calls) == 2 else data, offset)  # the second write stops short

    monkeypatch.setattr(streammerge.io.writer.os, "pwrite", short)
    _check(tmp_path / "s.safetensors", _write_shard(tmp_path / "s.safetensors"))
    assert len(calls) > 3


def test_a_direct_write_refused_goes_on_buffered(tmp_path, monkeypatch):
    # Some file systems open with O_DIRECT and then refuse the writes (EINVAL): buffered from there.
    import fcntl

    real = os.pwrite
    refused = []

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(streammerge.io.writer.os, "pwrite", refuse_direct)
    _check(tmp_path / "s.safetensors", _write_shard(tmp_path / "s.safetensors"))
    if not refused:
        pytest.skip("this file system refuses O_DIRECT at open (the buffered path is what ran)")


def _disk_full_at(monkeypatch, nth: int) -> list[int]:
    """The writer's nth os.pwrite fails with ENOSPC; returns the sizes of the writes tried."""
    real, calls = os.pwrite, []

    def full(fd, data, offset):
        calls.append(len(data))
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(streammerge.io.writer.os, "pwrite", full)
    return calls


def test_a_direct_write_failing_behind_is_one_error_and_leaves_no_file(tmp_path, monkeypatch):
    # Full stages are written on a thread of their own: its error comes back at the next write or
    # at finish, as the one-line OutputError, and the partial file is gone.
    _disk_full_at(monkeypatch, 2)
    path = tmp_path / "s.safetensors"
    with pytest.raises(streammerge.errors.OutputError, match="disk full"):
        _write_shard(path)
    assert not path.exists() and not path.with_name(path.name + ".partial").exists()


def test_an_abort_after_a_write_failing_behind_closes_and_removes_the_file(tmp_path, monkeypatch):
    # Another error first (Ctrl-C, a failing input): the failed write behind was never collected,
    # and its views of a stage must not keep abort() from closing it and deleting the partial file.
    calls = _disk_full_at(monkeypatch, 1)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("a", "F32", (STAGE // 2,), STAGE * 2)], {"format": "pt"})
    w.write(torch.zeros(STAGE // 4 + 1))  # one full stage goes behind, and fails there
    if w._io is not None:
        w._io.shutdown(wait=True)  # (the write behind has failed by now)
    if not calls:
        pytest.skip("no direct I/O on this file system")
    w.abort()
    assert not path.exists() and not path.with_name(path.name + ".partial").exists()


def test_reads_wait_for_the_writes_in_flight():
    # mq-deadline serves queued reads first: a shard write waited behind the prefetch's reads while
    # the merge waited for the writer. Reads that start during a write wait for it instead.
    import threading

    from streammerge.io import disk

    release, read = threading.Event(), threading.Event()

    def write() -> None:
        with disk.writing():
            release.wait(5)

    writer = threading.Thread(target=write)
    writer.start()
    while not disk._writes:
        pass
    reader = threading.Thread(target=lambda: (disk.before_read(), read.set()))
    reader.start()
    assert not read.wait(0.2)  # held while the write is in flight
    release.set()
    assert read.wait(5)
    writer.join()
    reader.join()
    disk.before_read()  # nothing in flight: no wait


def test_direct_writes_behind_take_the_disk_from_reads(tmp_path, monkeypatch):
    from streammerge.io import disk

    during, real = [], os.pwrite
    monkeypatch.setattr(streammerge.io.writer.os, "pwrite", lambda fd, data, at: during.append(disk._writes) or real(fd, data, at))
    opened, real_open = [], os.open
    monkeypatch.setattr(streammerge.io.writer.os, "open", lambda p, flags, mode=0o777: opened.append(flags) or real_open(p, flags, mode))
    _check(tmp_path / "s.safetensors", _write_shard(tmp_path / "s.safetensors"))
    if not any(f & os.O_DIRECT for f in opened):
        pytest.skip("this file system refuses O_DIRECT (the buffered path is what ran)")
    assert during == [1, 1, 1]  # the full stage, written behind; finish()'s aligned rest and unaligned tail
    assert disk._writes == 0
