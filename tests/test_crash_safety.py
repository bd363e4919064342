"""Crash safety and hostile conditions, second round (issue 18): a killed --force, finalize hashing
what it certifies, a lock on the output folder, disk full anywhere, inputs changed during a merge."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import shard_hashes

import streammerge
import streammerge.front.api
from streammerge import MergeConfig, merge
from streammerge.constants import MANIFEST, SAFETENSORS_INDEX, STATE_DIR
from streammerge.front.demo import build_demo_models
from streammerge.io.verify import verify

SHARD = 60_000  # bytes: four shards of the demo models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    build_demo_models(root)
    (root / "a.yaml").write_text("merge_method: ties\nbase_model: base\nmodels:\n"
                                 "  - {model: ft1, parameters: {weight: 0.5, density: 0.5}}\n"
                                 "  - {model: ft2, parameters: {weight: 0.5, density: 0.3}}\n")
    (root / "b.yaml").write_text("merge_method: dare_ties\nbase_model: base\nseed: 3\nmodels:\n"
                                 "  - {model: ft1, parameters: {weight: 0.6, density: 0.5}}\n"
                                 "  - {model: ft2, parameters: {weight: 0.4, density: 0.5}}\n")
    return root


@pytest.fixture(scope="module")
def fresh_b(models, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("fresh") / "b"
    merge(MergeConfig.from_yaml(models / "b.yaml"), out, max_shard_size=SHARD)
    return shard_hashes(out, "*")


def cli(*args: object, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True, **kwargs)


class Killed(BaseException):
    """A kill, as far as the folder is concerned: nothing after it runs (not even cleanup that catches Exception)."""


# ---- 1. a killed --force ------------------------------------------------------------------------


def test_force_killed_at_any_deletion_is_accepted_by_a_rerun_and_by_force(models, fresh_b, tmp_path, monkeypatch):
    """Kills `merge --force` (over a finished merge of another config) at its k-th file deletion while
    it replaces the old merge, for every k; the folder left behind must be accepted by a plain rerun
    (even k, once A no longer looks complete) or by --force (odd k), and give B's bytes."""
    a, b = MergeConfig.from_yaml(models / "a.yaml"), MergeConfig.from_yaml(models / "b.yaml")
    real_unlink, real_rmtree, real_prepare = pathlib.Path.unlink, streammerge.front.api.shutil.rmtree, streammerge.front.api._prepare_output
    calls: list[int] = []
    kill_at = [0]

    def counted(real):
        def fn(*args, **kwargs):
            if calls:  # inside _prepare_output
                calls.append(1)
                if len(calls) == kill_at[0] + 1:
                    raise Killed
            return real(*args, **kwargs)
        return fn

    def prepare(*args, **kwargs):
        calls.append(0)
        try:
            return real_prepare(*args, **kwargs)
        finally:
            calls.clear()

    merge(a, tmp_path / "a", max_shard_size=SHARD)
    for k in range(1, 40):
        out = tmp_path / f"out{k}"
        shutil.copytree(tmp_path / "a", out)
        kill_at[0] = k
        with monkeypatch.context() as m:
            m.setattr(pathlib.Path, "unlink", counted(real_unlink))
            m.setattr(streammerge.front.api.shutil, "rmtree", counted(real_rmtree))
            m.setattr(streammerge.front.api, "_prepare_output", prepare)
            try:
                merge(b, out, max_shard_size=SHARD, force=True)
                killed = False
            except Killed:
                killed = True
        if killed:  # must not refuse the folder (a plain rerun refuses A while A is still complete, rightly)
            merge(b, out, max_shard_size=SHARD, force=k % 2 == 1 or (out / SAFETENSORS_INDEX).exists())
        assert shard_hashes(out, "*") == fresh_b, k
        if not killed:  # k is past the last deletion: every point was covered
            break
    assert k > 5


def test_force_sigkilled_as_the_old_merge_disappears_then_rerun(models, fresh_b, tmp_path):
    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        merge(MergeConfig.from_yaml(models / "a.yaml"), out, max_shard_size=SHARD)
        old = set(out.glob("model-*.safetensors")) | {out / MANIFEST}
        proc = subprocess.Popen([sys.executable, "-m", "streammerge", "merge", str(models / "b.yaml"), str(out), "-q",
                                 "--max-shard-size", "60KB", "--force"], stderr=subprocess.PIPE)
        while proc.poll() is None and all(p.exists() for p in old):
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / SAFETENSORS_INDEX).exists():
            break
    rerun = cli("merge", models / "b.yaml", out, "-q", "--max-shard-size", "60KB")
    assert rerun.returncode == 0, rerun.stderr
    assert shard_hashes(out, "*") == fresh_b and verify(out).ok


# ---- 2. finalize hashes what it certifies ---------------------------------------------------------


def test_finalize_refuses_a_shard_that_differs_from_its_workers_sha256(models, fresh_b, tmp_path):
    out = tmp_path / "out"
    b = MergeConfig.from_yaml(models / "b.yaml")
    for rank in (0, 1):
        merge(b, out, max_shard_size=SHARD, rank=rank, world_size=2)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01  # one bit of tensor data: the size stays
    victim.write_bytes(bytes(data))
    done = cli("finalize", out)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    owner = next(r for r in (0, 1) if victim.name in [s.filename for s in
                 streammerge.front.api.worker_shards(streammerge.front.api.plan(b, max_shard_size=SHARD), r, 2)])
    assert victim.name in done.stderr and f"--rank {owner} --world-size 2" in done.stderr and "rerun" in done.stderr
    assert not (out / SAFETENSORS_INDEX).exists() and not (out / MANIFEST).exists()
    # rerunning that worker rewrites the shard; then finalize completes the merge with B's bytes
    assert merge(b, out, max_shard_size=SHARD, rank=owner, world_size=2).reused_shards >= 1
    assert cli("finalize", out).returncode == 0
    assert shard_hashes(out, "*") == fresh_b and verify(out).ok


# ---- 6. one merge at a time in a folder -------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from streammerge.front.api import _folder_lock
with _folder_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(out: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_merge_into_the_same_folder_fails_naming_the_first(models, fresh_b, tmp_path):
    out = tmp_path / "out"
    first = _holder(out, "exclusive")  # a merge writing there: it holds the folder's lock, a shard half written
    (out / "model-00001-of-00004.safetensors.partial").write_bytes(b"half")
    try:
        second = cli("merge", models / "b.yaml", out, "--max-shard-size", "60KB")
        assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"another merge (pid {first.pid} on " in second.stderr and "is writing there" in second.stderr
        with pytest.raises(streammerge.OutputError, match="another merge"):  # --force does not break in either
            merge(MergeConfig.from_yaml(models / "a.yaml"), out, max_shard_size=SHARD, force=True)
        assert (out / "model-00001-of-00004.safetensors.partial").read_bytes() == b"half"  # the first one's file is left alone
    finally:
        first.kill()
        first.wait()
    merge(MergeConfig.from_yaml(models / "b.yaml"), out, max_shard_size=SHARD)
    assert shard_hashes(out, "*") == fresh_b and verify(out).ok


def test_workers_share_the_folder_but_not_a_rank_and_finalize_waits_for_them(models, tmp_path):
    out = tmp_path / "out"
    b = MergeConfig.from_yaml(models / "b.yaml")
    worker = _holder(out, "rank-1-of-2")
    try:
        merge(b, out, max_shard_size=SHARD, rank=0, world_size=2)  # another rank: fine
        with pytest.raises(streammerge.OutputError, match=rf"another merge \(pid {worker.pid} on .*\) is writing there"):
            merge(b, out, max_shard_size=SHARD, rank=1, world_size=2)
        with pytest.raises(streammerge.OutputError, match="another merge"):
            streammerge.front.api.finalize(out)
        with pytest.raises(streammerge.OutputError, match="another merge"):
            merge(b, out, max_shard_size=SHARD)
    finally:
        worker.kill()
        worker.wait()
    # the holder died: its lock is gone with it
    merge(b, out, max_shard_size=SHARD, rank=1, world_size=2)
    assert streammerge.front.api.finalize(out).shards and verify(out).ok


def test_a_lock_left_by_a_killed_merge_does_not_block(models, fresh_b, tmp_path):
    out = tmp_path / "out"
    holder = _holder(out, "exclusive")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert "pid" in (out / STATE_DIR / "lock").read_text()
    merge(MergeConfig.from_yaml(models / "b.yaml"), out, max_shard_size=SHARD)
    assert shard_hashes(out, "*") == fresh_b


# ---- 7. a full disk anywhere is the clean disk-full error ---------------------------------------------


class Disk:
    """A disk with `free` bytes left, for the files streammerge.io.writer writes. Shards go through
    os.open and os.write/os.pwrite (direct or plain): a write past the end fails with ENOSPC, after writing what fits,
    as the kernel does. Side files go through open(): buffered (8 KiB, as Python's BufferedWriter), a
    flush past the end fails, also in close(). fsync fails once the disk is full (NFS reports ENOSPC there)."""

    def __init__(self, free: int | None):
        self.free, self.used = free, 0
        self.fds: set[int] = set()
        self.lock = threading.Lock()

    def full(self, more: int = 0) -> bool:
        return self.free is not None and self.used + more > self.free

    def take(self, fd: int, data):
        """What of `data` fits on the disk (ENOSPC when nothing does)."""
        with self.lock:  # the writer's direct writes run on threads
            if fd in self.fds and self.full(len(data)):
                room = max(0, self.free - self.used)
                if room == 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                data = memoryview(data)[:room]
            if fd in self.fds:
                self.used += len(data)
            return data

    def patch(self, monkeypatch, module) -> None:
        real_open, real_write, real_pwrite, real_fsync, real_close = os.open, os.write, os.pwrite, os.fsync, os.close
        disk = self

        class FakeOs:  # the writer's os, with the shard files on this disk
            def __getattr__(self, name):
                return getattr(os, name)

            def open(self, path, flags, mode=0o777):
                fd = real_open(path, flags, mode)
                if flags & os.O_WRONLY:
                    disk.fds.add(fd)
                return fd

            def write(self, fd, data):
                return real_write(fd, disk.take(fd, data))

            def pwrite(self, fd, data, offset):
                return real_pwrite(fd, disk.take(fd, data), offset)

            def fsync(self, fd):
                if disk.full(1) and (fd in disk.fds or disk.used >= disk.free):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_fsync(fd)

            def close(self, fd):
                disk.fds.discard(fd)
                return real_close(fd)

        monkeypatch.setattr(module, "os", FakeOs())
        monkeypatch.setattr(module, "open", self.open, raising=False)

    def open(self, path, mode="r", *args, **kwargs):
        if "w" not in mode:
            return open(path, mode, *args, **kwargs)
        disk, real = self, open(path, mode, *args, **kwargs)

        class File:
            pending = bytearray()

            def write(self, data):
                self.pending += bytes(data)
                if len(self.pending) >= 8192:
                    self.flush()
                return len(data)

            def flush(self):
                if disk.full(len(self.pending)):
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.used += len(self.pending)
                real.write(self.pending)
                real.flush()
                self.pending = bytearray()

            def fileno(self):
                if disk.free is not None and disk.used >= disk.free:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real.fileno()

            def close(self):
                try:
                    self.flush()
                finally:
                    real.close()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

        return File()


def test_disk_full_at_any_point_is_the_clean_error(models, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import streammerge.io.writer
    from streammerge.front.cli import main

    def run(out: Path, free: int | None):
        disk = Disk(free)
        disk.patch(monkeypatch, streammerge.io.writer)
        result = CliRunner().invoke(main, ["merge", str(models / "b.yaml"), str(out), "-q", "--max-shard-size", "60KB"])
        monkeypatch.undo()
        return result, disk.used

    result, total = run(tmp_path / "full", None)
    assert result.exit_code == 0, result.output
    for i, free in enumerate([0, 1, 8191, 8193, *(total * k // 9 for k in range(1, 9)), total - 2000, total - 1]):
        out = tmp_path / f"out{i}"
        result, _ = run(out, free)
        assert result.exit_code == 1, (free, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "disk full" in lines[0] and "internal error" not in lines[0], (free, result.stderr)
        assert not (out / SAFETENSORS_INDEX).exists() and not list(out.glob("*.partial")), free
    result, _ = run(out, None)  # space freed: the same command completes the merge
    assert result.exit_code == 0 and verify(out).ok


# ---- 4. an input truncated during the merge -------------------------------------------------------

SIGBUS_DURING_MERGE = """
import os, sys
import streammerge.front.api as api
from streammerge.front.cli import main

real = api.run_plan

def run_plan(plan, reference, finetuned, *args, **kwargs):
    # a block of ft1's last tensor is mapped, then the file is truncated under it: the next touch is a SIGBUS
    victim = finetuned[0]
    name = max(victim.tensors, key=lambda n: victim.tensors[n].offset)
    view = victim.view(name)
    os.truncate(victim.tensors[name].file, 100)
    float(view.float().sum())
    return real(plan, reference, finetuned, *args, **kwargs)

api.run_plan = run_plan
sys.argv = ["streammerge", "merge", *sys.argv[1:]]
main()
"""


def test_an_input_truncated_under_a_mapped_block_is_one_line_naming_it(models, tmp_path):
    work = tmp_path / "models"
    shutil.copytree(models, work)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SIGBUS_DURING_MERGE, str(work / "b.yaml"), str(out), "-q"],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"{work / 'ft1'}/model-0000" in lines[0] and "now 100 bytes" in lines[0] and "changed while the merge read it" in lines[0]
    assert not (out / SAFETENSORS_INDEX).exists() and not (out / MANIFEST).exists()


def test_an_input_truncated_between_blocks_is_refused_before_its_pages_are_touched(models, tmp_path):
    from streammerge.errors import CheckpointError
    from streammerge.io.sources import Checkpoint

    work = tmp_path / "ft1"
    shutil.copytree(models / "ft1", work)
    with Checkpoint(work) as ckpt:
        name = max(ckpt.tensors, key=lambda n: ckpt.tensors[n].offset)
        ckpt.view(name, 0, 1)
        os.truncate(ckpt.tensors[name].file, 100)
        with pytest.raises(CheckpointError, match="is shorter than when its header was read"):
            ckpt.view(name, 1, 2)


def test_a_resume_names_the_input_that_changed(models, tmp_path):
    work = tmp_path / "models"
    shutil.copytree(models, work)
    out = tmp_path / "out"
    b = MergeConfig.from_yaml(work / "b.yaml")
    with pytest.raises(Killed):  # killed after its first shard
        merge(b, out, max_shard_size=SHARD, on_shard_file=lambda path: (_ for _ in ()).throw(Killed()))
    victim = sorted((work / "ft2").glob("*.safetensors"))[0]
    os.utime(victim, ns=(time.time_ns(), time.time_ns()))  # touched: its modification time changed
    rerun = cli("merge", work / "b.yaml", out, "--max-shard-size", "60KB")
    assert rerun.returncode == 1 and f"{victim} (modified since)" in rerun.stderr and len(rerun.stderr.splitlines()) == 1


# ---- NaN/Inf inputs: --check-finite's error stays one line ------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_check_finite_error_is_one_line_without_numpy_warnings(models, tmp_path, method):
    from safetensors.torch import load_file, save_file

    work = tmp_path / "models"
    shutil.copytree(models, work)
    for who in ("base", "ft2"):  # inf - inf: numpy's "invalid value encountered in subtract"
        f = sorted((work / who).glob("*.safetensors"))[0]
        tensors = load_file(f)
        name = next(n for n in tensors if "mlp" in n)
        tensors[name][0, :5] = float("inf")
        save_file(tensors, f, metadata={"format": "pt"})
    (work / "c.yaml").write_text(f"merge_method: {method}\nbase_model: base\nmodels:\n"
                                 "  - {model: ft1, parameters: {weight: 0.5, density: 0.5}}\n"
                                 "  - {model: ft2, parameters: {weight: 0.5, density: 0.3}}\n")
    done = cli("merge", work / "c.yaml", tmp_path / "out", "--check-finite", "--compile", "off", "--threads", "2")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and "holds NaN or Inf" in done.stderr, done.stderr
