"""The Python API: `plan` and `merge`, the same calls the CLI makes.

Example:
    >>> from streammerge import MergeConfig, merge
    >>> cfg = MergeConfig.from_yaml("ties.yaml")            # doctest: +SKIP
    >>> result = merge(cfg, "out/")                          # doctest: +SKIP
    >>> result.shards[0]["sha256"]                           # doctest: +SKIP
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors
import torch
import yaml

from streammerge import __version__
from streammerge.constants import (
    COPIED_FILES,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_SHARD_SIZE,
    LAYER_COUNT_KEYS,
    MANIFEST,
    MODEL_CARD,
    SAFETENSORS_INDEX,
    STATE_DIR,
    STATE_LOCK,
    STATE_PLAN,
    STATE_REPLACING,
    TOKENIZER_MARKERS,
)
from streammerge.errors import (
    CheckpointError,
    ConfigError,
    HubError,
    OutputError,
    StreammergeError,
)
from streammerge.front.config import MergeConfig, layer_index
from streammerge.io import hub, quant
from streammerge.io.lora import attach_adapters
from streammerge.io.lora import fingerprint as adapters_fingerprint
from streammerge.io.sources import Checkpoint
from streammerge.io.vocab import build_reindex
from streammerge.io.writer import (
    copy_file_atomic,
    file_sha256,
    fsync_dir,
    write_json_atomic,
    write_text_atomic,
)
from streammerge.pipeline.device import resolve_device
from streammerge.pipeline.distributed import Group, check_worker
from streammerge.pipeline.engine import Progress, run_plan
from streammerge.pipeline.plan import (
    Plan,
    ShardPlan,
    assign_workers,
    build_plan,
    check_architectures,
)
from streammerge.pipeline.recipe import expand

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
    rank: int = 0  # this worker, of `world_size`; `shards` are the ones it owns
    world_size: int = 1
    finalized: bool = True  # False: a worker's share is done, `finalize` still has to write the index
    device: str = "cpu"  # where the merge arithmetic ran ("cpu" when nothing was left to merge)

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
            "rank": self.rank,
            "world_size": self.world_size,
            "finalized": self.finalized,
            "device": self.device,
        }


def _open(config: MergeConfig, stack: ExitStack, stages: object = None) -> tuple[Checkpoint, list[Checkpoint]]:
    """Validates the config and opens (headers only) the reference and the fine-tunes, each distinct
    path once. Reports everything wrong at once: config problems and every unreadable model.
    A recipe's stage, named as a model, opens as a checkpoint computed when read (front/recipe.py),
    with the plan options in `stages` (a recipe.StageOptions)."""
    types = config._type_problems()
    if types:  # nothing below can even look at such a config (paths with NUL, a list for a method)
        raise ConfigError(types)
    problems: list[StreammergeError] = []
    try:
        config.validate()
    except ConfigError as e:
        problems.append(e)
    opened: dict[str, Checkpoint | None] = {}
    if config.recipe is not None and stages is None:
        stages = _stage_options(config, DEFAULT_MAX_SHARD_SIZE, DEFAULT_MAX_MEMORY, "file", False)

    def get(source: str) -> Checkpoint | None:
        if config.recipe is not None and source in config.recipe.names():  # a stage's name wins, as in mergekit-multi
            from streammerge.front import recipe

            try:
                return recipe.open_stage(config.recipe, source, stack, stages)
            except StreammergeError as e:
                problems.append(e)
                return None
        path = config._path(source)  # a string without NUL: _type_problems refused anything else
        key = os.path.realpath(path) if hub.parse_source(path) is None else path
        if key not in opened:
            try:  # a checkpoint or a LoRA adapter, local or a Hub repo
                opened[key] = stack.enter_context(hub.open_checkpoint(path))
            except (CheckpointError, HubError) as e:
                problems.append(e)
                opened[key] = None
        return opened[key]

    finetuned = [get(m.source) for m in config.finetunes()]
    reference = get(config.base) if config.base is not None else (finetuned[0] if finetuned else None)
    if reference is not None:
        problems += attach_adapters(config, reference, finetuned)
    problems = list({str(e): e for e in problems}.values())  # a recipe stage read twice fails twice: said once
    if len(problems) == 1:
        raise problems[0]
    if problems:
        messages = [p for e in problems for p in (e.problems if isinstance(e, ConfigError) else [str(e)])]
        raise ConfigError(list(dict.fromkeys(messages)))
    return reference, finetuned  # type: ignore[return-value]


def plan(
    config: MergeConfig,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
    shard_order: str = "file",
    allow_crimes: bool = False,
) -> Plan:
    """Validates the config and builds the plan from the inputs' headers; reads no weights.

    `shard_order` and `allow_crimes`: as for `merge`.

    Raises:
        ConfigError, CheckpointError, MismatchError: everything wrong, before any heavy work.
    """
    with ExitStack() as stack:
        reference, finetuned = _open(config, stack, _stage_options(config, max_shard_size, max_memory, shard_order, allow_crimes))
        return _build_plan(config, reference, finetuned, max_shard_size, max_memory, shard_order, allow_crimes)[0]


def _stage_options(config: MergeConfig, max_shard_size: int, max_memory: int, shard_order: str, allow_crimes: bool,
                   compile: str = "auto") -> object:
    """A recipe's stages are planned and merged with the final merge's options (front/recipe.py)."""
    if config.recipe is None:
        return None
    from streammerge.front.recipe import StageOptions

    return StageOptions(max_shard_size, max_memory, shard_order, allow_crimes, compile)


def _build_plan(config: MergeConfig, reference: Checkpoint, finetuned: list[Checkpoint], max_shard_size: int,
                max_memory: int, shard_order: str = "file", allow_crimes: bool = False) -> tuple[Plan, Path | None]:
    """The plan, and the folder the tokenizer files come from (one without a tokenizer fails here,
    before any work). A tokenizer source's vocabularies decide the vocabulary tensors' rows."""
    if not allow_crimes:
        check_architectures(reference, finetuned)
    tokenizer_from = tokenizer_folder(config, reference, finetuned)
    reindex = build_reindex(config, reference, finetuned, tokenizer_from)
    the_plan = build_plan(config, reference, finetuned, max_shard_size=max_shard_size, max_memory=max_memory,
                          reindex=reindex, shard_order=shard_order)
    stages = expand([reference, *finetuned])[1]
    if stages:  # a recipe's stages each hold one computed tensor while it is read (pipeline/recipe.py)
        the_plan = replace(the_plan, peak_memory=the_plan.peak_memory + sum(s.extra_memory for s in stages))
    return the_plan, tokenizer_from


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
    gpu_memory: int | None = None,
    threads: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    delete_downloaded: bool = False,
    download_budget: int | None = None,
    on_shard_file: Callable[[Path], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    shard_order: str = "file",
    allow_crimes: bool = False,
    verify_inputs: bool = False,
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
        compile: "auto" uses the compiled CPU kernels (C, built when streammerge is installed) when
            they were built, else numpy or torch; "on" requires them (ConfigError if they were not
            built); "off" uses numpy or torch. The bytes are the same either way.
        check_finite: scan every input and merged tensor for NaN/Inf and fail naming the first.
        verify_inputs: record, with each shard, sha256 digests of the input bytes it was built from,
            and on a resume check every finished shard's against the inputs now (one more read of
            them). Without it a resume checks each input file's size, time and header only.
        device: "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N"; without CUDA, a
            warning and the CPU (the same bytes).
        gpu_memory: bytes of GPU memory for one block's working set (default: 80% of the free memory).
        threads: CPU threads for the merge arithmetic (default: torch's).
        on_shard_file: called with each shard's path as soon as it is final (e.g. `hub.HubUpload.add_shard`).
        on_total: called once, when planned, with the input bytes `progress` will count to.
        rank, world_size: this process's share of a merge split over `world_size` workers: it
            writes the shards `worker_shards` gives it, and `finalize` writes the index once all
            are done. Under torchrun (torch.distributed initialized) both come from the process
            group: rank 0 prepares the folder first and finalizes when every rank succeeded.
            Any split gives the same bytes.
        delete_downloaded: delete the Hub input files this run downloaded once no remaining tensor
            needs them (files already in the cache are kept).
        download_budget: bytes of downloaded Hub input files on disk at once; downloads wait for
            room, and files are deleted after use as with `delete_downloaded`.
        copy_tokenizer: copy the tokenizer files (mergekit's --no-copy-tokenizer: False); a tokenizer
            source's re-indexed vocabulary is written either way, as mergekit does.
        write_model_card: write README.md (mergekit's --no-write-model-card: False).
        shard_order: "file" fills shards in the reference's file order; "name" in tensor name order,
            the order mergekit-yaml writes, so a byte limit splits the output as mergekit's does.
        allow_crimes: merge models whose config.json names different architectures (mergekit's
            --allow-crimes); without it they are refused.
    """
    start = time.perf_counter()
    out = Path(output_dir)
    group, rank, world_size = _workers(rank, world_size, force)
    target = resolve_device(device)
    if gpu_memory is not None and gpu_memory <= 0:
        raise ConfigError(f"gpu_memory (--gpu-memory) must be a positive number of bytes, got {gpu_memory}")
    held = ExitStack()  # the output folder's lock: held until the merge is finalized
    try:
        with ExitStack() as stack:
            reference, finetuned = _open(config, stack, _stage_options(config, max_shard_size, max_memory, shard_order,
                                                                       allow_crimes, compile))
            the_plan, tokenizer_from = _build_plan(config, reference, finetuned, max_shard_size, max_memory, shard_order,
                                                   allow_crimes)
            inputs = [reference, *finetuned]
            side = {"copy_tokenizer": copy_tokenizer, "write_model_card": write_model_card}
            identity = input_identities(inputs)  # one snapshot, fingerprinted and recorded in the state
            fingerprint = plan_fingerprint(the_plan, inputs, side, identity)
            mine = worker_shards(the_plan, rank, world_size)
            log.debug("plan: %d tensors (%d merged) in %d shard(s) of at most %d bytes, filled in %s order; this worker "
                      "writes %d; device %s; fingerprint %s", len(the_plan.tensors), sum(t.merged for t in the_plan.tensors),
                      len(the_plan.shards), max_shard_size, shard_order, len(mine), target, fingerprint[:16])
            if on_total is not None:
                on_total(sum(s.input_bytes for s in mine))

            def state() -> None:
                _write_state(out, the_plan, reference, tokenizer_from if copy_tokenizer or the_plan.reindex else None,
                             fingerprint, identity, write_model_card)

            digests = (lambda name: shard_input_digests(the_plan, inputs, name)) if verify_inputs else None

            def run(todo: list[ShardPlan], on_shard: Callable[[dict], None]) -> dict[str, dict]:
                remote = list({id(c): c for c in inputs if isinstance(c, hub.HubCheckpoint)}.values())
                downloads = hub.Downloads(remote, budget=download_budget, delete=delete_downloaded) if remote else None
                return run_plan(the_plan, reference, finetuned, out, progress=progress, compile=compile, todo=todo,
                                check_finite=check_finite, device=str(target), gpu_memory=gpu_memory, threads=threads,
                                on_shard=on_shard, downloads=downloads)

            complete, shards, reused = write_output(out, the_plan, inputs, fingerprint, mine, force=force, rank=rank,
                                                    world_size=world_size, group=group, held=held, write_state=state,
                                                    run=run, digests=digests, on_shard_file=on_shard_file)
        return MergeResult(
            output_dir=out,
            shards=[{k: r[k] for k in ("file", "sha256", "bytes")} for r in shards],
            total_size=the_plan.total_size,
            tensors=len(the_plan.tensors),
            merged_tensors=sum(t.merged for t in the_plan.tensors),
            seconds=time.perf_counter() - start,
            reused_shards=reused,
            already_complete=complete,
            rank=rank,
            world_size=world_size,
            finalized=complete or world_size == 1 or group is not None,
            device=str(target),
        )
    finally:
        held.close()


def write_output(out: Path, the_plan: Plan, inputs: list[Checkpoint], fingerprint: str, mine: list[ShardPlan], *,
                 force: bool, rank: int, world_size: int, group: Group | None, held: ExitStack,
                 write_state: Callable[[], None], run: Callable[[list[ShardPlan], Callable[[dict], None]], dict[str, dict]],
                 digests: Callable[[str], dict] | None = None,
                 on_shard_file: Callable[[Path], None] | None = None) -> tuple[bool, list[dict], int]:
    """The output folder's lifecycle for this worker's shards `mine`, whatever writes them (a merge,
    a mixture of experts): lock and prepare the folder (under torchrun rank 0 first), record the state
    `finalize` needs, keep finished shards, `run(todo, on_shard)` the rest, then finalize where this
    process speaks for the whole output. Returns (already complete, the shards' receipts, shards reused)."""

    def prepare() -> bool:
        # the folder's lock: one process alone, or rank 0 for a torchrun job, or each independent worker
        # sharing it (and alone on its rank); torchrun's other ranks follow rank 0
        lock = "exclusive" if world_size == 1 or (group is not None and rank == 0) else (
            None if group is not None else f"rank-{rank}-of-{world_size}")
        return _prepare_output(out, inputs, force, fingerprint, lock, held)

    error: BaseException | None = None
    complete, done, shards = False, {}, []
    try:
        complete = group.rank0_first(prepare) if group is not None else prepare()
        if not complete:
            write_state()
            done = _resume(out, [s.filename for s in mine], digests)
            todo = [s for s in mine if s.filename not in done]
            _check_free_space(out, todo)

            def on_shard(receipt: dict) -> None:
                tensors = next(the_plan.stored_names(s) for s in todo if s.filename == receipt["file"])
                log.debug("wrote %s: %d tensors, %d bytes, sha256 %s", receipt["file"], len(tensors), receipt["bytes"],
                          receipt["sha256"])
                extra = {"inputs": digests(receipt["file"])} if digests is not None else {}
                write_json_atomic(out / STATE_DIR / f"{receipt['file']}.json",
                                  {**receipt, "tensors": list(tensors), "worker": [rank, world_size], **extra})
                if on_shard_file is not None:
                    on_shard_file(out / receipt["file"])

            new = run(todo, on_shard)
            shards = [done.get(s.filename) or new[s.filename] for s in mine]
    except Exception as e:
        if group is None:
            raise
        error = e
    if group is not None:
        group.all_statuses(error)
    finalizes = world_size == 1 or (group is not None and rank == 0)  # who writes (or reports) the whole output
    if complete:
        by_file = {r["file"]: r for r in json.loads((out / MANIFEST).read_text("utf-8"))["shards"]}
        shards = list(by_file.values()) if finalizes else [by_file[s.filename] for s in mine]
    elif group is not None:
        # every rank hashed its shards as it wrote them (or on resume): no second read here
        final = group.rank0_first(lambda: _finalize(out, rehash=False) if rank == 0 else None)
        shards = final.shards if final is not None else shards
    elif world_size == 1:
        shards = _finalize(out, rehash=False).shards
    return complete, shards, len(mine) if complete else len(done)


def worker_shards(the_plan: Plan, rank: int = 0, world_size: int = 1) -> list[ShardPlan]:
    """The output shards worker `rank` of `world_size` writes (all of them for a single process)."""
    check_worker(rank, world_size)
    return [s for s, owner in zip(the_plan.shards, assign_workers(the_plan.shards, world_size)) if owner == rank]


def finalize(output_dir: str | os.PathLike) -> MergeResult:
    """Completes a merge whose shards are all written (by one process or by many workers): checks
    every shard against its receipt, its sha256 included (re-reading every shard), then writes the
    model card, the manifest and, last, the index.

    Raises:
        OutputError: no merge in progress there, shards missing (named, with the worker that owns
            them when known), or a shard whose bytes differ from the sha256 its worker recorded;
            rerun those workers (finished shards are kept, changed ones redone), then finalize again.
    """
    out = Path(output_dir)
    with ExitStack() as held:
        if (out / STATE_DIR).is_dir():  # not while a worker still writes here
            held.enter_context(_folder_lock(out, "exclusive"))
        return _finalize(out, rehash=True)


def _finalize(output_dir: str | os.PathLike, rehash: bool) -> MergeResult:
    """`finalize`; `rehash=False` when this very job wrote (or re-hashed on resume) every shard."""
    start = time.perf_counter()
    out = Path(output_dir)
    state = out / STATE_DIR
    try:
        info = json.loads((state / STATE_PLAN).read_text("utf-8"))
        plan_shards = info["shards"]
    except FileNotFoundError:
        if (out / SAFETENSORS_INDEX).is_file() and (out / MANIFEST).is_file():
            manifest_data = json.loads((out / MANIFEST).read_text("utf-8"))
            return _result_from_state(out, manifest_data["shards"], manifest_data.get("summary", {}), start, complete=True)
        raise OutputError(f"{out}: no merge in progress here ({STATE_DIR}/{STATE_PLAN} is missing); run `streammerge merge` first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{out}: {STATE_DIR}/{STATE_PLAN} is unreadable ({e}); rerun the merge with --force") from None
    receipts, missing = [], []
    for shard in plan_shards:
        receipt = _read_receipt(out, shard)
        if receipt is None:
            missing.append(shard["file"])
        else:
            receipts.append(receipt)
    if missing:
        raise OutputError(f"{out}: {len(missing)} of {len(plan_shards)} shard(s) not done: {_owners(missing, plan_shards, receipts)}; "
                          "rerun the workers that own them (finished shards are kept), then finalize again")
    if rehash:  # what the index certifies must be what the workers wrote: a flipped byte is caught here
        for receipt in receipts:
            _check_shard_sha256(out, receipt)
    try:
        for stale in out.glob("*.partial"):  # every shard is done: these are leftovers of killed writers
            stale.unlink(missing_ok=True)
        for side in sorted((state / "files").glob("*")):
            if not side.name.endswith(".partial"):
                os.replace(side, out / side.name)
    except OSError as e:
        raise OutputError(f"{out}: cannot finalize: {e.strerror or e}") from None
    if info["model_card"] is not None:  # None: --no-write-model-card
        write_text_atomic(out / MODEL_CARD, info["model_card"])
    shards = [{k: r[k] for k in ("file", "sha256", "bytes")} for r in receipts]
    write_json_atomic(out / MANIFEST, {**info["manifest"], "shards": shards, "fingerprint": info["fingerprint"],
                                       "summary": info["summary"]})
    fsync_dir(out)  # every shard's rename is on disk before the index can be
    weight_map = {name: shard["file"] for shard in plan_shards for name in shard["tensors"]}
    # The index comes last: a folder with an index is a complete merge.
    write_json_atomic(out / SAFETENSORS_INDEX, {"metadata": {"total_size": info["manifest"]["total_size"]}, "weight_map": weight_map})
    fsync_dir(out)
    shutil.rmtree(state, ignore_errors=True)
    return _result_from_state(out, shards, info["summary"], start, complete=False)


def _check_shard_sha256(out: Path, receipt: dict) -> None:
    path = out / receipt["file"]
    try:
        found = file_sha256(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot read: {e.strerror or e}; rerun {_worker_of(receipt)}, then finalize again") from None
    if found != (receipt["bytes"], receipt["sha256"]):
        raise OutputError(f"{path}: its bytes do not match the sha256 {_worker_of(receipt)} recorded when it wrote the "
                          f"shard (changed since?); rerun that worker (it rewrites the shard), then finalize again")


def _worker_of(receipt: dict) -> str:
    worker = receipt.get("worker")
    if isinstance(worker, list) and len(worker) == 2:
        return f"the worker --rank {worker[0]} --world-size {worker[1]}"
    return "the merge"


def _result_from_state(out: Path, shards: list[dict], summary: dict, start: float, complete: bool) -> MergeResult:
    return MergeResult(
        output_dir=out, shards=shards, total_size=summary.get("total_size", 0),
        tensors=summary.get("tensors", 0), merged_tensors=summary.get("merged_tensors", 0),
        seconds=time.perf_counter() - start, reused_shards=len(shards) if complete else 0, already_complete=complete,
    )


def _read_receipt(out: Path, shard: dict) -> dict | None:
    """A shard's receipt, if the shard is finished: the receipt names its tensors and the file has its size."""
    try:
        receipt = json.loads((out / STATE_DIR / f"{shard['file']}.json").read_text("utf-8"))
        if receipt["tensors"] == shard["tensors"] and (out / shard["file"]).stat().st_size == receipt["bytes"]:
            return receipt
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _owners(missing: list[str], plan_shards: list[dict], receipts: list[dict]) -> str:
    """'model-00002-of-00004.safetensors (rank 1 of 2), ...': owners known from the other workers' receipts."""
    sizes = {r["worker"][1] for r in receipts if isinstance(r.get("worker"), list)}
    if len(sizes) == 1:
        world_size = sizes.pop()
        shard_plans = tuple(ShardPlan(s["file"], tuple(s["tensors"]), 0, s["input_bytes"]) for s in plan_shards)
        owner = {s.filename: r for s, r in zip(shard_plans, assign_workers(shard_plans, world_size))}
        named = [f"{f} (rank {owner[f]} of {world_size})" for f in missing]
    else:
        named = list(missing)
    return ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")


def plan_fingerprint(the_plan: Plan, inputs: list[Checkpoint], side: dict | None = None, identity: list | None = None) -> str:
    """sha256 of everything that decides the output bytes: the plan and the inputs' identity
    (each file's size, modification time and header), so a resume never mixes two merges.
    `side`: which side files are written (tokenizer, model card), when not the default all;
    `identity`: input_identities(inputs), when already taken."""
    if identity is None:
        identity = input_identities(inputs)  # a recipe stage's fingerprint among them
    payload = {
        "version": __version__,
        "options": the_plan.options.as_strings(),
        "seed": the_plan.config.seed,
        "tensors": [[t.name, list(t.shape), t.out_dtype, t.merged, t.weights, t.densities, t.trim_densities, t.lam, t.dare,
                     t.gammas, t.epsilons] + ([t.inputs, t.scale] if t.inputs else []) + ([t.params] if t.params else [])
                    for t in the_plan.tensors],
        "shards": [[s.filename, list(s.tensors)] for s in the_plan.shards],
        "inputs": identity,
        "adapters": adapters_fingerprint(the_plan.config, inputs),
        "reindex": the_plan.reindex.digest if the_plan.reindex is not None else None,
    }
    if the_plan.layers is not None:  # stacked layers (their map is in "tensors"): config.json's layer count
        payload["layers"] = the_plan.layers
    if side and not all(side.values()):
        payload["side"] = side
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _workers(rank: int, world_size: int, force: bool) -> tuple[Group | None, int, int]:
    """This process's (torchrun process group or None, rank, world size), checked (merge and moe)."""
    group = Group.current()
    if group is not None:
        rank, world_size = group.rank, group.world_size
    check_worker(rank, world_size)
    if force and world_size > 1 and group is None:
        raise ConfigError("--force cannot be combined with independent workers (--world-size > 1): they would delete "
                          "each other's shards; empty the output directory first, or launch with torchrun")
    return group, rank, world_size


def input_identities(inputs: list[Checkpoint]) -> list[list]:
    """Each input file's identity: [path, size, mtime, header sha256] (a Hub file: repo, commit, name, etag, size);
    a recipe stage's inputs are followed down to the files, and the stage adds its fingerprint."""
    leaves, stages = expand(inputs)
    owners = {f: c for c in leaves for info in c.tensors.values() for f in info.files}
    return [owners[f].file_identity(f) for f in sorted(owners)] + [s.identity() for s in stages]


def changed_inputs(recorded: object, now: list[list] | None = None) -> list[str]:
    """The input files whose identity differs from `recorded` (a state plan's "inputs"): each named
    with what changed. `now`: the current identities; without it, local files are looked at again
    (their size and modification time)."""
    if not isinstance(recorded, list):
        return []
    current = {str(i[0]): i for i in now or []}
    changed = []
    for old in recorded:
        if not (isinstance(old, list) and len(old) == 4 and isinstance(old[0], str)):
            continue  # a Hub file: pinned by commit and etag, in the fingerprint
        path = old[0]
        if now is not None:
            new = current.get(path)
        else:
            try:
                st = os.stat(path)
                new = [path, st.st_size, st.st_mtime_ns, old[3]]
            except OSError:
                new = None
        if new is None:
            changed.append(f"{path} (gone, or no longer an input)")
        elif new[1] != old[1]:
            changed.append(f"{path} (now {new[1]} bytes, was {old[1]})")
        elif new[2] != old[2] or new[3] != old[3]:
            changed.append(f"{path} (modified since)")
    return changed


def _prepare_output(out: Path, inputs: list[Checkpoint], force: bool, fingerprint: str, lock: str | None,
                    held: ExitStack) -> bool:
    """Readies the output folder for this merge; True when this exact merge is already complete there.

    `lock`: "exclusive" (no other worker uses the folder yet, so stale files may be cleared and
    `force` applies), a worker's name (the folder's lock shared, the worker's own held; the folder
    must be empty or hold this same merge), or None (a torchrun rank after rank 0); taken before
    anything is deleted or written and kept open in `held` (a finished merge found there takes no lock)."""
    exclusive = lock == "exclusive"

    def take_lock() -> None:
        if lock is not None:
            held.enter_context(_folder_lock(out, lock))
    resolved = out.resolve()
    for ckpt in expand(inputs)[0]:  # a recipe stage's own inputs too
        folder = ckpt.folder.resolve()
        if resolved == folder or folder.is_relative_to(resolved):
            raise OutputError(f"{out}: is (or contains) the input {ckpt.path}; choose another output directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        take_lock()
        return False
    state = out / STATE_DIR
    if not ((out / MANIFEST).exists() or (out / SAFETENSORS_INDEX).exists() or state.is_dir() or any(out.glob("*.partial"))):
        raise OutputError(f"{out}: not empty, and holds files that are not a streammerge output; choose an "
                          "empty directory (they are never overwritten, even with --force)")
    if not force and (out / SAFETENSORS_INDEX).exists() and _fingerprint_in(out / MANIFEST) == fingerprint:
        return True  # read only: no lock needed
    take_lock()  # from here on files may go: not while another merge writes here
    if (state / STATE_REPLACING).exists():  # a --force killed while it deleted the previous merge
        if not exclusive:
            raise OutputError(f"{out}: a --force replacing the merge here was interrupted; rerun it as one process "
                              "(streammerge merge --force), or empty the directory")
        _replace(out)
        return False
    if force and exclusive:
        _replace(out)
        return False
    if (out / SAFETENSORS_INDEX).exists() and _fingerprint_in(out / MANIFEST) == fingerprint:
        return True
    previous = _fingerprint_in(state / STATE_PLAN)
    # Another worker is just starting this merge (its state folder is there, the plan not yet).
    fresh = state.is_dir() and previous is None and not any(state.glob("*.json")) and not (out / SAFETENSORS_INDEX).exists()
    if previous != fingerprint and not fresh:
        if previous is not None and not (out / SAFETENSORS_INDEX).exists():  # an unfinished merge: an input changed?
            changed = changed_inputs(_state_inputs(state), input_identities(inputs))
            if changed:
                raise OutputError(f"{out}: the unfinished merge here read inputs that changed since: {', '.join(changed[:3])}"
                                  f"{' and more' if len(changed) > 3 else ''}; restore them and rerun, or pass --force to start over")
        raise OutputError(f"{out}: holds a different merge; choose an empty directory or pass --force to replace it")
    _unmark_complete(out)  # from a finalize that did not finish
    if exclusive:  # nobody else is writing: partial files are leftovers of a killed run
        for stale in out.glob("*.partial"):
            stale.unlink(missing_ok=True)
    return False


def _replace(out: Path) -> None:
    """Deletes the previous merge in `out` (shards, index, manifest, card, side files, state), leaving
    an empty state folder. The folder is marked as ours first (the state folder and a marker in it,
    on disk before anything goes), so a kill at any point leaves a folder a rerun accepts and a rerun
    finishes the deletion."""
    state = out / STATE_DIR
    marker = state / STATE_REPLACING
    try:
        state.mkdir(exist_ok=True)
        write_text_atomic(marker, "a --force replace of the previous merge is in progress\n")
        fsync_dir(out)
        _unmark_complete(out)  # the output no longer looks complete from here on
        ours = [MODEL_CARD, *COPIED_FILES]
        for stale in [*out.glob("model-*.safetensors"), *out.glob("*.partial"), *(out / n for n in ours)]:
            stale.unlink(missing_ok=True)
        for entry in state.iterdir():
            if entry.name != STATE_REPLACING and not entry.name.startswith(STATE_LOCK):  # ours, held
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
        fsync_dir(out)
        marker.unlink()
        fsync_dir(state)
    except OSError as e:
        raise OutputError(f"{out}: cannot replace the previous merge: {e.strerror or e}") from None


@contextmanager
def _folder_lock(out: Path, mode: str) -> Iterator[None]:
    """Holds the output folder's lock (flock, released by the kernel when the process dies, so a
    dead merge never blocks): "exclusive", or a worker's name: the folder's lock shared with the
    other workers of a split merge and its own `lock.<name>` exclusive. Fails at once, naming the
    process (pid, host) that holds it."""
    state = out / STATE_DIR
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create: {e.strerror or e}") from None
    fds = []
    try:
        if mode == "exclusive":
            fds.append(_flock(out, state / STATE_LOCK, fcntl.LOCK_EX))
        else:
            fds.append(_flock(out, state / STATE_LOCK, fcntl.LOCK_SH))
            fds.append(_flock(out, state / f"{STATE_LOCK}.{mode}", fcntl.LOCK_EX))
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock


def _flock(out: Path, path: Path, how: int) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot create the lock: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{path}: cannot lock: {e.strerror or e}") from None
            holders = sorted({h for p in path.parent.glob(f"{STATE_LOCK}*") for h in _lock_holder(p)})
            who = f" ({'; '.join(holders)})" if holders else ""
            raise OutputError(f"{out}: another merge{who} is writing there; wait for it to end, or stop it "
                              "(a merge that died leaves no lock)") from None
        try:  # the file locked is still the one at `path` (a finalize may delete the state folder meanwhile)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
        path.parent.mkdir(parents=True, exist_ok=True)
    if how == fcntl.LOCK_EX:  # who holds it, for another merge's message (only that: a full disk is no reason to stop)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass
    return fd


def _lock_holder(path: Path) -> list[str]:
    """"pid N on HOST" from a lock file that some process holds exclusively (else it is stale: [])."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return []  # nobody holds it exclusively: what it says is stale
        except OSError:
            pass
        text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
        return [text] if text.startswith("pid ") else []
    finally:
        os.close(fd)


def _unmark_complete(out: Path) -> None:
    for name in (SAFETENSORS_INDEX, MANIFEST):
        (out / name).unlink(missing_ok=True)


def _write_state(out: Path, the_plan: Plan, reference: Checkpoint, tokenizer_from: Path | None, fingerprint: str,
                 identity: list, write_model_card: bool = True) -> None:
    """Everything `finalize` needs, so it can run from the output folder alone (on any node).
    Each worker writes the same bytes; atomic renames make concurrent writers safe."""
    state = out / STATE_DIR
    try:
        (state / "files").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create: {e.strerror or e}") from None
    _copy_side_files(reference, tokenizer_from, state / "files", the_plan)
    write_json_atomic(state / STATE_PLAN, {
        "fingerprint": fingerprint,
        "inputs": identity,  # to name an input that changes (resume, SIGBUS)
        "shards": [{"file": s.filename, "tensors": the_plan.stored_names(s), "input_bytes": s.input_bytes} for s in the_plan.shards],
        "manifest": manifest(the_plan),
        "model_card": model_card(the_plan) if write_model_card else None,
        "summary": {"tensors": len(the_plan.tensors), "merged_tensors": sum(t.merged for t in the_plan.tensors),
                    "total_size": the_plan.total_size},
    })


def _state_inputs(state: Path) -> object:
    try:
        return json.loads((state / STATE_PLAN).read_text("utf-8")).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None


def _fingerprint_in(path: Path) -> str | None:
    """The merge fingerprint a manifest or a state plan records, if it is readable."""
    try:
        return json.loads(path.read_text("utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _resume(out: Path, shards: list[str], digests: Callable[[str], dict] | None = None) -> dict[str, dict]:
    """Keeps each of `shards` whose file still matches its receipt; removes the rest of them.

    With `digests` (--verify-inputs), a finished shard is kept only if the input bytes it was built
    from are still the same; a shard recorded without them is redone; changed bytes are an error
    naming the input, since the finished shards then mix old and new inputs.
    """
    state = out / STATE_DIR
    done: dict[str, dict] = {}
    for name in shards:
        receipt_path = state / f"{name}.json"
        try:
            receipt = json.loads(receipt_path.read_text("utf-8"))
            intact = file_sha256(out / name) == (receipt["bytes"], receipt["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if intact and _inputs_unchanged(out, name, receipt, digests):
            done[name] = receipt
            continue
        receipt_path.unlink(missing_ok=True)
        for stale in (out / name, out / f"{name}.partial"):
            stale.unlink(missing_ok=True)
    if done:
        log.info("resuming in %s: %d shard(s) already done%s", out, len(done),
                 " (their input bytes checked)" if digests is not None else "")
    return done


def _inputs_unchanged(out: Path, name: str, receipt: dict, digests: Callable[[str], dict] | None) -> bool:
    if digests is None:
        return True
    recorded = receipt.get("inputs")
    if not isinstance(recorded, dict):
        log.info("%s: recorded without input digests; redone to check its inputs", name)
        return False
    now = digests(name)
    changed = sorted(f for f in set(recorded) | set(now) if recorded.get(f) != now.get(f))
    if changed:
        raise OutputError(f"{changed[0]}: its bytes changed since {out / name} was built from it (same size, time and "
                          f"header{f'; {len(changed) - 1} more input(s) too' if len(changed) > 1 else ''}): the finished "
                          "shards would mix old and new inputs; rerun with --force to merge again")
    return True


def shard_input_digests(the_plan: Plan, inputs: list[Checkpoint], shard: str) -> dict[str, str]:
    """sha256 of the input bytes one output shard is built from, per local input file: the bytes of
    every input tensor it reads, in plan order. (A Hub file is pinned by its commit and etag already;
    a recipe stage is checked through its own inputs' identities.)"""
    by_name = {t.name: t for t in the_plan.tensors}
    tensors = next(s.tensors for s in the_plan.shards if s.filename == shard)
    hashes: dict[Path, hashlib._Hash] = {}
    for name in tensors:
        tp = by_name[name]
        reads = [(inputs[i], n) for i, n in tp.inputs] if tp.inputs else [(c, name) for c in (inputs if tp.merged else inputs[:1])]
        for ckpt, n in {(id(c), n): (c, n) for c, n in reads}.values():
            info = ckpt.tensors.get(n)
            if info is None or type(ckpt) is not Checkpoint:
                continue
            h = hashes.setdefault(info.file, hashlib.sha256())
            with open(info.file, "rb") as f:
                f.seek(info.offset)
                left = info.nbytes
                while left > 0:
                    chunk = f.read(min(left, 16 << 20))
                    if not chunk:
                        raise CheckpointError(f"{info.file}: truncated: tensor {n!r} ends past the end of the file")
                    h.update(chunk)
                    left -= len(chunk)
    return {str(f): h.hexdigest() for f, h in hashes.items()}


def _check_free_space(out: Path, shards: list[ShardPlan]) -> None:
    needed = sum(s.nbytes for s in shards)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise OutputError(
            f"{out}: {free / 1e9:.2f} GB free but the merge writes {needed / 1e9:.2f} GB; free some space or choose another disk"
        )


def tokenizer_folder(config: MergeConfig, reference: Checkpoint, finetuned: list[Checkpoint]) -> Path | None:
    """Where the tokenizer files come from: the base by default (and for `union`, which extends the
    base's), or the model the tokenizer source names (a listed model, or any local folder, as mergekit
    allows). Raises ConfigError when an explicitly named source holds no tokenizer. Fetches a Hub
    source's small files."""
    source = config.tokenizer_settings()[0]
    reference.fetch_side_files(COPIED_FILES)
    if source is None:
        return reference.folder if reference.path.is_dir() else None
    from_base = source in ("base", "union")
    folder = reference.folder if from_base else Path(config._path(source))
    ref = hub.parse_source(config._path(source)) if not from_base else None
    if ref is not None:  # a Hub repo: the input already open (config.validate), else opened here
        remote = next((c for c in [reference, *finetuned] if isinstance(c, hub.HubCheckpoint) and c.ref == ref), None)
        if remote is None:
            with hub.open_checkpoint(config._path(source)) as remote:
                remote.fetch_side_files(COPIED_FILES)
        else:
            remote.fetch_side_files(COPIED_FILES)
        folder = remote.folder
    if folder.is_file():
        folder = folder.parent
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise ConfigError(f"tokenizer_source: {source!r} ({folder}) holds no tokenizer ({', '.join(TOKENIZER_MARKERS)}); "
                          "name a model that has one, or leave tokenizer_source out")
    return folder


def _copy_side_files(reference: Checkpoint, tokenizer_from: Path | None, out: Path, the_plan: Plan) -> None:
    """config.json, generation config and tokenizer files from the base (or the tokenizer source)."""
    if not reference.path.is_dir():
        return
    for name in COPIED_FILES:
        folder = reference.folder if name in ("config.json", "generation_config.json") else tokenizer_from
        if the_plan.reindex is not None and name in the_plan.reindex.files:  # the union's added tokens
            write_json_atomic(out / name, the_plan.reindex.files[name])
            continue
        if folder is None:  # no tokenizer files copied (--no-copy-tokenizer)
            continue
        src = folder / name
        if not src.is_file():
            continue
        if name == "config.json":
            write_json_atomic(out / name, _output_model_config(src, the_plan))
        else:
            copy_file_atomic(src, out / name)


def _output_model_config(src: Path, the_plan: Plan) -> dict:
    data = json.loads(src.read_text("utf-8"))
    embed = next((t for t in the_plan.tensors if t.name.endswith("embed_tokens.weight")), None)
    if the_plan.reindex is not None:
        data["vocab_size"] = the_plan.reindex.rows  # the output vocabulary's rows, as mergekit writes it
    elif embed is not None and the_plan.config.vocab != "error" and "vocab_size" in data:
        data["vocab_size"] = embed.shape[0]  # truncated by the vocab option
    if the_plan.layers is not None:  # stacked slices: the output's layer count, as mergekit writes it
        _set_layer_count(data, the_plan)
    _set_quantization(data, the_plan)
    dtypes = {t.out_dtype for t in the_plan.tensors if t.out_dtype in ("BF16", "F16", "F32")}
    if len(dtypes) == 1 and ("torch_dtype" in data or "dtype" in data):
        name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtypes.pop()]
        data["torch_dtype" if "torch_dtype" in data else "dtype"] = name
    return data


def _set_quantization(data: dict, the_plan: Plan) -> None:
    """FP8 output: the fine-grained quantization_config, naming the linear modules left unquantized; any
    other output is full precision, so a quantized input's quantization_config goes."""
    data.pop("quantization_config", None)
    if any(t.quantized for t in the_plan.tensors):
        kept = [t.name.removesuffix(".weight") for t in the_plan.tensors
                if not t.quantized and len(t.shape) == 2 and t.name.endswith(".weight") and "embed" not in t.name]
        data["quantization_config"] = quant.quantization_config(kept)


def _set_layer_count(data: dict, the_plan: Plan) -> None:
    """Sets the layer count key of config.json (mergekit: the architecture's num_layers_config_key).
    A per-layer list (`layer_types`, which transformers checks against the count) follows each
    output layer's input layer."""
    key = next((k for k in LAYER_COUNT_KEYS if k in data), "num_hidden_layers")
    old = data.get(key)
    data[key] = the_plan.layers
    types = data.get("layer_types")
    if isinstance(types, list) and len(types) == old:
        sources = {}  # output layer -> input layer of the tensor the output layer starts with
        for t in the_plan.tensors:
            out, src = layer_index(t.name), layer_index(t.inputs[0][1]) if t.inputs else None
            if out is not None and src is not None:
                sources.setdefault(out, src)
        data["layer_types"] = [types[min(sources.get(j, j), len(types) - 1)] for j in range(the_plan.layers)]


def manifest(the_plan: Plan) -> dict:
    """The resolved config, seed and versions; `finalize` adds each shard's sha256: enough to check and reproduce."""
    return {
        "format": "streammerge-manifest/1",
        "streammerge_version": __version__,
        "versions": {"torch": torch.__version__.split("+")[0], "safetensors": safetensors.__version__, "python": platform.python_version()},
        "config": the_plan.config.to_dict(),
        "seed": the_plan.config.seed,
        "options": the_plan.options.as_strings(),
        "total_size": the_plan.total_size,
    }


def model_card(the_plan: Plan) -> str:
    cfg = the_plan.config
    bases = [cfg.base] if cfg.base else []
    models = bases + [m.source for m in cfg.models if m.source not in bases]
    # A Hub model is named by its repo id (the revision is in the configuration below).
    models = list(dict.fromkeys(ref.repo_id if (ref := hub.parse_source(cfg._path(m))) else m for m in models))
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
