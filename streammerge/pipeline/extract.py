"""extract-lora: a PEFT LoRA adapter from a fine-tune and its base, one tensor at a time (docs/extract-lora.md).

Each 2-D weight's task vector τ = θ − θ₀ is factored as B A (methods/lowrank.py): an exact SVD
where it fits the memory budget, else a seeded randomized SVD over τ's row blocks. Embeddings and
the output head are stored whole (`modules_to_save`) unless `embed_lora`, as mergekit-extract-lora
does; other changed tensors (norms) too, unless `skip_undecomposable`.

The output folder's lifecycle follows a merge's (front/api.py): an exclusive lock, each tensor's
factors written under `.streammerge/pieces/` as it is done (a rerun after a kill keeps them), then
adapter_model.safetensors under a temporary name and renamed, the model card and manifest, and
adapter_config.json last: a folder with adapter_config.json is a complete adapter. A rerun of the
same extraction is a no-op; `force` replaces a previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from streammerge import __version__
from streammerge.constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    MODEL_CARD,
    STATE_DIR,
)
from streammerge.errors import CheckpointError, ConfigError, MismatchError, OutputError
from streammerge.io import hub
from streammerge.io.lora import AdaptedModel, LoraAdapter
from streammerge.io.sources import (
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    Checkpoint,
    itemsize,
)
from streammerge.io.writer import (
    ShardWriter,
    fsync_dir,
    write_json_atomic,
    write_text_atomic,
)
from streammerge.methods import lowrank

log = logging.getLogger(__name__)

FORMAT = "streammerge-extract-lora/1"
PIECES = "pieces"  # in STATE_DIR: one safetensors file and one receipt per finished tensor
PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM
# Modules mergekit treats as embeddings (nn.Embedding) and as the output head: stored whole by default.
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|tok_embeddings|embed_in)$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)$|^output$")
_OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
COPY_ROWS_BYTES = 64 << 20  # a tensor stored whole is copied into the adapter this many bytes at a time


@dataclass(frozen=True)
class ExtractOptions:
    """What decides the adapter's bytes (all in the fingerprint). Defaults: mergekit-extract-lora's."""

    max_rank: int = 128
    sv_epsilon: float = 0.0
    energy: float | None = None
    distribute_scale: bool = True
    embed_lora: bool = False
    save_modules: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_undecomposable: bool = False
    svd: str = "auto"  # auto | exact | randomized
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    dtype: str | None = None  # factors' dtype; None: each fine-tuned tensor's own

    def check(self) -> None:
        problems = []
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1:
            problems.append(f"rank (--rank/--max-rank) must be a whole number >= 1, got {self.max_rank!r}")
        if not self.sv_epsilon >= 0 or not math.isfinite(self.sv_epsilon):
            problems.append(f"sv_epsilon (--sv-epsilon) must be >= 0, got {self.sv_epsilon!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            problems.append(f"energy (--energy) must be in (0, 1], got {self.energy!r}")
        if self.svd not in ("auto", "exact", "randomized"):
            problems.append(f"svd (--svd) must be auto, exact or randomized, got {self.svd!r}")
        if self.oversample < 0 or self.power_iters < 0:
            problems.append("oversample and power_iters (--oversample, --power-iters) must be >= 0")
        if self.dtype is not None and self.dtype not in _OUT_DTYPES:
            problems.append(f"dtype (--dtype) must be bfloat16, float16 or float32, got {self.dtype!r}")
        for what, patterns in (("--include-regex", self.include), ("--exclude-regex", self.exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    problems.append(f"{what} {p!r}: not a valid regular expression ({e})")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class Item:
    """One tensor of the fine-tune and what becomes of it."""

    name: str
    module: str
    kind: str  # lora | embedding (PEFT's lora_embedding: τᵀ factored) | save (stored whole) | bias (lora_B.bias)
    shape: tuple[int, ...]
    dtype: str  # the fine-tune's dtype
    nbytes: int


@dataclass
class TensorReport:
    """What extraction did with one tensor: its rank and the relative Frobenius error ‖τ − B A‖/‖τ‖
    of the factors as written (rank 0: τ = 0, nothing written)."""

    name: str
    kind: str
    shape: list[int]
    rank: int = 0
    error: float = 0.0
    method: str = ""  # exact | randomized | whole | unchanged
    seconds: float = 0.0
    keys: list[str] = field(default_factory=list)  # its keys in adapter_model.safetensors
    dtypes: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class ExtractResult:
    output_dir: Path
    tensors: list[TensorReport]
    bytes: int
    seconds: float
    already_complete: bool = False
    reused: int = 0  # tensors kept from an interrupted run
    device: str = "cpu"

    def summary(self) -> dict:
        lora = [t for t in self.tensors if t.kind in ("lora", "embedding") and t.rank > 0]
        return {
            "output_dir": str(self.output_dir),
            "adapter_bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "already_complete": self.already_complete,
            "reused_tensors": self.reused,
            "device": self.device,
            "max_rank_used": max((t.rank for t in lora), default=0),
            "max_error": max((t.error for t in lora), default=0.0),
            "tensors": [{"name": t.name, "kind": t.kind, "shape": t.shape, "rank": t.rank, "error": t.error,
                         "method": t.method, "seconds": round(t.seconds, 3)} for t in self.tensors],
        }


def extract_lora(
    finetune: str,
    output_dir: str | os.PathLike,
    *,
    base: str,
    options: ExtractOptions | None = None,
    max_memory: int = 1 << 30,
    device: str = "auto",
    threads: int | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    on_tensor: Callable[[TensorReport], None] | None = None,
) -> ExtractResult:
    """Writes the PEFT LoRA adapter that takes `base` to (approximately) `finetune` into `output_dir`.

    Args:
        finetune, base: a model folder, a .safetensors file, a merge's output, a Hub repo id
            org/name[@revision], or mergekit's model+lora.
        options: ranks, what to factor, how (ExtractOptions; mergekit-extract-lora's defaults).
        max_memory: bytes of working memory: a τ whose exact SVD fits is factored exactly, others by
            the randomized SVD (unless options.svd says which).
        device: cpu, cuda, cuda:N or auto, where the arithmetic runs.
        force: replace a previous extraction in `output_dir`.
        progress: called with the fine-tune's bytes as each tensor is done; on_total: once, with their sum.
        on_tensor: called with each tensor's report as it is done.

    Raises:
        ConfigError (options), CheckpointError/HubError (inputs), MismatchError (base and fine-tune do
        not fit: missing tensors, shapes), OutputError (the folder).
    """
    from streammerge.front.api import _folder_lock, input_identities
    from streammerge.pipeline.device import resolve_device

    start = time.perf_counter()
    options = options or ExtractOptions()
    options.check()
    target = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(output_dir)
    with ExitStack() as stack:
        ft = _open(finetune, "FINETUNE", stack)
        ref = _open(base, "--base", stack)
        items = plan_items(ft, ref, options)
        fingerprint = _fingerprint(options, input_identities([ref, ft]))
        for ckpt in (ft, ref):
            folder = ckpt.folder.resolve()
            if out.resolve() == folder or folder.is_relative_to(out.resolve()):
                raise OutputError(f"{out}: is (or contains) the input {ckpt.label}; choose another output directory")
        done = _complete(out, fingerprint) if not force else None
        if done is not None:
            return ExtractResult(out, done["reports"], done["bytes"], time.perf_counter() - start, already_complete=True,
                                 reused=len(done["reports"]), device=str(target))
        stack.enter_context(_folder_lock_for(out, _folder_lock))
        _prepare(out, fingerprint, force)
        pieces = out / STATE_DIR / PIECES
        pieces.mkdir(parents=True, exist_ok=True)
        if on_total is not None:
            on_total(sum(i.nbytes for i in items))
        reports, reused = [], 0
        for index, item in enumerate(items):
            report = _load_receipt(pieces, index, item)
            if report is not None:
                reused += 1
            else:
                report = _extract_one(item, ft, ref, options, max_memory, target, pieces, index)
            reports.append(report)
            if on_tensor is not None:
                on_tensor(report)
            if progress is not None:
                progress(item.nbytes)
        config = adapter_config(items, reports, ft, base)
        total = _write_adapter(out, items, reports, ft, pieces)
        _finish(out, config, reports, total, fingerprint, finetune, base, options)
    if reused:
        log.info("resumed in %s: %d tensor(s) kept from an interrupted run", out, reused)
    return ExtractResult(out, reports, total, time.perf_counter() - start, reused=reused, device=str(target))


# ---- inputs and what becomes of each tensor -------------------------------------------------------


def _open(source: str, what: str, stack: ExitStack) -> Checkpoint:
    opened = stack.enter_context(hub.open_checkpoint(source))
    if isinstance(opened, LoraAdapter):
        raise CheckpointError(opened.label, f"{what} is a LoRA adapter; extract-lora needs full checkpoints (to re-rank "
                              "an adapter, pass the model it adapts with the adapter applied: MODEL+ADAPTER)")
    return opened


def plan_items(ft: Checkpoint | AdaptedModel, ref: Checkpoint | AdaptedModel, options: ExtractOptions) -> list[Item]:
    """Sorts the fine-tune's tensors (in name order) into factored, stored whole, LoRA biases; checks
    them against the base (every problem at once).

    Raises:
        MismatchError: tensors missing from the base, shapes that differ, non-2-D weights asked for.
    """
    modules: dict[str, dict[str, object]] = {}
    for name in sorted(ft.tensors):
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, {})[leaf] = ft.tensors[name]
    saved = set(options.save_modules)
    items: list[Item] = []
    problems: list[str] = []

    def item(info, module: str, kind: str) -> Item:
        return Item(info.name, module, kind, tuple(info.shape), info.dtype, info.nbytes)

    for module, leaves in modules.items():
        leaf_name = module.rpartition(".")[2]
        infos = [i for i in leaves.values() if i.dtype in FLOAT_DTYPES]
        weight = leaves.get("weight")
        is_embedding, is_head = bool(_EMBEDDING.search(module)), bool(_HEAD.search(module))
        excluded = any(re.search(p, module) for p in options.exclude)
        selected = not excluded and (not options.include or any(re.search(p, module) for p in options.include))
        if module in saved or leaf_name in saved or ((is_embedding or is_head) and not options.embed_lora and not excluded):
            kind = "save"
        elif not selected:
            continue
        elif weight is not None and weight.dtype in FLOAT_DTYPES and len(weight.shape) == 2:
            kind = "lora"
        elif options.include and weight is not None and weight.dtype in FLOAT_DTYPES:
            problems.append(f"{weight.name}: has shape {list(weight.shape)}, not a 2-D weight, but --include-regex asks "
                            "for it; only 2-D (linear, embedding) weights are factored: narrow the pattern")
            continue
        else:
            if options.skip_undecomposable:
                continue
            kind = "save"
        for info in infos:
            base_info = ref.tensors.get(info.name)
            if base_info is None:
                problems.append(f"{info.name}: in the fine-tune but not in the base (a different model?)")
                continue
            if tuple(base_info.shape) != tuple(info.shape):
                if kind == "save" and (is_embedding or is_head):  # a resized vocabulary: stored whole, as mergekit does
                    log.warning("%s: shape %s in the fine-tune, %s in the base: stored whole (the base needs its vocabulary "
                                "resized to load the adapter)", info.name, list(info.shape), list(base_info.shape))
                    items.append(item(info, module, "save"))
                    continue
                problems.append(f"{info.name}: shape {list(info.shape)} in the fine-tune but {list(base_info.shape)} in the base")
                continue
            if kind == "lora" and info is weight:
                items.append(item(info, module, "embedding" if is_embedding else "lora"))
            elif kind == "lora":
                if info.name.endswith(".bias") and len(info.shape) == 1:
                    items.append(item(info, module, "bias"))
                else:
                    log.warning("%s: a %s tensor of a factored module, left out of the adapter", info.name, list(info.shape))
            else:
                items.append(item(info, module, "save"))
    if problems:
        raise MismatchError(problems)
    if not any(i.kind in ("lora", "embedding") for i in items) and not any(i.kind == "save" for i in items):
        raise ConfigError("nothing to extract: no 2-D weight is selected (check --include-regex/--exclude-regex)")
    return items


# ---- one tensor ----------------------------------------------------------------------------------------


def _out_dtype(item: Item, options: ExtractOptions) -> str:
    return _OUT_DTYPES[options.dtype] if options.dtype else item.dtype


def _extract_one(item: Item, ft, ref, options: ExtractOptions, max_memory: int, device: torch.device, pieces: Path,
                 index: int) -> TensorReport:
    start = time.perf_counter()
    report = TensorReport(item.name, item.kind, list(item.shape))

    def read(r0: int, r1: int) -> torch.Tensor:  # rows of τ, exact in float64 (both inputs are float)
        # moved as stored, widened on the device: a GPU gets 2 bytes an element over PCIe, not 8; a copy
        # always (a float64 view on the CPU would otherwise be the read-only mapped file itself)
        t = ft.view(item.name, r0, r1).to(device).to(torch.float64, copy=True)
        return t.sub_(ref.view(item.name, r0, r1).to(device).double())

    tensors: dict[str, torch.Tensor] = {}
    if item.kind == "save":
        changed = any(not torch.equal(ft.view(item.name, r0, r1), ref.view(item.name, r0, r1))
                      for r0, r1 in lowrank.row_blocks(item.shape[0] if item.shape else 1, max(1, math.prod(item.shape[1:]))))
        if ref.tensors[item.name].dtype != item.dtype or tuple(ref.tensors[item.name].shape) != item.shape:
            changed = True
        report.method, report.rank = ("whole", 1) if changed else ("unchanged", 0)
        if changed:
            report.keys, report.dtypes, report.shapes = [PREFIX + item.name], [item.dtype], [list(item.shape)]
    elif item.kind == "bias":
        delta = read(0, item.shape[0])
        if bool((delta != 0).any()):
            key = f"{PREFIX}{item.module}.lora_B.bias"
            tensors[key] = delta.to("cpu", DTYPES[_out_dtype(item, options)])
            report.method, report.rank = "whole", 1
        else:
            report.method = "unchanged"
    else:
        shape = (item.shape[0], item.shape[1])
        rule = lowrank.RankRule(options.max_rank, options.sv_epsilon, options.energy)
        exact = options.svd == "exact" or (options.svd == "auto" and lowrank.exact_bytes(shape) <= max_memory)
        if exact:
            tau = read(0, shape[0])
            svd = lowrank.exact_svd(tau, rule)
            read_err = lambda r0, r1: tau[r0:r1]  # noqa: E731
        else:
            need = lowrank.randomized_bytes(shape, options.max_rank, options.oversample)
            if need > max_memory:
                raise ConfigError(f"{item.name}: the randomized SVD of its {shape[0]} x {shape[1]} task vector at rank "
                                  f"{options.max_rank} needs {need / 2**20:.0f} MiB; raise --max-memory to at least that")
            svd = lowrank.randomized_svd(read, shape, rule, seed=lowrank.tensor_seed(options.seed, item.name),
                                         oversample=options.oversample, power_iters=options.power_iters, device=device)
            read_err = read
        a, b = lowrank.lora_factors(svd, options.distribute_scale)
        dtype = DTYPES[_out_dtype(item, options)]
        a, b = a.to("cpu", dtype).contiguous(), b.to("cpu", dtype).contiguous()
        report.rank, report.method = len(svd.s), svd.method
        if report.rank:
            report.error = lowrank.relative_error(read_err, shape, a.to(device), b.to(device), svd.norm_sq)
            if item.kind == "embedding":  # PEFT's lora_embedding_A is r × vocab, lora_embedding_B dim × r: (B A)ᵀ = τ
                tensors[f"{PREFIX}{item.module}.lora_embedding_A"] = b.T.contiguous()
                tensors[f"{PREFIX}{item.module}.lora_embedding_B"] = a.T.contiguous()
            else:
                tensors[f"{PREFIX}{item.module}.lora_A.weight"] = a
                tensors[f"{PREFIX}{item.module}.lora_B.weight"] = b
        else:
            report.method = "unchanged" if svd.norm_sq == 0.0 else svd.method
    report.keys = report.keys or list(tensors)
    report.dtypes = report.dtypes or [DTYPE_NAMES[t.dtype] for t in tensors.values()]
    report.shapes = report.shapes or [list(t.shape) for t in tensors.values()]
    report.seconds = time.perf_counter() - start
    if tensors:
        entries = [(k, DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
        writer = ShardWriter(pieces / f"{index:05d}.safetensors", entries, {})
        for t in tensors.values():
            writer.write(torch.empty(t.shape, dtype=t.dtype).copy_(t))  # dense strides, even for an n × 1 factor
        writer.finish()
    write_json_atomic(pieces / f"{index:05d}.json", {"item": asdict(item) | {"shape": list(item.shape)}, "report": asdict(report)})
    return report


def _load_receipt(pieces: Path, index: int, item: Item) -> TensorReport | None:
    """The report of a tensor an interrupted run finished (its piece file in place), else None."""
    try:
        data = json.loads((pieces / f"{index:05d}.json").read_text("utf-8"))
        if data["item"]["name"] != item.name or data["item"]["kind"] != item.kind:
            return None
        report = TensorReport(**data["report"])
        if report.keys and item.kind != "save":
            Checkpoint(pieces / f"{index:05d}.safetensors").close()  # a header that parses: the rename happened
        return report
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return None


# ---- the adapter -------------------------------------------------------------------------------------------


def adapter_config(items: list[Item], reports: list[TensorReport], ft, base: str) -> dict:
    """PEFT's adapter_config.json: r = the largest rank used, lora_alpha = r and, for tensors of another
    rank, rank_pattern = alpha_pattern = their rank (scaling 1 everywhere), as mergekit writes it."""
    factored = [(i, r) for i, r in zip(items, reports) if i.kind in ("lora", "embedding") and r.rank > 0]
    r = max((rep.rank for _, rep in factored), default=1)
    ranks = {i.module: rep.rank for i, rep in factored if rep.rank != r}
    targets = _target_modules([i.module for i, _ in factored], ft)
    saved = sorted({i.module for i, rep in zip(items, reports) if i.kind == "save" and rep.rank > 0})
    biased = any(i.kind == "bias" and rep.rank > 0 for i, rep in zip(items, reports))
    ref = hub.parse_source(base)
    return {
        "base_model_name_or_path": ref.repo_id if ref is not None else str(base),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),
        "target_modules": targets,
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": biased,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _target_modules(modules: list[str], ft) -> list[str]:
    """Leaf names (q_proj, ...) where every 2-D weight of that name is factored, else the full module
    names: PEFT adapts every module a target names, and a module without factors would get random A."""
    by_leaf: dict[str, set[str]] = {}
    for name, info in ft.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            module = name.rpartition(".")[0]
            by_leaf.setdefault(module.rpartition(".")[2], set()).add(module)
    mine: dict[str, set[str]] = {}
    for m in modules:
        mine.setdefault(m.rpartition(".")[2], set()).add(m)
    out: list[str] = []
    for leaf, ms in sorted(mine.items()):
        out += [leaf] if ms == by_leaf.get(leaf) else sorted(ms)
    return out


def _write_adapter(out: Path, items: list[Item], reports: list[TensorReport], ft, pieces: Path) -> int:
    """adapter_model.safetensors from the pieces (and the tensors stored whole, read from the fine-tune),
    streamed under a temporary name and renamed; returns its tensor bytes."""
    entries, sources = [], []
    for index, (item, rep) in enumerate(zip(items, reports)):
        for key, dtype, shape in zip(rep.keys, rep.dtypes, rep.shapes):
            entries.append((key, dtype, tuple(shape), math.prod(shape) * itemsize(dtype)))
            sources.append((index, item, key))
    writer = ShardWriter(out / ADAPTER_WEIGHTS, entries, {"format": "pt"})
    try:
        opened: dict[int, Checkpoint] = {}
        for index, item, key in sources:
            if item.kind == "save":
                info = ft.tensors[item.name]
                step = max(1, COPY_ROWS_BYTES // max(1, info.row_bytes))
                for r0 in range(0, info.rows, step):
                    writer.write(ft.view(item.name, r0, min(r0 + step, info.rows)))
                continue
            if index not in opened:
                for old in opened.values():
                    old.close()
                opened = {index: Checkpoint(pieces / f"{index:05d}.safetensors")}
            writer.write(opened[index].view(key))
        for old in opened.values():
            old.close()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return sum(e[3] for e in entries)


# ---- the output folder --------------------------------------------------------------------------------------


def _fingerprint(options: ExtractOptions, identities: list) -> str:
    payload = {"format": FORMAT, "version": __version__, "options": asdict(options), "inputs": identities}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def _manifest(out: Path) -> dict | None:
    try:
        data = json.loads((out / MANIFEST).read_text("utf-8"))
        return data if isinstance(data, dict) and data.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def _complete(out: Path, fingerprint: str) -> dict | None:
    """The finished extraction in `out` when it is this very one (its manifest's fingerprint), else None."""
    data = _manifest(out)
    if data is None or data.get("fingerprint") != fingerprint or not (out / ADAPTER_CONFIG).is_file():
        return None
    try:
        return {"reports": [TensorReport(**r) for r in data["tensors"]], "bytes": data["adapter_bytes"]}
    except (KeyError, TypeError):
        return None


def _folder_lock_for(out: Path, folder_lock):
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _ours(out):
        raise OutputError(f"{out}: not empty, and holds files that are not a streammerge extraction; choose an empty "
                          "directory (they are never overwritten, even with --force)")
    return folder_lock(out, "exclusive")


def _ours(out: Path) -> bool:
    return _manifest(out) is not None or (out / STATE_DIR).is_dir()


def _prepare(out: Path, fingerprint: str, force: bool) -> None:
    """Readies `out` (locked, ours or empty): a previous different (or, with force, any) extraction is
    removed, adapter_config.json first so that the folder stops looking complete at once; the pieces
    of an interrupted run of this same extraction are kept."""
    state = out / STATE_DIR
    record = state / "fingerprint"
    previous = record.read_text().strip() if record.is_file() else None
    finished = _manifest(out)
    if not force and ((finished is not None and finished.get("fingerprint") != fingerprint)
                      or (previous is not None and previous != fingerprint)):
        raise OutputError(f"{out}: holds a different extraction; choose an empty directory or pass --force to replace it")
    try:
        if force or finished is not None:
            for name in (ADAPTER_CONFIG, MANIFEST, ADAPTER_WEIGHTS, MODEL_CARD):
                (out / name).unlink(missing_ok=True)
            fsync_dir(out)
        if force or previous != fingerprint:
            shutil.rmtree(state / PIECES, ignore_errors=True)
        for stale in out.glob("*.partial"):
            stale.unlink(missing_ok=True)
        state.mkdir(exist_ok=True)
        write_text_atomic(record, fingerprint + "\n")
    except OSError as e:
        raise OutputError(f"{out}: cannot prepare: {e.strerror or e}") from None


def _finish(out: Path, config: dict, reports: list[TensorReport], total: int, fingerprint: str, finetune: str, base: str,
            options: ExtractOptions) -> None:
    """Model card and manifest, then adapter_config.json: the adapter is complete from that rename on."""
    write_text_atomic(out / MODEL_CARD, model_card(finetune, base, options, config, reports))
    write_json_atomic(out / MANIFEST, {
        "format": FORMAT, "streammerge_version": __version__, "fingerprint": fingerprint,
        "finetune": finetune, "base": base, "options": asdict(options), "adapter_bytes": total,
        "tensors": [asdict(r) for r in reports],
    })
    fsync_dir(out)
    write_json_atomic(out / ADAPTER_CONFIG, config)
    fsync_dir(out)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def model_card(finetune: str, base: str, options: ExtractOptions, config: dict, reports: list[TensorReport]) -> str:
    ref = hub.parse_source(base)
    factored = [r for r in reports if r.kind in ("lora", "embedding") and r.rank > 0]
    worst = max((r.error for r in factored), default=0.0)
    return (
        "---\n" + f"base_model: {ref.repo_id if ref else base}\nlibrary_name: peft\ntags:\n- lora\n- streammerge\n"
        "- extract-lora\n---\n\n"
        f"# LoRA adapter extracted from `{finetune}`\n\n"
        f"Extracted with streammerge {__version__} (`streammerge extract-lora`) against the base `{base}`: "
        f"{len(factored)} weights factored at rank up to {config['r']} (largest relative Frobenius error "
        f"{worst:.4g}), {len(config['modules_to_save'] or [])} modules stored whole.\n\n"
        "## Options\n\n```json\n" + json.dumps(asdict(options), indent=2) + "\n```\n"
    )


def push_adapter(output_dir: str | os.PathLike, repo_id: str, *, private: bool = False, branch: str | None = None,
                 token: str | None = None) -> str:
    """Uploads a finished adapter folder to a Hub repo in one commit (adapter_config.json included), as
    `streammerge push` does for a merge; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd

    out = Path(output_dir)
    if not (out / ADAPTER_CONFIG).is_file():
        raise OutputError(f"{out}: no {ADAPTER_CONFIG}: not a finished extraction; run it (or resume it) first")
    upload = hub.HubUpload(repo_id, private=private, branch=branch, token=token)
    try:
        ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
               for p in sorted(out.iterdir()) if p.is_file() and not p.name.endswith(".partial")]
        info = upload.api.create_commit(repo_id, ops, commit_message="Upload LoRA adapter (streammerge extract-lora)",
                                        revision=branch)
    except Exception as e:
        raise hub._push_error(e, upload.ref) from None
    finally:
        upload.pool.shutdown(wait=True)
    return str(info.commit_url)
