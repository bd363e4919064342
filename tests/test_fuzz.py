"""Fuzzing the readers: whatever the bytes, a checkpoint either reads correctly or is refused with a
StreammergeError. Never another exception, never a hang.

Three generators: arbitrary bytes; well-formed safetensors files with their JSON header mutated
(dtypes, shapes, offsets, extra keys, metadata, the length prefix, truncated or extra data); and
HF folders whose index is mutated.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

from conftest import no_hang
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge.constants import SAFETENSORS_INDEX
from streammerge.errors import StreammergeError
from streammerge.io import quant
from streammerge.io.sources import DTYPES, Checkpoint, itemsize

SETTINGS = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)
dims = st.integers(0, 5) | st.sampled_from([-1, 2**31, 2**62, 2**64, 10**18])
names = st.text(min_size=0, max_size=12) | st.sampled_from(["w", "model.norm.weight", "__metadata__", "a\nb"])




def read_or_refuse(path: Path) -> None:
    """Opens `path`; if it opens, every tensor must read (copy and view) with its declared shape and dtype."""
    with no_hang(10):
        try:
            ckpt = Checkpoint(path)
        except StreammergeError:
            return
        with ckpt:
            for name, info in ckpt.tensors.items():
                for tensor in (ckpt.read(name), ckpt.view(name)):
                    assert tuple(tensor.shape) == info.shape and tensor.dtype == DTYPES[info.dtype], (name, info)
                    assert tensor.numel() * tensor.element_size() == info.nbytes
                    del tensor
                if info.rows > 1:  # a row range, as the engine reads it
                    part = ckpt.view(name, 1, info.rows)
                    assert tuple(part.shape) == (info.rows - 1, *info.shape[1:])
                    del part


def safetensors_bytes(tensors: list[tuple[str, str, list[int]]], metadata: object = None) -> tuple[dict, bytes]:
    """A well-formed header (as a dict) and the data for the given (name, dtype, shape)."""
    header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, bytes(i % 251 for i in range(offset))


def frame(header: dict | bytes, data: bytes, length_delta: int = 0) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


# FP8 tensors are well formed only with their scales (test_fp8.py); alone they are refused
valid_tensors = st.lists(
    st.tuples(st.text(min_size=1, max_size=10), st.sampled_from(sorted(set(DTYPES) - {"F8_E4M3", "F8_E5M2"})), st.lists(st.integers(0, 4), max_size=3)),
    max_size=4,
    unique_by=lambda t: t[0],
).filter(lambda ts: all(t[0] != "__metadata__" for t in ts)).filter(
    # names of other quantization formats' tensors (".absmax", "_blocks" + "_scales") are refused by design (quant.py)
    lambda ts: not any(t[0].endswith(suffix) for t in ts for suffix, _ in quant._SUFFIXES)
    and not any(t[0].endswith("_blocks") for t in ts))


@st.composite
def mutated_file(draw) -> bytes:
    tensors = draw(valid_tensors)
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | json_values)
    header, data = safetensors_bytes(tensors, metadata)
    for _ in range(draw(st.integers(0, 3))):
        entries = [k for k in header if k != "__metadata__"]
        what = draw(st.sampled_from(["dtype", "shape", "offsets", "extra", "drop", "replace", "add", "rename"]))
        if what == "add" or not entries:
            header[draw(names)] = draw(json_values | st.fixed_dictionaries(
                {"dtype": st.sampled_from(sorted(DTYPES)), "shape": st.lists(dims, max_size=3),
                 "data_offsets": st.lists(st.integers(0, 64), min_size=2, max_size=2)}))
            continue
        entry = header[draw(st.sampled_from(entries))]
        if not isinstance(entry, dict):
            continue
        if what == "dtype":
            entry["dtype"] = draw(st.sampled_from(sorted(DTYPES) + ["F8_E4M3", "f32", ""]) | json_values)
        elif what == "shape":
            entry["shape"] = draw(st.lists(dims, max_size=4) | json_values)
        elif what == "offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-4, 200) | json_scalars, max_size=3))
        elif what == "extra":
            entry[draw(st.text(max_size=6))] = draw(json_values)
        elif what == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif what == "replace":
            header[draw(st.sampled_from(entries))] = draw(json_values)
        elif what == "rename":
            old = draw(st.sampled_from(entries))
            if old in header:
                header[draw(names)] = header.pop(old)
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.integers(0, 7))
    if draw(st.booleans()):  # byte-level damage inside the header: non-UTF-8, duplicate keys, cuts
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.binary(max_size=4) | st.sampled_from([b"\xff", b'"w":1,', b"\\ud800", b"{"])) + raw[pos:]
    cut = draw(st.integers(-8, 8))
    data = data[: len(data) + cut] if cut < 0 else data + bytes(cut)
    return frame(raw, data, draw(st.sampled_from([0, 0, 0, -1, 1, -8, 8, 2**40, -(2**40)])))


def write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


@SETTINGS
@given(st.binary(max_size=300) | st.binary(min_size=8, max_size=8).map(lambda b: b + b"{}"))
def test_arbitrary_bytes(content):
    with tempfile.TemporaryDirectory() as d:
        read_or_refuse(write(Path(d), "m.safetensors", content))


@SETTINGS
@given(valid_tensors, st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
def test_well_formed_files_read(tensors, metadata):
    header, data = safetensors_bytes(tensors, metadata)
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d), "m.safetensors", frame(header, data))
        with no_hang(10), Checkpoint(path) as ckpt:  # must open: nothing wrong with it
            assert sorted(ckpt.tensors) == sorted(t[0] for t in tensors)
        read_or_refuse(path)


@SETTINGS
@given(mutated_file())
def test_mutated_files(content):
    with tempfile.TemporaryDirectory() as d:
        read_or_refuse(write(Path(d), "m.safetensors", content))


SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
shard_names = st.sampled_from(SHARDS + ["../x.safetensors", "/etc/passwd", "", ".", "sub/../" + SHARDS[0], "missing.safetensors",
                                        "pytorch_model.bin", "a\x00b"]) | st.text(max_size=10)


@st.composite
def index_file(draw) -> bytes:
    weight_map: dict[str, object] = {"a": SHARDS[0], "b": SHARDS[0], "c": SHARDS[1]}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["a", "b", "c", "d"]) | names)
        if draw(st.booleans()):
            weight_map[key] = draw(shard_names | json_values)
        else:
            weight_map.pop(key, None)
    index: object = {"metadata": draw(json_values), "weight_map": weight_map}
    if draw(st.integers(0, 9)) == 0:
        index = draw(json_values)
    raw = json.dumps(index, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.binary(max_size=3)) + raw[pos:]
    return raw


@SETTINGS
@given(index_file())
def test_mutated_indexes(raw):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for shard, tensors in zip(SHARDS, ([("a", "F32", [2, 3]), ("b", "BF16", [4])], [("c", "I8", [3, 1])])):
            write(folder, shard, frame(*safetensors_bytes(tensors)))
        write(folder, SAFETENSORS_INDEX, raw)
        read_or_refuse(folder)
