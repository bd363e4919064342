"""One merge split over workers: by output shard, with receipts and a finalize step. Any split
(in process, independent CLI workers, torchrun) gives the single-process bytes, file for file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SMALL_LLAMA, shard_hashes

from streammerge import MergeConfig, OutputError, merge
from streammerge.errors import ConfigError
from streammerge.front.api import finalize, worker_shards
from streammerge.front.api import plan as make_plan
from streammerge.front.cli import main
from streammerge.front.demo import build_demo_models
from streammerge.pipeline.distributed import slurm_array_env
from streammerge.pipeline.plan import ShardPlan, assign_workers

SHARD = 60_000  # bytes: about a dozen shards


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    build_demo_models(root, shape=SMALL_LLAMA)
    (root / "dare_ties.yaml").write_text(
        "merge_method: dare_ties\nbase_model: base\nseed: 7\nmodels:\n"
        "  - {model: ft1, parameters: {weight: 0.6, density: 0.5}}\n"
        "  - {model: ft2, parameters: {weight: 0.4, density: 0.3}}\n"
    )
    # FusionBench's TIES: one trim threshold over the whole model, so a shard depends on tensors
    # in other workers' shards.
    (root / "ties_global.yaml").write_text(
        "merge_method: ties\nbase_model: base\nsemantics: fusionbench\nmodels:\n"
        "  - {model: ft1, parameters: {weight: 1.0, density: 0.2}}\n  - {model: ft2, parameters: {weight: 1.0, density: 0.2}}\n"
        "parameters: {lambda: 0.7}\n"
    )
    (root / "slerp.yaml").write_text(
        "merge_method: slerp\nbase_model: base\nmodels:\n  - model: ft1\n"
        "parameters:\n  t: [{filter: mlp, value: [0.2, 0.8]}, {value: 0.5}]\n"
    )
    return root


def files(out: Path) -> dict[str, str]:
    """Every file of a finished output, by name: its sha256."""
    assert not (out / ".streammerge").exists() and not list(out.glob("*.partial"))
    return shard_hashes(out, "*")


@pytest.fixture(scope="module")
def single(models, tmp_path_factory) -> dict[str, dict[str, str]]:
    """The single-process outputs to compare with."""
    root = tmp_path_factory.mktemp("single")
    expected = {}
    for name in ("dare_ties", "ties_global", "slerp"):
        merge(MergeConfig.from_yaml(models / f"{name}.yaml"), root / name, max_shard_size=SHARD)
        expected[name] = files(root / name)
    return expected


def test_assign_workers_balances_bytes_and_covers_every_shard_once():
    shards = tuple(ShardPlan(f"s{i}", (), 0, size) for i, size in enumerate([9, 7, 6, 5, 5, 4, 3, 3, 2, 1]))
    for world in (1, 2, 3, 4, 16):
        owners = assign_workers(shards, world)
        assert owners == assign_workers(shards, world)  # deterministic
        loads = [sum(s.input_bytes for s, o in zip(shards, owners) if o == r) for r in range(world)]
        assert sum(loads) == 45 and all(0 <= o < world for o in owners)
        # Greedy largest-first: no worker exceeds the even share by more than one shard.
        assert max(loads) <= 45 / world + 9
    loads2 = sorted(sum(s.input_bytes for s, o in zip(shards, assign_workers(shards, 2)) if o == r) for r in range(2))
    assert loads2 == [22, 23]


# 40 workers: more than shards, some get none. (Each worker of ties_global reads every tensor
# for the model-wide threshold, so it stays at small world sizes here.)
@pytest.mark.parametrize("name, world", [("dare_ties", 2), ("dare_ties", 3), ("dare_ties", 40), ("ties_global", 2), ("ties_global", 3),
                                         ("slerp", 3)])
def test_any_split_gives_the_single_process_bytes(models, single, tmp_path, name, world):
    config = MergeConfig.from_yaml(models / f"{name}.yaml")
    out = tmp_path / "out"
    owned = []
    for rank in reversed(range(world)):  # any order
        result = merge(config, out, max_shard_size=SHARD, rank=rank, world_size=world)
        assert not result.finalized and (result.rank, result.world_size) == (rank, world)
        owned += [s["file"] for s in result.shards]
        assert not (out / "model.safetensors.index.json").exists()  # incomplete until finalized
    assert sorted(owned) == sorted(f for f in single[name] if f.startswith("model-0"))
    final = finalize(out)
    assert len(final.shards) == len(owned) and not final.already_complete
    assert files(out) == single[name]
    assert finalize(out).already_complete  # a second finalize is a no-op


def test_worker_rerun_keeps_its_finished_shards_and_redoes_the_rest(models, single, tmp_path):
    config = MergeConfig.from_yaml(models / "dare_ties.yaml")
    out = tmp_path / "out"
    merge(config, out, max_shard_size=SHARD, rank=0, world_size=2)
    mine = [s.filename for s in worker_shards(make_plan(config, max_shard_size=SHARD), 1, 2)]
    with pytest.raises(OutputError, match=rf"{len(mine)} of \d+ shard\(s\) not done: {mine[0]} \(rank 1 of 2\)"):
        finalize(out)
    merge(config, out, max_shard_size=SHARD, rank=1, world_size=2)
    # Rank 1 "dies": one shard lost, another corrupted after its receipt was written.
    (out / mine[0]).unlink()
    with open(out / mine[1], "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    kept = {n: (out / n).stat().st_ino for n in mine[2:]}
    result = merge(config, out, max_shard_size=SHARD, rank=1, world_size=2)
    assert result.reused_shards == len(mine) - 2
    assert {n: (out / n).stat().st_ino for n in mine[2:]} == kept  # untouched
    finalize(out)
    assert files(out) == single["dare_ties"]


def test_a_rerun_with_another_world_size_reuses_the_receipts(models, single, tmp_path):
    config = MergeConfig.from_yaml(models / "dare_ties.yaml")
    out = tmp_path / "out"
    merge(config, out, max_shard_size=SHARD, rank=0, world_size=3)
    result = merge(config, out, max_shard_size=SHARD)  # one process takes over, keeps rank 0's work
    assert result.reused_shards == len(worker_shards(make_plan(config, max_shard_size=SHARD), 0, 3)) > 0
    assert files(out) == single["dare_ties"]


def test_bad_worker_arguments_are_clear_errors(models, tmp_path):
    config = MergeConfig.from_yaml(models / "dare_ties.yaml")
    with pytest.raises(ConfigError, match="rank 2 of world size 2"):
        merge(config, tmp_path / "a", rank=2, world_size=2)
    with pytest.raises(ConfigError, match="--force cannot be combined with independent workers"):
        merge(config, tmp_path / "a", rank=0, world_size=2, force=True)
    with pytest.raises(OutputError, match="no merge in progress"):
        finalize(tmp_path)
    merge(config, tmp_path / "b", max_shard_size=SHARD, rank=0, world_size=2)
    other = MergeConfig.from_yaml(models / "ties_global.yaml")
    with pytest.raises(OutputError, match="holds a different merge"):
        merge(other, tmp_path / "b", max_shard_size=SHARD, rank=1, world_size=2)


def test_slurm_array_variables_give_rank_and_world_size(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert slurm_array_env() == (1, 2)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(models / "dare_ties.yaml"), str(out), "--max-shard-size", "60KB"])
    assert result.exit_code == 0, result.output
    assert "worker 1 of 2" in result.output and f"streammerge finalize {out}" in result.output
    # Flags win over the environment.
    result = CliRunner().invoke(main, ["merge", str(models / "dare_ties.yaml"), str(out), "--max-shard-size", "60KB",
                                       "--rank", "0", "--json"])
    summary = json.loads(result.output)
    assert summary["rank"] == 0 and summary["world_size"] == 2 and summary["finalized"] is False
    result = CliRunner().invoke(main, ["finalize", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["finalized"] is True
    result = CliRunner().invoke(main, ["finalize", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no merge in progress" in result.output


def _worker_cmd(models: Path, out: Path, rank: int, world: int) -> list[str]:
    return [sys.executable, "-m", "streammerge", "merge", str(models / "dare_ties.yaml"), str(out), "-q",
            "--max-shard-size", "60KB", "--rank", str(rank), "--world-size", str(world)]


def test_concurrent_cli_workers_then_finalize(models, single, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(_worker_cmd(models, out, r, 2), stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    proc = subprocess.run([sys.executable, "-m", "streammerge", "finalize", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert files(out) == single["dare_ties"]


def test_a_worker_killed_midway_is_rerun(models, single, tmp_path):
    out = tmp_path / "out"
    subprocess.run(_worker_cmd(models, out, 0, 2), check=True)
    theirs = [s.filename for s in worker_shards(make_plan(MergeConfig.from_yaml(models / "dare_ties.yaml"), max_shard_size=SHARD), 1, 2)]
    cmd = _worker_cmd(models, out, 1, 2) + ["--max-memory", "64KB"]  # many small blocks: seconds of work
    for _ in range(5):  # until a kill lands between its first and last shard
        proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if sum((out / ".streammerge" / f"{n}.json").exists() for n in theirs) >= 1:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        done = sum((out / ".streammerge" / f"{n}.json").exists() for n in theirs)
        if proc.returncode == -signal.SIGKILL and 0 < done < len(theirs):
            break
        for n in theirs:  # it finished first: undo its work and try again
            (out / n).unlink(missing_ok=True)
            (out / ".streammerge" / f"{n}.json").unlink(missing_ok=True)
    else:
        pytest.skip("the worker always finished before it could be killed")
    proc = subprocess.run([sys.executable, "-m", "streammerge", "finalize", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and "(rank 1 of 2)" in proc.stderr
    assert subprocess.run(cmd).returncode == 0
    subprocess.run([sys.executable, "-m", "streammerge", "finalize", str(out)], check=True, capture_output=True)
    assert files(out) == single["dare_ties"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "streammerge", *args], capture_output=True, text=True, env=env, timeout=300)


def test_torchrun_two_processes_give_the_single_process_bytes(models, single, tmp_path):
    out = tmp_path / "out"
    proc = _torchrun("merge", str(models / "ties_global.yaml"), str(out), "--max-shard-size", "60KB", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # rank 0 alone speaks: one JSON document
    assert summary["world_size"] == 2 and summary["finalized"] is True
    assert len(summary["shards"]) == len([f for f in single["ties_global"] if f.startswith("model-0")])
    assert files(out) == single["ties_global"]


def test_torchrun_worker_failure_fails_the_job_naming_the_rank(models, tmp_path):
    # A NaN in a tensor of a shard that rank 1 owns: with --check-finite only rank 1 fails.
    root = tmp_path / "models"
    for name in ("base", "ft1", "ft2"):
        shutil.copytree(models / name, root / name)
    (root / "dare_ties.yaml").write_text((models / "dare_ties.yaml").read_text())
    the_plan = make_plan(MergeConfig.from_yaml(root / "dare_ties.yaml"), max_shard_size=SHARD)
    victim = worker_shards(the_plan, 1, 2)[0].tensors[0]
    from safetensors.torch import load_file, save_file

    for f in (root / "ft1").glob("*.safetensors"):
        tensors = load_file(f)
        if victim in tensors:
            tensors[victim].view(-1)[0] = float("nan")
            save_file(tensors, f, metadata={"format": "pt"})
    proc = _torchrun("merge", str(root / "dare_ties.yaml"), str(tmp_path / "out"), "--max-shard-size", "60KB", "--check-finite")
    assert proc.returncode != 0
    assert "rank 1 of 2 failed: " in proc.stderr and victim in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_plan_shows_each_workers_shards(models):
    result = CliRunner().invoke(main, ["plan", str(models / "dare_ties.yaml"), "--max-shard-size", "60KB", "--world-size", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    workers = summary["workers"]
    assert [w["rank"] for w in workers] == [0, 1, 2]
    assert sorted(f for w in workers for f in w["shards"]) == sorted(s["file"] for s in summary["shards"])
    the_plan = make_plan(MergeConfig.from_yaml(models / "dare_ties.yaml"), max_shard_size=SHARD)
    assert workers[1]["shards"] == [s.filename for s in worker_shards(the_plan, 1, 3)]


def test_each_torchrun_process_on_a_gpu_node_takes_its_local_gpu(monkeypatch):
    from streammerge.pipeline.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # asked for by index: that one
    monkeypatch.delenv("LOCAL_RANK")
    # always with an index: torch.cuda.set_device and mem_get_info refuse a bare "cuda"
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="2 GPU"):
        resolve_device("cuda:2")
