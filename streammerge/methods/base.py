"""What a merge method is: one declaration (name, paper, inputs, parameters, passes, fast paths).

A method merges one tensor at a time, and sees it as row blocks: the tensor viewed as
[rows, row_elems] (a 1-D tensor is rows of one element; a scalar one row). Whatever needs the
whole tensor (a norm, a Gram matrix, a top-k threshold, a quantile) comes from *stats passes*
over the blocks, each turning per-block partial results into an explicit `state`; then the merge
pass turns each block into output rows from that state. The engine owns the I/O (reading the
blocks, the memory budget, writing); a method owns only its arithmetic.

Determinism: under the default semantics a tensor's bytes may not depend on how it was split into
blocks. Partial results must therefore combine exactly: integer counts and histograms, or float64
per-row sums (each row reduced in a fixed order, `row_sums`), which `reduce` adds with math.fsum
(`total`). Keep partials small and prefer Python numbers/lists to tensors: small tensors kept
across blocks pin the allocator's heap between the blocks' big temporaries. A method that needs the whole tensor at once (to reproduce mergekit's own float32
reductions bit for bit) says so with `whole_tensor`, and the engine hands it one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

BASE_MODES = ("required", "optional", "forbidden")
# elements per slice the engine hands a method running on the compiled kernels (TensorCtx.compiled),
# and what their per-thread scratch holds: pipeline/passes.py's HooksBackend
COMPILED_SLICE = 1 << 18
PATHS = ("torch", "numpy", "compiled", "gpu")  # where a method's merge can run (opt-in)


@dataclass(frozen=True)
class Param:
    """One parameter a method reads, as a config writes it under `parameters:`.

    `default` None means required. `low`/`high` bound numeric values (inclusive unless the `_open`
    flag is set). `per_model` parameters may differ per model (a model's own `parameters:`); the
    others are one value for the whole merge (mergekit's `lambda`, `t`). `per_tensor` values may be
    gradients or filter lists. `presets` gives the default under a semantics preset where it differs.
    """

    name: str
    default: Any = None
    kind: type = float  # float | int | bool | str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    per_model: bool = True
    per_tensor: bool = True
    choices: tuple[str, ...] = ()  # for kind str
    presets: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    # the out-of-range message; {name}, {range} and {value} are filled in
    error: str = "{name} must be in {range}, got {value}"

    def default_for(self, semantics: str) -> Any:
        return self.presets.get(semantics, self.default)

    def problem(self, value: Any) -> str | None:
        """Why a (numeric, resolved) value is out of range, or None."""
        if self.kind is str:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.kind is bool:
            return None
        lo_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        hi_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if lo_bad or hi_bad:
            lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
            hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
            return self.error.format(name=self.name, range=f"{lo}, {hi}", value=value)
        return None


class Shaped:
    """A tensor's rows as the engine splits it: the first dimension (a scalar is one row of one element)."""

    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorCtx(Shaped):
    """Everything about one tensor's merge except its data."""

    name: str
    shape: tuple[int, ...]
    semantics: str  # default | mergekit | peft | fusionbench
    # per-model parameters as tuples (one value per model, config order), the others as scalars,
    # each resolved for this tensor (filters, gradients, defaults)
    params: Mapping[str, Any]
    dtype: torch.dtype | None  # mergekit's `dtype` (its compute dtype); None: the inputs' own
    out_dtype: torch.dtype
    has_base: bool
    seed: int = 0
    keys: tuple[int, ...] = ()  # per model: a counter-based random key (mask.mask_key) for this tensor
    compiled: bool = False  # the compiled kernels (methods/ckernel.py) may take CPU rows: the same bytes, faster



@dataclass
class Rows:
    """Rows [r0, r1) of a tensor from every input, as stored (any float dtype, on the compute device).

    `base` is θ₀'s rows (None when the method takes no base, or the config gives none); `models`
    the other models' θ rows, in config order. Each is shaped [r1 − r0, row_elems].
    """

    r0: int
    r1: int
    base: torch.Tensor | None
    models: list[torch.Tensor]

    @property
    def start(self) -> int:
        """Flat index of the block's first element."""
        return self.r0 * (self.models[0].shape[1] if self.models else self.base.shape[1])


class Method:
    """A merge method. Subclass, set the class attributes, override the hooks, and `register` it.

    Hooks (all pure: no I/O, no globals):
        passes(ctx)                       number of stats passes before the merge pass
        skips(ctx, p, state)              True: pass p has nothing to compute (an exact selection
                                          that pass 1 settled); its reduce gets no partials
        whole_tensor(ctx)                 True: the tensor comes as one block (mergekit's own reductions)
        stats(ctx, p, rows, state)        a small partial result of pass p over one block
        reduce(ctx, p, partials, state)   the state after pass p, from the blocks' partials in order
        merge(ctx, rows, state)           the output rows [r1 − r0, row_elems], any float dtype;
                                          the engine rounds them to the output dtype
    """

    name: ClassVar[str]
    reference: ClassVar[str] = ""  # paper (arXiv id / URL) or origin
    summary: ClassVar[str] = ""  # the formula, one line
    base: ClassVar[str] = "required"  # required | optional | forbidden
    min_models: ClassVar[int] = 1  # models besides the base
    max_models: ClassVar[int | None] = None
    params: ClassVar[tuple[Param, ...]] = ()
    semantics: ClassVar[tuple[str, ...]] = ("default", "mergekit")
    paths: ClassVar[frozenset[str]] = frozenset({"torch", "gpu"})
    copies: ClassVar[bool] = False  # copies one model per slice, never merges (layer stacking: passthrough)
    mergekit_appends_base: ClassVar[bool] = False  # mergekit adds an unlisted base_model as the last model (linear)
    # mergekit writes this method's result in this dtype (float32 arithmetic, never cast back) unless
    # `out_dtype` is set; None: in `dtype`, as every other method
    mergekit_out_dtype: ClassVar[str | None] = None
    stats_kind: ClassVar[str] = "none"  # what the passes compute, for `streammerge methods`: e.g. "Gram (float64 row sums)"

    def passes(self, ctx: TensorCtx) -> int:
        return 0

    def whole_tensor(self, ctx: TensorCtx) -> bool:
        return False

    def skips(self, ctx: TensorCtx, p: int, state: Any) -> bool:
        return False

    def stats(self, ctx: TensorCtx, p: int, rows: Rows, state: Any) -> Any:
        raise NotImplementedError

    def reduce(self, ctx: TensorCtx, p: int, partials: list[Any], state: Any) -> Any:
        raise NotImplementedError

    def merge(self, ctx: TensorCtx, rows: Rows, state: Any) -> torch.Tensor:
        raise NotImplementedError

    def check(self, n_models: int, has_base: bool) -> list[str]:
        """Problems with the inputs (the config names the method); the registry's input contract."""
        problems = []
        if self.base == "required" and not has_base:
            problems.append(f"base_model: {self.name} needs a base model")
        if self.base == "forbidden" and has_base:
            problems.append(f"base_model: {self.name} takes no base model; remove base_model")
        if n_models < self.min_models:
            problems.append(f"models: {self.name} needs at least {self.min_models} model(s) besides the base, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            problems.append(f"models: {self.name} takes at most {self.max_models} model(s) besides the base, got {n_models}")
        return problems


# ---- helpers for exact, split-independent statistics -------------------------------------------


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of a [rows, cols] tensor in float64, each row reduced by a tree fixed by the row
    length alone (first half plus last half, again and again), in elementwise ops: the same bits on
    any device and thread count. Returns float64 [rows]."""
    return row_sums_(x.to(torch.float64, copy=True)).clone()  # (the sums alone, not the whole buffer)


def row_sums_(work: torch.Tensor) -> torch.Tensor:
    """row_sums on a float64 [rows, cols] buffer it overwrites; returns a view of it (float64 [rows])."""
    cols = work.shape[1]
    while cols > 1:
        half = cols // 2
        work[:, :half] += work[:, cols - half : cols]
        cols -= half
    return work[:, 0] if work.shape[1] else torch.zeros(work.shape[0], dtype=torch.float64, device=work.device)


def total(parts: Sequence[torch.Tensor] | torch.Tensor) -> float:
    """The exact (correctly rounded) float64 sum of per-row partial sums, whatever their grouping."""
    if isinstance(parts, torch.Tensor):
        return math.fsum(parts.reshape(-1).tolist())
    return math.fsum(v for p in parts for v in p.reshape(-1).tolist())


def run_tensor(method: Method, ctx: TensorCtx, base: torch.Tensor | None, models: Sequence[torch.Tensor],
               rows_per_block: int | None = None) -> torch.Tensor:
    """A whole tensor through a method's passes, in row blocks, in memory (tests, reference runs).

    The engine does the same with its I/O; this is the loop, without it. Returns the merged tensor in
    the method's output dtype before rounding, shaped like the inputs.
    """
    shape = tuple((base if base is not None else models[0]).shape)

    def view(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(ctx.rows, ctx.row_elems)

    b, ms = view(base), [view(m) for m in models]
    step = ctx.rows if rows_per_block is None or method.whole_tensor(ctx) else rows_per_block
    spans = [(r, min(r + step, ctx.rows)) for r in range(0, ctx.rows, step)] or [(0, 0)]

    def block(r0: int, r1: int) -> Rows:
        return Rows(r0, r1, None if b is None else b[r0:r1], [m[r0:r1] for m in ms])

    state: Any = None
    for p in range(method.passes(ctx)):
        partials = [] if method.skips(ctx, p, state) else [method.stats(ctx, p, block(r0, r1), state) for r0, r1 in spans]
        state = method.reduce(ctx, p, partials, state)
    out = [method.merge(ctx, block(r0, r1), state) for r0, r1 in spans]
    return torch.cat(out).reshape(shape)
