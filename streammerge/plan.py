"""The plan: everything decided from headers and config before a single weight is read.

Which tensors exist, what each one's method parameters are, its output dtype, which output shard it
lands in, and how much memory and disk the merge needs. `build_plan` is a pure function of the
inputs' headers and the config: the dry run prints it, the engine executes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import DTYPES, MergeConfig, ModelSpec, layer_index
from .constants import DEFAULT_MAX_MEMORY, DEFAULT_MAX_SHARD_SIZE, SHARD_NAME
from .errors import MismatchError
from .ops import MergeOptions
from .sources import DTYPE_NAMES, FLOAT_DTYPES, Checkpoint, TensorInfo, itemsize

# Names of 2-D weights that are embeddings, not linear layers (DARE's "linear weights only" scope).
EMBEDDING_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "shared.weight")


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D `.weight` that is not an embedding: `*_proj.weight`, `lm_head.weight`, `fc1.weight`, ..."""
    return len(shape) == 2 and name.endswith(".weight") and not any(m in name for m in EMBEDDING_MARKERS)


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors dtype name
    merged: bool  # False: copied from the base unchanged (apart from the dtype)
    weights: tuple[float, ...] = ()  # per fine-tune
    densities: tuple[float, ...] = ()  # per fine-tune: DARE keep rate or TIES trim density
    trim_densities: tuple[float, ...] = ()  # per fine-tune: dare_ties' trim after the drop
    lam: float = 1.0
    dare: bool = False  # DARE applies to this tensor (method and scope)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[str, ...]
    nbytes: int  # tensor data bytes


@dataclass(frozen=True)
class Plan:
    """The merge, decided. Pure data: no open files, no tensors."""

    config: MergeConfig
    options: MergeOptions
    reference: str  # the model whose names, order and files define the output (the base, or the first model)
    sources: tuple[str, ...]  # paths of the fine-tunes, in config order
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    input_bytes: int  # bytes read once over all inputs
    peak_memory: int  # estimated peak working memory for tensor blocks
    max_memory: int

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)


def build_plan(
    config: MergeConfig,
    reference: Checkpoint,
    finetuned: list[Checkpoint],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Plan:
    """Decides the whole merge from headers alone; raises MismatchError listing every incompatibility.

    Args:
        reference: the base model (or, for `linear` without a base, the first model).
        finetuned: the models contributing task vectors (for `linear`, all models), in config order.
    """
    opts = config.merge_options()
    specs: list[ModelSpec] = config.finetunes()
    check_compatible(reference, finetuned)

    names = sorted(reference.tensors, key=lambda n: (reference.tensors[n].file.name, reference.tensors[n].offset))
    layers = [layer_index(n) for n in names]
    n_layers = max((i for i in layers if i is not None), default=-1) + 1
    out_dtype_override = config.out_dtype or config.dtype

    tensors: list[TensorPlan] = []
    for name, layer in zip(names, layers):
        info = reference.tensors[name]
        is_float = info.dtype in FLOAT_DTYPES
        out_dtype = DTYPE_NAMES[DTYPES[out_dtype_override]] if (out_dtype_override and is_float) else info.dtype
        if not is_float or not config.selected(name):
            tensors.append(TensorPlan(name, info.shape, out_dtype, merged=False))
            continue

        def param(key: str, spec: ModelSpec | None) -> float:
            return config.tensor_param(key, spec, name, layer, n_layers)

        tensors.append(
            TensorPlan(
                name,
                info.shape,
                out_dtype,
                merged=True,
                weights=tuple(param("weight", s) for s in specs),
                densities=tuple(param("density", s) for s in specs),
                trim_densities=tuple(param("trim_density", s) for s in specs),
                lam=param("lambda", None),
                dare=opts.sparsify == "dare" and (opts.dare_scope == "all" or is_linear_weight(name, info.shape)),
            )
        )

    shards = _assign_shards(tensors, max_shard_size)
    distinct = {id(c): c for c in [reference, *finetuned]}.values()
    return Plan(
        config=config,
        options=opts,
        reference=str(reference.path),
        sources=tuple(str(c.path) for c in finetuned),
        tensors=tuple(tensors),
        shards=tuple(shards),
        input_bytes=sum(c.nbytes for c in distinct),
        peak_memory=estimate_peak_memory(tensors, reference.tensors, len(finetuned), max_memory),
        max_memory=max_memory,
    )


def check_compatible(reference: Checkpoint, others: list[Checkpoint]) -> None:
    """Every model must have the reference's tensors with the same shapes; collects all problems."""
    problems: list[str] = []
    for ckpt in others:
        if ckpt is reference:
            continue
        missing = [n for n in reference.tensors if n not in ckpt.tensors]
        extra = [n for n in ckpt.tensors if n not in reference.tensors]
        if missing:
            problems.append(f"{ckpt.path}: lacks {len(missing)} tensor(s) of {reference.path}, e.g. {missing[0]!r}")
        if extra:
            problems.append(f"{ckpt.path}: has {len(extra)} tensor(s) not in {reference.path}, e.g. {extra[0]!r}")
        for name, info in reference.tensors.items():
            other = ckpt.tensors.get(name)
            if other is None:
                continue
            if other.shape != info.shape:
                problems.append(
                    f"tensor {name!r}: shape {list(other.shape)} in {ckpt.path} but {list(info.shape)} in {reference.path}"
                )
            elif (other.dtype in FLOAT_DTYPES) != (info.dtype in FLOAT_DTYPES):
                problems.append(f"tensor {name!r}: dtype {other.dtype} in {ckpt.path} but {info.dtype} in {reference.path}")
    if problems:
        raise MismatchError(problems)


def _assign_shards(tensors: list[TensorPlan], max_shard_size: int) -> list[ShardPlan]:
    """Fills shards in tensor order, starting a new one when the next tensor would overflow it."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    count = len(groups)
    return [
        ShardPlan(SHARD_NAME.format(index=i + 1, count=count), tuple(t.name for t in g), sum(t.nbytes for t in g))
        for i, g in enumerate(groups)
    ]


def bytes_per_element(n_models: int, in_itemsize: int, out_itemsize: int) -> int:
    """Working bytes per element of a block: inputs as read, float32 deltas of every model, the
    base and the result in float32, a few float32/bool temporaries, the output bytes."""
    return (n_models + 1) * in_itemsize + 4 * (n_models + 4) + out_itemsize + 2 * n_models


def rows_per_block(shape: tuple[int, ...], n_models: int, in_itemsize: int, out_itemsize: int, max_memory: int) -> int:
    """How many rows of a tensor fit in the memory budget at once (at least one)."""
    row_elems = math.prod(shape[1:]) if shape else 1
    per_row = max(1, row_elems * bytes_per_element(n_models, in_itemsize, out_itemsize))
    rows = shape[0] if shape else 1
    return max(1, min(rows, max_memory // per_row))


def estimate_peak_memory(tensors: list[TensorPlan], infos: dict[str, TensorInfo], n_models: int, max_memory: int) -> int:
    peak = 0
    for t in tensors:
        in_size = itemsize(infos[t.name].dtype)
        out_size = itemsize(t.out_dtype)
        block_rows = rows_per_block(t.shape, n_models, in_size, out_size, max_memory)
        row_elems = math.prod(t.shape[1:]) if t.shape else 1
        peak = max(peak, block_rows * row_elems * bytes_per_element(n_models, in_size, out_size))
    return peak
