"""`verify`: checks that a merged output folder is intact, reading every byte of every shard.

A finished merge holds its shards, `model.safetensors.index.json` (tensor name -> shard) and
`streammerge_manifest.json` (each shard's sha256 and size). `verify` checks them against each other
and against the bytes on disk, and reports every problem it finds, not just the first.

Any other Hugging Face model folder (mergekit's output, a download) has no manifest: `verify` checks
what can be checked without one (the index or the single `model.safetensors`, every header, every
tensor's offsets inside its file, the sizes, every byte readable) and says what it could not (no
sha256 to compare the shards with) in `notes`.

Example:
    >>> from streammerge.verify import verify
    >>> report = verify("out/")                      # doctest: +SKIP
    >>> report.ok, report.problems                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from streammerge.constants import (
    MANIFEST,
    MAX_INDEX_BYTES,
    MODEL_CARD,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
)
from streammerge.errors import CheckpointError
from streammerge.io.sources import TensorInfo, _inside, read_header, read_json
from streammerge.io.writer import file_sha256


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found: `ok` when `problems` is empty."""

    output_dir: Path
    ok: bool
    problems: list[str]  # each names the file and what is wrong with it
    shards: int  # shard files read in full
    tensors: int  # tensors found in those shards' headers
    sha256_checked: bool = True  # False: no streammerge manifest, so no sha256 to compare the shards with
    notes: tuple[str, ...] = ()  # what could not be checked, and why

    def summary(self) -> dict:
        return {"output_dir": str(self.output_dir), "ok": self.ok, "shards": self.shards, "tensors": self.tensors,
                "problems": list(self.problems), "sha256_checked": self.sha256_checked, "notes": list(self.notes)}


def verify(output_dir: str | os.PathLike) -> VerifyReport:
    """Checks a merged output folder: every shard's header and sha256, the index and the manifest.

    Checks that the index's `weight_map` and the shards' headers agree (each tensor in exactly the
    shard the index names), that `metadata.total_size` is the sum of the tensors' bytes, and that each
    shard has the size and sha256 the manifest records. Reads every byte of every shard.

    Returns:
        A report listing every problem found, each naming the file and what is wrong with it.
    """
    out = Path(output_dir)
    problems: list[str] = []
    if not out.is_dir():
        problems.append(f"{out}: {'not a folder' if out.exists() else 'no such folder'}")
        return VerifyReport(out, False, problems, 0, 0)

    notes: list[str] = []
    plain = not _exists(out / MANIFEST) and not _made_by_streammerge(out)  # a Hugging Face folder of another tool
    single = plain and not _exists(out / SAFETENSORS_INDEX) and (out / SAFETENSORS_SINGLE).is_file()
    if plain:
        notes.append(f"{out}: no {MANIFEST} (not a streammerge output): headers, "
                     f"{'the single file' if single else 'the index'}, offsets and sizes checked and every byte read; "
                     "no sha256 to compare the shards with")
    index = None if single else _load_json(out / SAFETENSORS_INDEX, problems, "the merge did not finish, or this is not a merge output"
                                           if not plain else "not a Hugging Face model folder (nor is there a model.safetensors)")
    manifest = None if plain else _load_json(out / MANIFEST, problems, "nothing to check the shards' sha256 against")
    weight_map = _weight_map(out, index, problems)
    if single:  # one file, no index: it holds every tensor
        try:
            weight_map = {name: SAFETENSORS_SINGLE for name in read_header(out / SAFETENSORS_SINGLE)[0]}
        except CheckpointError as e:
            problems.append(str(e))
            weight_map = {}
        names_single = [SAFETENSORS_SINGLE]
    recorded = _manifest_shards(out, manifest, problems)

    names = names_single if single else sorted(set(weight_map.values()) | set(recorded))
    for extra in sorted({p.name for p in out.glob("*.safetensors")} - set(names)):
        problems.append(f"{out / extra}: a shard in neither the index nor the manifest (left from another merge?)")

    found: dict[str, TensorInfo] = {}  # tensor name -> where it is
    found_in: dict[str, str] = {}  # tensor name -> the shard (as named in the index) that holds it
    readable: set[str] = set()  # shards whose header could be read
    shards_read = 0
    for name in names:
        try:
            path = _inside(out, name)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if name not in recorded and manifest is not None:
            problems.append(f"{path}: in the index but not in the manifest, so its sha256 cannot be checked")
        if name not in weight_map.values() and index is not None:
            problems.append(f"{path}: in the manifest but the index maps no tensor to it")
        read_fully, tensors = _check_shard(path, recorded.get(name), problems)
        shards_read += read_fully
        if tensors is None:
            continue
        readable.add(name)
        for tname, info in tensors.items():
            if tname in found:
                problems.append(f"{path}: tensor {tname!r} is also in {found[tname].file.name}")
                continue
            found[tname], found_in[tname] = info, name
            if index is not None and weight_map.get(tname) != name:
                where = f"maps it to {weight_map[tname]}" if tname in weight_map else "does not list it"
                problems.append(f"{path}: holds tensor {tname!r} but the index {where}")

    for tname, shard in sorted(weight_map.items()):
        if shard in readable and found_in.get(tname) != shard:
            problems.append(f"{out / SAFETENSORS_INDEX}: maps tensor {tname!r} to {shard}, which does not hold it")
    total = sum(info.nbytes for info in found.values())
    if index is not None:
        metadata = index.get("metadata") if isinstance(index, dict) else None
        declared = metadata.get("total_size") if isinstance(metadata, dict) else None
        if plain and declared is None:
            notes.append(f"{out / SAFETENSORS_INDEX}: no metadata.total_size to check")
        elif declared != total:
            problems.append(f"{out / SAFETENSORS_INDEX}: metadata.total_size is {declared!r} but the shards hold {total} tensor bytes")
    if isinstance(manifest, dict) and "total_size" in manifest and manifest["total_size"] != total:
        problems.append(f"{out / MANIFEST}: total_size is {manifest['total_size']!r} but the shards hold {total} tensor bytes")
    return VerifyReport(out, not problems, problems, shards_read, len(found), not plain, tuple(notes))


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _made_by_streammerge(out: Path) -> bool:
    """Whether the folder's model card says streammerge wrote it (then its manifest must be there)."""
    try:
        card = (out / MODEL_CARD).read_text("utf-8", errors="replace")[:4096]
    except OSError:
        return False
    return card.startswith("---") and "- streammerge\n" in card.split("\n---", 1)[0]


def _load_json(path: Path, problems: list[str], why: str) -> object | None:
    """A small JSON file, or None with the problem recorded."""
    if not path.exists() and not path.is_symlink():
        problems.append(f"{path}: missing ({why})")
        return None
    try:
        return read_json(path, MAX_INDEX_BYTES, "not valid JSON")
    except CheckpointError as e:
        problems.append(str(e))
        return None


def _weight_map(out: Path, index: object | None, problems: list[str]) -> dict[str, str]:
    if index is None:
        return {}
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        problems.append(f"{out / SAFETENSORS_INDEX}: no 'weight_map' object of tensor name -> shard file")
        return {}
    return weight_map


def _manifest_shards(out: Path, manifest: object | None, problems: list[str]) -> dict[str, dict]:
    """The manifest's shard records by file name: {"file", "sha256", "bytes"}."""
    if manifest is None:
        return {}
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        problems.append(f"{out / MANIFEST}: no 'shards' list of {{file, sha256, bytes}}")
        return {}
    recorded: dict[str, dict] = {}
    for i, entry in enumerate(shards):
        ok = (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
              and type(entry.get("bytes")) is int)
        if not ok:
            problems.append(f"{out / MANIFEST}: shards[{i}] is not a {{file, sha256, bytes}} record")
        elif entry["file"] in recorded:
            problems.append(f"{out / MANIFEST}: shard {entry['file']!r} is listed twice")
        else:
            recorded[entry["file"]] = entry
    return recorded


def _check_shard(path: Path, record: dict | None, problems: list[str]) -> tuple[bool, dict[str, TensorInfo] | None]:
    """Checks one shard's header, size and sha256: (whether it was read in full, its tensors or None)."""
    if not path.exists() and not path.is_symlink():
        problems.append(f"{path}: missing")
        return False, None
    try:
        tensors: dict[str, TensorInfo] | None = read_header(path)[0]
    except CheckpointError as e:
        problems.append(str(e))
        tensors = None
    if not path.is_file():  # a directory, a pipe or a device: never read (a pipe would block)
        return False, tensors
    size, digest = _sha256(path, problems)
    if digest is None:
        return False, tensors
    if record is not None:
        if size != record["bytes"]:
            problems.append(f"{path}: {size} bytes but the manifest records {record['bytes']} (truncated or modified)")
        if digest != record["sha256"]:
            problems.append(f"{path}: sha256 {digest} does not match the manifest's {record['sha256']} (corrupted or modified)")
    return True, tensors


def _sha256(path: Path, problems: list[str]) -> tuple[int, str | None]:
    """Reads the whole file: its size and sha256 (hex); None with a problem if it can't be read."""
    try:
        return file_sha256(path)
    except OSError as e:
        problems.append(f"{path}: cannot read: {e.strerror or e}")
        return 0, None