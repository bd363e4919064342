"""Crash safety: a merge killed at any point resumes to the same bytes; a full disk or Ctrl-C leaves
nothing that looks complete; a rerun of a finished merge is a no-op."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_LLAMA, shard_hashes

import streammerge.front.api
import streammerge.io.writer
from streammerge import MergeConfig, OutputError, merge
from streammerge.front.demo import build_demo_models
from streammerge.io.sources import Checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    build_demo_models(root, shape=SMALL_LLAMA)
    (root / "merge.yaml").write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n"
        "  - {model: ft1, parameters: {weight: 0.5, density: 0.5}}\n"
        "  - {model: ft2, parameters: {weight: 0.5, density: 0.3}}\n"
    )
    return root


def _cmd(models: Path, out: Path) -> list[str]:
    # Small shards and a small memory budget: many shards, many row blocks, a few seconds of work.
    return [sys.executable, "-m", "streammerge", "merge", str(models / "merge.yaml"), str(out), "-q",
            "--max-shard-size", "60KB", "--max-memory", "64KB"]


def _state(out: Path) -> dict[str, str]:
    return {**shard_hashes(out), **shard_hashes(out, "model.safetensors.index.json")}


def test_killed_at_random_points_resumes_to_the_same_bytes(models, tmp_path):
    subprocess.run(_cmd(models, tmp_path / "reference"), check=True)
    expected = _state(tmp_path / "reference")
    n_shards = len(expected) - 1
    assert n_shards >= 8

    out = tmp_path / "out"
    rng = random.Random(0)
    kills_mid_merge = 0
    for _ in range(15):  # until five kills landed mid-merge
        if kills_mid_merge >= 5:
            break
        if (out / "model.safetensors.index.json").exists():  # a run got to the end first: start over
            shutil.rmtree(out)
        proc = subprocess.Popen(_cmd(models, out), stderr=subprocess.PIPE)
        target = rng.randrange(1, n_shards)  # kill once this many shards are finished, plus a random delay
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            receipts = len(list((out / ".streammerge").glob("*.json"))) if (out / ".streammerge").exists() else 0
            if receipts > target:
                time.sleep(rng.uniform(0, 0.05))
                proc.send_signal(signal.SIGKILL)
                killed = proc.wait() == -signal.SIGKILL
                complete = (out / "model.safetensors.index.json").exists()
                kills_mid_merge += killed and not complete
                if killed and not complete:  # killed mid-merge: nothing may look complete
                    assert not (out / "streammerge_manifest.json").exists()
                break
            time.sleep(0.002)
        proc.wait()
    assert kills_mid_merge >= 3
    subprocess.run(_cmd(models, out), check=True)
    assert _state(out) == expected
    assert not list(out.glob("*.partial")) and not (out / ".streammerge").exists()


def test_interrupt_stops_cleanly_and_resumes(models, tmp_path):
    # One shard per tensor (dozens): a long window after the first one for the interrupt to land in,
    # even on a loaded machine; retried if the merge still ends first.
    cmd = lambda out: _cmd(models, out) + ["--max-shard-size", "10KB"]  # noqa: E731
    for attempt in range(10):
        out = tmp_path / f"out{attempt}"
        # SIGINT at its default in the child even when this run ignores it (a background job in a
        # non-interactive shell does), so Python turns it into KeyboardInterrupt there.
        proc = subprocess.Popen(cmd(out), stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while proc.poll() is None and not ((out / ".streammerge").exists() and list((out / ".streammerge").glob("model-*.json"))):
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not list(out.glob("*.partial")) and not (out / "model.safetensors.index.json").exists()
    subprocess.run(cmd(out), check=True)
    subprocess.run(cmd(tmp_path / "reference"), check=True)
    assert _state(out) == _state(tmp_path / "reference")


def _config(models: Path) -> MergeConfig:
    return MergeConfig.from_yaml(models / "merge.yaml")


def test_rerun_of_a_finished_merge_is_a_no_op_and_a_changed_input_is_refused(models, tmp_path):
    first = merge(_config(models), tmp_path / "out", max_shard_size=60_000)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = merge(_config(models), tmp_path / "out", max_shard_size=60_000)
    assert again.shards == first.shards and again.already_complete and not first.already_complete
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes  # nothing rewritten
    with pytest.raises(OutputError, match="different merge"):
        merge(MergeConfig(**{**_config(models).__dict__, "seed": 1, "method": "dare_ties"}), tmp_path / "out", max_shard_size=60_000)


def test_disk_full_gives_a_clear_error_and_no_complete_looking_output(models, tmp_path, monkeypatch):
    calls = []
    real = streammerge.io.writer.ShardWriter._write

    def full(self, data):
        calls.append(len(data))
        if len(calls) > 5:
            self.abort()
            raise OutputError(f"{self.path}: write failed: {errno.errorcode[errno.ENOSPC]} (disk full?)")
        real(self, data)

    monkeypatch.setattr(streammerge.io.writer.ShardWriter, "_write", full)
    with pytest.raises(OutputError, match="disk full"):
        merge(_config(models), tmp_path / "out", max_shard_size=60_000)
    out = tmp_path / "out"
    assert not (out / "model.safetensors.index.json").exists() and not (out / "streammerge_manifest.json").exists()
    assert not list(out.glob("*.partial"))
    # Space freed: the same merge resumes, keeping the shard that was finished before the disk filled.
    monkeypatch.setattr(streammerge.io.writer.ShardWriter, "_write", real)
    resumed = merge(_config(models), tmp_path / "out", max_shard_size=60_000)
    assert resumed.reused_shards >= 1 and not resumed.already_complete
    assert resumed.shards == merge(_config(models), tmp_path / "fresh", max_shard_size=60_000).shards


def test_real_enospc_from_the_os_is_reported(models, tmp_path, monkeypatch):
    writes, shards = [], set()
    real_os = os

    class FullOs:
        """The writer's os, its shard files on a disk that fills up after a few writes."""

        def __getattr__(self, name):
            return getattr(real_os, name)

        def open(self, path, flags, mode=0o777):
            fd = real_os.open(path, flags, mode)
            if str(path).endswith(".safetensors.partial"):
                shards.add(fd)
            return fd

        def pwrite(self, fd, data, offset):
            if fd in shards:
                writes.append(len(data))
                if len(writes) > 4:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_os.pwrite(fd, data, offset)

    monkeypatch.setattr(streammerge.io.writer, "os", FullOs())
    with pytest.raises(OutputError, match="No space left on device"):
        merge(_config(models), tmp_path / "out", max_shard_size=60_000)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_too_little_free_space_is_refused_before_any_work(models, tmp_path, monkeypatch):
    monkeypatch.setattr(streammerge.front.api.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(OutputError, match="GB free but the merge writes"):
        merge(_config(models), tmp_path / "out")
    assert not list((tmp_path / "out").glob("model-*"))


def test_receipts_are_written_as_shards_finish(models, tmp_path, monkeypatch):
    seen = []
    real = streammerge.front.api.write_json_atomic

    def spy(path, obj):
        seen.append(path.name)
        real(path, obj)

    monkeypatch.setattr(streammerge.front.api, "write_json_atomic", spy)
    merge(_config(models), tmp_path / "out", max_shard_size=60_000)
    receipts = [n for n in seen if n.endswith(".safetensors.json")]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(receipts) == sorted(f"{f}.json" for f in set(index["weight_map"].values()))
    assert seen.index("model.safetensors.index.json") == len(seen) - 1  # the index comes last


class _Stop(Exception):
    pass


def _interrupted(config: MergeConfig, out: Path, **kwargs) -> list[str]:
    """A merge stopped right after its first shard; returns that shard's tensors."""
    def stop(path: Path) -> None:
        raise _Stop(path)

    with pytest.raises(Exception):  # noqa: B017  the stop, as the writer reports it
        merge(config, out, max_shard_size=60_000, on_shard_file=stop, **kwargs)
    (receipt,) = [p for p in (out / ".streammerge").glob("model-*.json")]
    return json.loads(receipt.read_text())["tensors"]


def test_verify_inputs_catches_an_input_rewritten_in_place(models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    config = MergeConfig.from_yaml(root / "merge.yaml")
    reference = merge(config, tmp_path / "reference", max_shard_size=60_000)
    # resumed with the inputs untouched: the same bytes, the finished shard kept
    tensors = _interrupted(config, tmp_path / "same", verify_inputs=True)
    resumed = merge(config, tmp_path / "same", max_shard_size=60_000, verify_inputs=True)
    assert resumed.shards == reference.shards and resumed.reused_shards == 1
    # one tensor the finished shard read, rewritten in place: same size, header and modification time
    out = tmp_path / "out"
    tensors = _interrupted(config, out, verify_inputs=True)
    info = Checkpoint(root / "ft1").tensors[tensors[0]]
    stat = info.file.stat()
    with open(info.file, "r+b") as f:
        f.seek(info.offset)
        data = f.read(2)
        f.seek(info.offset)
        f.write(bytes(b ^ 0x01 for b in data))
    os.utime(info.file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(OutputError, match=f"{info.file}: its bytes changed since .* was built from it"):
        merge(config, out, max_shard_size=60_000, verify_inputs=True)
