"""What a newcomer ran into, each reproduced: mistyped paths that look like repo ids, long mismatch lines,
verify on a folder streammerge did not write, inspect of a model of another shape, a slow --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from streammerge.io import hub
from streammerge.constants import MANIFEST, MODEL_CARD, SAFETENSORS_INDEX
from streammerge.errors import MismatchError
from streammerge.front.cli import main
from streammerge.front.demo import (
    TinyLlama,
    build_demo_models,
    random_state,
    save_checkpoint,
)
from streammerge.io.verify import verify

REPO = Path(__file__).resolve().parents[1]


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edges")
    build_demo_models(root)
    # the same layer names, another size: every 2-D tensor has other shapes
    save_checkpoint(random_state(TinyLlama(hidden=32, intermediate=96), seed=5), root / "other", shards=1,
                    config=TinyLlama(hidden=32, intermediate=96).config_json(torch.bfloat16))
    return root


# ---- a mistyped local path that looks like org/name --------------------------------------------------


def test_paths_that_cannot_be_repo_ids_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for source in ("./models/ft9", "/abs/x", "~/x", "a/b/c", "models/ft9", "models/ft9@main"):
        assert hub.parse_source(source) is None, source  # `models/` exists here: a local path, mistyped
    assert hub.parse_source("modles/ft9") == hub.HubRef("modles/ft9")  # could be a repo


def test_a_mistyped_local_path_fails_at_once_naming_the_folder(tmp_path, monkeypatch):
    """`models/` exists: `models/baes` is a local path that is not there; the Hub is never asked."""
    monkeypatch.chdir(tmp_path)
    build_demo_models(tmp_path / "models")
    monkeypatch.setattr(hub, "HubCheckpoint", lambda *a, **k: pytest.fail("the Hub was asked"))
    start = time.perf_counter()
    result = run("plan", "--base", "models/baes", "--model", "models/ft1", "--method", "ties")
    assert time.perf_counter() - start < 5
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["streammerge: error: models/baes: no such file or folder"]


def test_a_relative_path_in_a_config_resolves_against_its_folder(tmp_path, monkeypatch):
    """In a YAML, `models/baes` next to an existing `models/` folder is a local path too."""
    build_demo_models(tmp_path / "models")
    (tmp_path / "c.yaml").write_text("merge_method: ties\nbase_model: models/baes\nmodels:\n  - model: models/ft1\n")
    monkeypatch.chdir("/")
    monkeypatch.setattr(hub, "HubCheckpoint", lambda *a, **k: pytest.fail("the Hub was asked"))
    result = run("plan", tmp_path / "c.yaml")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"streammerge: error: {tmp_path / 'models' / 'baes'}: no such file or folder"


def test_an_unreachable_hub_is_named_after_the_missing_folder(tmp_path, monkeypatch):
    """A source that may be a repo id: said first that there is no such local folder, then why the Hub did not answer."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    build_demo_models(tmp_path / "models")
    result = run("plan", "--base", "modles/base", "--model", "models/ft1", "--method", "ties", "--json")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("streammerge: error: modles/base: no such local folder, and the Hub at http://127.0.0.1:9 "
                               "cannot be reached to look for a repo of that name")
    error = json.loads(result.stdout)["error"]
    assert (error["type"], error["what"]) == ("CheckpointNotFoundError", "modles/base")


# ---- many mismatches: one short line ---------------------------------------------------------------


def test_a_model_of_another_size_is_one_short_line(models, tmp_path):
    result = run("merge", tmp_path / "out", "--base", models / "base", "--model", models / "other", "--method", "ties", "--json")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert len(line) < 600, line
    assert f"{models / 'other'}: 21 of 21 tensors have other shapes than in {models / 'base'}" in line
    assert "(a model of another size or architecture?), e.g. 'model.embed_tokens.weight' [256, 32] vs [256, 64], " in line
    assert line.endswith("(all 21, one per tensor: rerun with --json)")
    problems = json.loads(result.stdout)["error"]["problems"]  # where the full list is
    assert len(problems) == 21 and all(p.startswith("tensor '") for p in problems)


def test_mismatch_error_shows_the_first_three():
    e = MismatchError([f"p{i}" for i in range(10)])
    assert str(e) == "10 mismatch(es) between the models: p0; p1; p2; ... and 7 more (all 10, one per tensor: rerun with --json)"
    assert str(MismatchError(["only"])) == "only"


# ---- verify without a manifest -----------------------------------------------------------------------


def test_verify_a_plain_hugging_face_folder(models, tmp_path):
    report = verify(models / "base")  # an index and two shards, no manifest
    assert report.ok and not report.sha256_checked
    assert (report.shards, report.tensors) == (2, len(TinyLlama().shapes()))
    assert "no sha256 to compare" in report.notes[0]
    result = run("verify", models / "base")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ok: 2 shards, {report.tensors} tensors verified (no streammerge manifest: no sha256 compared)"
    assert result.stderr.startswith("streammerge: info: ")

    single = models / "other"  # one model.safetensors, no index
    assert verify(single).ok and verify(single).shards == 1

    broken = tmp_path / "broken"  # a truncated shard is still found
    import shutil

    shutil.copytree(models / "base", broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 64)
    report = verify(broken)
    assert not report.ok and any("outside the" in p and "truncated file?" in p for p in report.problems)
    (broken / SAFETENSORS_INDEX).unlink()
    assert any("not a Hugging Face model folder" in p for p in verify(broken).problems)


def test_a_streammerge_output_without_its_manifest_is_still_a_problem(models, tmp_path):
    out = tmp_path / "out"
    assert run("merge", out, "--base", models / "base", "--model", models / "ft1", "--method", "ties", "--quiet").exit_code == 0
    assert (out / MODEL_CARD).is_file()
    (out / MANIFEST).unlink()
    assert verify(out).problems == [f"{out / MANIFEST}: missing (nothing to check the shards' sha256 against)"]


# ---- inspect of a model of another shape -----------------------------------------------------------


def test_inspect_a_model_of_another_shape_is_an_error(models):
    result = run("inspect", models / "base", models / "ft1", models / "other")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert f"{models / 'other'}: 21 of 21 tensors have other shapes than in the base" in line
    assert "[32, 96] vs [64, 128]" in line and line.endswith("(all 21, one per tensor: rerun with --json)")
    assert result.stdout == ""
    result = run("inspect", models / "base", models / "other", "--json")
    assert result.exit_code == 1 and len(json.loads(result.stdout)["error"]["problems"]) == 21


# ---- start-up --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["merge", "--help"], ["merge", "--no-such-flag"], ["--version"]])
def test_help_and_usage_errors_do_not_import_torch(args):
    code = ("import sys\nfrom streammerge.front.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'safetensors', 'huggingface_hub', 'yaml') if m in sys.modules]\n"
            "print('HEAVY', heavy)" % args)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []", out


def test_package_names_are_there_when_used():
    import streammerge

    assert callable(streammerge.plan) and callable(streammerge.verify) and streammerge.MergeConfig.__name__ == "MergeConfig"
    import streammerge.io.verify  # noqa: F401
    import streammerge.pipeline.plan  # noqa: F401  (the submodules): the package's names stay the functions

    assert callable(streammerge.plan) and callable(streammerge.verify)
