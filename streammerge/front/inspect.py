"""A look at the task vectors before merging: `streammerge inspect BASE MODEL...`.

Streams every model's delta τ = θ − θ₀ once, in row blocks (LoRA adapters: their rebuilt τ), and
accumulates per model and per layer group the distribution of |τ| and the fraction above 0.005,
where the DARE paper (Yu et al. 2024, §4.5) finds drop-and-rescale breaking down (continued
pre-training); and per pair of models the cosine similarity and the sign-conflict rate that TIES
elects against (Yadav et al. 2023). Memory: one row block per model plus fixed histograms.

Quantiles come from a histogram of |τ|'s float32 bit patterns shifted right by 19 bits: 16 bins per
power of two, so a reported quantile is the upper edge of the bin holding the true one (at most
6.25 % above it). docs/inspect.md describes every number and the JSON keys.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from streammerge.errors import MismatchError, MissingDependencyError, StreammergeError
from streammerge.front.config import layer_index
from streammerge.io.lora import LoraAdapter, open_model
from streammerge.io.sources import FLOAT_DTYPES, Checkpoint
from streammerge.pipeline.plan import EMBEDDING_MARKERS, is_vocab_tensor

DARE_LIMIT = 0.005  # |τ| above which DARE's rescale breaks down (Yu et al. 2024)
WARN_FRACTION = 0.05  # warn when at least this fraction of a model's |τ| exceeds the limit
HIST_SHIFT = 19  # float32 bits >> 19: sign (0), 8 exponent bits, 4 mantissa bits -> 4096 bins
HIST_BINS = 1 << (31 - HIST_SHIFT)
BLOCK_ELEMENTS = 1 << 20  # elements per row block and model
ALL = "all"


@dataclass(frozen=True)
class DeltaStats:
    """|τ| of one model over one group of tensors."""

    elements: int
    nonzero: int
    mean_abs: float
    rms: float
    max_abs: float
    p50: float  # quantiles of |τ|: upper edges of 6.25 %-wide bins (module docstring)
    p90: float
    p99: float
    frac_large: float  # fraction of elements with |τ| > threshold


@dataclass(frozen=True)
class PairStats:
    """Two models' task vectors over one group of tensors."""

    cosine: float  # ⟨τ_a, τ_b⟩ / (‖τ_a‖ ‖τ_b‖); 0 when either is all zeros
    sign_conflict: float  # fraction of the elements where both are non-zero that differ in sign
    both_nonzero: int


@dataclass(frozen=True)
class ShapeMismatch:
    tensor: str
    model: str
    base_shape: tuple[int, ...]
    model_shape: tuple[int, ...] | None  # None: the model lacks the tensor


@dataclass(frozen=True)
class InspectReport:
    """What `inspect_deltas` found. `deltas[m][g]`: model m (index into `models`) over group g;
    `pairs[(a, b)][g]` for a < b; groups in model order, then "all"."""

    base: str
    models: tuple[str, ...]
    threshold: float
    groups: tuple[str, ...]
    deltas: dict[int, dict[str, DeltaStats]]
    pairs: dict[tuple[int, int], dict[str, PairStats]]
    mismatches: tuple[ShapeMismatch, ...]
    warnings: tuple[str, ...]

    def to_json(self) -> dict:
        """The report as JSON-ready data (keys in docs/inspect.md)."""
        return {
            "base": self.base,
            "models": list(self.models),
            "threshold": self.threshold,
            "groups": list(self.groups),
            "deltas": [{"model": self.models[m], "groups": {g: asdict(s) for g, s in by_group.items()}}
                       for m, by_group in sorted(self.deltas.items())],
            "pairs": [{"models": [self.models[a], self.models[b]], "groups": {g: asdict(s) for g, s in by_group.items()}}
                      for (a, b), by_group in sorted(self.pairs.items())],
            "shape_mismatches": [{"tensor": x.tensor, "model": x.model, "base_shape": list(x.base_shape),
                                  "model_shape": None if x.model_shape is None else list(x.model_shape)} for x in self.mismatches],
            "warnings": list(self.warnings),
        }


def layer_group(name: str) -> str:
    """`layers.N` for tensors of numbered layers, else embed, norm, lm_head or other."""
    layer = layer_index(name)
    if layer is not None:
        return f"layers.{layer}"
    if "lm_head" in name:
        return "lm_head"
    if any(m in name for m in EMBEDDING_MARKERS):
        return "embed"
    return "norm" if "norm" in name else "other"


class _Model:
    """Running sums of one model over one group."""

    def __init__(self) -> None:
        self.n = self.nonzero = self.large = 0
        self.sum_abs = self.sum_sq = self.max = 0.0
        self.hist = np.zeros(HIST_BINS, np.int64)

    def add(self, a: np.ndarray, limit: np.float32) -> None:
        self.n += a.size
        self.nonzero += int(np.count_nonzero(a))
        self.large += int(np.count_nonzero(a > limit))
        a64 = a.astype(np.float64)
        self.sum_abs += float(a64.sum())
        self.sum_sq += float(np.dot(a64, a64))
        self.max = max(self.max, float(a.max(initial=0.0)))
        self.hist += np.bincount(a.view(np.int32) >> HIST_SHIFT, minlength=HIST_BINS)

    def __iadd__(self, other: _Model) -> _Model:  # every field adds up: the whole model is the sum of its groups
        self.n, self.nonzero, self.large = self.n + other.n, self.nonzero + other.nonzero, self.large + other.large
        self.sum_abs, self.sum_sq = self.sum_abs + other.sum_abs, self.sum_sq + other.sum_sq
        self.max = max(self.max, other.max)
        self.hist += other.hist
        return self

    def stats(self) -> DeltaStats:
        n = max(self.n, 1)
        return DeltaStats(self.n, self.nonzero, self.sum_abs / n, math.sqrt(self.sum_sq / n), self.max,
                          *(self.quantile(q) for q in (0.5, 0.9, 0.99)), self.large / n)

    def quantile(self, q: float) -> float:
        """The ceil(q·n)-th smallest |τ|, rounded up to its bin's upper edge (or the max); 0 if it is 0."""
        k = max(1, math.ceil(q * self.n))
        if self.n == 0 or k <= self.n - self.nonzero:
            return 0.0
        b = int(np.searchsorted(np.cumsum(self.hist), k))
        edge = float(np.uint32((b + 1) << HIST_SHIFT).view(np.float32)) if b + 1 < HIST_BINS else math.inf
        return min(edge, self.max)  # the true quantile is at most both


class _Pair:
    def __init__(self) -> None:
        self.dot = self.sq_a = self.sq_b = 0.0
        self.both = self.conflicts = 0

    def add(self, a: np.ndarray, b: np.ndarray, sq_a: float, sq_b: float, sa: np.ndarray, sb: np.ndarray) -> None:
        self.dot += float(np.dot(a, b))
        self.sq_a += sq_a
        self.sq_b += sq_b
        product = sa * sb
        self.both += int(np.count_nonzero(product))
        self.conflicts += int(np.count_nonzero(product < 0))

    def __iadd__(self, other: _Pair) -> _Pair:
        self.dot, self.sq_a, self.sq_b = self.dot + other.dot, self.sq_a + other.sq_a, self.sq_b + other.sq_b
        self.both, self.conflicts = self.both + other.both, self.conflicts + other.conflicts
        return self

    def stats(self) -> PairStats:
        norm = math.sqrt(self.sq_a * self.sq_b)
        return PairStats(self.dot / norm if norm > 0 else 0.0, self.conflicts / self.both if self.both else 0.0, self.both)


def inspect_deltas(
    base: str | os.PathLike,
    models: list[str | os.PathLike],
    *,
    threshold: float = DARE_LIMIT,
    warn_fraction: float = WARN_FRACTION,
    block_elements: int = BLOCK_ELEMENTS,
    progress: Callable[[int], None] | None = None,
) -> InspectReport:
    """Streams every model's task vector against `base` once and summarizes it.

    Args:
        base: the base checkpoint (folder or .safetensors file).
        models: fine-tuned checkpoints or LoRA adapter folders.
        threshold: the |τ| counted as large (DARE's 0.005).
        warn_fraction: warn about a model when at least this fraction of its |τ| is large.
        block_elements: elements per row block (memory: about 16 bytes each per model).
        progress: called with the number of base elements just processed.

    Example:
        >>> report = inspect_deltas("base/", ["ft1/", "lora/"])           # doctest: +SKIP
        >>> report.deltas[0]["all"].frac_large, report.pairs[(0, 1)]["all"].cosine  # doctest: +SKIP
    """
    if not models:
        raise StreammergeError("inspect needs at least one model besides the base")
    with ExitStack() as stack:
        reference = stack.enter_context(Checkpoint(base))
        sources = [stack.enter_context(open_model(m)) for m in models]
        for source in sources:
            if isinstance(source, LoraAdapter):
                source.attach(reference, base_name=str(base))
        _check_shapes(reference, sources, [str(m) for m in models])
        return _inspect(reference, sources, [str(m) for m in models], threshold, warn_fraction, block_elements, progress)


def _check_shapes(reference: Checkpoint, sources: list, names: list[str]) -> None:
    """A model whose tensors have other shapes than the base's (another size or architecture) has no
    task vector to inspect: MismatchError naming them, before any weight is read. Vocabulary tensors
    that differ in their rows only (added tokens) and missing tensors are left out of the numbers."""
    problems: list[str] = []
    details: list[str] = []
    for source, label in zip(sources, names):
        bad = []
        for name, info in reference.tensors.items():
            other = source.tensors.get(name)
            if info.dtype not in FLOAT_DTYPES or other is None or other.shape == info.shape:
                continue
            if is_vocab_tensor(name, info.shape) and len(other.shape) == 2 and other.shape[1:] == info.shape[1:]:
                continue
            bad.append((name, other.shape, info.shape))
        lines = [f"tensor {n!r}: shape {list(o)} in {label} but {list(r)} in the base {reference.path}" for n, o, r in bad]
        details += lines
        if len(bad) > MismatchError.SHOWN:
            examples = ", ".join(f"{n!r} {list(o)} vs {list(r)}" for n, o, r in bad[:MismatchError.SHOWN])
            problems.append(f"{label}: {len(bad)} of {len(reference.tensors)} tensors have other shapes than in the base "
                            f"{reference.path} (a model of another size or architecture?), e.g. {examples}")
        else:
            problems += lines
    if problems:
        raise MismatchError(problems, details=details)


def _inspect(reference, sources, names, threshold, warn_fraction, block_elements, progress) -> InspectReport:
    n = len(sources)
    limit = np.float32(threshold)
    per_model: list[dict[str, _Model]] = [{} for _ in range(n)]
    per_pair: dict[tuple[int, int], dict[str, _Pair]] = {(a, b): {} for a in range(n) for b in range(a + 1, n)}
    mismatches: list[ShapeMismatch] = []
    groups: list[str] = []
    tensors = sorted(reference.tensors.values(), key=lambda t: (t.file.name, t.offset))
    for info in tensors:
        if info.dtype not in FLOAT_DTYPES:
            continue
        usable = []
        for m, source in enumerate(sources):
            other = source.tensors.get(info.name)
            if other is None or other.shape != info.shape:
                mismatches.append(ShapeMismatch(info.name, names[m], info.shape, None if other is None else other.shape))
            else:
                usable.append(m)
        group = layer_group(info.name)
        if group not in groups:
            groups.append(group)
        row_elems = info.numel // max(info.rows, 1)
        step = max(1, block_elements // max(row_elems, 1))
        for r0 in range(0, info.rows, step):
            r1 = min(r0 + step, info.rows)
            theta0 = reference.view(info.name, r0, r1).float().reshape(-1).numpy()
            deltas: dict[int, np.ndarray] = {}
            for m in usable:
                source = sources[m]
                if isinstance(source, LoraAdapter) and source.gives_delta(info.name):
                    d = source.delta_rows(info.name, r0, r1).reshape(-1).numpy()
                else:
                    d = source.view(info.name, r0, r1).float().reshape(-1).numpy() - theta0
                deltas[m] = d
                per_model[m].setdefault(group, _Model()).add(np.abs(d), limit)
            wide = {m: d.astype(np.float64) for m, d in deltas.items()}
            squares = {m: float(np.dot(w, w)) for m, w in wide.items()} if per_pair else {}  # once per model, not per pair
            signs = {m: np.sign(d) for m, d in deltas.items()}
            for (a, b), by_group in per_pair.items():
                if a in deltas and b in deltas:
                    by_group.setdefault(group, _Pair()).add(wide[a], wide[b], squares[a], squares[b], signs[a], signs[b])
            if progress is not None:
                progress((r1 - r0) * row_elems)
    order = _group_order(groups)
    for acc in [*per_model, *per_pair.values()]:  # the whole model: the sum of its groups
        parts = [acc[g] for g in order if g in acc]
        if parts:
            acc[ALL] = type(parts[0])()
            for part in parts:
                acc[ALL] += part
    order += [ALL]
    deltas_out = {m: {g: acc[g].stats() for g in order if g in acc} for m, acc in enumerate(per_model)}
    pairs_out = {k: {g: acc[g].stats() for g in order if g in acc} for k, acc in per_pair.items()}
    warnings = []
    for m, by_group in deltas_out.items():
        overall = by_group.get(ALL)
        if overall is not None and overall.frac_large >= warn_fraction:
            warnings.append(f"{names[m]}: {overall.frac_large:.1%} of |delta| exceed {threshold:g}: DARE's drop-and-rescale "
                            "is likely to hurt (it breaks down on large deltas, as after continued pre-training); "
                            "prefer ties or task_arithmetic, or a density close to 1")
    if mismatches:
        warnings.append(f"{len(mismatches)} tensor(s) differ in shape from the base or are missing, e.g. "
                        f"{mismatches[0].tensor!r} in {mismatches[0].model}: left out of these numbers")
    return InspectReport(str(reference.path), tuple(names), threshold, tuple(order), deltas_out, pairs_out,
                         tuple(mismatches), tuple(warnings))


def _group_order(groups: list[str]) -> list[str]:
    layers = sorted((g for g in groups if g.startswith("layers.")), key=lambda g: int(g.split(".")[1]))
    rest = [g for g in ("embed", "norm", "lm_head", "other") if g in groups]
    return rest[:1] + layers + rest[1:] if "embed" in rest else layers + rest


# ---- output --------------------------------------------------------------------------------------


def format_report(report: InspectReport, *, groups: bool = True) -> str:
    """The report as readable tables (the CLI's default output)."""
    lines = [f"base {report.base}; |delta| quantiles are bin upper edges (<= 6.25% high); large = |delta| > {report.threshold:g}"]
    head = f"  {'group':<12} {'mean|d|':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9} {'large':>7} {'nonzero':>8}"
    for m, name in enumerate(report.models):
        lines += ["", f"model {m + 1}: {name}", head]
        for g, s in report.deltas[m].items():
            if groups or g == ALL:
                lines.append(f"  {g:<12} {s.mean_abs:9.2e} {s.p50:9.2e} {s.p90:9.2e} {s.p99:9.2e} {s.max_abs:9.2e} "
                             f"{s.frac_large:7.2%} {s.nonzero / max(s.elements, 1):8.2%}")
    for (a, b), by_group in report.pairs.items():
        lines += ["", f"models {a + 1} and {b + 1}: cosine similarity, sign conflicts (where both are non-zero)",
                  f"  {'group':<12} {'cosine':>8} {'conflict':>9} {'both!=0':>12}"]
        for g, s in by_group.items():
            if groups or g == ALL:
                lines.append(f"  {g:<12} {s.cosine:8.4f} {s.sign_conflict:9.2%} {s.both_nonzero:12d}")
    if report.mismatches:
        lines += ["", "tensors left out (shape differs from the base, or missing):"]
        lines += [f"  {x.tensor} in {x.model}: {list(x.model_shape) if x.model_shape else 'missing'} vs base {list(x.base_shape)}"
                  for x in report.mismatches]
    return "\n".join(lines)


def plot_report(report: InspectReport, path: str | os.PathLike) -> Path:
    """One PNG: per layer group, |delta| (mean, p99), the large fraction, and each pair's cosine and sign conflicts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'streammerge[plot]'") from None
    groups = [g for g in report.groups if g != ALL]
    x = np.arange(len(groups))
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 0.3 * len(groups) + 4), 8), sharex=True)
    (mag, large), (cos, conflict) = axes

    def values(by_group, field):
        return [getattr(by_group[g], field) if g in by_group else np.nan for g in groups]

    for m, name in enumerate(report.models):
        label = f"{m + 1}: {Path(name).name or name}"
        line, = mag.plot(x, values(report.deltas[m], "mean_abs"), marker=".", label=f"{label} mean")
        mag.plot(x, values(report.deltas[m], "p99"), linestyle="--", color=line.get_color(), label=f"{label} p99")
        large.plot(x, values(report.deltas[m], "frac_large"), marker=".", label=label)
    for (a, b), by_group in report.pairs.items():
        cos.plot(x, values(by_group, "cosine"), marker=".", label=f"{a + 1}-{b + 1}")
        conflict.plot(x, values(by_group, "sign_conflict"), marker=".", label=f"{a + 1}-{b + 1}")
    mag.set_yscale("log")
    mag.axhline(report.threshold, color="gray", linewidth=0.8)
    mag.set_title("|delta| per layer (mean, p99)")
    large.set_title(f"fraction |delta| > {report.threshold:g} (DARE fails when high)")
    cos.set_title("cosine similarity of task vectors")
    conflict.set_title("sign conflicts where both are non-zero")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xticks(x)
        ax.set_xticklabels(groups, rotation=90, fontsize=7)
    if not report.pairs:
        for ax in axes[1]:
            ax.text(0.5, 0.5, "one model: no pairs", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

