"""mergekit-yaml's flags on `streammerge merge` (streammerge/mergekit_flags.py, docs/mergekit.md): every
one parses; the honoured ones do what they say; the moot ones say so in one info line; --json
failures print an error object."""

from __future__ import annotations

import ast
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import shard_hashes

import streammerge.front.api
from streammerge import MergeConfig, ModelSpec, plan
from streammerge.constants import MODEL_CARD, SAFETENSORS_INDEX
from streammerge.front.api import MergeResult
from streammerge.front.cli import main
from streammerge.front.demo import (
    TinyLlama,
    build_demo_models,
    finetune_of,
    random_state,
    save_checkpoint,
)
from streammerge.front.mergekit_flags import (
    FLAGS,
    MOOT,
    parse_kmb,
    table,
    torchrun_command,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mergekit_shards.json"
MERGEKIT_OPTIONS = Path(__file__).resolve().parents[1] / "benchmarks/mergekit/.venv/lib/python3.11/site-packages/mergekit/options.py"
MAIN_MERGEKIT_OPTIONS = Path("/work/main/benchmarks/mergekit/.venv/lib/python3.11/site-packages/mergekit/options.py")

# `mergekit-yaml --help` of mergekit 0.1.5, every spelling (the test of the list itself is below).
MERGEKIT_0_1_5 = [
    "--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings",
    "--trust-remote-code", "--no-trust-remote-code", "--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype",
    "--random-seed", "-v", "--quiet", "--no-quiet", "--cuda", "--no-cuda", "--device", "--low-cpu-memory",
    "--no-low-cpu-memory", "--lazy-unpickle", "--no-lazy-unpickle", "--read-to-gpu", "--no-read-to-gpu", "--multi-gpu",
    "--no-multi-gpu", "-j", "--num-threads", "--gpu-rich", "--async-write", "--no-async-write", "--write-threads",
    "--out-shard-size", "--copy-tokenizer", "--no-copy-tokenizer", "--clone-tensors", "--no-clone-tensors",
    "--write-model-card", "--no-write-model-card", "--safe-serialization", "--no-safe-serialization",
]
VALUES = {"--random-seed": "3", "-j": "2", "--num-threads": "2", "--write-threads": "2", "--out-shard-size": "1B",
          "--device": "cpu", "--lora-merge-dtype": "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIG = """\
merge_method: dare_ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: ft2
    parameters: {weight: 0.5, density: 0.5}
seed: 0
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_demo_models(root)
    for name in TOKENIZER_FILES:
        (root / "base" / name).write_text(json.dumps({"file": name}))
    (root / "merge.yaml").write_text(CONFIG)
    return root


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def info_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("streammerge: info: ")]


# ---- the list -----------------------------------------------------------------------------------


def spellings() -> list[str]:
    return [s for flag in FLAGS for s in flag.spellings]


def test_every_mergekit_0_1_5_flag_is_listed():
    ours = spellings()
    assert sorted(ours) == sorted(set(ours))
    missing = sorted(set(MERGEKIT_0_1_5) - set(ours))
    assert not missing, missing
    assert set(ours) - set(MERGEKIT_0_1_5) == {"--verbose"}  # -v's long spelling


@pytest.mark.skipif(not (MERGEKIT_OPTIONS.is_file() or MAIN_MERGEKIT_OPTIONS.is_file()), reason="mergekit's venv is not installed")
def test_the_list_is_mergekit_options_fields():
    """Every MergeOptions field of the installed mergekit has a flag here (read from its source, not imported)."""
    source = (MERGEKIT_OPTIONS if MERGEKIT_OPTIONS.is_file() else MAIN_MERGEKIT_OPTIONS).read_text()
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "MergeOptions")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert fields == {flag.name for flag in FLAGS}


def test_docs_table_is_current():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "mergekit.md").read_text()
    assert table() in doc, "docs/mergekit.md: paste streammerge.front.mergekit_flags.table() in again"


# ---- every flag parses --------------------------------------------------------------------------


@pytest.fixture
def fake_merge(monkeypatch, tmp_path):
    """api.merge replaced by a recorder: the CLI's parsing alone, in milliseconds."""
    calls: list[tuple[MergeConfig, dict]] = []

    def record(cfg, output, **kwargs):
        calls.append((cfg, kwargs))
        return MergeResult(Path(output), [], 0, 0, 0, 0.0, device=kwargs.get("device", "cpu"))

    monkeypatch.setattr(streammerge.front.api, "merge", record)
    return calls


@pytest.mark.parametrize("spelling", MERGEKIT_0_1_5 + ["--verbose"])
def test_every_flag_parses(spelling, models, tmp_path, fake_merge, monkeypatch):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", hf_constants.HF_HUB_CACHE)  # --transformers-cache sets it
    value = VALUES.get(spelling, str(tmp_path / "dir") if spelling.endswith("cache") else None)
    result = run("merge", models / "merge.yaml", tmp_path / "out", spelling, *([value] if value else []))
    assert result.exit_code == 0, result.output
    assert len(fake_merge) == 1
    flag = next(f for f in FLAGS if spelling in f.spellings)
    info = info_lines(result)
    moot_asks = flag.name in MOOT and not (spelling.startswith("--no-") and flag.name != "safe_serialization") and spelling != "--safe-serialization"
    if moot_asks:
        assert len(info) == 1 and info[0].startswith(f"streammerge: info: {spelling}: "), result.stderr
    elif flag.name not in ("multi_gpu", "gpu_rich") or spelling == "--no-multi-gpu":
        assert info == [], result.stderr


def test_honoured_flags_reach_the_merge(models, tmp_path, fake_merge):
    result = run("merge", models / "merge.yaml", tmp_path / "out", "--random-seed", "5", "-j", "3", "--out-shard-size", "2B",
                 "--no-copy-tokenizer", "--no-write-model-card", "--allow-crimes", "--unsafe-truncate-embeddings", "--no-cuda")
    assert result.exit_code == 0, result.output
    cfg, kwargs = fake_merge[0]
    assert (cfg.seed, cfg.vocab) == (5, "truncate_to_smallest")
    assert kwargs["threads"] == 3 and kwargs["device"] == "cpu"
    assert (kwargs["max_shard_size"], kwargs["shard_order"]) == (2_000_000_000, "name")
    assert not kwargs["copy_tokenizer"] and not kwargs["write_model_card"] and kwargs["allow_crimes"]
    fake_merge.clear()
    assert run("merge", models / "merge.yaml", tmp_path / "out").exit_code == 0  # streammerge's defaults
    cfg, kwargs = fake_merge[0]
    assert (kwargs["shard_order"], kwargs["copy_tokenizer"], kwargs["write_model_card"], kwargs["allow_crimes"]) == (
        "file", True, True, False)
    assert kwargs["device"] == "auto"


@pytest.mark.parametrize("args, needle", [
    (["--seed", "1", "--random-seed", "2"], "--random-seed 2 contradicts --seed 1"),
    (["--cuda", "--device", "cpu"], "--cuda contradicts --device cpu"),
    (["--threads", "2", "-j", "3"], "--num-threads 3 contradicts --threads 2"),
    (["--vocab", "truncate_to_base", "--unsafe-truncate-embeddings"], "contradicts --vocab truncate_to_base"),
    (["--out-shard-size", "1.5B"], "not a mergekit size"),
    (["--out-shard-size", "1B", "--max-shard-size", "1GB"], "give one of them"),
])
def test_contradicting_flags_are_usage_errors(args, needle, models, tmp_path, fake_merge):
    result = run("merge", models / "merge.yaml", tmp_path / "out", *args)
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert fake_merge == []


def test_gpu_rich_is_cuda_and_multi_gpu_prints_the_torchrun_command(models, tmp_path, fake_merge):
    args = [str(models / "merge.yaml"), str(tmp_path / "out"), "--multi-gpu", "--random-seed", "3"]
    result = run("merge", *args)
    assert result.exit_code == 0, result.output
    expected = shlex.join(["torchrun", "--nproc_per_node", "NUM_GPUS" if torch.cuda.device_count() < 2 else str(torch.cuda.device_count()),
                           "-m", "streammerge", "merge", args[0], args[1], "--random-seed", "3"])
    assert info_lines(result) == [f"streammerge: info: --multi-gpu: this run merges on one device; to use every GPU "
                                  f"(one process each, the same bytes) run: {expected}"]
    fake_merge.clear()
    result = run("merge", models / "merge.yaml", tmp_path / "out", "--gpu-rich")
    assert result.exit_code == 0, result.output
    assert fake_merge[0][1]["device"] == "cuda"
    assert len(info_lines(result)) == 1 and " --cuda" in info_lines(result)[0] and "--gpu-rich:" in info_lines(result)[0]
    assert torchrun_command(["a", "--gpu-rich"]).endswith("merge a --cuda")


def test_transformers_cache_is_the_hub_cache(models, tmp_path, fake_merge, monkeypatch):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", "/elsewhere")
    assert run("merge", models / "merge.yaml", tmp_path / "out", "--transformers-cache", tmp_path / "hf").exit_code == 0
    assert hf_constants.HF_HUB_CACHE == str(tmp_path / "hf")


def test_parse_kmb_is_mergekits():
    assert [parse_kmb(v) for v in ("5B", "5b", "500M", "1000k", "123", "0")] == [5 * 10**9, 5 * 10**9, 5 * 10**8, 10**6, 123, 0]
    for bad in ("1.5B", "5GB", "-1", "", "B"):
        with pytest.raises(Exception, match="not a mergekit size"):
            parse_kmb(bad)


# ---- honoured: what they do ---------------------------------------------------------------------


def shard_inputs(root: Path) -> Path:
    """The inputs of benchmarks/mergekit/make_shard_fixtures.py (seeded: the same shapes and files)."""
    data = json.loads(FIXTURE.read_text())
    shape = TinyLlama(**data["inputs"]["shape"])
    config = shape.config_json(torch.bfloat16)
    base = random_state(shape, seed=0)
    save_checkpoint(base, root / "base", shards=3, config=config)
    for i in (1, 2):
        save_checkpoint(finetune_of(base, seed=100 + i), root / f"ft{i}", shards=3, config=config)
    return root


def test_out_shard_size_splits_as_mergekit(tmp_path):
    """Every case mergekit-yaml 0.1.5 wrote (tests/fixtures/mergekit_shards.json): the same tensors in the same shards."""
    data = json.loads(FIXTURE.read_text())
    root = shard_inputs(tmp_path)
    for case in data["cases"]:
        cfg = MergeConfig(method=case["method"], base=str(root / "base"), dtype=case["dtype"],
                          models=tuple(ModelSpec(str(root / f"ft{i}"), {"weight": 0.5, "density": 0.5}) for i in (1, 2)))
        size = parse_kmb(case["out_shard_size"])
        p = plan(cfg, max_shard_size=size if size > 0 else 1 << 62, shard_order="name")
        assert [sorted(s.tensors) for s in p.shards] == case["shards"], case["out_shard_size"]
        if len(case["shards"]) > 1:  # the file order splits otherwise: the order is what makes it mergekit's
            assert [sorted(s.tensors) for s in plan(cfg, max_shard_size=size).shards] != case["shards"]


def test_out_shard_size_on_the_command_line(tmp_path):
    data = json.loads(FIXTURE.read_text())
    case = next(c for c in data["cases"] if c["out_shard_size"] == "4K")
    root = shard_inputs(tmp_path)
    (root / "c.yaml").write_text(data["config"].format(method=case["method"], dtype=case["dtype"]))
    result = run("merge", root / "c.yaml", root / "out", "--out-shard-size", "4K", "--quiet")
    assert result.exit_code == 0, result.output
    weight_map = json.loads((root / "out" / SAFETENSORS_INDEX).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert [sorted(n for n, f in weight_map.items() if f == file) for file in files] == case["shards"]
    plan_json = json.loads(run("plan", root / "c.yaml", "--out-shard-size", "4K", "--json").stdout)
    assert [s["tensors"] for s in plan_json["shards"]] == [len(s) for s in case["shards"]]


def test_no_copy_tokenizer_and_no_model_card(models, tmp_path):
    out = tmp_path / "out"
    result = run("merge", models / "merge.yaml", out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet")
    assert result.exit_code == 0, result.output
    files = {p.name for p in out.iterdir()}
    assert not files & {*TOKENIZER_FILES, MODEL_CARD}
    assert {"config.json", "generation_config.json", SAFETENSORS_INDEX} <= files
    assert run("verify", out).exit_code == 0
    default = tmp_path / "default"
    assert run("merge", models / "merge.yaml", default, "--quiet").exit_code == 0
    assert {*TOKENIZER_FILES, MODEL_CARD} <= {p.name for p in default.iterdir()}
    assert shard_hashes(out) == shard_hashes(default)  # the same weights
    # the side files are part of what a folder holds: the other choice is another merge
    result = run("merge", models / "merge.yaml", out, "--quiet")
    assert result.exit_code == 1 and "holds a different merge" in result.stderr


def test_random_seed_is_the_seed(models, tmp_path):
    for name, args in (("seed", ["--seed", "9"]), ("random", ["--random-seed", "9"]), ("zero", [])):
        assert run("merge", models / "merge.yaml", tmp_path / name, "--quiet", *args).exit_code == 0
    assert shard_hashes(tmp_path / "seed") == shard_hashes(tmp_path / "random") != shard_hashes(tmp_path / "zero")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_cuda_without_cuda_falls_back_to_the_cpu(models, tmp_path):
    result = run("merge", models / "merge.yaml", tmp_path / "out", "--cuda", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"streammerge: warning: CUDA is not available (torch {torch.__version__}, no GPU "
                                          "found): merging on the CPU, with the same bytes"]


def test_allow_crimes(models, tmp_path):
    """Models whose config.json name different architectures: refused as mergekit refuses them, merged with --allow-crimes."""
    root = tmp_path / "m"
    for name in ("base", "ft1", "ft2"):
        shutil.copytree(models / name, root / name)
    config = json.loads((models / "ft2" / "config.json").read_text())
    (root / "ft2" / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    (root / "merge.yaml").write_text(CONFIG)
    result = run("merge", root / "merge.yaml", tmp_path / "out", "--quiet")
    assert result.exit_code == 1
    assert "different architectures (LlamaForCausalLM: " in result.stderr and "MistralForCausalLM: " in result.stderr
    assert "--allow-crimes" in result.stderr
    result = run("merge", root / "merge.yaml", tmp_path / "out", "--quiet", "--allow-crimes")
    assert result.exit_code == 0, result.output
    assert shard_hashes(tmp_path / "out") == shard_hashes_of_merge(models, tmp_path / "plain")


def shard_hashes_of_merge(models: Path, out: Path) -> dict:
    assert run("merge", models / "merge.yaml", out, "--quiet").exit_code == 0
    return shard_hashes(out)


def test_verbose_shows_debug_lines(models, tmp_path):
    result = run("merge", models / "merge.yaml", tmp_path / "out", "-v")
    assert result.exit_code == 0, result.output
    assert any(line.startswith("streammerge: debug: plan: ") for line in result.stderr.splitlines())
    result = run("merge", models / "merge.yaml", tmp_path / "out2")
    assert "streammerge: debug:" not in result.stderr


# ---- --json failures ----------------------------------------------------------------------------


def test_json_error_object_on_failure(models, tmp_path):
    missing = tmp_path / "nowhere"
    result = run("merge", tmp_path / "out", "--base", models / "base", "--model", missing, "--method", "ties", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["status"] == "error"
    error = data["error"]
    assert (error["code"], error["type"], error["what"]) == (1, "CheckpointNotFoundError", str(missing))
    assert result.stderr.splitlines() == [f"streammerge: error: {error['message']}"]

    result = run("merge", models / "merge.yaml", tmp_path / "out", "--json", "--no-such-flag")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert (data["ok"], data["error"]["code"], data["error"]["type"]) == (False, 2, "UsageError")
    assert "--no-such-flag" in data["error"]["message"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("density: 0.5}", "density: 7}").replace("base_model: base", f"base_model: {models / 'base'}")
                   .replace("model: ft", f"model: {models}/ft"))
    result = run("plan", bad, "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "ConfigError" and len(error["problems"]) == 2
    assert all("density must be in (0, 1]" in p for p in error["problems"])

    result = run("merge", models / "merge.yaml", tmp_path / "ok", "--json")  # success: ok true
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True
