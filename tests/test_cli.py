"""The command line: merge from YAML or flags, plan, demo, and one-line errors with exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import shard_hashes
from safetensors import safe_open

from streammerge import ConfigError
from streammerge.constants import MANIFEST, MODEL_CARD, SAFETENSORS_INDEX
from streammerge.front.cli import main, parse_size
from streammerge.front.demo import (
    TinyLlama,
    build_demo_models,
    finetune_of,
    random_state,
    save_checkpoint,
)
from streammerge.io.sources import Checkpoint
from streammerge.pipeline.plan import POOL_SHARE, SCRATCH_BYTES, WRITE_SHARE

CONFIG = """\
merge_method: dare_ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ft2
    parameters: {weight: 0.6, density: 0.5}
parameters: {lambda: 1.2}
seed: 7
"""
# The same merge as CONFIG, from flags (paths are appended by the tests).
FLAGS = ["--method", "dare_ties", "--weight", "0.6", "--density", "0.5", "--lambda", "1.2", "--seed", "7"]
N_TENSORS = len(TinyLlama().shapes())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base/, ft1/, ft2/ (tiny Llamas, two shards each) and merge.yaml, shared by the tests (read only)."""
    root = tmp_path_factory.mktemp("models")
    build_demo_models(root)
    (root / "merge.yaml").write_text(CONFIG)
    return root


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def model_flags(root: Path) -> list[str]:
    return ["--base", str(root / "base"), "--model", str(root / "ft1"), "--model", str(root / "ft2"), *FLAGS]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streammerge: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- merge ------------------------------------------------------------------------------------


def test_merge_yaml_writes_shards_index_manifest_and_card(models, tmp_path):
    out = tmp_path / "out"
    result = run("merge", models / "merge.yaml", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"merged {N_TENSORS}/{N_TENSORS} tensors into 1 shard(s), ")
    assert result.stdout.rstrip().endswith(f"-> {out}")

    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MODEL_CARD, MANIFEST, SAFETENSORS_INDEX, "config.json", "generation_config.json", "model-00001-of-00001.safetensors"]
    )
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    assert set(index["weight_map"]) == set(TinyLlama().shapes())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["seed"] == 7
    assert manifest["config"]["merge_method"] == "dare_ties"
    assert manifest["config"]["models"][0] == {"model": "ft1", "parameters": {"weight": 0.6, "density": 0.5}}
    assert manifest["config"]["parameters"] == {"lambda": 1.2}
    assert manifest["total_size"] == index["metadata"]["total_size"]
    assert [(s["file"], s["sha256"]) for s in manifest["shards"]] == list(shard_hashes(out).items())

    card = (out / MODEL_CARD).read_text()
    assert card.startswith("---\nbase_model:\n- base\n- ft1\n- ft2\n")
    assert "using the **dare_ties** method (default semantics, seed 7), with `base` as the base" in card
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_flags_give_the_same_bytes_as_yaml(models, tmp_path):
    assert run("merge", models / "merge.yaml", tmp_path / "yaml").exit_code == 0
    result = run("merge", tmp_path / "flags", *model_flags(models))
    assert result.exit_code == 0, result.output
    yaml_shards, flag_shards = shard_hashes(tmp_path / "yaml"), shard_hashes(tmp_path / "flags")
    assert yaml_shards and yaml_shards == flag_shards
    index = lambda d: json.loads((tmp_path / d / SAFETENSORS_INDEX).read_text())  # noqa: E731
    assert index("yaml") == index("flags")


def test_merge_json_summary_matches_files(models, tmp_path):
    out = tmp_path / "out"
    result = run("merge", models / "merge.yaml", out, "--json", "--max-shard-size", "100KB")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok"
    assert summary["output_dir"] == str(out)
    assert (summary["tensors"], summary["merged_tensors"]) == (N_TENSORS, N_TENSORS)
    assert len(summary["shards"]) > 1
    for shard in summary["shards"]:
        path = out / shard["file"]
        assert shard["sha256"] == sha256(path)  # of the whole file
        assert shard["bytes"] == path.stat().st_size  # the whole file, as its sha256
    assert summary["total_size"] == json.loads((out / SAFETENSORS_INDEX).read_text())["metadata"]["total_size"]
    assert summary["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # where the arithmetic ran


def test_library_warnings_are_cli_lines_even_when_quiet(models, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run("merge", models / "merge.yaml", tmp_path / "out", "--device", "cuda", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["streammerge: warning: CUDA is not available (torch %s, no GPU found): merging on "
                                          "the CPU, with the same bytes" % torch.__version__]


@pytest.mark.parametrize(("flags", "needle"), [(["--device", "tpu"], "--device 'tpu': choose auto, cpu, cuda or cuda:N"),
                                               (["--gpu-memory", "0"], "--gpu-memory")])
def test_bad_device_settings_are_one_line_errors(models, tmp_path, flags, needle):
    assert_one_line_error(run("merge", models / "merge.yaml", tmp_path / "out", *flags), 1, needle)
    assert not (tmp_path / "out").exists()


def test_quiet_prints_nothing(models, tmp_path):
    result = run("merge", models / "merge.yaml", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert (tmp_path / "out" / SAFETENSORS_INDEX).is_file()


def test_max_shard_size_splits_and_index_maps_every_tensor(models, tmp_path):
    out = tmp_path / "out"
    assert run("merge", models / "merge.yaml", out, "--max-shard-size", "100KB", "-q").exit_code == 0
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(files)
    assert n >= 3  # 213 kB of bf16 tensors in shards of at most 100 kB
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(TinyLlama().shapes())
    total = 0
    for file in files:
        with safe_open(str(out / file), "pt") as f:
            names = set(f.keys())
            assert names == {k for k, v in index["weight_map"].items() if v == file}
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names]
        assert sum(sizes) <= 100_000
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == 213_632


def test_force_replaces_a_previous_merge_with_identical_bytes(models, tmp_path):
    out = tmp_path / "out"
    assert run("merge", models / "merge.yaml", out, "-q").exit_code == 0
    first = shard_hashes(out)
    # The same merge again: already complete, nothing to do; a different one needs --force.
    assert run("merge", models / "merge.yaml", out, "-q").exit_code == 0 and shard_hashes(out) == first
    assert_one_line_error(run("merge", models / "merge.yaml", out, "--seed", "9", "--semantics", "peft"), 1,
                          f"{out}: holds a different merge", "--force")
    # --force also removes shards of a different layout
    result = run("merge", models / "merge.yaml", out, "--force", "--max-shard-size", "100KB", "-q")
    assert result.exit_code == 0
    assert len(shard_hashes(out)) > 1
    result = run("merge", models / "merge.yaml", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert shard_hashes(out) == first
    assert sorted(json.loads((out / SAFETENSORS_INDEX).read_text())["weight_map"].values())[0] == "model-00001-of-00001.safetensors"


def test_same_seed_same_bytes_other_seed_other_bytes(models, tmp_path):
    base = ["--base", models / "base", "--model", models / "ft1", "--model", models / "ft2", "--method", "dare_ties",
            "--density", "0.5", "-q"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run("merge", tmp_path / name, *base, "--seed", seed).exit_code == 0
    a, b, c = (shard_hashes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    # the seed only drives DARE: ties ignores it
    ties = ["--base", models / "base", "--model", models / "ft1", "--method", "ties", "--density", "0.5", "-q"]
    assert run("merge", tmp_path / "t1", *ties, "--seed", 1).exit_code == 0
    assert run("merge", tmp_path / "t2", *ties, "--seed", 2).exit_code == 0
    assert shard_hashes(tmp_path / "t1") == shard_hashes(tmp_path / "t2")


def test_per_model_flags_and_seed_override_on_yaml(models, tmp_path):
    result = run("merge", tmp_path / "a", "--base", models / "base", "--model", models / "ft1", "--model", models / "ft2",
                 "--method", "ties", "--weight", "0.3", "--weight", "0.7", "--density", "0.4", "--param", "normalize=true", "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / MANIFEST).read_text())["config"]
    assert [m["parameters"] for m in config["models"]] == [{"weight": 0.3, "density": 0.4}, {"weight": 0.7, "density": 0.4}]
    assert config["parameters"] == {"normalize": True}
    result = run("merge", models / "merge.yaml", tmp_path / "b", "--seed", "9", "--semantics", "peft", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert (manifest["seed"], manifest["config"]["semantics"], manifest["options"]["mean_divisor"]) == (9, "peft", "count")


# ---- plan -------------------------------------------------------------------------------------


def test_plan_text(models, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    result = run("plan", models / "merge.yaml", "--max-shard-size", "100KB")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"method dare_ties (default semantics), reference {models / 'base'}"
    assert lines[1:3] == [f"  model {models / 'ft1'}", f"  model {models / 'ft2'}"]
    assert lines[3] == f"{N_TENSORS} of {N_TENSORS} tensors merged, the rest copied from the reference"
    assert lines[4].startswith("reads 0.001 GB, writes 0.000 GB in ") and lines[4].endswith(" shard(s)")
    assert int(lines[4].split(" in ")[1].split()[0]) >= 3
    assert lines[5].startswith("estimated peak working memory ") and lines[5].endswith("(budget 1024 MiB)")
    assert len(lines) == 6


def test_plan_json(models, monkeypatch):
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("plan read tensor data"))
    monkeypatch.setattr(Checkpoint, "view", lambda *a, **k: pytest.fail("plan read tensor data"))
    result = run("plan", models / "merge.yaml", "--json", "--tensors", "--max-memory", "64KiB")
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)
    assert (p["method"], p["semantics"], p["reference"]) == ("dare_ties", "default", str(models / "base"))
    assert p["models"] == [str(models / "ft1"), str(models / "ft2")]
    assert (p["tensors"], p["merged_tensors"]) == (N_TENSORS, N_TENSORS)
    assert p["output_bytes"] == sum(s["bytes"] for s in p["shards"]) == 213_632
    assert p["input_bytes"] == 3 * 213_632  # base and two fine-tunes, bf16
    # the pool share of the 64 KiB budget in five output buffers, the writer's stages, the numpy
    # kernel's fixed chunk scratch, and nothing left for staging inputs read from disk
    assert p["estimated_peak_memory"] == 5 * int(65536 * POOL_SHARE / 5) + int(65536 * WRITE_SHARE) + SCRATCH_BYTES
    assert p["options"]["dare_scope"] == "linear"
    by_name = {t["name"]: t for t in p["tensor_plan"]}
    assert set(by_name) == set(TinyLlama().shapes())
    up = by_name["model.layers.0.mlp.up_proj.weight"]
    assert (up["shape"], up["dtype"], up["merged"], up["dare"]) == ([128, 64], "BF16", True, True)
    assert (up["weights"], up["densities"], up["lambda"]) == ([0.6, 0.6], [0.5, 0.5], 1.2)
    assert by_name["model.embed_tokens.weight"]["dare"] is False  # DARE's default scope: linear weights


def test_plan_from_flags_without_output(models):
    result = run("plan", "--base", models / "base", "--model", models / "ft1", "--method", "ties", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["models"] == [str(models / "ft1")]


# ---- demo -------------------------------------------------------------------------------------


def test_demo(tmp_path):
    root = tmp_path / "demo"
    result = run("demo", root)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"built base and 2 fine-tunes in {root}/, config {root / 'merge.yaml'}"
    assert "merged 21/21 tensors into 2 shards" in result.stdout
    index = json.loads((root / "merged" / SAFETENSORS_INDEX).read_text())
    assert set(index["weight_map"]) == set(TinyLlama().shapes())
    first = shard_hashes(root / "merged")

    # Run again: the models are reused (said so), merged again, the same bytes.
    result = run("demo", root)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (f"reusing the demo models an earlier run built in {root}/ (--force rebuilds "
                                             "them); merging again")
    assert shard_hashes(root / "merged") == first
    result = run("demo", root, "--force", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert shard_hashes(root / "merged") == first

    other = tmp_path / "other"  # a folder of someone else's files is never built over without --force
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(run("demo", other), 1, f"{other}: not empty, and not a streammerge demo folder", "--force")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(run("demo", a_file), 1, f"{a_file}: exists and is not a directory")


# ---- errors -----------------------------------------------------------------------------------


def test_missing_model_folder_is_named(models, tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(run("merge", tmp_path / "out", "--base", models / "base", "--model", missing, "--method", "ties"),
                          1, f"{missing}: no such file or folder")
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_needs_safetensors(models, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_one_line_error(run("merge", tmp_path / "out", "--base", models / "base", "--model", folder, "--method", "ties"),
                          1, str(folder), "safetensors")


def test_shape_mismatch_names_tensor_and_shapes(models, tmp_path):
    state = finetune_of(random_state(TinyLlama(), seed=0), seed=5)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
    save_checkpoint(state, tmp_path / "odd", shards=1)
    result = run("merge", tmp_path / "out", "--base", models / "base", "--model", models / "ft1", "--model", tmp_path / "odd",
                 "--method", "ties")
    assert_one_line_error(result, 1, "'model.layers.1.mlp.up_proj.weight'", "[64, 64]", "[128, 64]", str(tmp_path / "odd"))


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--method", "frankenmerge"], ["merge_method: unknown method 'frankenmerge'"]),
        (["--method", "ties", "--density", "0"], ["density must be in (0, 1], got 0.0"]),
        (["--method", "ties", "--density", "1.5"], ["density must be in (0, 1], got 1.5"]),
        (["--method", "slerp"], ["models: slerp interpolates between base_model and exactly one other model; got 2",
                                 "parameters.t: slerp needs t"]),
        (["--method", "della", "--param", "epsilon=0.6", "--density", "0.5"], ["parameters.epsilon", "epsilon must be in [0, 0.5)", "got 0.6"]),
        (["--method", "ties", "--param", "normalize"], ["--param 'normalize': expected KEY=VALUE"]),
        (["--method", "ties", "--weight", "1", "--weight", "2", "--weight", "3"], ["--weight given 3 times for 2 models"]),
        (["--method", "ties", "--dtype", "fp8"], ["dtype: unknown dtype 'fp8'"]),
    ],
)
def test_config_errors_from_flags(models, tmp_path, flags, needles):
    result = run("merge", tmp_path / "out", "--base", models / "base", "--model", models / "ft1", "--model", models / "ft2", *flags)
    assert_one_line_error(result, 1, *needles)
    assert not (tmp_path / "out").exists()


def test_several_config_problems_in_one_line(models, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: tiez\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {density: 1.5, weigth: 1}\n")
    # every problem at once: the config's three, and the two models missing next to the YAML
    line = assert_one_line_error(run("merge", path, tmp_path / "out"), 1, "5 problems: ")
    for key in ("merge_method", "models[0].parameters.density", "models[0].parameters.weigth",
                "ft1: no such file or folder", "base: no such file or folder"):
        assert key in line


def test_output_is_an_input_folder(models, tmp_path):
    for out in (models / "ft1", models):
        result = run("merge", out, *model_flags(models))
        assert_one_line_error(result, 1, f"{out}: is (or contains) the input")
    assert sorted(p.name for p in (models / "ft1").iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", SAFETENSORS_INDEX]


def test_output_with_foreign_files_is_refused_even_with_force(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run("merge", models / "merge.yaml", out), 1, "not empty")
    assert_one_line_error(run("merge", models / "merge.yaml", out, "--force"), 1, "not a streammerge output")
    assert (out / "notes.txt").read_text() == "mine"


def test_config_with_model_flag_is_a_usage_error(models, tmp_path):
    result = run("merge", models / "merge.yaml", tmp_path / "out", "--model", models / "ft1")
    assert result.exit_code == 2
    assert "Error: --model cannot be combined with a CONFIG file; put it in the YAML" in result.stderr
    assert "Traceback" not in result.output
    result = run("plan", models / "merge.yaml", "--lambda", "2")
    assert result.exit_code == 2
    assert "Error: --lambda cannot be combined with a CONFIG file" in result.stderr


def test_bad_usage_exits_2(models, tmp_path):
    assert run("merge").exit_code == 2
    assert run("merge", "a", "b", "c").exit_code == 2
    result = run("merge", models / "merge.yaml", tmp_path / "out", "--max-shard-size", "12XB")
    assert result.exit_code == 2 and "'12XB' is not a size" in result.stderr


def test_debug_raises_the_library_error(models, tmp_path):
    result = run("merge", tmp_path / "out", "--base", models / "base", "--model", models / "ft1", "--method", "nope", "--debug")
    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError)


def test_internal_error_is_one_line_exit_3(models, tmp_path, monkeypatch):
    import streammerge.front.api

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(streammerge.front.api, "merge", broken)
    assert_one_line_error(run("merge", models / "merge.yaml", tmp_path / "out"), 3,
                          "internal error: RuntimeError: boom (rerun with --debug")


def test_subprocess_error_is_one_line_without_traceback(models, tmp_path):
    missing = tmp_path / "missing-ft"
    env = {**os.environ, "STREAMMERGE_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "streammerge", "merge", str(tmp_path / "out"), "--base", str(models / "base"),
         "--model", str(missing), "--method", "ties"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == f"streammerge: error: {missing}: no such file or folder\n"


def test_subprocess_merge_json(models, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "STREAMMERGE_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "streammerge", "merge", str(models / "merge.yaml"), str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert [s["sha256"] for s in summary["shards"]] == list(shard_hashes(out).values())


# ---- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("123", 123), ("100KB", 100_000), ("100kb", 100_000), ("5GB", 5 * 10**9), ("1GiB", 2**30), ("512MiB", 512 * 2**20),
     ("1.5M", 1_500_000), (" 2 TB ", 2 * 10**12), ("64KiB", 65_536), ("7b", 7)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "5 GiBs", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(click.BadParameter):
        parse_size(text)


def test_the_cli_lets_idle_openmp_threads_sleep(monkeypatch, capsys):
    # Set before torch loads OpenMP (its idle threads then sleep rather than spin beside the merge's
    # threads); a user's own OMP_WAIT_POLICY is kept.
    from streammerge.front.cli import run

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(sys, "argv", ["streammerge", "--help"])
    with pytest.raises(SystemExit):
        run()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        run()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
