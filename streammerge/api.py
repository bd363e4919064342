"""The Python API: `plan` and `merge`, the same calls the CLI makes.

Example:
    >>> from streammerge import MergeConfig, merge
    >>> cfg = MergeConfig.from_yaml("ties.yaml")            # doctest: +SKIP
    >>> result = merge(cfg, "out/")                          # doctest: +SKIP
    >>> result.shards[0]["sha256"]                           # doctest: +SKIP
"""

from __future__ import annotations

import json
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
from .errors import OutputError
from .plan import Plan, build_plan
from .sources import Checkpoint
from .writer import write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote."""

    output_dir: Path
    shards: list[dict]  # [{file, sha256, bytes}]
    total_size: int  # tensor data bytes, as in the index's metadata
    tensors: int
    merged_tensors: int
    seconds: float

    def summary(self) -> dict:
        return {
            "output_dir": str(self.output_dir),
            "shards": self.shards,
            "total_size": self.total_size,
            "tensors": self.tensors,
            "merged_tensors": self.merged_tensors,
            "seconds": round(self.seconds, 3),
        }


def _open(config: MergeConfig, stack: ExitStack) -> tuple[Checkpoint, list[Checkpoint]]:
    """Opens (headers only) the reference and the fine-tunes, each distinct path once."""
    opened: dict[str, Checkpoint] = {}

    def get(path: str) -> Checkpoint:
        key = os.path.realpath(path)
        if key not in opened:
            opened[key] = stack.enter_context(Checkpoint(path))
        return opened[key]

    finetuned = [get(config.model_path(m)) for m in config.finetunes()]
    reference = get(config.base_path) if config.base_path is not None else finetuned[0]
    return reference, finetuned


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
    config.validate()
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
) -> MergeResult:
    """Runs the merge and writes a sharded checkpoint that transformers loads as is.

    Shards are written under temporary names and renamed when complete; the model card, the
    manifest and, last, the index appear only when every shard is in place.

    Args:
        config: the merge (validated here).
        output_dir: created if needed; must be empty, or hold a previous merge and `force` be set.
        max_shard_size: bytes of tensor data per output shard.
        max_memory: bytes of working memory for tensor blocks.
        force: replace an existing merge in `output_dir`.
        progress: called with input bytes as they are processed.
        compile: "auto" compiles a fused CPU kernel (torch.compile) for big merges; "on", "off".
            The bytes are the same either way.
    """
    start = time.perf_counter()
    config.validate()
    out = Path(output_dir)
    with ExitStack() as stack:
        reference, finetuned = _open(config, stack)
        the_plan = build_plan(config, reference, finetuned, max_shard_size=max_shard_size, max_memory=max_memory)
        _prepare_output(out, [reference, *finetuned], force)
        shards = run_plan(the_plan, reference, finetuned, out, progress=progress, compile=compile)
        _copy_side_files(config, reference, out, the_plan)
        write_text_atomic(out / MODEL_CARD, model_card(the_plan))
        write_json_atomic(out / MANIFEST, manifest(the_plan, shards))
        weight_map = {name: s.filename for s in the_plan.shards for name in s.tensors}
        write_json_atomic(out / SAFETENSORS_INDEX, {"metadata": {"total_size": the_plan.total_size}, "weight_map": weight_map})
    return MergeResult(
        output_dir=out,
        shards=shards,
        total_size=the_plan.total_size,
        tensors=len(the_plan.tensors),
        merged_tensors=sum(t.merged for t in the_plan.tensors),
        seconds=time.perf_counter() - start,
    )


def _prepare_output(out: Path, inputs: list[Checkpoint], force: bool) -> None:
    resolved = out.resolve()
    for ckpt in inputs:
        folder = ckpt.folder.resolve()
        if resolved == folder or folder.is_relative_to(resolved):
            raise OutputError(f"{out}: is (or contains) the input {ckpt.path}; choose another output directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        ours = (out / MANIFEST).exists() or (out / SAFETENSORS_INDEX).exists() or any(out.glob("*.partial"))
        if not force:
            raise OutputError(f"{out}: not empty; choose an empty directory or pass --force to replace a previous merge")
        if not ours:
            raise OutputError(f"{out}: holds files that are not a streammerge output; refusing to overwrite even with --force")
        for name in (SAFETENSORS_INDEX, MANIFEST):  # the output no longer looks complete from here on
            (out / name).unlink(missing_ok=True)
        for stale in list(out.glob("model-*.safetensors")) + list(out.glob("*.partial")):
            stale.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create: {e.strerror or e}") from None


def _copy_side_files(config: MergeConfig, reference: Checkpoint, out: Path, the_plan: Plan) -> None:
    """config.json, generation config and tokenizer files from the base (or the tokenizer source)."""
    if not reference.path.is_dir():
        return
    tokenizer_from = reference.folder
    if config.tokenizer_source not in (None, "base"):
        tokenizer_from = Checkpoint(config._path(config.tokenizer_source)).folder
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
