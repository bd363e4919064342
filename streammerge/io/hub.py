"""The Hugging Face Hub at the edges: repo ids as inputs, a merged checkpoint pushed as output.

An input `org/name` or `org/name@revision` (a path that exists locally always wins) becomes a
`HubCheckpoint`: its revision is resolved to one commit, so every file comes from the same commit;
its tensor table comes from the remote index and the shards' safetensors headers, read with ranged
requests and checked as strictly as local headers, so `plan` downloads no weights. Shards are
downloaded with huggingface_hub into its cache when the merge gets to them: `Downloads` fetches them
ahead of need, in the order the merge reads them, within an optional disk budget, and deletes the
ones this run downloaded once no remaining tensor needs them.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE and tokens (HF_TOKEN, `hf auth login`)
itself; this module reads its `constants` when a checkpoint is opened. Tokens are never put in a
message, a log line or an output file.

Example:
    >>> ckpt = open_checkpoint("org/model@main")          # doctest: +SKIP
    >>> ckpt.tensors["model.norm.weight"].shape              # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from streammerge.constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_SUFFIXES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
)
from streammerge.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    HubError,
    StreammergeError,
)
from streammerge.io.lora import AdaptedModel, LoraAdapter, open_model, split_model_lora
from streammerge.io.sources import (
    Checkpoint,
    TensorInfo,
    _read_index,
    header_length,
    parse_header,
    read_header,
)

log = logging.getLogger(__name__)

# `org/name`: what the Hub accepts as a model id (letters, digits, '-', '_', '.'; no '--' or '..').
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
HEADER_PROBE_BYTES = 100_000  # first ranged read of a shard: most safetensors headers fit (as huggingface_hub does)


@dataclass(frozen=True)
class HubRef:
    """A model repo on the Hub and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_source(source: str) -> HubRef | None:
    """`org/name` or `org/name@revision` as a Hub reference; None for a local path.

    A path that exists locally wins; so does anything that cannot be a repo id (`./x`, `/abs`, `~/x`,
    `a/b/c`), and `dir/name` where the folder `dir` exists here: a mistyped local path, not a repo.
    """
    if os.path.exists(source):
        return None
    repo_id, at, revision = source.partition("@")
    if os.path.isdir(repo_id.split("/")[0]):
        return None
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith((".", "-")):
        return None
    if at and not revision:
        return None
    return HubRef(repo_id, revision or None)


def open_checkpoint(source: str, *, token: str | None = None) -> Checkpoint | LoraAdapter:
    """A local checkpoint, or a Hub one when `source` is a repo id that is not a local path (a
    checkpoint read lazily, or a LoRA adapter)."""
    pair = split_model_lora(source)
    if pair is not None:  # mergekit's model+lora: the model with the adapter applied
        return _adapted(*pair, token=token)
    ref = parse_source(source)
    if ref is None:
        return open_model(source)  # a local checkpoint or LoRA adapter
    remote = HubCheckpoint(ref, token=token)
    if not remote.adapter_files:
        return remote
    # A PEFT LoRA adapter repo: a few MB, fetched whole, then read as a local adapter folder.
    for file in remote.adapter_files:
        remote.download(file)
    adapter = LoraAdapter(remote.path)
    adapter.source_label = remote.label
    return adapter


def _adapted(model_source: str, adapter_source: str, *, token: str | None) -> AdaptedModel:
    model = open_checkpoint(model_source, token=token)
    try:
        if isinstance(model, LoraAdapter):
            raise CheckpointError(model_source, "is a LoRA adapter; in model+lora the model before '+' is a full checkpoint")
        adapter = open_checkpoint(adapter_source, token=token)
        if not isinstance(adapter, LoraAdapter):
            adapter.close()
            raise CheckpointError(adapter_source, "is not a LoRA adapter (no adapter_config.json); in model+lora the part "
                                  "after '+' is a PEFT adapter folder or Hub repo")
        try:
            return AdaptedModel(model, adapter)
        except BaseException:
            adapter.close()
            raise
    except BaseException:
        model.close()
        raise


@dataclass(frozen=True)
class RemoteFile:
    size: int
    etag: str  # the cache's blob name: the LFS sha256, or the git blob id of a small file


class HubCheckpoint(Checkpoint):
    """A safetensors checkpoint in a Hub repo, pinned to one commit; its files are fetched when first read.

    Files live where huggingface_hub puts them (`<cache>/models--org--name/snapshots/<commit>/`), so
    once fetched they are read exactly as local files are.
    """

    def __init__(self, ref: HubRef, *, token: str | None = None):
        from huggingface_hub import constants as hf_constants
        from huggingface_hub.file_download import repo_folder_name

        self.ref = ref
        self.token = token
        self.endpoint = hf_constants.ENDPOINT
        self.offline = hf_constants.HF_HUB_OFFLINE
        self.cache_dir = Path(hf_constants.HF_HUB_CACHE)
        self.storage = self.cache_dir / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
        self.commit, self.remote = self._resolve_commit()
        self.path = self.storage / "snapshots" / self.commit
        self.downloaded: set[Path] = set()  # files this run downloaded: the only ones ever deleted
        self.downloads: Downloads | None = None  # set while a merge schedules this checkpoint's files
        self.adapter_files: list[Path] = []  # a LoRA adapter repo: its two files
        self._fetch_lock = threading.Lock()

        index = None
        if SAFETENSORS_INDEX in self.remote:
            self.download(self.path / SAFETENSORS_INDEX)
            index = _read_index(self.path)
            names = list(dict.fromkeys(sorted(index.values())))
        elif SAFETENSORS_SINGLE in self.remote:
            names = [SAFETENSORS_SINGLE]
        elif any(n.endswith(PICKLE_SUFFIXES) for n in self.remote):
            raise CheckpointError(self.label, "holds only pickle weights (.bin/.pt), which streammerge never loads; "
                                  "use a revision or repo with safetensors weights")
        elif ADAPTER_CONFIG in self.remote and ADAPTER_WEIGHTS in self.remote:
            self.adapter_files = [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]  # open_checkpoint takes it from here
            return
        else:
            raise CheckpointNotFoundError(self.label, f"no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} in this repo")
        for name in names:
            if name not in self.remote:
                raise CheckpointNotFoundError(self.label, f"shard {name!r} listed in {SAFETENSORS_INDEX} is not in the repo")
        self.files = [self.path / name for name in names]
        self._load(index, self._read_header)

    # ---- identity ---------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """`org/name@<commit>`: names the repo in messages and plans."""
        return f"{self.ref.repo_id}@{self.commit[:12]}"

    @property
    def folder(self) -> Path:
        return self.path

    def file_identity(self, file: Path) -> list:
        """What identifies a file's bytes for a resume: repo, commit, name, etag and size (not mtimes)."""
        remote = self.remote[self._name(file)]
        return [self.ref.repo_id, self.commit, self._name(file), remote.etag, remote.size]

    def _name(self, file: Path) -> str:
        return file.relative_to(self.path).as_posix()

    def size(self, file: Path) -> int:
        return self.remote[self._name(file)].size

    def cached(self, file: Path) -> bool:
        return file.is_file()

    # ---- resolving the revision and the headers ------------------------------------------------

    def _resolve_commit(self) -> tuple[str, dict[str, RemoteFile]]:
        """The commit the revision points to now, and every file of that commit with its size and etag."""
        if self.offline:
            return self._resolve_from_cache()
        from huggingface_hub import HfApi

        try:
            info = HfApi(endpoint=self.endpoint).model_info(self.ref.repo_id, revision=self.ref.revision,
                                                            files_metadata=True, token=self.token)
        except Exception as e:
            raise hub_error(e, self.ref, first_contact=True) from None
        files = {}
        for s in info.siblings or []:
            size = s.lfs.size if s.lfs else s.size
            etag = s.lfs.sha256 if s.lfs else s.blob_id
            if size is not None and etag:
                files[s.rfilename] = RemoteFile(int(size), str(etag))
        if not info.sha or not _COMMIT.fullmatch(info.sha):
            raise HubError(f"{self.ref}: the Hub did not say which commit this revision is; check HF_ENDPOINT")
        # Remember the branch/tag -> commit in the cache, as huggingface_hub does, for offline runs later.
        revision = self.ref.revision or "main"
        if revision != info.sha:
            ref_file = self.storage / "refs" / revision
            try:
                ref_file.parent.mkdir(parents=True, exist_ok=True)
                ref_file.write_text(info.sha)
            except OSError as e:
                raise HubError(f"{self.cache_dir}: cannot write to the Hub cache: {e.strerror or e}") from None
        return info.sha, files

    def _resolve_from_cache(self) -> tuple[str, dict[str, RemoteFile]]:
        revision = self.ref.revision or "main"
        commit = revision if _COMMIT.fullmatch(revision) else None
        ref_file = self.storage / "refs" / revision
        if commit is None and ref_file.is_file():
            commit = ref_file.read_text().strip()
        snapshot = self.storage / "snapshots" / (commit or "")
        if commit is None or not snapshot.is_dir():
            raise CheckpointNotFoundError(
                str(self.ref), f"no such local folder, and not in the Hub cache {self.cache_dir} with HF_HUB_OFFLINE "
                "set: check the path, or run once online to download the repo, or unset HF_HUB_OFFLINE")
        files = {}
        for path in sorted(snapshot.rglob("*")):
            if path.is_file():
                blob = Path(os.path.realpath(path))
                files[path.relative_to(snapshot).as_posix()] = RemoteFile(blob.stat().st_size, blob.name)
        return commit, files

    def _read_header(self, file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """A shard's header: from the cache when the shard is there, else with ranged requests."""
        if self.cached(file):
            return read_header(file)
        size = self.size(file)
        prefix = self._read_range(file, 0, min(size, HEADER_PROBE_BYTES))
        header_len = header_length(file, prefix[:8], size)
        raw = prefix[8:8 + header_len]
        if len(raw) < header_len:
            raw += self._read_range(file, len(prefix), 8 + header_len)
        if len(raw) != header_len:
            raise CheckpointError(file, "the Hub sent fewer header bytes than asked for (truncated file?)")
        return parse_header(file, raw, size)

    def _read_range(self, file: Path, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file at this commit; never more (a server ignoring Range is cut off)."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import (
            build_hf_headers,
            get_session,
            hf_raise_for_status,
        )

        url = hf_hub_url(self.ref.repo_id, self._name(file), revision=self.commit, endpoint=self.endpoint)
        headers = {**build_hf_headers(token=self.token), "Range": f"bytes={start}-{end - 1}"}
        try:
            with get_session().stream("GET", url, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                skip = start if response.status_code == 200 else 0  # 200: the whole file from byte 0
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= skip + end - start:
                        break
            return bytes(data[skip:skip + end - start])
        except Exception as e:
            raise hub_error(e, self.ref, self._name(file)) from None

    # ---- fetching, and releasing ----------------------------------------------------------

    def download(self, file: Path) -> None:
        """Downloads one file of this commit into the cache (nothing to do when it is there)."""
        from huggingface_hub import hf_hub_download

        name = self._name(file)
        if self.cached(file):
            return
        try:
            got = Path(hf_hub_download(self.ref.repo_id, name, revision=self.commit, cache_dir=self.cache_dir,
                                       token=self.token, endpoint=self.endpoint))
        except Exception as e:
            raise hub_error(e, self.ref, name) from None
        if got != file:  # the cache layout is huggingface_hub's; we read where it says the file is
            raise HubError(f"{self.ref}: huggingface_hub put {name} at {got}, not at {file}; unexpected cache layout")
        self.downloaded.add(file)
        if os.path.getsize(file) != self.size(file):
            raise CheckpointError(file, f"downloaded {os.path.getsize(file)} bytes but the Hub lists {self.size(file)}")

    def fetch(self, file: Path) -> None:
        """Makes sure a file is on disk: waits for the scheduled download, or downloads it now."""
        if self.downloads is not None and self.downloads.wait(self, file):
            return
        with self._fetch_lock:
            self.download(file)

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self.fetch(file)
        return super()._fd(file)

    def _map(self, file: Path):
        if file not in self._maps:
            self.fetch(file)  # outside the lock: a download must not stop readers of other files
        return super()._map(file)

    def release(self, file: Path, *, delete: bool) -> int:
        """Closes a file; with `delete`, removes it from the cache if this run downloaded it.

        Returns the bytes freed. Views still alive keep their pages until they go (Linux frees an
        unlinked file's blocks when its last mapping closes).
        """
        with self._lock:
            mm = self._maps.pop(file, None)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
            fd = self._fds.pop(file, None)
            if fd is not None:
                os.close(fd)
        if not delete or file not in self.downloaded or not file.is_symlink() and not file.exists():
            return 0
        blob = Path(os.path.realpath(file))
        file.unlink(missing_ok=True)
        if blob != file and blob.parent.name == "blobs":
            blob.unlink(missing_ok=True)
        self.downloaded.discard(file)
        log.info("deleted %s of %s from the Hub cache after its last use", self._name(file), self.label)
        return self.size(file)

    def fetch_side_files(self, names: Iterable[str]) -> None:
        """Downloads the small files (config, tokenizer) among `names` that this commit has."""
        for name in names:
            if name in self.remote:
                self.download(self.path / name)


def hub_error(e: Exception, ref: HubRef, filename: str | None = None, *, first_contact: bool = False) -> StreammergeError:
    """One line for a huggingface_hub failure: what, which repo/revision/file, and what to do.
    `first_contact`: the repo was being looked up, having no local folder of that name: said first."""
    from huggingface_hub import errors as hf

    where = f"{ref}" + (f": {filename}" if filename else "")
    local = "no such local folder, and " if first_contact else ""
    login = "set HF_TOKEN or run `hf auth login` with a token that can read it"
    if isinstance(e, StreammergeError):
        return e
    if isinstance(e, hf.GatedRepoError):
        return HubError(f"{ref}: a gated repo: accept its conditions on its Hub page, then {login}")
    if isinstance(e, hf.RepositoryNotFoundError):
        return CheckpointNotFoundError(where, f"no such local path, and no Hub repo {ref.repo_id!r} (if it is private, {login})")
    if isinstance(e, hf.RevisionNotFoundError):
        return CheckpointNotFoundError(where, f"no revision {ref.revision!r} in {ref.repo_id}; check the branch, tag or commit")
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return CheckpointNotFoundError(where, f"{local}not in the Hub cache, and the Hub cannot be used (HF_HUB_OFFLINE is "
                                       "set, or it is unreachable): check the path, or run once online, or check the connection"
                                       if local else "not in the Hub cache, and the Hub cannot be used (HF_HUB_OFFLINE is "
                                       "set, or it is unreachable): run once online, or check the connection")
    if isinstance(e, hf.EntryNotFoundError):
        return CheckpointNotFoundError(where, f"no such file in {ref.repo_id} at this revision")
    if isinstance(e, hf.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return HubError(f"{where}: access denied by the Hub (HTTP {status}): {login}")
        return HubError(f"{where}: the Hub answered HTTP {status}; try again later")
    if isinstance(e, OSError) and not isinstance(e, ConnectionError) and e.errno is not None:
        return HubError(f"{where}: cannot write to the Hub cache: {e.strerror or e}")
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):
        from huggingface_hub import constants as hf_constants

        if first_contact:  # most likely a mistyped local path: say that first
            return CheckpointNotFoundError(where, f"no such local folder, and the Hub at {hf_constants.ENDPOINT} cannot be "
                                           f"reached to look for a repo of that name ({type(e).__name__}); check the path, "
                                           "or the connection (HF_HUB_OFFLINE=1 uses the cache)")
        return HubError(f"{where}: cannot reach the Hub at {hf_constants.ENDPOINT} ({type(e).__name__}); check the "
                        "connection, or set HF_HUB_OFFLINE=1 to use the cache")
    return HubError(f"{where}: {type(e).__name__}: {e}")


# ---- scheduling downloads during a merge ------------------------------------------------------


class _Unit:
    """One blob to have on disk: the same file can appear in two inputs (two revisions of a repo)."""

    def __init__(self, size: int):
        self.size = size
        self.copies: list[tuple[HubCheckpoint, Path]] = []
        self.first = self.last = 0
        self.ready = threading.Event()
        self.cached = False  # on disk before the merge: costs no budget, never deleted
        self.released = False  # past its last use: never fetched again


class Downloads:
    """Downloads the Hub inputs' files in the order the merge reads them, ahead of need.

    With a `budget`, the bytes this run downloaded and still holds never exceed it: a download
    waits until earlier files are released. Files are released (deleted, if this run downloaded
    them) after the last tensor that reads them when `delete` is set; a budget implies it.
    """

    def __init__(self, checkpoints: list[HubCheckpoint], *, budget: int | None = None, delete: bool = False):
        self.checkpoints = checkpoints
        self.budget = budget
        self.delete = delete or budget is not None
        self.units: dict[tuple[Path, str], _Unit] = {}
        self.by_file: dict[tuple[int, Path], _Unit] = {}
        self.position: dict[str, int] = {}
        self.held = 0
        self.error: BaseException | None = None
        self.stopped = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def start(self, order: list[tuple[str, list[tuple[Checkpoint, str]]]],
              prelude: list[tuple[str, list[tuple[Checkpoint, str]]]] = ()) -> None:
        """Plans the downloads from the tensors in the order the merge reads them.

        Args:
            order: (output tensor name, the (checkpoint, its tensor name) pairs read for it) in
                output-pass order; stacked layers read another layer's name.
            prelude: tensors read before the output pass (a model-wide statistics pass): their files
                are all needed at once, from the start.
        """
        hub = {id(c) for c in self.checkpoints}
        for position, (name, sources) in enumerate([*prelude, *order]):
            t = max(0, position - len(prelude))
            if position >= len(prelude):
                self.position[name] = t
            for c, read in sources:
                if id(c) not in hub:
                    continue
                for file in c.tensors[read].files:  # an FP8 weight's scale may lie in another shard
                    unit = self.by_file.get((id(c), file))
                    if unit is None:
                        key = (c.storage, c.remote[c._name(file)].etag)
                        unit = self.units.get(key)
                        if unit is None:
                            unit = self.units[key] = _Unit(c.size(file))
                            unit.first = t
                        unit.copies.append((c, file))
                        self.by_file[(id(c), file)] = unit
                    unit.last = max(unit.last, t)
        for c in self.checkpoints:
            c.downloads = self
        for unit in self.units.values():
            unit.cached = all(c.cached(f) for c, f in unit.copies)
        self._check_budget(len(order))
        self.thread = threading.Thread(target=self._run, name="streammerge-downloads", daemon=True)
        self.thread.start()

    def _check_budget(self, steps: int) -> None:
        """Refuses, before any download, a budget smaller than what some tensor needs on disk at once,
        and a cache disk without room for what will be held."""
        to_fetch = [u for u in self.units.values() if not u.cached]
        need = 0
        if self.delete:
            ends = sorted([(u.first, u.size) for u in to_fetch] + [(u.last + 1, -u.size) for u in to_fetch])
            live = 0
            for _, delta in ends:
                live += delta
                need = max(need, live)
        else:
            need = sum(u.size for u in to_fetch)
        if self.budget is not None and need > self.budget:
            raise HubError(f"--download-budget {_size(self.budget)} is too small: the merge needs {_size(need)} of downloaded "
                           "input files on disk at once (the shards one tensor reads, or all of them for a model-wide "
                           "trim or sign pass); raise it to at least that")
        if not to_fetch:
            return
        hold = need if self.budget is None else min(self.budget, sum(u.size for u in to_fetch))
        cache = self.checkpoints[0].cache_dir
        probe = next((p for p in (cache, *cache.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        if free < hold:
            hint = "pass --download-budget (it implies deleting shards after use)" if self.budget is None else "lower --download-budget"
            raise HubError(f"{cache}: {_size(free)} free but the merge downloads {_size(hold)} there; {hint}, "
                           "free some space, or set HF_HUB_CACHE to another disk")

    def _run(self) -> None:
        for unit in sorted(self.units.values(), key=lambda u: u.first):
            with self.cond:
                while (not unit.cached and self.budget is not None and self.held > 0
                       and self.held + unit.size > self.budget and not self.stopped):
                    self.cond.wait()
                if self.stopped:
                    break
                if not unit.cached:
                    self.held += unit.size
            try:
                for c, f in unit.copies:
                    c.download(f)
            except BaseException as e:  # handed to whoever waits for a file
                with self.cond:
                    self.error = e
                break
            finally:
                unit.ready.set()
        with self.cond:  # nothing more will come: wake every waiter
            for unit in self.units.values():
                unit.ready.set()

    def wait(self, ckpt: HubCheckpoint, file: Path) -> bool:
        """Waits until a scheduled file is on disk; False when it is not scheduled."""
        unit = self.by_file.get((id(ckpt), file))
        if unit is None:
            return False
        while not unit.ready.wait(0.2):  # a short wait lets Ctrl-C through
            pass
        if unit.released:  # a late readahead hint: the merge is past this file's last tensor
            raise HubError(f"{ckpt.label}: {ckpt._name(file)} was released after its last use")
        if self.error is not None and not ckpt.cached(file):
            raise self.error
        return ckpt.cached(file)

    def done(self, name: str) -> None:
        """The merge finished the tensor `name`: releases the files no later tensor reads."""
        t = self.position.get(name)
        if t is None or not self.delete:
            return
        for unit in self.units.values():
            if unit.last == t and unit.ready.is_set():
                unit.released = True
                freed = sum(c.release(f, delete=True) for c, f in unit.copies)
                if not unit.cached:
                    with self.cond:
                        self.held -= unit.size
                        self.cond.notify_all()
                    log.debug("released %d bytes", freed)

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for c in self.checkpoints:
            c.downloads = None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


# ---- pushing the result ------------------------------------------------------------------------


class HubUpload:
    """An upload to a Hub repo: shards go up as each becomes final (`add_shard`, on a thread of its
    own, overlapping the merge); `commit` uploads whatever is left and makes it all visible at once.

    Creating it creates the repo (and the branch), so a missing write permission fails before the merge.
    """

    def __init__(self, repo_id: str, *, private: bool = False, branch: str | None = None, token: str | None = None):
        from huggingface_hub import HfApi
        from huggingface_hub import constants as hf_constants

        if "@" in repo_id or not _REPO_ID.fullmatch(repo_id):
            raise HubError(f"{repo_id!r}: not a Hub repo id; use org/name (the branch goes in --hub-branch)")
        self.repo_id, self.branch, self.ref = repo_id, branch, HubRef(repo_id, branch)
        self.api = HfApi(endpoint=hf_constants.ENDPOINT, token=token)
        self.uploads: dict[str, tuple[object, Future]] = {}  # shard name: (its commit operation, its upload)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="streammerge-upload")
        try:
            self.api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if branch is not None:
                self.api.create_branch(repo_id, branch=branch, exist_ok=True)
        except Exception as e:
            raise _push_error(e, self.ref) from None

    def add_shard(self, path: Path) -> None:
        """Starts uploading a final shard (an LFS upload: stored on the Hub, not yet in any commit)."""
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        self.uploads[path.name] = (op, self.pool.submit(self.api.preupload_lfs_files, self.repo_id, additions=[op],
                                                        revision=self.branch))

    def commit(self, output_dir: str | os.PathLike, commit_message: str | None = None) -> str:
        """Uploads the rest of a finished merge and commits everything, the index included; returns the commit URL."""
        from huggingface_hub import CommitOperationAdd

        out = Path(output_dir)
        try:
            if not (out / SAFETENSORS_INDEX).is_file():
                raise CheckpointNotFoundError(out, f"no {SAFETENSORS_INDEX}: not a finished merge; merge (or resume) first")
            files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.endswith(".partial"))
            shards = [f for f in files if f.endswith(".safetensors")]
            for name in shards:
                if name not in self.uploads:  # kept from an earlier run, or pushed after the merge
                    self.add_shard(out / name)
            for _, upload in self.uploads.values():
                upload.result()
            ops = [self.uploads[name][0] for name in shards]
            ops += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(out / name))
                    for name in files if name not in shards and name != SAFETENSORS_INDEX] + \
                   [CommitOperationAdd(path_in_repo=SAFETENSORS_INDEX, path_or_fileobj=str(out / SAFETENSORS_INDEX))]
            info = self.api.create_commit(self.repo_id, ops, commit_message=commit_message or "Upload merged model (streammerge)",
                                          revision=self.branch)
        except Exception as e:
            raise _push_error(e, self.ref) from None
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return str(info.commit_url)


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Uploads a finished merge (shards, index, config, tokenizer files, model card, manifest).

    Creates the repo if needed (and the branch). The shards are uploaded first; the one commit that
    makes them visible also adds the index, so the repo never looks complete while it is not.
    (`HubUpload` does the same with shards uploaded while the merge runs.)

    Returns:
        The URL of the commit.

    Example:
        >>> push_to_hub("out/", "me/merged-model", private=True)   # doctest: +SKIP
    """
    out = Path(output_dir)
    if not (out / SAFETENSORS_INDEX).is_file():
        raise CheckpointNotFoundError(out, f"no {SAFETENSORS_INDEX}: not a finished merge; merge (or resume) first")
    return HubUpload(repo_id, private=private, branch=branch, token=token).commit(out, commit_message)


def _push_error(e: Exception, ref: HubRef) -> StreammergeError:
    from huggingface_hub import errors as hf

    write = "set HF_TOKEN or run `hf auth login` with a token that can write to it"
    if isinstance(e, hf.HfHubHTTPError) and not isinstance(e, (hf.RevisionNotFoundError,)):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403) or isinstance(e, hf.RepositoryNotFoundError):
            return HubError(f"{ref}: cannot push (HTTP {status}): {write}")
        return HubError(f"{ref}: push failed, the Hub answered HTTP {status}; nothing was committed, run it again")
    return hub_error(e, ref)
