"""The Python API: `plan` and `merge`, the same calls the CLI makes.

Example:
    >>> from streammerge import MergeConfig, merge
    >>> cfg = MergeConfig.from_yaml("ties.yaml")            # doctest: +SKIP
    >>> result = merge(cfg, "out/")                          # doctest: +SKIP
    >>> result.shards[0]["sha256"]                           # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
import yaml

from . import __version__
from .config import MergeConfig
from .constants import COPIED_FILES, DEFAULT_MAX_MEMORY, DEFAULT_MAX_SHARD_SIZE, MANIFEST, MODEL_CARD, SAFETENSORS_INDEX
from .engine import Progress, run_plan
from .errors import CheckpointError, ConfigError, OutputError, StreammergeError
from .plan import Plan, build_plan
from .sources import Checkpoint
from .writer import file_sha256, fsync_dir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote."""

    output_dir: Path
    shards: list[dict]  # [{file, sha256, bytes}]
    total_size: int  # tensor data bytes, as in the index's metadata
    tensors: int
    merged_tensors: int
    seconds: float
    reused_shards: int = 0  # shards kept from an interrupted run of the same merge
    already_complete: bool = False  # the same merge was already complete there; nothing was done

    def summary(self) -> dict:
        return {
            "output_dir": str(self.output_dir),
            "shards": self.shards,
            "total_size": self.total_size,
            "tensors": self.tensors,
            "merged_tensors": self.merged_tensors,
            "seconds": round(self.seconds, 3),
            "reused_shards": self.reused_shards,
            "already_complete": self.already_complete,
        }


def _open(config: MergeConfig, stack: ExitStack) -> tuple[Checkpoint, list[Checkpoint]]:
    """Validates the config and opens (headers only) the reference and the fine-tunes, each distinct
    path once. Reports everything wrong at once: config problems and every unreadable model."""
    problems: list[StreammergeError] = []
    try:
        config.validate()
    except ConfigError as e:
        problems.append(e)
    opened: dict[str, Checkpoint | None] = {}

    def get(path: str) -> Checkpoint | None:
        key = os.path.realpath(path)
        if key not in opened:
            try:
                opened[key] = stack.enter_context(Checkpoint(path))
            except CheckpointError as e:
                problems.append(e)
                opened[key] = None
        return opened[key]

    finetuned = [get(config.model_path(m)) for m in config.finetunes()]
    reference = get(config.base_path) if config.base_path is not None else (finetuned[0] if finetuned else None)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        messages = [p for e in problems for p in (e.problems if isinstance(e, ConfigError) else [str(e)])]
        raise ConfigError(messages)
    return reference, finetuned  # type: ignore[return-value]


def plan(
    config: MergeConfig,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Plan:
    """Validates the config and builds the plan from the inputs' headers; reads no weights.

    Raises:
        ConfigError, CheckpointError, MismatchError: everything wrong, before any heavy work.
    """
    with ExitStack() as stack:
        reference, finetuned = _open(config, stack)
        return build_plan(config, reference, finetuned, max_shard_size=max_shard_size, max_memory=max_memory)


def merge(
    config: MergeConfig,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
    force: bool = False,
    progress: Progress | None = None,
    compile: str = "auto",
    check_finite: bool = False,
    device: str = "auto",
    threads: int | None = None,
) -> MergeResult:
    """Runs the merge and writes a sharded checkpoint that transformers loads as is.

    Shards are written under temporary names and renamed when complete; the model card, the
    manifest and, last, the index appear only when every shard is in place.

    Args:
        config: the merge (validated here).
        output_dir: created if needed. An interrupted run of the same merge there is resumed
            (finished shards are checked against their sha256 and kept); a completed one is left
            as it is; anything else needs an empty folder, or `force` to replace a previous merge.
        max_shard_size: bytes of tensor data per output shard.
        max_memory: bytes of working memory for tensor blocks.
        force: replace an existing merge in `output_dir`.
        progress: called with input bytes as they are processed.
        compile: "auto" compiles a fused CPU kernel (torch.compile) for big merges; "on", "off".
            The bytes are the same either way.
        check_finite: scan every input and merged tensor for NaN/Inf and fail naming the first.
        device: "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N".
        threads: CPU threads for the merge arithmetic (default: torch's).
    """
    start = time.perf_counter()
    out = Path(output_dir)
    with ExitStack() as stack:
        reference, finetuned = _open(config, stack)
        the_plan = build_plan(config, reference, finetuned, max_shard_size=max_shard_size, max_memory=max_memory)
        tokenizer_folder(config, reference)  # a tokenizer_source without a tokenizer fails before any work
        inputs = [reference, *finetuned]
        fingerprint = plan_fingerprint(the_plan, inputs)
        done = _prepare_output(out, inputs, force, fingerprint)
        if done is None:  # this exact merge is already complete here
            shards = json.loads((out / MANIFEST).read_text("utf-8"))["shards"]
        else:
            _check_free_space(out, the_plan, done)
            shards = run_plan(the_plan, reference, finetuned, out, progress=progress, compile=compile, done=done, check_finite=check_finite,
                              device=device, threads=threads,
                              on_shard=lambda receipt: write_json_atomic(out / STATE_DIR / f"{receipt['file']}.json", receipt))
            _copy_side_files(config, reference, out, the_plan)
            write_text_atomic(out / MODEL_CARD, model_card(the_plan))
            write_json_atomic(out / MANIFEST, {**manifest(the_plan, shards), "fingerprint": fingerprint})
            weight_map = {name: s.filename for s in the_plan.shards for name in s.tensors}
            fsync_dir(out)  # every shard's rename is on disk before the index can be
            # The index comes last: a folder with an index is a complete merge.
            write_json_atomic(out / SAFETENSORS_INDEX, {"metadata": {"total_size": the_plan.total_size}, "weight_map": weight_map})
            fsync_dir(out)
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return MergeResult(
        output_dir=out,
        shards=shards,
        total_size=the_plan.total_size,
        tensors=len(the_plan.tensors),
        merged_tensors=sum(t.merged for t in the_plan.tensors),
        seconds=time.perf_counter() - start,
        reused_shards=len(the_plan.shards) if done is None else len(done),
        already_complete=done is None,
    )


STATE_DIR = ".streammerge"  # while a merge runs: its plan fingerprint and a receipt per finished shard


def plan_fingerprint(the_plan: Plan, inputs: list[Checkpoint]) -> str:
    """sha256 of everything that decides the output bytes: the plan and the inputs' identity
    (each file's size, modification time and header), so a resume never mixes two merges."""
    files = sorted({info.file for c in inputs for info in c.tensors.values()})
    identity = []
    for f in files:
        st = f.stat()
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = hashlib.sha256(fh.read(n)).hexdigest()
        identity.append([str(f.resolve()), st.st_size, st.st_mtime_ns, header])
    payload = {
        "version": __version__,
        "options": {k: str(v) for k, v in vars(the_plan.options).items()},
        "seed": the_plan.config.seed,
        "tensors": [[t.name, list(t.shape), t.out_dtype, t.merged, t.weights, t.densities, t.trim_densities, t.lam, t.dare]
                    for t in the_plan.tensors],
        "shards": [[s.filename, list(s.tensors)] for s in the_plan.shards],
        "inputs": identity,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _prepare_output(out: Path, inputs: list[Checkpoint], force: bool, fingerprint: str) -> dict[str, dict] | None:
    """Readies the output folder; returns the shards a previous run of this same merge finished
    (checked against their sha256), or None when this exact merge is already complete there."""
    resolved = out.resolve()
    for ckpt in inputs:
        folder = ckpt.folder.resolve()
        if resolved == folder or folder.is_relative_to(resolved):
            raise OutputError(f"{out}: is (or contains) the input {ckpt.path}; choose another output directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    state = out / STATE_DIR
    if out.exists() and any(out.iterdir()):
        ours = (out / MANIFEST).exists() or (out / SAFETENSORS_INDEX).exists() or state.is_dir() or any(out.glob("*.partial"))
        if not ours:
            raise OutputError(f"{out}: not empty, and holds files that are not a streammerge output; choose an "
                              "empty directory (they are never overwritten, even with --force)")
        if not force:
            if (out / SAFETENSORS_INDEX).exists() and _manifest_fingerprint(out) == fingerprint:
                return None
            if _state_fingerprint(state) == fingerprint:
                return _resume(out, state)
            raise OutputError(f"{out}: holds a different merge; choose an empty directory or pass --force to replace it")
        for name in (SAFETENSORS_INDEX, MANIFEST):  # the output no longer looks complete from here on
            (out / name).unlink(missing_ok=True)
        for stale in list(out.glob("model-*.safetensors")) + list(out.glob("*.partial")):
            stale.unlink()
        shutil.rmtree(state, ignore_errors=True)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create: {e.strerror or e}") from None
    write_json_atomic(state / "plan.json", {"fingerprint": fingerprint})
    return {}


def _manifest_fingerprint(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST).read_text("utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _state_fingerprint(state: Path) -> str | None:
    try:
        return json.loads((state / "plan.json").read_text("utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _resume(out: Path, state: Path) -> dict[str, dict]:
    """Keeps each finished shard whose file still matches its receipt; removes everything else."""
    done: dict[str, dict] = {}
    for receipt_path in state.glob("*.safetensors.json"):
        try:
            receipt = json.loads(receipt_path.read_text("utf-8"))
            shard = out / receipt["file"]
            if shard.stat().st_size == receipt["bytes"] and file_sha256(shard) == (receipt["bytes"], receipt["sha256"]):
                done[receipt["file"]] = receipt
                continue
        except (OSError, ValueError, KeyError, TypeError):
            pass
        receipt_path.unlink(missing_ok=True)
    for stale in list(out.glob("*.partial")) + [p for p in out.glob("model-*.safetensors") if p.name not in done]:
        stale.unlink()
    for name in (SAFETENSORS_INDEX, MANIFEST):
        (out / name).unlink(missing_ok=True)
    log.info("resuming in %s: %d shard(s) already done", out, len(done))
    return done


def _check_free_space(out: Path, the_plan: Plan, done: dict[str, dict]) -> None:
    needed = sum(s.nbytes for s in the_plan.shards if s.filename not in done)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise OutputError(
            f"{out}: {free / 1e9:.2f} GB free but the merge writes {needed / 1e9:.2f} GB; free some space or choose another disk"
        )


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a folder holding one of these has a tokenizer


def tokenizer_folder(config: MergeConfig, reference: Checkpoint) -> Path | None:
    """Where the tokenizer files come from: the base by default, or the model `tokenizer_source` names
    (`base`, a listed model, or any local folder, as mergekit allows). Raises ConfigError when an
    explicitly named source holds no tokenizer."""
    source = config.tokenizer_source
    if source is None:
        return reference.folder if reference.path.is_dir() else None
    folder = reference.folder if source == "base" else Path(config._path(source))
    if folder.is_file():
        folder = folder.parent
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise ConfigError(f"tokenizer_source: {source!r} ({folder}) holds no tokenizer ({', '.join(TOKENIZER_MARKERS)}); "
                          "name a model that has one, or leave tokenizer_source out")
    return folder


def _copy_side_files(config: MergeConfig, reference: Checkpoint, out: Path, the_plan: Plan) -> None:
    """config.json, generation config and tokenizer files from the base (or the tokenizer source)."""
    if not reference.path.is_dir():
        return
    tokenizer_from = tokenizer_folder(config, reference)
    for name in COPIED_FILES:
        folder = reference.folder if name in ("config.json", "generation_config.json") else tokenizer_from
        src = folder / name
        if not src.is_file():
            continue
        if name == "config.json":
            write_json_atomic(out / name, _output_model_config(src, the_plan))
        else:
            shutil.copyfile(src, out / name)


def _output_model_config(src: Path, the_plan: Plan) -> dict:
    data = json.loads(src.read_text("utf-8"))
    embed = next((t for t in the_plan.tensors if t.name.endswith("embed_tokens.weight")), None)
    if embed is not None and the_plan.config.vocab != "error" and "vocab_size" in data:
        data["vocab_size"] = embed.shape[0]  # truncated by the vocab option
    dtypes = {t.out_dtype for t in the_plan.tensors if t.out_dtype in ("BF16", "F16", "F32")}
    if len(dtypes) == 1 and ("torch_dtype" in data or "dtype" in data):
        name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtypes.pop()]
        data["torch_dtype" if "torch_dtype" in data else "dtype"] = name
    return data


def manifest(the_plan: Plan, shards: list[dict]) -> dict:
    """The resolved config, seed, versions and each shard's sha256: enough to check and reproduce."""
    return {
        "format": "streammerge-manifest/1",
        "streammerge_version": __version__,
        "versions": {"torch": torch.__version__.split("+")[0], "safetensors": safetensors.__version__, "python": platform.python_version()},
        "config": the_plan.config.to_dict(),
        "seed": the_plan.config.seed,
        "options": {k: str(v) for k, v in vars(the_plan.options).items()},
        "total_size": the_plan.total_size,
        "shards": shards,
    }


def model_card(the_plan: Plan) -> str:
    cfg = the_plan.config
    bases = [cfg.base] if cfg.base else []
    models = bases + [m.source for m in cfg.models if m.source not in bases]
    front = {"base_model": models, "library_name": "transformers", "tags": ["merge", "streammerge", cfg.method_name]}
    return (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# Merged model\n\nMerged with streammerge {__version__} using the **{cfg.method_name}** method"
        f" ({cfg.semantics} semantics, seed {cfg.seed})"
        + (f", with `{cfg.base}` as the base" if cfg.base else "")
        + ".\n\n## Models\n\n"
        + "".join(f"- `{m.source}`\n" for m in cfg.models)
        + "\n## Configuration\n\n```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```\n"
    )
