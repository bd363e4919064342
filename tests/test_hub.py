"""Hub repo ids as inputs and push_to_hub, against a fake Hub (tests/fakehub.py) the real client talks to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tokenizer_json
from safetensors.torch import load_file

from streammerge import MergeConfig
from streammerge.errors import CheckpointNotFoundError, ConfigError, HubError
from streammerge.front import api
from streammerge.front.cli import main
from streammerge.front.config import ModelSpec
from streammerge.front.demo import (
    TinyLlama,
    build_demo_models,
    finetune_of,
    random_state,
    save_checkpoint,
)
from streammerge.io import hub

SHAPE = TinyLlama(hidden=32, intermediate=64, layers=2, vocab=64)


@pytest.fixture
def models(tmp_path, fakehub):
    """A base and two fine-tunes (two shards each), as local folders and as Hub repos org/base, org/ft1, org/ft2."""
    base, fts = build_demo_models(tmp_path / "local", shape=SHAPE)
    for repo, folder in (("org/base", base), ("org/ft1", fts[0]), ("org/ft2", fts[1])):
        fakehub.add_folder(repo, folder)
    return base, fts


def ties(base: str, ft1: str, ft2: str, **extra) -> MergeConfig:
    return MergeConfig.from_dict({
        "merge_method": "dare_ties", "base_model": base, "seed": 3,
        "models": [{"model": ft1, "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": ft2, "parameters": {"weight": 0.4, "density": 0.7}}], **extra})


def cache_weights(fakehub_cache: Path) -> list[Path]:
    """Weight files in the Hub cache: shard pointers and blobs holding safetensors data."""
    return [p for p in fakehub_cache.rglob("*") if p.is_file() and (p.suffix == ".safetensors" or _is_safetensors_blob(p))]


def _is_safetensors_blob(p: Path) -> bool:
    return p.parent.name == "blobs" and p.stat().st_size > 4096


def hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_merge_of_repo_ids_equals_merge_of_local_folders(tmp_path, models, fakehub):
    base, (ft1, ft2) = models
    remote = api.merge(ties("org/base", "org/ft1", "org/ft2@main"), tmp_path / "remote", max_shard_size=40_000)
    local = api.merge(ties(str(base), str(ft1), str(ft2)), tmp_path / "local-out", max_shard_size=40_000)
    assert len(remote.shards) > 1
    assert [s["sha256"] for s in remote.shards] == [s["sha256"] for s in local.shards]
    names = [s["file"] for s in remote.shards] + ["model.safetensors.index.json", "config.json", "generation_config.json"]
    same_files(tmp_path / "remote", tmp_path / "local-out", names)
    card = (tmp_path / "remote" / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n- org/base\n- org/ft1\n- org/ft2\n")
    # Resume identity: the same remote merge again is recognized as complete, from commits and etags.
    again = api.merge(ties("org/base", "org/ft1", "org/ft2@main"), tmp_path / "remote", max_shard_size=40_000)
    assert again.already_complete


def test_plan_reads_headers_only_and_names_commits(models, fakehub):
    p = api.plan(ties("org/base", "org/ft1", "org/ft2"))
    commit = fakehub.repos["org/base"].refs["main"]
    assert p.reference == f"org/base@{commit[:12]}" and p.sources[0].startswith("org/ft1@")
    assert fakehub.weight_reads() == []
    assert all(r.range is not None and r.range.startswith("bytes=0-") for r in fakehub.requests if r.path.endswith(".safetensors"))
    assert cache_weights(hf_cache()) == []


def test_cli_plan_with_repo_ids_downloads_no_weights(models, fakehub):
    result = CliRunner().invoke(main, ["plan", "--base", "org/base", "--model", "org/ft1", "--model", "org/ft2@main",
                                       "--method", "ties", "--density", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["reference"].startswith("org/base@") and summary["tensors"] == len(SHAPE.shapes())
    assert fakehub.weight_reads() == [] and cache_weights(hf_cache()) == []


def test_revision_pins_one_commit(tmp_path, models, fakehub):
    """`revision:` next to `model:` (and `@rev`) reads that commit even after the branch moves on."""
    base, (ft1, ft2) = models
    old = fakehub.repos["org/ft1"].refs["main"]
    fakehub.add_folder("org/ft1", ft2)  # main now holds other weights
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": "org/base", "models": [
        {"model": "org/ft1", "revision": old, "parameters": {"density": 0.5}}, {"model": f"org/ft2@{fakehub.repos['org/ft2'].refs['main']}"}]})
    assert cfg.models[0].source == f"org/ft1@{old}"
    remote = api.merge(cfg, tmp_path / "pinned")
    local = api.merge(MergeConfig.from_dict({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(ft1), "parameters": {"density": 0.5}}, {"model": str(ft2)}]}), tmp_path / "local-out")
    assert [s["sha256"] for s in remote.shards] == [s["sha256"] for s in local.shards]


def test_config_revision_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"models\[0\]\.revision: 'org/a@v1' already names a revision"):
        MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "models": [{"model": "org/a@v1", "revision": "v2"}]})
    with pytest.raises(ConfigError, match=r"models\[1\]\.revision: must be a branch, tag or commit name, got 3"):
        MergeConfig.from_dict({"merge_method": "ties", "base_model": "b", "models": ["a", {"model": "org/a", "revision": 3}]})


def test_parse_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse_source("org/name") == hub.HubRef("org/name")
    assert hub.parse_source("org/name@refs/pr/1") == hub.HubRef("org/name", "refs/pr/1")
    for local in ("./org/name", "/abs/path", "a/b/c", "name", "org/na--me", "org/name@", "org/-x"):
        assert hub.parse_source(local) is None, local
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub.parse_source("org/name") is None  # a local path wins


def test_offline_merge_reuses_the_cache(tmp_path, models, fakehub, monkeypatch):
    from huggingface_hub import constants

    first = api.merge(ties("org/base", "org/ft1", "org/ft2"), tmp_path / "online")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fakehub.requests.clear()
    offline = api.merge(ties("org/base", "org/ft1", "org/ft2"), tmp_path / "offline")
    assert fakehub.requests == []
    assert [s["sha256"] for s in offline.shards] == [s["sha256"] for s in first.shards]
    same_files(tmp_path / "online", tmp_path / "offline", ["config.json", "model.safetensors.index.json"])
    with pytest.raises(CheckpointNotFoundError, match=r"^org/other: no such local folder, and not in the Hub cache .*HF_HUB_OFFLINE set"):
        api.plan(ties("org/other", "org/ft1", "org/ft2"))


def test_budget_bounds_downloaded_bytes_and_deletes_shards_after_use(tmp_path, fakehub):
    """Four shards per model: under the budget the cache never holds more downloaded weights, and
    ends with none; a budget below what one tensor needs is refused before any download."""
    base = random_state(SHAPE, seed=0)
    for i, state in enumerate([base, finetune_of(base, 1), finetune_of(base, 2)]):
        folder = save_checkpoint(state, tmp_path / f"m{i}", shards=4, config=SHAPE.config_json(next(iter(base.values())).dtype))
        fakehub.add_folder(f"org/m{i}", folder)
    shard = max(p.stat().st_size for p in (tmp_path / "m0").glob("*.safetensors"))
    budget = 4 * shard  # the three shards a tensor reads, and one ahead
    seen: list[int] = []

    def measure(_: int) -> None:  # the bytes of weights on disk in the cache, as the merge goes
        seen.append(sum(p.stat().st_size for p in cache_weights(hf_cache()) if not p.is_symlink()))

    result = api.merge(ties("org/m0", "org/m1", "org/m2"), tmp_path / "out", download_budget=budget, progress=measure)
    assert max(seen) <= budget and max(seen) >= 3 * shard // 2
    assert cache_weights(hf_cache()) == []
    downloaded = [r.path for r in fakehub.weight_reads()]
    assert len(downloaded) == len(set(downloaded)) == 12  # each shard once, never again after its deletion
    local = api.merge(ties(*(str(tmp_path / f"m{i}") for i in range(3))), tmp_path / "local-out")
    assert [s["sha256"] for s in result.shards] == [s["sha256"] for s in local.shards]
    with pytest.raises(HubError, match=r"^--download-budget 0.0\d MB is too small: the merge needs 0.0\d MB of downloaded input files on disk at once"):
        api.merge(ties("org/m0", "org/m1", "org/m2"), tmp_path / "small", download_budget=shard)
    assert cache_weights(hf_cache()) == []


def test_delete_downloaded_keeps_files_that_were_cached_before(tmp_path, models, fakehub):
    api.merge(ties("org/base", "org/ft1", "org/ft2"), tmp_path / "a")  # fills the cache
    before = sorted(cache_weights(hf_cache()))
    assert before
    api.merge(ties("org/base", "org/ft1", "org/ft2"), tmp_path / "b", delete_downloaded=True)
    assert sorted(cache_weights(hf_cache())) == before
    fresh = api.merge(ties("org/base", "org/ft1", "org/ft2@main"), tmp_path / "c", delete_downloaded=True, force=True)
    assert fresh.shards and sorted(cache_weights(hf_cache())) == before


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), result.output
    return lines[0]


def test_errors_are_one_line_and_say_what_to_do(tmp_path, models, fakehub, monkeypatch):
    ft1 = models[1][0]
    fakehub.add_folder("org/private", ft1, private=True)
    fakehub.add_folder("org/gated", ft1, gated=True)
    fakehub.commit("org/nosafetensors", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    plan = ["plan", "--method", "ties", "--base", "org/base"]
    assert "org/missing: no such local path, and no Hub repo 'org/missing'" in one_line_error(plan + ["--model", "org/missing"])
    line = one_line_error(plan + ["--model", "org/private"])
    assert "no Hub repo 'org/private' (if it is private, set HF_TOKEN or run `hf auth login`" in line
    assert "org/gated: a gated repo: accept its conditions" in one_line_error(plan + ["--model", "org/gated"])
    assert "org/ft1@nope: no revision 'nope' in org/ft1; check the branch" in one_line_error(plan + ["--model", "org/ft1@nope"])
    assert "holds only pickle weights" in one_line_error(plan + ["--model", "org/nosafetensors"])
    monkeypatch.setenv("HF_TOKEN", fakehub.token)
    result = CliRunner().invoke(main, plan + ["--model", "org/private", "--model", "org/gated", "--json"])
    assert result.exit_code == 0, result.output
    assert fakehub.token not in result.output


def test_a_file_gone_from_the_hub_is_a_clear_error(tmp_path, models, fakehub):
    ckpt = hub.open_checkpoint("org/ft1")
    shard = ckpt.files[0].name
    name = next(n for n, t in ckpt.tensors.items() if t.file.name == shard)
    del fakehub.files("org/ft1")[shard]
    with pytest.raises(CheckpointNotFoundError, match=rf"^org/ft1: {shard}: no such file in org/ft1 at this revision$"):
        ckpt.read(name)


def test_unreachable_hub(tmp_path, monkeypatch, fakehub):
    from huggingface_hub import constants

    fakehub.close()
    # no local folder org/base either: that is said first (a mistyped local path looks like a repo id)
    with pytest.raises(CheckpointNotFoundError, match=r"^org/base: no such local folder, and the Hub at http://127.0.0.1:\d+ "
                       r"cannot be reached to look for a repo of that name \(ConnectError\); check the path, or the connection"):
        hub.open_checkpoint("org/base")
    assert constants.HF_HUB_OFFLINE is False


def test_push_uploads_every_file_intact_in_one_commit(tmp_path, models, fakehub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", fakehub.token)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", "-q", "--base", "org/base", "--model", "org/ft1", "--model", "org/ft2",
                                       "--method", "ties", "--density", "0.5", "--max-shard-size", "40KB", str(out),
                                       "--push-to-hub", "me/merged", "--private"])
    assert result.exit_code == 0, result.output
    pushed = fakehub.files("me/merged")
    local = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len([n for n in local if n.startswith("model-")]) > 1
    assert sorted(n for n in pushed if n != ".gitattributes") == local
    for name in local:
        assert pushed[name] == (out / name).read_bytes(), name
    repo = fakehub.repos["me/merged"]
    assert repo.private and len(repo.history) == 2  # the creation, then everything in one commit with the index
    assert "model.safetensors.index.json" in repo.history[-1][1]
    for name in local:
        assert fakehub.token.encode() not in (out / name).read_bytes()
    # A branch, from the Python API, of an existing repo.
    url = hub.push_to_hub(out, "me/merged", branch="dev")
    assert url.endswith(fakehub.repos["me/merged"].refs["dev"]) and fakehub.files("me/merged", "dev")["README.md"] == (out / "README.md").read_bytes()


def test_shards_upload_while_the_merge_runs_and_become_visible_in_one_commit(tmp_path, models, fakehub, monkeypatch):
    import hashlib

    monkeypatch.setenv("HF_TOKEN", fakehub.token)
    upload = hub.HubUpload("me/early")
    out = tmp_path / "out"
    uploaded_during_merge = []

    def on_shard(path: Path) -> None:
        upload.add_shard(path)
        uploaded_during_merge.append(path.name)

    result = api.merge(ties("org/base", "org/ft1", "org/ft2"), out, max_shard_size=40_000, on_shard_file=on_shard)
    shards = [s["file"] for s in result.shards]
    assert len(shards) > 1 and uploaded_during_merge == shards
    for _, future in upload.uploads.values():
        future.result()
    # Stored on the Hub before any commit names them: the repo still holds only its creation.
    assert {hashlib.sha256((out / n).read_bytes()).hexdigest() for n in shards} <= set(fakehub.lfs)
    assert len(fakehub.repos["me/early"].history) == 1
    upload.commit(out)
    pushed = fakehub.files("me/early")
    assert sorted(n for n in pushed if n != ".gitattributes") == sorted(p.name for p in out.iterdir() if p.is_file())
    assert all(pushed[n] == (out / n).read_bytes() for n in shards)


def test_push_without_write_access_fails_before_merging(tmp_path, models, fakehub):
    out = tmp_path / "out"
    line = one_line_error(["merge", "-q", "--base", "org/base", "--model", "org/ft1", "--model", "org/ft2", "--method", "ties",
                           str(out), "--push-to-hub", "me/merged"])
    assert "me/merged: cannot push (HTTP 401)" in line
    assert not out.exists()  # no merge was started


def test_push_errors(tmp_path, models, fakehub):
    out = tmp_path / "out"
    api.merge(ties("org/base", "org/ft1", "org/ft2"), out)
    assert "me/merged: cannot push (HTTP 401): set HF_TOKEN or run `hf auth login`" in one_line_error(["push", str(out), "me/merged"])
    assert "no model.safetensors.index.json: not a finished merge" in one_line_error(["push", str(tmp_path), "me/merged"])
    with pytest.raises(HubError, match="not a Hub repo id"):
        hub.push_to_hub(out, "me/merged@dev")


def test_local_cache_snapshot_folder_is_a_local_input(tmp_path, models, fakehub):
    """A huggingface_hub snapshot folder (files linked to ../../blobs) reads as a local checkpoint."""
    api.merge(ties("org/base", "org/ft1", "org/ft2"), tmp_path / "a")
    snapshot = next((hf_cache() / "models--org--ft1" / "snapshots").iterdir())
    from streammerge.io.sources import Checkpoint

    assert len(Checkpoint(snapshot).tensors) == len(SHAPE.shapes())


def test_cli_subprocess_reads_the_environment(tmp_path, models, fakehub):
    """HF_ENDPOINT and HF_HUB_CACHE as a user sets them (huggingface_hub reads them at import)."""
    env = {**os.environ, "HF_ENDPOINT": fakehub.url, "HF_HUB_CACHE": str(tmp_path / "cache2"), "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN_PATH": str(tmp_path / "none"), "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("HF_TOKEN", None)
    cmd = [sys.executable, "-m", "streammerge", "merge", "-q", "--base", "org/base", "--model", "org/ft1", "--model", "org/ft2",
           "--method", "ties", "--density", "0.5", "--compile", "off", str(tmp_path / "out")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert fakehub.weight_reads() and list((tmp_path / "cache2").glob("models--org--base/snapshots/*/model-*.safetensors"))
    local = api.merge(MergeConfig(method="ties", base=str(models[0]), models=tuple(ModelSpec(str(f), {"density": 0.5}) for f in models[1])),
                      tmp_path / "local-out")
    assert (tmp_path / "out" / local.shards[0]["file"]).read_bytes() == (tmp_path / "local-out" / local.shards[0]["file"]).read_bytes()


def test_tokenizer_source_from_a_hub_repo(tmp_path, models, fakehub):
    tokens = [f"t{i}" for i in range(SHAPE.vocab)]
    swapped = [tokens[1], tokens[0], *tokens[2:]]  # ft1 numbers two tokens the other way round
    tokenizer = json.dumps(tokenizer_json(swapped)).encode()
    fakehub.commit("org/base", {"tokenizer.json": json.dumps(tokenizer_json(tokens)).encode()})
    fakehub.commit("org/ft1", {"tokenizer.json": tokenizer, "tokenizer_config.json": b"{}"})
    api.merge(ties("org/base", "org/ft1", "org/ft2", tokenizer_source="org/ft1"), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer
    # ft1's rows 0 and 1 trade places (its ids); ft2, without a tokenizer, has the base's ids; the rest is as without
    api.merge(ties("org/base", "org/ft1", "org/ft2"), tmp_path / "plain")
    merged, plain = (load_file(next((tmp_path / d).glob("model-*.safetensors")))["model.embed_tokens.weight"]
                     for d in ("out", "plain"))
    assert torch.equal(merged[2:], plain[2:]) and not torch.equal(merged[:2], plain[:2])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"  # from the base


def test_a_union_of_hub_vocabularies_gives_the_bytes_of_the_local_union(tmp_path, models, fakehub):
    # ft1 numbers two tokens the other way round and has a token the others lack: the union appends it
    tokens = [f"t{i}" for i in range(SHAPE.vocab)]
    theirs = [tokens[1], tokens[0], *tokens[2:5], "<|new|>", *tokens[6:]]
    tokenizers = {"base": tokenizer_json(tokens), "ft1": tokenizer_json(theirs), "ft2": tokenizer_json(tokens)}
    for name, data in tokenizers.items():
        fakehub.commit(f"org/{name}", {"tokenizer.json": json.dumps(data).encode()})
    base, fts = models
    for folder, name in ((base, "base"), (fts[0], "ft1"), (fts[1], "ft2")):
        (folder / "tokenizer.json").write_text(json.dumps(tokenizers[name]))
    hub = api.merge(ties("org/base", "org/ft1", "org/ft2", tokenizer_source="union"), tmp_path / "hub")
    local = api.merge(ties(str(base), str(fts[0]), str(fts[1]), tokenizer_source="union"), tmp_path / "local-out")
    assert [s["sha256"] for s in hub.shards] == [s["sha256"] for s in local.shards]
    union = json.loads((tmp_path / "hub" / "tokenizer.json").read_text())
    assert union["model"]["vocab"] == tokenizers["base"]["model"]["vocab"]
    assert [(t["id"], t["content"]) for t in union["added_tokens"]] == [(SHAPE.vocab, "<|new|>")]
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["vocab_size"] == SHAPE.vocab + 1


def test_a_lora_adapter_repo_merges_like_the_local_adapter(tmp_path, models, fakehub):
    import json

    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 32, generator=gen).bfloat16(), torch.randn(32, 4, generator=gen).bfloat16()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"], "base_model_name_or_path": "org/base"}))
    fakehub.add_folder("org/lora", adapter)
    base, (ft1, _) = models
    local = api.merge(MergeConfig(method="task_arithmetic", base=str(base), models=(ModelSpec(str(adapter), {"weight": 1.0}),)),
                      tmp_path / "out-local")
    remote = api.merge(MergeConfig(method="task_arithmetic", base="org/base", models=(ModelSpec("org/lora", {"weight": 1.0}),)),
                       tmp_path / "out-remote")
    assert [s["sha256"] for s in remote.shards] == [s["sha256"] for s in local.shards]
    changed = api.plan(MergeConfig(method="task_arithmetic", base="org/base", models=(ModelSpec("org/lora", {"weight": 1.0}),)))
    assert changed.sources[0].startswith("org/lora@")
