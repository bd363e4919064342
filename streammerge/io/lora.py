"""PEFT LoRA adapters as fine-tunes: each adapted weight's task vector rebuilt per row block.

A LoRA adapter (a folder with adapter_config.json and adapter_model.safetensors) stores, per adapted
weight W (out × in), two factors A (r × in) and B (out × r); its task vector is τ = s · B A with the
scaling s = lora_alpha / r (rsLoRA: lora_alpha / √r). An adapter is opened here as a source that
looks like a checkpoint of the base's tensors (`tensors`, `view`, `advise`), and also hands over
its task vector directly (`delta_rows`), so the kernels never see base + τ rounded and subtracted.

Rows r0..r1 of τ are s · L[r0:r1] R with (L, R) = (B, A), or (Aᵀ, Bᵀ) where PEFT transposes the
product (fan_in_fan_out, i.e. GPT-2's Conv1D, and embeddings). Only the factors (and one block of
τ) are ever in memory.

Op order (docs/lora.md): each element of L R is Σ_k L_ik R_kj summed in float64 in the fixed order
k = 0 .. r-1 (every product is exact in float64), rounded once to float32, then multiplied by s in
float32, zeros written as +0. So τ is a function of the factors alone: the same bits for any row
block, thread count, BLAS library or machine.

Factor drop (`lora_drop`, the LoRA Dropout paper, arXiv 2404.09610): instead of DARE's drop on τ,
drop rank components (`rank`: column k of B and row k of A together) or elements of A
(`element_a`) or of B (`element_b`) with the counter-based mask of mask.py, and rescale τ by
1/density: E[τ'] = τ since each product term survives with probability density.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streammerge.constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MAX_ADAPTER_CONFIG_BYTES,
    PICKLE_SUFFIXES,
)
from streammerge.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    StreammergeError,
)
from streammerge.front.config import MergeConfig, ModelSpec
from streammerge.io.sources import (
    FLOAT_DTYPES,
    Checkpoint,
    TensorInfo,
    read_json,
)
from streammerge.methods.mask import keep_mask, mask_key

log = logging.getLogger(__name__)

PEFT_PREFIXES = ("base_model.model.", "base_model.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save(?:\.[^.]+)?(?=\.[^.]+$)")
ROW_CHUNK_ELEMENTS = 1 << 18  # elements of τ computed at once: a float64 accumulator of 2 MiB


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a PEFT adapter folder (it holds adapter_config.json)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).exists()


@dataclass(frozen=True)
class LoraTensor(TensorInfo):
    """One base tensor as an adapter sees it.

    kind: "lora" (τ = s · L R), "zero" (the adapter does not touch it: τ = 0), or "full" (a weight the
    adapter stores whole: modules_to_save, or biases trained with bias="all"/"lora_only").
    """

    kind: str = "zero"
    key_a: str = ""  # adapter file keys of the factors (lora) or of the stored tensor (full)
    key_b: str = ""
    rank: int = 0
    scaling: float = 0.0
    transposed: bool = False  # PEFT transposes B A: fan_in_fan_out, or an embedding


@dataclass(frozen=True)
class FactorDrop:
    """DARE's drop applied to a LoRA adapter's factors (see the module docstring)."""

    mode: str  # rank | element_a | element_b
    density: float
    key: int  # mask.mask_key(seed, model_index, f"{tensor}#lora_{mode}")


class LoraAdapter:
    """A PEFT LoRA adapter, read as a fine-tune of a base checkpoint.

    Opening reads adapter_config.json and the weights' header only; `attach(base)` maps the adapter's
    keys onto the base's tensors and checks every shape. Then `tensors` lists every base tensor, and
    `delta_rows`/`view` give τ or θ = θ₀ + τ rows of any of them.

    Example:
        >>> base = Checkpoint("llama/")                                  # doctest: +SKIP
        >>> adapter = LoraAdapter("my-lora/"); adapter.attach(base)      # doctest: +SKIP
        >>> adapter.delta_rows("model.layers.0.self_attn.q_proj.weight", 0, 8)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source_label: str | None = None  # set by hub.open_checkpoint for an adapter repo
        self.config_path = self.path / ADAPTER_CONFIG
        self.config = _read_config(self.config_path)
        self.config_text = json.dumps(self.config, sort_keys=True)
        _check_config(self.config_path, self.config)
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.exists():
            pickled = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            what = (f"only {pickled[0]}, a pickle file, which streammerge never loads (it can run code); save the "
                    "adapter with safe_serialization=True") if pickled else "no such file"
            raise CheckpointNotFoundError(weights, what)
        self.weights = Checkpoint(weights)
        self.modules, self.full = _parse_keys(weights, self.weights.tensors)
        self.reference: Checkpoint | None = None
        self.tensors: dict[str, TensorInfo] = {}
        self._cache: tuple | None = None  # the factors of the last tensor read: ((name, drop), (L, R))

    # ---- the checkpoint interface -----------------------------------------------------------

    def file_identity(self, file: Path) -> list:
        return self.weights.file_identity(file)

    def fetch_side_files(self, names) -> None:
        """An adapter's vocabulary is its base's: no tokenizer or config files to fetch."""

    @property
    def label(self) -> str:
        """How messages and plans name this adapter (as `Checkpoint.label`): `org/name@<commit>` from the Hub."""
        return self.source_label or str(self.path)

    @property
    def folder(self) -> Path:
        return self.path

    @property
    def nbytes(self) -> int:
        """Bytes read from the adapter file for the whole merge."""
        return sum(t.nbytes for t in self.tensors.values()) if self.tensors else self.weights.nbytes

    def gives_delta(self, name: str) -> bool:
        """Whether rows of `name` come as τ (delta_rows) rather than as stored weights."""
        return self.tensors[name].kind != "full"

    def view(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        """Rows of the adapted weight θ₀ + τ (float32; the base's own rows where τ = 0)."""
        info = self.tensors[name]
        row_end = info.rows if row_end is None else row_end
        if info.kind == "full":
            return self.weights.view(info.key_a, row_start, row_end)
        if info.kind == "zero":
            return self.reference.view(name, row_start, row_end)
        rows = self.delta_rows(name, row_start, row_end)
        return rows.add_(self.reference.view(name, row_start, row_end))

    def advise(self, name: str) -> None:
        info = self.tensors[name]
        for key in (info.key_a, info.key_b):
            if key:
                self.weights.advise(key)

    def close(self) -> None:
        self.weights.close()
        self._cache = None

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- mapping onto the base ----------------------------------------------------------------

    def attach(self, reference: Checkpoint, *, base_name: str | None = None) -> None:
        """Maps the adapter's keys onto `reference`'s tensors and checks their shapes.

        Raises:
            CheckpointError: every key that targets no base tensor or has the wrong shape, at once.
        """
        problems: list[str] = []
        tensors: dict[str, TensorInfo] = {}
        file = self.weights.path
        for name, info in reference.tensors.items():
            tensors[name] = LoraTensor(name, info.dtype, info.shape, file, 0, 0)
        for module, parts in self.modules.items():
            target = _target(reference, module + ".weight")
            where = f"adapter key {parts.get('A') or parts.get('B')!r}"
            if target is None:
                problems.append(f"{where} adapts {module!r}, which the base {reference.path} does not have "
                                "(an adapter of a different base model?)")
                continue
            problem, entry = self._lora_entry(target, reference.tensors[target], parts)
            if problem:
                problems.append(f"{where}: {problem}")
            else:
                tensors[target] = entry
        for name, key in self.full.items():
            target = _target(reference, name)
            if target is None:
                problems.append(f"adapter key {key!r} (a whole saved weight) matches no tensor of the base {reference.path}")
                continue
            stored = self.weights.tensors[key]
            if tensors[target].kind == "lora":
                problems.append(f"adapter key {key!r}: {target!r} is both LoRA-adapted and stored whole")
                continue
            if stored.dtype not in FLOAT_DTYPES:
                problems.append(f"adapter key {key!r}: dtype {stored.dtype} is not a float type")
                continue
            # full weights keep their own shape: the plan reports a mismatch (e.g. a resized vocabulary)
            tensors[target] = LoraTensor(target, stored.dtype, stored.shape, file, stored.offset, stored.nbytes, kind="full", key_a=key)
        if problems:
            head = f"adapter does not fit the base: {len(problems)} problem(s): " if len(problems) > 1 else ""
            raise CheckpointError(file, head + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
        claimed = self.config.get("base_model_name_or_path")
        if claimed and base_name and Path(str(claimed).rstrip("/")).name != Path(str(base_name).rstrip("/")).name:
            log.warning("%s: adapter was trained on %r, merged onto %r (every shape matches)", self.config_path, claimed, base_name)
        self.reference, self.tensors = reference, tensors

    def _lora_entry(self, target: str, base: TensorInfo, parts: dict) -> tuple[str | None, LoraTensor | None]:
        if "A" not in parts or "B" not in parts:
            return f"{'lora_B' if 'A' in parts else 'lora_A'} of the same module is missing", None
        a, b = self.weights.tensors[parts["A"]], self.weights.tensors[parts["B"]]
        for t in (a, b):
            if t.dtype not in FLOAT_DTYPES:
                return f"{t.name!r} has dtype {t.dtype}, not a float type", None
        if len(a.shape) != 2 or len(b.shape) != 2:
            return (f"factors of shapes {list(a.shape)} and {list(b.shape)}: only LoRA on linear and embedding "
                    "layers (2-D factors) is supported, not convolutions"), None
        if base.dtype not in FLOAT_DTYPES or len(base.shape) != 2:
            return f"targets {target!r} of shape {list(base.shape)} {base.dtype}, not a 2-D float weight", None
        rank = a.shape[0]
        if b.shape[1] != rank:
            return f"lora_A has rank {rank} but lora_B {list(b.shape)} has {b.shape[1]} columns", None
        module = parts["module"]
        transposed = parts["embedding"] or bool(self.config.get("fan_in_fan_out", False))
        rows, cols = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if (rows, cols) != tuple(base.shape):
            layout = " (fan_in_fan_out: B A transposed)" if transposed and not parts["embedding"] else ""
            return (f"B A has shape {[rows, cols]}{layout} but {target!r} has {list(base.shape)} in the base "
                    "(an adapter of a different base model?)"), None
        configured = _pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", rank))
        if configured != rank:
            return f"rank {rank} in the file but r = {configured} in {ADAPTER_CONFIG}", None
        alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.config.get("lora_alpha", rank))
        scaling = alpha / math.sqrt(rank) if self.config.get("use_rslora", False) else alpha / rank
        entry = LoraTensor(target, "F32", base.shape, self.weights.path, a.offset, a.nbytes + b.nbytes, kind="lora",
                           key_a=a.name, key_b=b.name, rank=rank, scaling=scaling, transposed=transposed)
        return None, entry

    # ---- τ ----------------------------------------------------------------------------------------

    def delta_rows(self, name: str, row_start: int, row_end: int, drop: FactorDrop | None = None) -> torch.Tensor:
        """Rows [row_start, row_end) of τ in float32 (a new tensor; zeros where the adapter does not adapt)."""
        info = self.tensors[name]
        shape = (row_end - row_start, *info.shape[1:])
        if info.kind == "zero":
            return torch.zeros(shape, dtype=torch.float32)
        if info.kind != "lora":
            raise ValueError(f"{name!r} is stored whole in {self.weights.path}: read it with view()")
        left, right = self._factors(info, drop)
        out = torch.empty(shape, dtype=torch.float32)
        scales = [np.float32(info.scaling)] + ([np.float32(1.0 / drop.density)] if drop is not None else [])
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, shape[1]))
        for r in range(row_start, row_end, step):  # each chunk finished while it is in cache
            chunk = out.numpy()[r - row_start : min(r + step, row_end) - row_start]
            lora_product(left[r : r + len(chunk)], right, out=chunk)
            for scale in scales:
                np.multiply(chunk, scale, out=chunk)
            np.add(chunk, np.float32(0.0), out=chunk)  # −0 → +0: τ's zeros carry no sign
        return out

    def _factors(self, info: LoraTensor, drop: FactorDrop | None) -> tuple[torch.Tensor, ...]:
        """L and R of τ = L @ R (float64, the factor drop applied), cached for the current tensor."""
        if self._cache is not None and self._cache[0] == (info.name, drop):
            return self._cache[1]
        a = self.weights.read(info.key_a).double()
        b = self.weights.read(info.key_b).double()
        if drop is not None:
            if drop.mode == "rank":  # rank component k is row k of A (and column k of B)
                a *= keep_mask(drop.key, 0, info.rank, drop.density).view(-1, 1)
            elif drop.mode == "element_a":
                a *= keep_mask(drop.key, 0, a.numel(), drop.density).view(a.shape)
            else:
                b *= keep_mask(drop.key, 0, b.numel(), drop.density).view(b.shape)
        left, right = (a.T.contiguous(), b.T.contiguous()) if info.transposed else (b, a)
        factors = (left, right)
        self._cache = ((info.name, drop), factors)
        return factors


# ---- the product -------------------------------------------------------------------------------


PRODUCT_SCRATCH = 16  # bytes per element while lora_product builds a block: its float64 sum and term


def lora_product(left: torch.Tensor, right: torch.Tensor, out: np.ndarray | None = None) -> torch.Tensor:
    """left @ right in one fixed order of operations, rounded once to float32:
    Σ_k left[:, k] · right[k, :] accumulated for k = 0 .. r-1 in float64.

    The factors hold float32-representable values (bf16, fp16, fp32), so each product is exact in
    float64 and the sums follow the one order above: the bits never depend on BLAS, threads, row
    blocks or the machine, as a matrix multiply's would. (numpy: ~10x torch's broadcast addcmul here.)
    """
    lhs, rhs = left.numpy(), right.numpy()
    acc = np.zeros((lhs.shape[0], rhs.shape[1]))
    term = np.empty_like(acc)
    for k in range(lhs.shape[1]):
        np.multiply(lhs[:, k : k + 1], rhs[k : k + 1], out=term)
        acc += term
    if out is None:
        out = np.empty(acc.shape, dtype=np.float32)
    np.copyto(out, acc, casting="same_kind")  # the one rounding to float32
    return torch.from_numpy(out)


# ---- the merge's view of adapters ----------------------------------------------------------------


@dataclass(frozen=True)
class DeltaRows:
    """How the engine reads one adapter's τ for one tensor (engine.TensorJob)."""

    adapter: LoraAdapter
    name: str
    drop: FactorDrop | None

    @property
    def drops_factors(self) -> bool:
        return self.drop is not None

    def read(self, row_start: int, row_end: int) -> torch.Tensor:
        return self.adapter.delta_rows(self.name, row_start, row_end, self.drop)


def drop_mode(config: MergeConfig, spec: ModelSpec) -> str:
    """A model's lora_drop: its own, else the top-level one, else "delta" (DARE drops τ itself)."""
    return str(spec.parameters.get("lora_drop") or config.parameters.get("lora_drop") or "delta")


def delta_inputs(tp, plan, finetuned: list) -> list[DeltaRows | None]:
    """Per fine-tune of a merged tensor: how to read its τ when it is a LoRA adapter, else None.

    With lora_drop other than "delta", a DARE method's drop (this tensor's density) happens on the
    factors here, and the caller turns the kernel's drop off for that model.
    """
    if not any(isinstance(source, LoraAdapter) for source in finetuned):
        return [None] * len(finetuned)
    specs = plan.config.finetunes()
    out: list[DeltaRows | None] = []
    for i, source in enumerate(finetuned):
        if not isinstance(source, LoraAdapter) or not source.gives_delta(tp.name):
            out.append(None)
            continue
        mode = drop_mode(plan.config, specs[i])
        drop = None
        if mode != "delta" and tp.dare and source.tensors[tp.name].kind == "lora":
            drop = FactorDrop(mode, tp.densities[i], mask_key(plan.config.seed, i, f"{tp.name}#lora_{mode}"))
        out.append(DeltaRows(source, tp.name, drop))
    return out


def attach_adapters(config: MergeConfig, reference, finetuned: list) -> list[StreammergeError]:
    """Attaches every adapter among the fine-tunes to the reference; returns the problems found."""
    problems: list[StreammergeError] = []
    if isinstance(reference, LoraAdapter):
        return [ConfigError(f"{reference.path}: a LoRA adapter cannot be the base (or, for linear, the first model); "
                            "give the full model it adapts as base_model")]
    for i, (spec, source) in enumerate(zip(config.finetunes(), finetuned)):
        if source is None:
            continue
        if not isinstance(source, LoraAdapter):
            if spec.parameters.get("lora_drop") not in (None, "delta"):
                problems.append(ConfigError(f"models[{i}].parameters.lora_drop: {spec.source} is not a LoRA adapter"))
            continue
        if source.reference is reference:
            continue  # listed twice
        try:
            source.attach(reference, base_name=config.base)
        except CheckpointError as e:
            problems.append(e)
    return problems


def fingerprint(config: MergeConfig, inputs: list) -> list:
    """What of the adapters decides the output bytes beyond their files: config and drop modes."""
    specs = config.finetunes()
    return [[str(c.path), c.config_text, drop_mode(config, specs[i - 1]) if 0 < i <= len(specs) else ""]
            for i, c in enumerate(inputs) if isinstance(c, LoraAdapter)]


def open_model(path: str | os.PathLike) -> Checkpoint | LoraAdapter:
    """A checkpoint, or a LoRA adapter when the folder holds adapter_config.json."""
    return LoraAdapter(path) if is_adapter(path) else Checkpoint(path)


# ---- adapter_config.json and the weights' keys -------------------------------------------------------


def _read_config(path: Path) -> dict:
    data = read_json(path, MAX_ADAPTER_CONFIG_BYTES, "not a valid adapter config")
    if not isinstance(data, dict):
        raise CheckpointError(path, "not a JSON object")
    return data


def _check_config(path: Path, cfg: dict) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(path, f"peft_type {cfg.get('peft_type')!r}: only LoRA adapters can be merged "
                              "(IA3, LoHa, LoKr, AdaLoRA, prompt tuning... are not supported)")
    if cfg.get("use_dora"):
        raise CheckpointError(path, "use_dora: true: DoRA adapters rescale the weight's column norms, which is not a "
                              "task vector B A; merge the adapter into the model first (PEFT merge_and_unload)")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or not math.isfinite(value)):
            raise CheckpointError(path, f"{key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                                  for v in value.values()):
            raise CheckpointError(path, f"{key} must map module patterns to positive numbers, got {value!r}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as e:
                raise CheckpointError(path, f"{key}: {pattern!r} is not a valid pattern ({e})") from None
    for key in ("fan_in_fan_out", "use_rslora"):
        if not isinstance(cfg.get(key, False), bool):
            raise CheckpointError(path, f"{key} must be true or false, got {cfg.get(key)!r}")


def _strip_prefix(key: str) -> str:
    for prefix in PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _parse_keys(file: Path, tensors: dict[str, TensorInfo]) -> tuple[dict[str, dict], dict[str, str]]:
    """Sorts the weights' keys: LoRA factors by module, and whole saved tensors by their base name."""
    modules: dict[str, dict] = {}
    full: dict[str, str] = {}
    adapters: set[str] = set()
    for key in tensors:
        name = _strip_prefix(key)
        m = _LORA_KEY.match(name) or _EMBEDDING_KEY.match(name)
        if m:
            if m.group("adapter"):
                adapters.add(m.group("adapter"))
            part = modules.setdefault(m.group("module"), {"module": m.group("module"), "embedding": False})
            part["embedding"] = part["embedding"] or "embedding" in m.group("part")
            part[m.group("part")[-1]] = key
            continue
        if "lora_magnitude_vector" in name:
            raise CheckpointError(file, f"key {key!r}: a DoRA magnitude vector; DoRA adapters are not supported")
        if re.search(r"\.lora_B(\.[^.]+)?\.bias$", name):
            raise CheckpointError(file, f"key {key!r}: a bias on lora_B (lora_bias=True) is not supported")
        if ".lora_" in name or "trainable_tokens" in name:
            raise CheckpointError(file, f"key {key!r}: not a LoRA factor streammerge understands (lora_A/lora_B weights, "
                                  "lora_embedding_A/B)")
        full[_MODULES_TO_SAVE.sub("", name)] = key
    if len(adapters) > 1:
        raise CheckpointError(file, f"holds several adapters ({', '.join(sorted(adapters))}); save each on its own")
    if not modules and not full:
        raise CheckpointError(file, "holds no LoRA weights (no lora_A/lora_B keys)")
    return modules, full


def _target(reference: Checkpoint, name: str) -> str | None:
    """The base tensor an adapter key names, allowing for the `model.` prefix differing."""
    for candidate in (name, "model." + name, name.removeprefix("model.")):
        if candidate in reference.tensors:
            return candidate
    return None


def _pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern: the first pattern matching the module path's end wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default




# ---- mergekit's model+lora ---------------------------------------------------------------------------


def split_model_lora(source: str) -> tuple[str, str] | None:
    """mergekit's `model+lora` reference: (model, adapter), or None for a plain source (a path that
    exists locally wins, as everywhere; mergekit itself splits on the `+` always).

    Raises:
        ConfigError: more than one `+`, or an empty side (mergekit cannot parse those either).
    """
    if "+" not in source or os.path.exists(source):
        return None
    parts = source.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"{source!r}: mergekit's model+lora takes one model, '+', one LoRA adapter (a folder or Hub "
                          "repo with adapter_config.json); it has no such local path either")
    return parts[0], parts[1]


class AdaptedModel:
    """mergekit's `model+lora`: a checkpoint with a PEFT LoRA adapter applied, read like any checkpoint.

    Every tensor the adapter adapts reads as W + s·B·A: τ = s·B·A rebuilt per row block exactly as
    for an adapter merged as a fine-tune (float64 sums in a fixed order, rounded once to float32),
    W + τ added in float64 and rounded once to W's own dtype, what PEFT's merge_and_unload saves (up
    to its float32 matrix product's rounding). Weights the adapter stores whole (modules_to_save)
    replace the model's; all others are the model's own bytes. mergekit merges the adapter into a
    copy of the model on disk first (--lora-merge-cache); here nothing is written.

    Example:
        >>> with AdaptedModel(Checkpoint("llama/"), LoraAdapter("my-lora/")) as m:   # doctest: +SKIP
        ...     m.view("model.layers.0.self_attn.q_proj.weight", 0, 8)
    """

    def __init__(self, model: Checkpoint, adapter: LoraAdapter):
        adapter.attach(model, base_name=str(model.path))
        self.model, self.adapter = model, adapter
        self.path = model.path
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in model.tensors.items():
            own = adapter.tensors[name]
            self.tensors[name] = own if own.kind == "full" else info  # a weight stored whole keeps its own shape and dtype

    @property
    def label(self) -> str:
        return f"{self.model.label}+{self.adapter.label}"

    @property
    def folder(self) -> Path:
        return self.model.folder

    @property
    def nbytes(self) -> int:
        return self.model.nbytes + self.adapter.weights.nbytes

    def view(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        """Rows of the adapted weight, in its dtype (a new tensor where the adapter changes it)."""
        kind = self.adapter.tensors[name].kind
        if kind == "zero":
            return self.model.view(name, row_start, row_end)
        if kind == "full":
            return self.adapter.view(name, row_start, row_end)
        info = self.model.tensors[name]
        row_end = info.rows if row_end is None else row_end
        delta = self.adapter.delta_rows(name, row_start, row_end)
        weight = self.model.view(name, row_start, row_end)
        return delta.double().add_(weight).to(weight.dtype)  # the sum in float64, weight widened as it is read

    def read(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        return self.view(name, row_start, row_end).clone()

    def advise(self, name: str) -> None:
        self.model.advise(name)
        self.adapter.advise(name)

    def file_identity(self, file: Path) -> list:
        """The model file's identity, and the adapter's (its weights' identity and its config): a resume
        never mixes two adapters."""
        return [*self.model.file_identity(file), self.adapter.weights.file_identity(self.adapter.weights.path),
                self.adapter.config_text]

    def fetch_side_files(self, names) -> None:
        self.model.fetch_side_files(names)

    def close(self) -> None:
        self.adapter.close()
        self.model.close()

    def __enter__(self) -> AdaptedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
