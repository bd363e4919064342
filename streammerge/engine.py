"""Runs a plan: reads row blocks, merges them with `ops`, streams the results into shards.

Each tensor is processed in row blocks sized to the memory budget. A method that needs whole-tensor
quantities first makes stats passes over the blocks (TIES' top-k threshold by radix selection,
mergekit's L1 rescale), then one output pass; a tensor that fits in one block is read once and kept
between passes. FusionBench's global trim domain adds passes over all tensors before any output.
Nothing depends on the block size: the DARE mask is counter-based and the tie rule is by flat index.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import ops
from .mask import keep_mask, mask_key
from .plan import Plan, TensorPlan, rows_per_block
from .sources import DTYPES, Checkpoint, itemsize
from .writer import ShardWriter

Progress = Callable[[int], None]  # called with the number of input bytes just processed


@dataclass
class _TrimState:
    """One fine-tune's trim threshold and how many ties at it have been seen so far (flat order)."""

    threshold: ops.TrimThreshold | None
    ties_seen: int = 0


class TensorMerge:
    """The passes over one tensor's row blocks."""

    def __init__(self, tp: TensorPlan, plan: Plan, reference: Checkpoint, finetuned: list[Checkpoint]):
        self.tp, self.opts = tp, plan.options
        self.reference, self.finetuned = reference, finetuned
        in_dtypes = [DTYPES[c.tensors[tp.name].dtype] for c in [reference, *finetuned]]
        promoted = functools.reduce(torch.promote_types, in_dtypes)
        compute = self.opts.compute_dtype or promoted
        # float32 by default; float64 inputs stay float64 (no silent loss)
        self.compute = torch.promote_types(compute, promoted) if compute == torch.float32 else compute
        self.out_dtype = DTYPES[tp.out_dtype]
        self.row_elems = math.prod(tp.shape[1:]) if tp.shape else 1
        in_size = max(itemsize(c.tensors[tp.name].dtype) for c in [reference, *finetuned])
        step = rows_per_block(tp.shape, len(finetuned), in_size, itemsize(tp.out_dtype), plan.max_memory)
        if self.opts.whole_tensors:
            step = tp.rows
        self.blocks = [(r, min(r + step, tp.rows)) for r in range(0, tp.rows, step)]
        self.read_bytes_per_row = sum(c.tensors[tp.name].row_bytes for c in {id(c): c for c in [reference, *finetuned]}.values())
        self.keys = [mask_key(plan.config.seed, i, tp.name) for i in range(len(finetuned))] if tp.dare else []
        self.dare_scales = [1.0] * len(finetuned)
        if tp.dare and self.opts.rescale == "inverse":
            self.dare_scales = [1.0 / d for d in tp.densities]
        self._cache: tuple[int, torch.Tensor, torch.Tensor, bool] | None = None

    # ---- reading ------------------------------------------------------------------------

    def _read(self, ckpt: Checkpoint, r0: int, r1: int) -> torch.Tensor:
        return ckpt.read(self.tp.name, r0, r1)

    def deltas(self, r0: int, r1: int, *, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ₀, τ) of rows [r0, r1) in the compute dtype, DARE's drop applied; its rescale if `scaled`."""
        if self._cache is not None and self._cache[0] == r0:
            _, base, deltas, is_scaled = self._cache
            if is_scaled == scaled:
                return base, deltas
            if scaled:  # the L1 pass saw them unscaled; scale in place once
                self._apply_scales(deltas)
                self._cache = (r0, base, deltas, True)
                return base, deltas
        base = self._read(self.reference, r0, r1).to(self.compute)
        deltas = ops.task_vectors(base, [self._read(c, r0, r1) for c in self.finetuned])
        if self.tp.dare:
            start, count = r0 * self.row_elems, (r1 - r0) * self.row_elems
            for i, key in enumerate(self.keys):
                keep = keep_mask(key, start, count, self.tp.densities[i], device=deltas.device)
                deltas[i].mul_(keep.view(deltas[i].shape))
            if scaled:
                self._apply_scales(deltas)
        if len(self.blocks) == 1:
            self._cache = (r0, base, deltas, scaled or not self.tp.dare)
        return base, deltas

    def release(self) -> None:
        """Drops the cached block (between passes that visit many tensors)."""
        self._cache = None

    def _apply_scales(self, deltas: torch.Tensor) -> None:
        for i, scale in enumerate(self.dare_scales):
            if scale != 1.0:
                deltas[i].mul_(scale)

    # ---- stats passes -------------------------------------------------------------------

    def l1_pass(self) -> None:
        """mergekit's DARE rescale ‖τ‖₁ / ‖τ ⊙ m‖₁ per model (whole tensors, as mergekit)."""
        (r0, r1), = self.blocks
        base = self._read(self.reference, r0, r1).to(self.compute)
        full = ops.task_vectors(base, [self._read(c, r0, r1) for c in self.finetuned])
        _, kept = self.deltas(r0, r1, scaled=False)
        self.dare_scales = [ops.l1_rescale(full[i], kept[i]) if self.tp.dare else 1.0 for i in range(len(full))]

    def trim_ranks(self) -> list[int | None]:
        densities = self.tp.densities if self.opts.sparsify == "trim" else self.tp.trim_densities
        return [ops.trim_rank(self.tp.numel, d, self.opts.trim_rule) for d in densities]

    def radix_pass(self, selectors: list[ops.RadixSelect | None]) -> None:
        """Feeds every block's |τ̂| to the selectors (one pass of the two)."""
        for r0, r1 in self.blocks:
            _, deltas = self.deltas(r0, r1)
            for i, sel in enumerate(selectors):
                if sel is not None:
                    sel.add(deltas[i].abs())

    def sign_sum(self, trims: list[_TrimState] | None) -> float:
        """Σ of the raw elected signs (FusionBench's majority), with the trim applied."""
        total = 0.0
        for r0, r1 in self.blocks:
            _, deltas = self.deltas(r0, r1)
            if trims is not None:
                _trim(deltas, trims)
            w = torch.tensor(self.tp.weights, dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
            score = ops.sign_score(deltas * w if self.opts.weighted_sign else deltas, self.opts)
            total += float(score.sign().sum(dtype=torch.float64))
        return total

    # ---- output pass --------------------------------------------------------------------

    def output(self, trims: list[_TrimState] | None, majority: float, progress: Progress | None) -> Iterator[torch.Tensor]:
        """Yields the merged rows block by block, in the output dtype."""
        tp = self.tp
        for r0, r1 in self.blocks:
            if not tp.merged:
                out = self._read(self.reference, r0, r1).to(self.out_dtype)
            elif self.opts.combine == "average":
                models = [self._read(c, r0, r1) for c in self.finetuned]
                out = ops.linear_block(models, tp.weights, self.opts, self.compute).to(self.out_dtype)
            else:
                base, deltas = self.deltas(r0, r1)
                if self.opts.trim_rule == "argsort" and self.opts.sparsify == "trim":
                    for i, density in enumerate(tp.densities):
                        if density < 1:
                            deltas[i].mul_(ops.argsort_keep(deltas[i], density))
                elif trims is not None:
                    _trim(deltas, trims)
                out = ops.merge_block(base, deltas, tp.weights, tp.lam, self.opts, majority).to(self.out_dtype)
            self.release()
            if progress is not None:
                progress((r1 - r0) * (self.read_bytes_per_row if tp.merged else self.reference.tensors[tp.name].row_bytes))
            yield out


def _trim(deltas: torch.Tensor, trims: list[_TrimState]) -> None:
    for i, state in enumerate(trims):
        if state.threshold is not None:
            keep, ties = ops.trim_keep(deltas[i].abs(), state.threshold, state.ties_seen)
            state.ties_seen += ties
            deltas[i].mul_(keep)


def _uses_trim(tm: TensorMerge) -> bool:
    """Whether the tensor needs radix-selected trim thresholds."""
    opts = tm.opts
    if not tm.tp.merged or opts.combine == "average" or opts.trim_rule == "argsort":
        return False
    return opts.sparsify == "trim" or (opts.sparsify == "dare" and any(d < 1 for d in tm.tp.trim_densities))


def _select(tms: list[TensorMerge], ranks: list[int | None]) -> list[tuple[float, int, int] | None]:
    """Two radix passes over the given tensors, for each model whose rank needs a selection."""
    selectors = [ops.RadixSelect(k) if k else None for k in ranks]
    for tm in tms:
        tm.radix_pass(selectors)
        if len(tms) > 1:  # a global pass must not keep every tensor's deltas
            tm.release()
    for sel in selectors:
        if sel is not None:
            sel.end_pass()
    for tm in tms:
        tm.radix_pass(selectors)
        if len(tms) > 1:
            tm.release()
    return [sel.result() if sel is not None else None for sel in selectors]


def _trim_states(ranks: list[int | None], selected: list, rule: str) -> list[_TrimState]:
    return [_TrimState(None if k is None else ops.trim_threshold(k, rule, s)) for k, s in zip(ranks, selected)]


def run_plan(
    plan: Plan,
    reference: Checkpoint,
    finetuned: list[Checkpoint],
    out_dir,
    *,
    progress: Progress | None = None,
) -> list[dict]:
    """Writes every shard of the plan into `out_dir`; returns [{file, sha256, bytes}] per shard."""
    opts = plan.options
    by_name = {t.name: t for t in plan.tensors}
    merges = {t.name: TensorMerge(t, plan, reference, finetuned) for t in plan.tensors}

    # FusionBench's global trim domain: one threshold per model over every merged tensor, found in
    # two radix passes over the whole model before any output; ties are then kept in plan order.
    global_trims: list[_TrimState] | None = None
    trimmed = [tm for tm in merges.values() if _uses_trim(tm)]
    if opts.trim_scope == "global" and trimmed:
        numel = sum(tm.tp.numel for tm in trimmed)
        densities = trimmed[0].tp.densities if opts.sparsify == "trim" else trimmed[0].tp.trim_densities
        ranks = [ops.trim_rank(numel, d, opts.trim_rule) for d in densities]
        global_trims = _trim_states(ranks, _select(trimmed, ranks), opts.trim_rule)

    majority = 1.0
    if opts.zero_sign == "majority" and opts.combine == "ties":
        total = 0.0
        for tm in (tm for tm in merges.values() if tm.tp.merged):
            if global_trims is None and _uses_trim(tm):
                ranks = tm.trim_ranks()
                total += tm.sign_sum(_trim_states(ranks, _select([tm], ranks), opts.trim_rule))
            else:
                total += tm.sign_sum(global_trims)
            tm.release()
        majority = float(math.copysign(1.0, total)) if total != 0 else 0.0
        if global_trims is not None:
            for state in global_trims:
                state.ties_seen = 0

    results = []
    for shard in plan.shards:
        entries = [(n, by_name[n].out_dtype, by_name[n].shape, by_name[n].nbytes) for n in shard.tensors]
        writer = ShardWriter(out_dir / shard.filename, entries, {"format": "pt"})
        try:
            for name in shard.tensors:
                tm = merges.pop(name)
                trims = global_trims
                if trims is None and _uses_trim(tm):
                    if tm.opts.sparsify == "dare" and tm.opts.rescale == "l1":
                        tm.l1_pass()
                    ranks = tm.trim_ranks()
                    trims = _trim_states(ranks, _select([tm], ranks), opts.trim_rule)
                elif tm.tp.dare and opts.rescale == "l1":
                    tm.l1_pass()
                for block in tm.output(trims if _uses_trim(tm) else None, majority, progress):
                    writer.write(block)
        except BaseException:
            writer.abort()
            raise
        results.append({"file": shard.filename, "sha256": writer.finish(), "bytes": writer.file_size})
    return results
