"""The task-vector family: each τ_t = θ_t − θ₀ sparsified, then combined (mergekit's generalized
task arithmetic). A method is a (sparsifier, combiner) pair; `ops.py` holds their formulas, the
engine their stats passes (exact radix trims, the tie positions, mergekit's L1 factors), and
`kernels.py` (numpy) / `ckernel.py` (C) their fast CPU paths.

The fast paths are opt-in: a method runs on a path only when both its sparsifier and its combiner
declare it (`paths`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from streammerge.methods.base import Method, Param
from streammerge.methods.registry import register

ALL_PATHS = frozenset({"torch", "numpy", "compiled", "gpu"})


@dataclass(frozen=True)
class Part:
    """A sparsifier or a combiner: its formula, the stats passes it needs, where it runs."""

    name: str
    formula: str
    stats: str = "none"
    paths: frozenset[str] = ALL_PATHS


SPARSIFIERS = {s.name: s for s in (
    Part("none", "τ"),
    Part("trim", "top_k(τ): the k = int(d·density) largest |τ|, ties lowest index first", "exact radix trim"),
    Part("dare", "τ ⊙ m / density, m a counter-based keep mask (p = density)", "none (exact radix trim with trim_density)"),
    Part("band", "top_k(o'+t) minus top_k(o'): drops the gamma share of outliers and the small ones", "outlier band (two radix trims)"),
    Part("magprune", "τ ⊙ m / p, p by |τ| rank within each row in density ± epsilon", "none (ranks within rows)"),
)}
COMBINERS = {c.name: c for c in (
    Part("sum", "θ₀ + λ Σ w_t τ̂_t (÷ Σ w_t with normalize)"),
    Part("ties", "θ₀ + λ disjoint_merge(elect(τ̂)): the sign elected per element, then the agreeing τ̂ merged",
         "majority sign (fusionbench)"),
    Part("average", "Σ w_t θ_t / Σ w_t"),
    Part("copy", "θ (times scale)"),
)}

# ---- parameters, as configs write them ----------------------------------------------------------------

WEIGHT = Param("weight", 1.0, doc="w_t, the model's weight")
DENSITY = Param("density", 1.0, low=0, high=1, low_open=True, doc="the share of τ kept (DARE keep rate, TIES trim density)")
LAMBDA = Param("lambda", 1.0, per_model=False, doc="λ, the scale of the merged task vector")
TRIM_DENSITY = Param("trim_density", 1.0, low=0, high=1, low_open=True, doc="a TIES trim after DARE's drop (FusionBench's DARE-TIES)",
                     error="density must be in {range}, got {value}")
GAMMA = Param("gamma", 0.01, low=0, high=1, doc="the share of largest |τ| dropped as outliers",
              error="gamma (the share of largest |delta| dropped) must be in {range}, got {value}")
EPSILON = Param("epsilon", 0.15, low=0, high=0.5, high_open=True, doc="the spread of keep probabilities, density ± epsilon",
                error="epsilon must be in {range} (keep probabilities density ± epsilon), got {value}")
SCALE = Param("scale", 1.0, doc="a factor applied to the copied tensor")
T = Param("t", None, low=0, high=1, per_model=False, doc="the interpolation factor (0 gives the base, 1 the other model)",
          error="t must be in {range} (0 gives the base, 1 the other model), got {value}")

# whole-merge options (top-level parameters only); None: the preset's rule (config.merge_options)
NORMALIZE = Param("normalize", None, kind=bool, per_model=False, per_tensor=False, doc="divide by Σ w_t (ties: mean rather than sum)")
RESCALE = Param("rescale", None, kind=bool, per_model=False, per_tensor=False, doc="DARE's and DELLA's rescale of kept elements")
MERGE_FUNC = Param("merge_func", "mean", kind=str, per_model=False, per_tensor=False, choices=("mean", "sum", "max"),
                   presets={"fusionbench": "sum"}, doc="the disjoint merge over agreeing models")
SIGN_METHOD = Param("sign_method", "sum", kind=str, per_model=False, per_tensor=False, choices=("sum", "count"), doc="how the sign is elected")
DARE_SCOPE = Param("dare_scope", "linear", kind=str, per_model=False, per_tensor=False, choices=("all", "linear"),
                   presets={"mergekit": "all", "peft": "all", "fusionbench": "all"}, doc="which tensors DARE drops in")
TRIM_SCOPE = Param("trim_scope", "tensor", kind=str, per_model=False, per_tensor=False, choices=("tensor", "global"),
                   presets={"fusionbench": "global"}, doc="one trim threshold per tensor, or per model over every tensor")
INT8_MASK = Param("int8_mask", None, kind=bool, per_model=False, per_tensor=False, doc="accepted for mergekit configs; no effect")


class TaskVectorMethod(Method):
    """A (sparsifier, combiner) pair; its arithmetic lives in ops/kernels/engine, keyed by the parts' names."""

    sparsify: ClassVar[str] = "none"
    combine: ClassVar[str] = "sum"
    semantics = ("default", "mergekit", "peft", "fusionbench")
    # mergekit's registered defaults under `semantics: mergekit` (its merge_methods/registry.py)
    mergekit_normalize: ClassVar[bool] = False
    mergekit_rescale: ClassVar[bool] = False

    @property
    def paths(self) -> frozenset[str]:  # type: ignore[override]
        return SPARSIFIERS[self.sparsify].paths & COMBINERS[self.combine].paths

    @property
    def stats_kind(self) -> str:  # type: ignore[override]
        parts = [SPARSIFIERS[self.sparsify].stats, COMBINERS[self.combine].stats]
        return "; ".join(p for p in parts if p != "none") or "none"

    @property
    def summary(self) -> str:  # type: ignore[override]
        s = SPARSIFIERS[self.sparsify]
        return COMBINERS[self.combine].formula + ("" if s.name == "none" else f", τ̂ = {s.formula}")


TV_OPTIONS = (NORMALIZE, RESCALE, SIGN_METHOD, DARE_SCOPE, TRIM_SCOPE, INT8_MASK)
TIES_OPTIONS = (*TV_OPTIONS, MERGE_FUNC)
# breadcrumbs and DELLA sparsify each tensor on its own: no global trim domain
LOCAL_OPTIONS = (NORMALIZE, RESCALE, SIGN_METHOD, DARE_SCOPE, INT8_MASK)
LOCAL_TIES_OPTIONS = (*LOCAL_OPTIONS, MERGE_FUNC)


@register
class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    reference = "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"
    params = (WEIGHT, DENSITY, LAMBDA, *TV_OPTIONS)


@register
class MagnitudePrune(TaskVectorMethod):
    name = "magnitude_prune"
    reference = "magnitude pruning of each task vector (mergekit's magnitude sparsification)"
    sparsify = "trim"
    params = (WEIGHT, DENSITY, LAMBDA, *TV_OPTIONS)


@register
class Ties(TaskVectorMethod):
    name = "ties"
    reference = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708"
    sparsify, combine = "trim", "ties"
    mergekit_normalize = True
    params = (WEIGHT, DENSITY, LAMBDA, *TIES_OPTIONS)


@register
class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    reference = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
    sparsify = "dare"
    mergekit_rescale = True
    params = (WEIGHT, DENSITY, LAMBDA, *TV_OPTIONS)


@register
class DareTies(TaskVectorMethod):
    name = "dare_ties"
    reference = "Yu et al. 2024 (DARE) with TIES' sign election, arXiv:2311.03099"
    sparsify, combine = "dare", "ties"
    mergekit_rescale = True
    params = (WEIGHT, DENSITY, LAMBDA, TRIM_DENSITY, *TIES_OPTIONS)


@register
class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    reference = "Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795"
    sparsify = "band"
    semantics = ("default", "mergekit")
    params = (WEIGHT, DENSITY, LAMBDA, GAMMA, *LOCAL_OPTIONS)


@register
class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    combine = "ties"
    params = (WEIGHT, DENSITY, LAMBDA, GAMMA, *LOCAL_TIES_OPTIONS)


@register
class Della(TaskVectorMethod):
    name = "della"
    reference = "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617"
    sparsify, combine = "magprune", "ties"
    semantics = ("default", "mergekit")
    mergekit_normalize = mergekit_rescale = True
    params = (WEIGHT, DENSITY, LAMBDA, EPSILON, *LOCAL_TIES_OPTIONS)


@register
class DellaLinear(Della):
    name = "della_linear"
    combine = "sum"
    mergekit_normalize = False
    params = (WEIGHT, DENSITY, LAMBDA, EPSILON, *LOCAL_OPTIONS)


@register
class Linear(TaskVectorMethod):
    name = "linear"
    reference = "Wortsman et al. 2022, Model soups, arXiv:2203.05482"
    combine = "average"
    base = "optional"
    mergekit_normalize = True
    mergekit_appends_base = True
    params = (WEIGHT, NORMALIZE, INT8_MASK)


@register
class Passthrough(TaskVectorMethod):
    name = "passthrough"
    reference = "mergekit's layer stacking (slices of one model each)"
    combine = "copy"
    base = "optional"
    copies = True
    semantics = ("default", "mergekit")
    params = (SCALE,)
