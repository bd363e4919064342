"""Hostile and broken input files: each is refused with one error naming the file and the problem.

Never a traceback, never a hang, never an unpickled byte. Library calls raise CheckpointError (or
CheckpointNotFoundError); the CLI turns them into one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import no_hang

from streammerge.constants import SAFETENSORS_INDEX
from streammerge.errors import CheckpointError, CheckpointNotFoundError
from streammerge.front.cli import main
from streammerge.front.demo import build_demo_models
from streammerge.io.sources import Checkpoint, _inside, read_header

GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
DATA = bytes(range(16))




def write_st(path: Path, header: dict | bytes, data: bytes = DATA, *, length: int | None = None) -> Path:
    """A safetensors file with the given header (a dict, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def refused(path: str | os.PathLike, *problem: str, cls: type[CheckpointError] = CheckpointError, named: Path | None = None) -> str:
    """Asserts that opening `path` as a Checkpoint raises exactly `cls` with a message naming
    `named` (default: `path`) and each of `problem`; returns the message."""
    with no_hang(), pytest.raises(CheckpointError) as info:
        Checkpoint(path)
    assert type(info.value) is cls, (type(info.value), str(info.value))
    message = str(info.value)
    assert message.startswith(f"{named or path}: "), message
    for needle in problem:
        assert needle in message, (needle, message)
    assert "\n" not in message and len(message) < 600
    return message


def test_a_good_file_reads(tmp_path):
    path = write_st(tmp_path / "m.safetensors", GOOD)
    with Checkpoint(path) as ckpt:
        assert ckpt.read("w").tolist() == torch.frombuffer(bytearray(DATA), dtype=torch.float32).view(2, 2).tolist()


# ---- the length prefix and the JSON ------------------------------------------------------------


def test_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x10\x00")
    refused(path, "not a safetensors file: shorter than its 8-byte header length")


def test_empty_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"")
    refused(path, "shorter than its 8-byte header length")


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 100 * 1024 * 1024 + 1])
def test_absurd_header_length(tmp_path, length):
    path = write_st(tmp_path / "m.safetensors", GOOD, length=length)
    refused(path, f"corrupt safetensors header: declares {length} header bytes")


def test_header_longer_than_the_file(tmp_path):
    raw = json.dumps(GOOD).encode()
    path = write_st(tmp_path / "m.safetensors", raw[:20], b"", length=len(raw))  # truncated inside the header
    refused(path, f"declares {len(raw)} header bytes but the file has 28 bytes", "truncated")


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b'{"w": {"dtype": "F32",', "corrupt safetensors header: Expecting"),
        (b"", "corrupt safetensors header: Expecting value"),
        (b"[1, 2]", "corrupt safetensors header: not a JSON object"),
        (b'"w"', "corrupt safetensors header: not a JSON object"),
        (b"{}\x00\x00", "corrupt safetensors header: Extra data"),
        (b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header: JSON nested too deeply"),
        (b'{"w": ' + b"9" * 5000 + b"}", "corrupt safetensors header: Exceeds the limit"),
    ],
    ids=["cut", "empty", "list", "string", "nul-padding", "deep", "huge-int"],
)
def test_malformed_json(tmp_path, raw, problem):
    refused(write_st(tmp_path / "m.safetensors", raw, b""), problem)


def test_header_not_utf8(tmp_path):
    raw = json.dumps(GOOD).encode().replace(b'"w"', b'"\xff\xfe"')
    refused(write_st(tmp_path / "m.safetensors", raw), "corrupt safetensors header: not UTF-8")


def test_duplicate_json_keys(tmp_path):
    entry = json.dumps(GOOD["w"])
    raw = f'{{"w": {entry}, "w": {entry}}}'.encode()
    refused(write_st(tmp_path / "m.safetensors", raw), "corrupt safetensors header: duplicate key 'w'")


def test_duplicate_keys_inside_an_entry(tmp_path):
    raw = b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}'
    refused(write_st(tmp_path / "m.safetensors", raw), "duplicate key 'dtype'")


# ---- the entries --------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [[], "x", 0, False, 1.5, {"a": 1}, {"a": None}, {"a": ["b"]}])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    path = write_st(tmp_path / "m.safetensors", {"__metadata__": metadata, **GOOD})
    refused(path, "corrupt safetensors header: __metadata__ must map strings to strings")


def test_null_metadata_is_no_metadata(tmp_path):
    tensors, metadata = read_header(write_st(tmp_path / "m.safetensors", {"__metadata__": None, **GOOD}))
    assert metadata == {} and list(tensors) == ["w"]


def test_empty_tensor_name(tmp_path):
    refused(write_st(tmp_path / "m.safetensors", {"": GOOD["w"]}), "corrupt safetensors header: a tensor has an empty name")


@pytest.mark.parametrize("entry", [[1, 2], "F32", None, {**GOOD["w"], "extra": 1}], ids=["list", "str", "null", "extra-key"])
def test_not_a_tensor_entry(tmp_path, entry):
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}), "corrupt safetensors header: tensor 'w' is not a tensor entry")


@pytest.mark.parametrize("dtype", ["F8_E8M0", "f32", "", None, 32, ["F32"], {"F32": 1}])
def test_unknown_or_non_string_dtype(tmp_path, dtype):
    entry = {**GOOD["w"], "dtype": dtype}
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}), f"tensor 'w' has dtype {dtype!r}, which streammerge does not read")


@pytest.mark.parametrize("shape", [[-1, 4], [2.0, 2], [True, 2], ["2", 2], [None], 4, "2x2", None])
def test_shape_not_a_list_of_naturals(tmp_path, shape):
    entry = {**GOOD["w"], "shape": shape}
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}), f"corrupt safetensors header: tensor 'w' has shape {shape!r}")


def test_shape_product_too_large_for_its_bytes(tmp_path):
    # 2**62 * 2**62 * 4 bytes: an int64 overflow in C, caught here as a byte count that does not match
    entry = {**GOOD["w"], "shape": [2**62, 2**62]}
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}), "tensor 'w' has 16 bytes for shape [4611686018427387904, 46")


@pytest.mark.parametrize(
    "shape", [[0, 10**18], [10**18, 0], [0, 2**62, 2**62], [1] * 33, [0] * 40], ids=["wide", "tall", "strides", "dims", "zeros"]
)
def test_absurd_shape_without_bytes(tmp_path, shape):
    # no elements, so no bytes to check against, but huge dimensions: a view would overflow, a block loop never end
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}, b""), "corrupt safetensors header: tensor 'w' has an absurd shape")


def test_empty_tensor_of_a_sane_shape_reads(tmp_path):
    entry = {"dtype": "BF16", "shape": [0, 4096], "data_offsets": [0, 0]}
    with Checkpoint(write_st(tmp_path / "m.safetensors", {"e": entry}, b"")) as ckpt:
        assert ckpt.read("e").shape == (0, 4096) and ckpt.view("e").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "offsets",
    [[0.0, 16.0], [False, True], [0, True], ["0", "16"], [0, None], [0], [0, 8, 16], "0-16", None, {"0": 16}],
    ids=["floats", "bools", "bool", "strings", "null", "one", "three", "str", "none", "dict"],
)
def test_data_offsets_not_two_ints(tmp_path, offsets):
    entry = {**GOOD["w"], "data_offsets": offsets}
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}), "corrupt safetensors header: tensor 'w' has data_offsets")


@pytest.mark.parametrize("offsets", [[0, 32], [-16, 0], [16, 0], [2**70, 2**70 + 16]], ids=["past-end", "negative", "reversed", "huge"])
def test_data_offsets_out_of_range(tmp_path, offsets):
    entry = {**GOOD["w"], "data_offsets": offsets}
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}), "tensor 'w' has data_offsets", "outside the 16 data bytes")


def test_offsets_not_matching_the_shape(tmp_path):
    entry = {**GOOD["w"], "data_offsets": [0, 12]}
    refused(write_st(tmp_path / "m.safetensors", {"w": entry}, DATA[:12]), "tensor 'w' has 12 bytes for shape [2, 2] F32")


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    refused(write_st(tmp_path / "m.safetensors", header, DATA[:12]), "corrupt safetensors header: tensor 'b' overlaps the previous tensor")


def test_aliased_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    refused(write_st(tmp_path / "m.safetensors", header), "overlaps the previous tensor")


def test_hole_between_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    refused(write_st(tmp_path / "m.safetensors", header), "corrupt safetensors header: tensor 'b' leaves a hole before it")


def test_bytes_after_the_last_tensor(tmp_path):
    refused(write_st(tmp_path / "m.safetensors", GOOD, DATA + b"junk"), "corrupt safetensors header: 4 byte(s) after the last tensor's data")


def test_truncated_data(tmp_path):
    refused(write_st(tmp_path / "m.safetensors", GOOD, DATA[:10]), "tensor 'w' has data_offsets [0, 16] outside the 10 data bytes (truncated file?)")


def test_a_huge_name_gives_a_short_message(tmp_path):
    name = "x" * 1_000_000
    message = refused(write_st(tmp_path / "m.safetensors", {name: {**GOOD["w"], "dtype": "F99"}}), "has dtype 'F99'")
    assert len(message) < 300


def test_file_truncated_after_its_header_was_read(tmp_path):
    raw = json.dumps(GOOD).encode()
    path = write_st(tmp_path / "m.safetensors", raw + b" " * (-len(raw) % 8))  # aligned: view() maps, not copies
    with Checkpoint(path) as ckpt:
        os.truncate(path, path.stat().st_size - 8)
        with pytest.raises(CheckpointError, match=r"m\.safetensors: file ended while reading tensor 'w' \(truncated\?\)"):
            ckpt.read("w")
        with pytest.raises(CheckpointError, match=r"m\.safetensors: is shorter than when its header was read"):
            ckpt.view("w")  # a mapped view past the end would be a SIGBUS


# ---- not a regular file ----------------------------------------------------------------------


def test_directory_named_like_a_file(tmp_path):
    folder = tmp_path / "m.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"m\.safetensors: not a regular file but a directory"):
        read_header(folder)
    refused(folder, f"no {SAFETENSORS_INDEX} or model.safetensors in this folder", cls=CheckpointNotFoundError)
    model = tmp_path / "model"
    (model / "model.safetensors").mkdir(parents=True)
    refused(model, "not a regular file", named=model / "model.safetensors")


def test_fifo_never_blocks(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)  # nobody writes: an open() without O_NONBLOCK would wait forever
    with no_hang(), pytest.raises(CheckpointError, match=r"m\.safetensors: not a regular file but a named pipe"):
        read_header(fifo)
    refused(fifo, "not a .safetensors file or a model folder but a named pipe")
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "model.safetensors")
    refused(model, "not a regular file", named=model / "model.safetensors")


def test_fifo_shard_in_an_index(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "model-00001-of-00001.safetensors")
    (model / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    refused(model, f"shard listed in {SAFETENSORS_INDEX} is not a regular file", named=model / "model-00001-of-00001.safetensors")


def test_fifo_index_never_blocks(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / SAFETENSORS_INDEX)
    refused(model, "not a regular file but a named pipe", named=model / SAFETENSORS_INDEX)


def test_device_files(tmp_path):
    refused("/dev/zero", "not a .safetensors file or a model folder but a character device")
    with no_hang(), pytest.raises(CheckpointError, match="^/dev/zero: not a regular file but a character device$"):
        read_header("/dev/zero")
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    refused(link, "not a .safetensors file or a model folder but a character device")


def test_index_that_is_a_directory(tmp_path):
    model = tmp_path / "model"
    (model / SAFETENSORS_INDEX).mkdir(parents=True)
    refused(model, "not a regular file but a directory", named=model / SAFETENSORS_INDEX)


# ---- indexes -------------------------------------------------------------------------------------


def sharded(folder: Path, weight_map: dict[str, str], **extra: object) -> Path:
    """A folder with shard a.safetensors (tensor 'a') and b.safetensors (tensor 'b') and the given index."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        write_st(folder / f"{name}.safetensors", {name: GOOD["w"]})
    (folder / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map, **extra}))
    return folder


def test_good_index(tmp_path):
    with Checkpoint(sharded(tmp_path / "m", {"a": "a.safetensors", "b": "b.safetensors"})) as ckpt:
        assert sorted(ckpt.tensors) == ["a", "b"] and ckpt.read("b").shape == (2, 2)


@pytest.mark.parametrize(
    "shard", ["../a.safetensors", "sub/../../a.safetensors", "/etc/passwd", "", "a\x00.safetensors"],
    ids=["dotdot", "nested-dotdot", "absolute", "empty", "nul"],
)
def test_index_shard_escaping_the_folder(tmp_path, shard):
    write_st(tmp_path / "a.safetensors", {"a": GOOD["w"]})
    model = sharded(tmp_path / "m", {"a": shard, "b": "b.safetensors"})
    refused(model, f"shard name {shard!r} points outside the model folder", named=model / SAFETENSORS_INDEX)


def test_index_shard_symlink_pointing_outside(tmp_path):
    outside = write_st(tmp_path / "outside.safetensors", {"a": GOOD["w"]})
    model = sharded(tmp_path / "m", {"a": "link.safetensors", "b": "b.safetensors"})
    (model / "link.safetensors").symlink_to(outside)
    refused(model, "shard 'link.safetensors' is a link pointing outside the model folder", named=model / SAFETENSORS_INDEX)
    (model / "sub").symlink_to(tmp_path)  # a linked folder on the way out
    (model / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "sub/outside.safetensors"}}))
    refused(model, "is a link pointing outside the model folder", named=model / SAFETENSORS_INDEX)


def test_single_file_symlink_pointing_outside(tmp_path):
    outside = write_st(tmp_path / "outside.safetensors", GOOD)
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").symlink_to(outside)
    refused(model, "shard 'model.safetensors' is a link pointing outside the model folder", named=model / "model.safetensors")


def test_symlink_inside_the_folder_is_fine(tmp_path):
    model = sharded(tmp_path / "m", {"a": "link.safetensors", "b": "b.safetensors"})
    (model / "link.safetensors").symlink_to("a.safetensors")
    with Checkpoint(model) as ckpt:
        assert sorted(ckpt.tensors) == ["a", "b"]


def test_symlink_loop(tmp_path):
    model = sharded(tmp_path / "m", {"a": "loop1.safetensors", "b": "b.safetensors"})
    (model / "loop1.safetensors").symlink_to("loop2.safetensors")
    (model / "loop2.safetensors").symlink_to("loop1.safetensors")
    with no_hang(), pytest.raises(CheckpointError) as info:
        Checkpoint(model)
    message = str(info.value)
    assert "loop1.safetensors" in message
    assert any(p in message for p in ("cannot be resolved", "is missing", "not a regular file")), message


def test_inside(tmp_path):
    (tmp_path / "m").mkdir()
    assert _inside(tmp_path / "m", "x.safetensors") == tmp_path / "m" / "x.safetensors"
    assert _inside(tmp_path / "m", "sub/x.safetensors") == tmp_path / "m" / "sub" / "x.safetensors"
    for bad in ("../x", "/x", "", "a/../../x", "\x00"):
        with pytest.raises(CheckpointError, match="points outside the model folder"):
            _inside(tmp_path / "m", bad)


def test_index_maps_a_tensor_to_a_shard_without_it(tmp_path):
    model = sharded(tmp_path / "m", {"a": "b.safetensors", "b": "b.safetensors"})
    refused(model, "1 tensor(s) listed in the index are not in their shard, e.g. 'a' is not in 'b.safetensors'",
            named=model / SAFETENSORS_INDEX)


def test_index_shard_missing(tmp_path):
    model = sharded(tmp_path / "m", {"a": "a.safetensors", "b": "c.safetensors"})
    refused(model, f"shard listed in {SAFETENSORS_INDEX} is missing", cls=CheckpointNotFoundError, named=model / "c.safetensors")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{", "not a valid index: Expecting"),
        ('{"weight_map": {"a": "a.safetensors", "a": "b.safetensors"}}', "not a valid index: duplicate key 'a'"),
        ("[]", "no 'weight_map' object"),
        ('{"weight_map": ["a.safetensors"]}', "no 'weight_map' object"),
        ('{"weight_map": {"a": 1}}', "no 'weight_map' object"),
        ('{"weight_map": {"a": null}}', "no 'weight_map' object"),
        ("[" * 100_000, "not a valid index: JSON nested too deeply"),
    ],
    ids=["cut", "duplicate", "list", "map-is-list", "int-shard", "null-shard", "deep"],
)
def test_malformed_index(tmp_path, text, problem):
    model = sharded(tmp_path / "m", {})
    (model / SAFETENSORS_INDEX).write_text(text)
    refused(model, problem, named=model / SAFETENSORS_INDEX)


def test_index_not_utf8(tmp_path):
    model = sharded(tmp_path / "m", {})
    (model / SAFETENSORS_INDEX).write_bytes(b'{"weight_map": {"\xff": "a.safetensors"}}')
    refused(model, "not a valid index: 'utf-8' codec can't decode", named=model / SAFETENSORS_INDEX)


# ---- pickles: never loaded -----------------------------------------------------------------------


class Exploit:
    """Unpickling this creates a folder: proof that a pickle was loaded."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_file_is_never_loaded(tmp_path, suffix):
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(pickle.dumps(Exploit(tmp_path / "pwned")))
    refused(path, "pickle checkpoints are never loaded", "convert to safetensors")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(path, folder)
    refused(folder, "holds only pickle weights (.bin/.pt), which streammerge never loads", "safetensors")
    assert not (tmp_path / "pwned").exists()


def test_pickle_shards_in_an_index(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "pytorch_model-00001-of-00001.bin").write_bytes(pickle.dumps(Exploit(tmp_path / "pwned")))
    (model / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    refused(model, "shard 'pytorch_model-00001-of-00001.bin' is a pickle file, which streammerge never loads", named=model / SAFETENSORS_INDEX)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "raw-pickle"])
def test_pickle_named_safetensors(tmp_path, zipped):
    path = tmp_path / "model.safetensors"
    if zipped:
        torch.save({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes(pickle.dumps(Exploit(tmp_path / "pwned"), protocol=4))
    refused(path, "a pickle (PyTorch) checkpoint, not safetensors", "never loaded")
    assert not (tmp_path / "pwned").exists()


def test_missing_path(tmp_path):
    refused(tmp_path / "nope", "no such file or folder", cls=CheckpointNotFoundError)


def test_not_a_safetensors_suffix(tmp_path):
    assert refused(write_st(tmp_path / "weights.npz", GOOD), "not a .safetensors file").endswith(": not a .safetensors file")


# ---- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_demo_models(root)
    return root


def corrupt_header(model: Path) -> Path:
    shard = model / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    return shard


def truncate_shard(model: Path) -> Path:
    shard = model / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    return shard


def escaping_index(model: Path) -> Path:
    index = json.loads((model / SAFETENSORS_INDEX).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../ft2/model-00001-of-00002.safetensors"
    (model / SAFETENSORS_INDEX).write_text(json.dumps(index))
    return model / SAFETENSORS_INDEX


def wrong_shard_in_index(model: Path) -> Path:
    index = json.loads((model / SAFETENSORS_INDEX).read_text())
    name = next(n for n, f in index["weight_map"].items() if f == "model-00001-of-00002.safetensors")
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (model / SAFETENSORS_INDEX).write_text(json.dumps(index))
    return model / SAFETENSORS_INDEX


def pickle_only(model: Path) -> Path:
    for p in model.glob("*.safetensors*"):
        p.unlink()
    (model / SAFETENSORS_INDEX).unlink(missing_ok=True)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(model / "pwned")))
    return model


def fifo_shard(model: Path) -> Path:
    shard = model / "model-00001-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    return shard


def newline_in_a_name(model: Path) -> Path:
    shard = model / "model-00001-of-00002.safetensors"
    write_st(shard, {"evil\nname": {**GOOD["w"], "dtype": "F99"}})
    return shard


@pytest.mark.parametrize(
    "damage, needle",
    [
        (corrupt_header, "corrupt safetensors header: declares"),
        (truncate_shard, "(truncated file?)"),
        (escaping_index, "points outside the model folder"),
        (wrong_shard_in_index, "not in their shard"),
        (pickle_only, "never loads"),
        (fifo_shard, "not a regular file"),
        (newline_in_a_name, "'evil\\nname' has dtype 'F99'"),
    ],
)
def test_cli_refuses_hostile_models_in_one_line(models, tmp_path, damage, needle):
    bad = tmp_path / "bad"
    shutil.copytree(models / "ft1", bad)
    named = damage(bad)
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: ties\nbase_model: {json.dumps(str(models / 'base'))}\nmodels:\n"
        f"  - model: {json.dumps(str(models / 'ft2'))}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {json.dumps(str(bad))}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    )
    out = tmp_path / "out"
    with no_hang(60):
        result = CliRunner().invoke(main, ["merge", str(config), str(out)])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"streammerge: error: {named}"), lines[0]
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.stderr
    assert not (out / SAFETENSORS_INDEX).exists()
    assert not (bad / "pwned").exists()
