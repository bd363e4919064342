"""`streammerge verify`: a fresh merge is intact; each kind of damage is found and named, all at once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from streammerge import MergeConfig, merge
from streammerge.constants import MANIFEST, SAFETENSORS_INDEX
from streammerge.front.cli import main
from streammerge.front.demo import DEMO_CONFIG, TinyLlama, build_demo_models
from streammerge.io.verify import VerifyReport, verify

N_TENSORS = len(TinyLlama().shapes())


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A fresh merge in several shards (read only: tests damage copies of it)."""
    root = tmp_path_factory.mktemp("verify")
    build_demo_models(root)
    (root / "merge.yaml").write_text(DEMO_CONFIG)
    merge(MergeConfig.from_yaml(root / "merge.yaml"), root / "out", max_shard_size=100_000)
    return root / "out"


@pytest.fixture
def out(merged, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(merged, copy)
    return copy


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("model-*.safetensors"))


def only(report: VerifyReport, *needles: str) -> None:
    """Asserts the report failed and that each needle is in some problem."""
    assert not report.ok
    for needle in needles:
        assert any(needle in p for p in report.problems), (needle, report.problems)


def test_fresh_merge_verifies(merged):
    report = verify(merged)
    assert report == VerifyReport(merged, True, [], len(shards(merged)), N_TENSORS)
    assert report.shards >= 3
    result = CliRunner().invoke(main, ["verify", str(merged)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {report.shards} shards, {N_TENSORS} tensors verified\n"
    assert result.stderr == ""
    result = CliRunner().invoke(main, ["verify", str(merged), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"output_dir": str(merged), "ok": True, "shards": report.shards,
                                         "tensors": N_TENSORS, "problems": [], "sha256_checked": True, "notes": []}


def test_flipped_byte_in_data(out):
    shard = shards(out)[1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor's data: the header still parses
    shard.write_bytes(raw)
    report = verify(out)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"{shard}: sha256 ")
    assert "does not match the manifest's" in report.problems[0] and "(corrupted or modified)" in report.problems[0]
    assert (report.shards, report.tensors) == (len(shards(out)), N_TENSORS)


def test_truncated_shard(out):
    shard = shards(out)[0]
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    only(verify(out), f"{shard}: corrupt safetensors header", "(truncated file?)",
         f"{shard}: {size - 10} bytes but the manifest records {size} (truncated or modified)",
         f"{shard}: sha256 ", f"{out / SAFETENSORS_INDEX}: metadata.total_size is ")


def test_deleted_shard(out):
    shard = shards(out)[-1]
    shard.unlink()
    report = verify(out)
    only(report, f"{shard}: missing")
    assert report.shards == len(shards(out))
    assert not any("does not hold it" in p for p in report.problems)  # one cause, not one line per tensor


def test_index_points_to_the_wrong_shard(out):
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    first, second = (p.name for p in shards(out)[:2])
    name = next(n for n, f in index["weight_map"].items() if f == first)
    index["weight_map"][name] = second
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index))
    report = verify(out)
    assert report.problems == [
        f"{out / first}: holds tensor {name!r} but the index maps it to {second}",
        f"{out / SAFETENSORS_INDEX}: maps tensor {name!r} to {second}, which does not hold it",
    ]


def test_index_misses_a_tensor_and_total_size_is_wrong(out):
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    name = sorted(index["weight_map"])[0]
    del index["weight_map"][name]
    index["metadata"]["total_size"] += 1
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index))
    only(verify(out), f"holds tensor {name!r} but the index does not list it",
         f"{out / SAFETENSORS_INDEX}: metadata.total_size is {index['metadata']['total_size']} but the shards hold "
         f"{index['metadata']['total_size'] - 1} tensor bytes")


def test_manifest_sha_edited(out):
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (out / MANIFEST).write_text(json.dumps(manifest))
    report = verify(out)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{out / manifest['shards'][0]['file']}: sha256 ")
    assert f"does not match the manifest's {'0' * 64}" in report.problems[0]


def test_missing_manifest(out):
    (out / MANIFEST).unlink()
    report = verify(out)
    assert report.problems == [f"{out / MANIFEST}: missing (nothing to check the shards' sha256 against)"]
    assert report.shards == len(shards(out))  # the rest is still checked


def test_missing_index(out):
    (out / SAFETENSORS_INDEX).unlink()
    only(verify(out), f"{out / SAFETENSORS_INDEX}: missing (the merge did not finish")


def test_malformed_manifest(out):
    (out / MANIFEST).write_text('{"shards": [{"file": "x"}]')
    only(verify(out), f"{out / MANIFEST}: not valid JSON")
    (out / MANIFEST).write_text('{"shards": [{"file": 1}]}')
    only(verify(out), f"{out / MANIFEST}: shards[0] is not a {{file, sha256, bytes}} record",
         "in the index but not in the manifest")


def test_stray_shard(out):
    shutil.copy(shards(out)[0], out / "model-00009-of-00009.safetensors")
    only(verify(out), f"{out / 'model-00009-of-00009.safetensors'}: a shard in neither the index nor the manifest")


def test_index_escaping_the_folder(out):
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = "../elsewhere.safetensors"
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index))
    only(verify(out), "shard name '../elsewhere.safetensors' points outside the model folder")


def test_fifo_shard_never_blocks(out):
    shard = shards(out)[0]
    shard.unlink()
    os.mkfifo(shard)
    only(verify(out), f"{shard}: not a regular file but a named pipe")


def test_every_problem_is_reported(out):
    first, *_, last = shards(out)
    raw = bytearray(first.read_bytes())
    raw[-1] ^= 0xFF
    first.write_bytes(raw)
    last.unlink()
    report = verify(out)
    only(report, f"{first}: sha256 ", f"{last}: missing")


def test_cli_reports_each_problem_on_its_own_line(out):
    shards(out)[-1].unlink()
    (out / MANIFEST).unlink()
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == len(verify(out).problems) >= 2
    assert all(line.startswith("streammerge: error: ") for line in lines)
    result = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["ok"] is False and len(summary["problems"]) == len(lines)


def test_cli_on_a_missing_folder(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr == f"streammerge: error: {tmp_path / 'nope'}: no such folder\n"
