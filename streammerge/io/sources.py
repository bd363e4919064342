"""Where checkpoints come from: a local folder (sharded or single file) or a bare .safetensors file.

Every source exposes the same small interface: the tensors' names with shape and dtype (from the
headers alone), and "read rows r0..r1 of this tensor". Headers are parsed and checked here, strictly,
before any tensor byte is read, because input files may come from strangers.

Tensors are read as read-only views of the files mapped in memory: no copy and no anonymous memory
(mapped file pages are page cache, which the kernel reclaims), and `advise` asks the kernel to read a
range ahead; a tensor staged by the prefetcher (io/prefetch.py: read from disk into memory of its
own) is viewed from there instead. `read(..., out=buf)` copies into a given buffer with `os.preadv` instead (the GIL is
released while the kernel copies), for callers that need their own memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import stat
import struct
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from streammerge.constants import (
    MAX_EMPTY_EXTENT,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    MAX_TENSOR_DIMS,
    PICKLE_SUFFIXES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
)
from streammerge.errors import CheckpointError, CheckpointNotFoundError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # read with their scales (quant.py), written by out_dtype float8_e4m3fn
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


GGUF_HINT = ("a GGUF file (llama.cpp's quantized format): streammerge merges safetensors; dequantize it first "
             "(transformers: from_pretrained(folder, gguf_file=...), save_pretrained) and merge that")


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file header describes it."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the first element in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of the first dimension (1 for a scalar): the unit of row blocks."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    @property
    def files(self) -> tuple[Path, ...]:
        """The files reading this tensor touches (an FP8 weight's scale may lie in another shard)."""
        return (self.file,)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {_short(key)}")
        seen[key] = value
    return seen


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and validates the header of one .safetensors file, reading no tensor data.

    Checks everything the format promises: a regular file (a directory, pipe or device is refused
    without blocking), a sane header length, UTF-8 JSON without duplicate keys, named tensors of known
    dtypes, non-negative shapes of sane rank, byte ranges that match shape x dtype, lie inside the file
    and tile its data exactly (no overlap, no hole, nothing after the last tensor).

    Returns:
        (tensors by name, the `__metadata__` dict).

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        with _open_regular(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            header_len = header_length(path, f.read(8), file_size)
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    if len(raw) != header_len:
        raise CheckpointError(path, "file ended while reading the safetensors header (truncated?)")
    return parse_header(path, raw, file_size)


def header_length(path: Path, prefix: bytes, file_size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's size."""
    if len(prefix) < 8:
        raise CheckpointError(path, "not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
        if _looks_pickled(prefix):
            raise CheckpointError(path, "a pickle (PyTorch) checkpoint, not safetensors: pickle checkpoints are "
                                  "never loaded (they can run code); convert the model to safetensors")
        raise CheckpointError(
            path,
            f"corrupt safetensors header: declares {header_len} header bytes but the file has "
            f"{file_size} bytes (truncated download or not a safetensors file?)",
        )
    return header_len


def parse_header(path: Path, raw: bytes, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validates the JSON header `raw` of a safetensors file of `file_size` bytes, as `read_header` does;
    for headers read some other way (a ranged request to the Hub). `path` is where the file is, or will be."""
    header_len = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise CheckpointError(path, "corrupt safetensors header: not UTF-8") from None
    except ValueError as e:  # JSONDecodeError is a ValueError, as is our duplicate-key error
        raise CheckpointError(path, f"corrupt safetensors header: {e}") from None
    except RecursionError:
        raise CheckpointError(path, "corrupt safetensors header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header: not a JSON object")

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "corrupt safetensors header: __metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"tensor {_short(name)}"
        if not name:
            raise CheckpointError(path, "corrupt safetensors header: a tensor has an empty name")
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(path, f"corrupt safetensors header: {where} is not a tensor entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(path, f"{where} has dtype {_short(dtype)}, which streammerge does not read")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(path, f"corrupt safetensors header: {where} has shape {_short(shape)}")
        if len(shape) > MAX_TENSOR_DIMS or (0 in shape and math.prod(max(d, 1) for d in shape) > MAX_EMPTY_EXTENT):
            raise CheckpointError(path, f"corrupt safetensors header: {where} has an absurd shape {_short(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise CheckpointError(
                path, f"corrupt safetensors header: {where} has data_offsets {_short(offsets)} outside the "
                f"{data_size} data bytes (truncated file?)"
            )
        nbytes = offsets[1] - offsets[0]
        if nbytes != math.prod(shape) * itemsize(dtype):
            raise CheckpointError(
                path, f"corrupt safetensors header: {where} has {nbytes} bytes for shape {_short(shape)} {dtype}"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], nbytes)

    # Byte ranges must tile the data region: no overlap (aliasing) and no holes.
    end = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset != end:
            problem = "overlaps the previous tensor" if info.offset < end else "leaves a hole before it"
            raise CheckpointError(path, f"corrupt safetensors header: tensor {_short(info.name)} {problem}")
        end = info.offset + info.nbytes
    if end != file_size:
        raise CheckpointError(path, f"corrupt safetensors header: {file_size - end} byte(s) after the last tensor's data")
    return tensors, metadata


def _short(value: object, limit: int = 80) -> str:
    """repr() cut to `limit` characters: hostile headers must not produce megabyte-long messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_pickled(prefix: bytes) -> bool:
    """A PyTorch zip checkpoint (torch.save) or a raw pickle (protocol 2 to 5)."""
    return prefix.startswith(b"PK\x03\x04") or (prefix[0] == 0x80 and 2 <= prefix[1] <= 5)


def _open_regular(path: Path) -> BinaryIO:
    """Opens a regular file for reading. Directories, pipes and devices are refused before any read,
    and the open never blocks (O_NONBLOCK), so a FIFO or /dev/zero cannot hang or flood a reader."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, f"not a regular file but {_file_kind(st.st_mode)}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the two looks
        os.close(fd)
        raise CheckpointError(path, "not a regular file")
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "a special file")


class Checkpoint:
    """A safetensors checkpoint on local disk: a HF model folder or a bare .safetensors file.

    Example:
        >>> ckpt = Checkpoint("path/to/model")            # doctest: +SKIP
        >>> ckpt.tensors["model.norm.weight"].shape        # doctest: +SKIP
        >>> ckpt.read("model.norm.weight")                 # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files, index = _resolve_files(self.path)
        self._load(index, read_header)

    def _load(self, index: dict[str, str] | None, read: Callable[[Path], tuple[dict[str, TensorInfo], dict]]) -> None:
        """Builds the tensor table from each file's header (`read(file)`), keeping what the index maps there."""
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            tensors, _ = read(file)
            if index is None:
                for name in tensors:
                    if name in self.tensors:
                        raise CheckpointError(file, f"tensor {name!r} also appears in {self.tensors[name].file.name}")
                self.tensors.update(tensors)
                continue
            for name, info in tensors.items():
                if index.get(name) == file.name:
                    self.tensors[name] = info
        if index is not None:
            missing = sorted(n for n, f in index.items() if n not in self.tensors)
            if missing:
                raise CheckpointError(
                    self.path / SAFETENSORS_INDEX,
                    f"{len(missing)} tensor(s) listed in the index are not in their shard, e.g. "
                    f"{_short(missing[0])} is not in {_short(index[missing[0]])}",
                )
        self._ends: dict[Path, int] = {}  # where each file's last tensor ends: its size when the header was read
        for info in self.tensors.values():
            self._ends[info.file] = max(self._ends.get(info.file, 0), info.offset + info.nbytes)
        # FP8 weights read as their float32 dequantization, their scales hidden (quant.py); the stored
        # tensors stay in `stored`
        self.stored = self.tensors
        self.tensors = quant.wrap(self.label, self.stored, self._model_config() if self._maybe_quantized() else None)
        self.quantization = quant.describe(self.tensors)
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._staged: dict[tuple[Path, int], object] = {}  # (file, offset) -> prefetch.Staged: read from disk ahead
        self._lock = threading.RLock()

    @property
    def label(self) -> str:
        """How messages and plans name this checkpoint."""
        return str(self.path)

    def _maybe_quantized(self) -> bool:
        """Whether config.json is worth reading for a quantization_config: FP8 tensors, or names of
        another quantization format (a full-precision checkpoint reads no side file)."""
        return any(t.dtype in quant.FP8_DTYPES or t.dtype in ("U8", "I8", "I32") for t in self.tensors.values())

    def _model_config(self) -> dict | None:
        self.fetch_side_files(["config.json"])
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        try:
            data = read_json(path, 16 << 20, "not valid JSON")
        except CheckpointError:
            return None  # a config.json we cannot read declares nothing; copying it fails later, naming it
        return data if isinstance(data, dict) else None

    @property
    def folder(self) -> Path:
        """The model folder (where config.json and tokenizer files live)."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str, row_start: int = 0, row_end: int | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reads rows [row_start, row_end) of a tensor (all of it by default), in its stored dtype.

        Args:
            out: optional uint8 buffer of at least the needed bytes, reused to avoid allocations.
        """
        info = self.tensors[name]
        if isinstance(info, quant.QuantTensor):
            return self.view(name, row_start, row_end)  # a new tensor already
        return self._read(info, row_start, row_end, out=out)

    def _read(self, info: TensorInfo, row_start: int, row_end: int | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        name = info.name
        row_end = info.rows if row_end is None else row_end
        nbytes = (row_end - row_start) * info.row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        fd = self._fd(info.file)
        view = memoryview(buf.numpy())
        offset, done = info.offset + row_start * info.row_bytes, 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(info.file, f"file ended while reading tensor {name!r} (truncated?)")
            done += got
        shape = ((row_end - row_start), *info.shape[1:]) if info.shape else ()
        return buf.view(DTYPES[info.dtype]).view(shape)

    def fd(self, file: Path) -> int:
        """The file's descriptor, opened once (buffered reads; never blocks on open)."""
        return self._fd(file)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even on a FIFO
            return fd

    def _map(self, file: Path) -> mmap.mmap:
        with self._lock:  # the readahead thread maps files too
            return self._map_locked(file)

    def _map_locked(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            fd = self._fd(file)
            if os.fstat(fd).st_size < self._ends.get(file, 0):  # a view past the end would kill us (SIGBUS)
                raise CheckpointError(file, "is shorter than when its header was read (truncated or replaced since?)")
            mm = self._maps[file] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        return mm

    def view(self, name: str, row_start: int = 0, row_end: int | None = None, *, dequantize: bool = True) -> torch.Tensor | quant.QuantRows:
        """Rows [row_start, row_end) of a tensor as a read-only view of the mapped file (no copy).

        The view must not be written to. Falls back to a copy for a tensor not aligned to its dtype.
        An FP8 weight comes as its float32 dequantization, a new tensor (quant.py), or with
        `dequantize=False` as its stored rows and scales (quant.QuantRows).
        """
        info = self.tensors[name]
        row_end = info.rows if row_end is None else row_end
        if isinstance(info, quant.QuantTensor):
            s0, s1 = quant.scale_rows(info, row_start, row_end)
            rows = quant.QuantRows(info, self._view(info.weight, row_start, row_end), self._view(info.scale, s0, s1), row_start)
            return rows.dequantize() if dequantize else rows
        return self._view(info, row_start, row_end)

    def _view(self, info: TensorInfo, row_start: int, row_end: int) -> torch.Tensor:
        nbytes = (row_end - row_start) * info.row_bytes
        offset = info.offset + row_start * info.row_bytes
        dtype = DTYPES[info.dtype]
        shape = ((row_end - row_start), *info.shape[1:]) if info.shape else ()
        staged = next((s for s in self._staged.get((info.file, info.offset), ()) if s.covers(offset, nbytes)), None)
        flat = staged.rows(offset, nbytes) if staged is not None and nbytes else None
        if flat is not None and offset % max(1, itemsize(info.dtype)) == 0:
            return flat.view(dtype).view(shape)
        if nbytes == 0 or offset % max(1, itemsize(info.dtype)):
            return self._read(info, row_start, row_end)
        # Touching a mapped page past the file's end kills the process (SIGBUS): a file truncated
        # since it was opened is refused here, before each block's pages are touched (the CLI
        # also reports a truncation that lands while a block is being read: cli._supervise).
        if os.fstat(self._fd(info.file)).st_size < self._ends.get(info.file, 0):
            raise CheckpointError(info.file, "is shorter than when its header was read (truncated or replaced since?); "
                                  "restore it and rerun (finished shards are kept)")
        with warnings.catch_warnings():  # torch warns that the buffer is read-only: we never write it
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map(info.file), dtype=torch.uint8, count=nbytes, offset=offset)
        return flat.view(dtype).view(shape)

    def advise(self, name: str) -> None:
        """Asks the kernel to start reading a tensor's bytes now (MADV_WILLNEED), without waiting."""
        info = self.tensors[name]
        for part in (info.weight, info.scale) if isinstance(info, quant.QuantTensor) else (info,):
            self.advise_part(part)

    # Bytes of a stored tensor read ahead into memory (io/prefetch.py: a Staged, whole or a row
    # block) are viewed from there until unstaged.
    def stage(self, staged) -> None:
        with self._lock:
            self._staged.setdefault((staged.info.file, staged.info.offset), []).append(staged)

    def staged(self, info: TensorInfo, lo: int, hi: int):
        return next((s for s in self._staged.get((info.file, info.offset), ()) if (s.lo, s.hi) == (lo, hi)), None)

    def unstage(self, staged) -> None:
        key = (staged.info.file, staged.info.offset)
        with self._lock:
            rest = [s for s in self._staged.get(key, ()) if s is not staged]
            if rest:
                self._staged[key] = rest
            else:
                self._staged.pop(key, None)

    def advise_part(self, info: TensorInfo) -> None:
        self.advise_range(info.file, info.offset, info.offset + info.nbytes)

    def advise_range(self, file: Path, lo: int, hi: int) -> None:
        """Asks the kernel to start reading bytes [lo, hi) of a file now (MADV_WILLNEED)."""
        if hi <= lo:
            return
        start = lo - lo % mmap.PAGESIZE
        self._map(file).madvise(mmap.MADV_WILLNEED, start, hi - start)

    def file_identity(self, file: Path) -> list:
        """What identifies a file's bytes for a resume: its path, size, modification time and header."""
        st = file.stat()
        with open(file, "rb") as fh:
            header = hashlib.sha256(fh.read(int.from_bytes(fh.read(8), "little"))).hexdigest()
        return [str(file.resolve()), st.st_size, st.st_mtime_ns, header]

    def fetch_side_files(self, names: Iterable[str]) -> None:
        """Makes the small files (config, tokenizer) among `names` local: they are, here."""

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive; the map goes when it does
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ComputedCheckpoint(Checkpoint):
    """A checkpoint whose tensors are computed when read (a recipe stage, a mixture of experts):
    subclasses give `view`; `read` copies its rows, into `out` when given."""

    def read(self, name: str, row_start: int = 0, row_end: int | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.view(name, row_start, row_end)
        if out is None:
            return rows.clone()
        flat = out[:rows.numel() * rows.element_size()].view(rows.dtype)
        flat.copy_(rows.reshape(-1))
        return flat.view(rows.shape)

def _inside(folder: Path, name: str, listed_in: str = SAFETENSORS_INDEX) -> Path:
    """Resolves a shard name from an index, refusing anything that escapes the model folder.

    Errors name the file that lists the shard (`listed_in`, in `folder`) or, with `listed_in=""`, the shard.
    """
    index_path = folder / listed_in if listed_in else folder / name
    candidate = Path(name)
    if not name or "\x00" in name or candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(index_path, f"shard name {_short(name)} points outside the model folder")
    try:
        resolved = (folder / candidate).resolve()
        inside = resolved.is_relative_to(folder.resolve()) or _in_hub_cache(folder.resolve(), resolved)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise CheckpointError(index_path, f"shard {_short(name)} cannot be resolved: {e}") from None
    if not inside:
        raise CheckpointError(index_path, f"shard {_short(name)} is a link pointing outside the model folder")
    return folder / candidate


def _in_hub_cache(folder: Path, resolved: Path) -> bool:
    """A huggingface_hub cache snapshot (<repo>/snapshots/<commit>/) links each file to <repo>/blobs/."""
    return folder.parent.name == "snapshots" and resolved.parent == folder.parent.parent / "blobs"


def read_json(path: Path, limit: int, what: str) -> object:
    """A small JSON file of an input (index, adapter config): a regular file, at most `limit` bytes,
    no duplicate keys; CheckpointError("<what>: ...") otherwise."""
    try:
        with _open_regular(path) as f:
            text = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    if len(text) > limit:
        raise CheckpointError(path, f"{what}: larger than {limit} bytes")
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"{what}: {e}") from None
    except RecursionError:
        raise CheckpointError(path, f"{what}: JSON nested too deeply") from None


def _read_index(folder: Path) -> dict[str, str] | None:
    index_path = folder / SAFETENSORS_INDEX
    if not index_path.exists() and not index_path.is_symlink():
        return None
    index = read_json(index_path, MAX_INDEX_BYTES, "not a valid index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(index_path, "not a valid index: no 'weight_map' object of tensor name -> shard file")
    for shard in sorted(set(weight_map.values())):
        _inside(folder, shard)
        if shard.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(index_path, f"shard {_short(shard)} is a pickle file, which streammerge never loads "
                                  "(it can run code); convert the model to safetensors")
    return weight_map


def _resolve_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a checkpoint path, and its index's weight map when it has one."""
    if not path.exists():
        raise CheckpointNotFoundError(path, "no such file or folder")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(path, "pickle checkpoints are never loaded (they can run code); convert to safetensors")
        if path.suffix == ".gguf":
            raise CheckpointError(path, GGUF_HINT)
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "not a .safetensors file")
        return [path], None
    if not path.is_dir():
        raise CheckpointError(path, f"not a .safetensors file or a model folder but {_file_kind(path.stat().st_mode)}")
    index = _read_index(path)
    if index is not None:
        files = [_inside(path, shard) for shard in dict.fromkeys(sorted(index.values()))]
        for file in files:
            if not file.exists():
                raise CheckpointNotFoundError(file, f"shard listed in {SAFETENSORS_INDEX} is missing")
            if not file.is_file():
                raise CheckpointError(file, f"shard listed in {SAFETENSORS_INDEX} is not a regular file")
        return files, index
    single = path / SAFETENSORS_SINGLE
    if single.exists() or single.is_symlink():
        _inside(path, SAFETENSORS_SINGLE, listed_in="")
        if not single.is_file():
            raise CheckpointError(single, "not a regular file")
        return [single], None
    if any(p.suffix == ".gguf" for p in path.iterdir()):
        raise CheckpointError(path, "holds only GGUF weights: " + GGUF_HINT)
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise CheckpointError(
            path, "holds only pickle weights (.bin/.pt), which streammerge never loads; convert the model "
            "to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointNotFoundError(path, f"no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} in this folder")


from streammerge.io import quant  # noqa: E402  (quant.py builds on TensorInfo above)
