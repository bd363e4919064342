"""The per-tensor work: how a tensor is read in row blocks (TensorJob), the backends that merge a
block (numpy chunks, torch, a method's own hooks), and the stats passes that find whole-tensor
quantities before the output pass (exact radix trims and their tie positions, mergekit's L1 factors,
FusionBench's model-wide trim and majority sign, a method's declared passes).

Every quantity a pass finds goes into the tensor's TensorSpec, which the output pass reads: no state
is left on a backend. Nothing depends on the block size: the DARE mask is counter-based and ties go
by flat index.
"""

from __future__ import annotations

import functools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from streammerge.io import lora, quant
from streammerge.io.sources import DTYPES, Checkpoint, ComputedCheckpoint
from streammerge.io.vocab import RowGather
from streammerge.methods import Method, Rows, kernels, ops, registry
from streammerge.methods.base import COMPILED_SLICE
from streammerge.methods.mask import keep_mask, keep_mask_varying, mask_key
from streammerge.methods.task_vectors import TaskVectorMethod
from streammerge.pipeline.device import Staging, record_event
from streammerge.pipeline.plan import (
    Plan,
    TensorPlan,
    device_rows,
    fp8_rows,
    job_rows,
    tensor_ctx,
    uses_chunk_kernel,
    whole_tensor,
)

log = logging.getLogger(__name__)

BRACKET_MIN = 1 << 18  # elements: a smaller block's every |τ| is selected with numpy, cheaper than the bracket's sample

@dataclass
class Block:
    """Rows [r0, r1) of one tensor from every input, as stored (no conversion yet)."""

    r0: int
    r1: int
    start: int  # flat index of the first element
    base: torch.Tensor | None
    fts: list[torch.Tensor]
    nbytes: int

# ---- backends: the same four operations on a block, with numpy chunks or with torch ------------


class NumpyBackend:
    """float32 arithmetic on the CPU: the compiled C kernel (ckernel.py) where it applies, else numpy
    per cache-sized chunk (kernels.py); the same bytes either way."""

    def __init__(self, pool: ThreadPoolExecutor | None, compiled=None):
        self.pool = pool
        self.compiled = compiled  # the streammerge.methods.ckernel module when it is built and wanted (engine), else None

    def _inputs(self, block: Block, spec: ops.TensorSpec, out: np.ndarray | None = None) -> tuple:
        """The block's inputs as the kernel reads them (to merge into `out`, or for a stats pass), and
        whether the compiled kernel takes them: FP8 rows stay as stored for it (dequantized as it
        reads), and are dequantized otherwise."""
        compiled = self._compiled_inputs(block, spec, out)
        if compiled is not None:
            return *compiled, True
        base = kernels.as_numpy(dequantized(block.base)) if block.base is not None else None
        return base, [kernels.as_numpy(dequantized(t)) for t in block.fts], False

    def _compiled_inputs(self, block: Block, spec: ops.TensorSpec, out: np.ndarray | None) -> tuple | None:
        """(base, fts) as the compiled kernel reads them (FP8 rows as stored), or None where it does not apply."""
        if self.compiled is None:
            return None
        base, fts = self._compiled_source(block.base), [self._compiled_source(t) for t in block.fts]
        return (base, fts) if self.compiled.supports(spec, base, fts, out) else None

    def _compiled_source(self, t):
        if t is None:
            return None
        return self.compiled.fp8_source(t) if isinstance(t, quant.QuantRows) else kernels.as_numpy(t)

    def hist(self, block: Block, spec: ops.TensorSpec, high: list[int | None], wanted: list[bool]) -> list:
        base, fts, compiled = self._inputs(block, spec)
        if compiled:
            return self.compiled.radix_hist(spec, base, fts, block.start, high, wanted, self.pool)
        return kernels.radix_hist(spec, base, fts, block.start, high, wanted, self.pool)

    def select(self, block: Block, spec: ops.TensorSpec, ranks: list[int | None], rule: str) -> list[ops.TrimThreshold | None] | None:
        """select_rank_thresholds for one whole-tensor block with the compiled kernel, rank q of model
        q mod n (n fine-tunes; breadcrumbs asks two ranks of each): a small block's every |τ| selected
        by numpy; a larger one by ops.BracketSelect, usually one pass that only compares most
        elements, its partly kept ties found in one sub-block when they sit at a hot value. None
        (nothing decided) where the compiled kernel does not apply or a bracket missed."""
        base, fts, compiled = self._inputs(block, spec)
        if not compiled:
            return None
        kernel, size, n = self.compiled, self.compiled.numel(base), len(fts)
        wanted = [any(ranks[q] for q in range(i, len(ranks), n)) for i in range(n)]
        if size < BRACKET_MIN:
            bits = kernel.tau_bits(spec, base, fts, block.start, wanted, sample=False)
            return [_trim_threshold(*(found := _sorted_select(bits[q % n], k)), k, rule,
                                    lambda keep, b=bits[q % n], v=found[0]: block.start + int(np.flatnonzero(b == _bits(v))[keep - 1]))
                    for q, k in enumerate(ranks)]
        sample = kernel.tau_bits(spec, base, fts, block.start, wanted)
        selects = [ops.BracketSelect(k, size, sample[q % n]) if k else None for q, k in enumerate(ranks)]
        while any(pending := [s if s is not None and s.found is None and not s.missed else None for s in selects]):
            above, hists, hot, values = kernel.bracket_pass(spec, base, fts, block.start, pending, self.pool)
            for q, s in enumerate(pending):
                if s is not None:
                    s.add(int(above[q]), hists[q], hot[q], values[q])
        if any(s is not None and s.missed for s in selects):
            return None

        def locate(q: int, value: float, keep: int) -> int:
            lo, hi, needed, s = 0, size, keep, selects[q]
            if _bits(value) in s.hot:  # the tie's sub-block from the counts, then only it scanned
                before = np.cumsum(s.hot_subs[s.hot.index(_bits(value))])
                g = int(np.searchsorted(before, keep))
                lo, hi, needed = g * ops.SUB, min(size, (g + 1) * ops.SUB), keep - (int(before[g - 1]) if g else 0)
            pos, _ = kernel.find_tie(spec, base, fts, block.start, q % n, value, needed, lo, hi)
            if pos is None:  # the counts said it is there
                raise RuntimeError(f"internal error: tie {keep} at |τ| = {value} not found in elements [{lo}, {hi}); please report it")
            return pos

        def threshold(q: int) -> ops.TrimThreshold | None:
            found = selects[q].found if ranks[q] else (None, 0, 0)
            return _trim_threshold(*found, ranks[q], rule, lambda keep: locate(q, found[0], keep))

        if self.pool is None:
            return [threshold(q) for q in range(len(ranks))]
        return [f.result() for f in [self.pool.submit(threshold, q) for q in range(len(ranks))]]

    def find_tie(self, block: Block, spec: ops.TensorSpec, i: int, value: float, needed: int) -> tuple[int | None, int]:
        base, fts, compiled = self._inputs(block, spec)
        if compiled:
            return self.compiled.find_tie(spec, base, fts, block.start, i, value, needed)
        return kernels.find_tie(spec, base, fts, block.start, i, value, needed)

    def sign_total(self, block: Block, spec: ops.TensorSpec) -> float:
        base = kernels.as_numpy(dequantized(block.base))
        return kernels.sign_total(spec, base, [kernels.as_numpy(dequantized(t)) for t in block.fts], block.start)

    def merge_quantized(self, block: Block, spec: ops.TensorSpec, dtype: torch.dtype, cols: int, dst: np.ndarray,
                        scales: np.ndarray) -> bool:
        """FP8 output: the block merged into `dtype` and quantized in one pass by the compiled
        kernel, FP8 bytes into `dst`, scales into `scales`; False (nothing done) where it does not apply."""
        kind = np.uint16 if dtype == torch.bfloat16 else np.float32
        inputs = self._compiled_inputs(block, spec, np.empty(0, kind))
        if inputs is None:
            return False
        self.compiled.merge_quantize(spec, *inputs, kind, cols, dst, scales, block.start, self.pool)
        return True

    def merge(self, block: Block, spec: ops.TensorSpec, out: torch.Tensor) -> None:
        """Writes the merged block into `out`, done on return."""
        flat = kernels.as_numpy(out)
        base, fts, compiled = self._inputs(block, spec, flat)
        if compiled:
            self.compiled.merge(spec, base, fts, flat, block.start, self.pool)
            return
        kernels.merge_block(spec, base if base is not None else fts[0], fts, flat, block.start, self.pool)


def _mapped(source) -> bool:
    """Whether a source's rows are views of a mapped file (not computed, nor a LoRA adapter's)."""
    return isinstance(source, Checkpoint) and not isinstance(source, ComputedCheckpoint)


def dequantized(t):
    """An input's rows as a tensor: FP8 rows read as stored (quant.QuantRows) dequantized to float32."""
    return t.dequantize() if isinstance(t, quant.QuantRows) else t


class TorchBackend:
    """`ops` on whole blocks with torch: mergekit's reduced-precision arithmetic, and GPUs.

    On a GPU, the inputs go through `Staging`, and the result, converted to the output dtype there,
    comes back with an asynchronous copy into the (pinned) output buffer: `merge` returns the event
    that the writer waits for. Nothing in between waits for the GPU, so reading the next block from
    disk overlaps the GPU's work on this one.
    """

    def __init__(self, compute: torch.dtype, device: torch.device = torch.device("cpu")):
        self.compute = compute
        self.device = device
        self.staging = Staging(device) if device.type != "cpu" else None
        self.sparsified: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None  # see l1_scales

    def _on_device(self, block: Block) -> Block:
        if self.staging is None:
            return block
        moved = self.staging.send(([block.base] if block.base is not None else []) + block.fts)
        base = moved.pop(0) if block.base is not None else None
        return replace(block, base=base, fts=moved)

    def deltas(self, block: Block, spec: ops.TensorSpec, *, staged: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """θ₀ and τ (sparsified: DARE, trim, breadcrumbs, DELLA) in the compute dtype, on the device."""
        if not staged:
            block = self._on_device(block)
        base = block.base.to(self.compute)
        deltas = ops.task_vectors(base, block.fts, spec.given)
        n = deltas[0].numel()
        opts = spec.opts
        for i, d in enumerate(deltas):
            density, scale = (spec.densities[i] if spec.densities else 1.0), spec.dare_scales[i]
            if spec.dare:
                keep = keep_mask(spec.keys[i], block.start, n, density, device=deltas.device)
                ops.dare(d, keep.view(d.shape), scale, density if opts.divide_by_density and scale != 1.0 else None)
            elif opts.sparsify == "magprune" and density < 1:
                p = ops.della_probabilities(d, density, spec.epsilons[i], mergekit=opts.trim_rule == "argsort")
                keep = keep_mask_varying(spec.keys[i], block.start, ops.keep_thresholds(p))
                ops.della(d, keep.view(d.shape), p if opts.rescale == "inverse" else None, scale)
            elif opts.trim_rule == "argsort" and opts.sparsify in ("trim", "band") and density < 1:
                # mergekit's sorts: one whole tensor (see MergeOptions.whole_tensors)
                keep = ops.argsort_keep(d, density) if opts.sparsify == "trim" else ops.outliers_keep(d, density, spec.gammas[i])
                ops.dare(d, keep, scale)  # the mask, then the L1 factor when rescaling
            outliers = spec.outliers[i] if spec.outliers else None
            if spec.trims[i] is not None or outliers is not None:
                d.mul_(ops.band_keep(d.abs(), spec.trims[i], outliers, block.start))
                if opts.sparsify == "band" and scale != 1.0:
                    d.mul_(scale)
        return base, deltas

    def hist(self, block: Block, spec: ops.TensorSpec, high: list[int | None], wanted: list[bool]) -> list:
        _, deltas = self.deltas(block, spec)
        return [
            None if not w else ops.radix_hist_high(d.abs()) if h is None else ops.radix_hist_low(d.abs(), h)
            for d, h, w in zip(deltas, high, wanted)
        ]

    def find_tie(self, block: Block, spec: ops.TensorSpec, i: int, value: float, needed: int) -> tuple[int | None, int]:
        _, deltas = self.deltas(block, spec)
        hits = torch.nonzero(deltas[i].abs().reshape(-1) == value).reshape(-1)
        if len(hits) >= needed:
            return block.start + int(hits[needed - 1]), needed
        return None, len(hits)

    def sign_total(self, block: Block, spec: ops.TensorSpec) -> float:
        _, deltas = self.deltas(block, spec)
        w = ops.column(spec.weights, deltas)
        score = ops.sign_score(deltas * w if spec.opts.weighted_sign else deltas, spec.opts)
        return float(score.sign().sum(dtype=torch.float64))

    def l1_scales(self, block: Block, spec: ops.TensorSpec) -> tuple[float, ...]:
        """mergekit's DARE rescale per model, from the whole tensor (a single block).

        The sparsified deltas stay for `merge` of the same block, which then only applies the factors
        instead of sorting and masking the tensor a second time.
        """
        moved = self._on_device(block)  # staged once: a second staging could overwrite buffers still in flight
        base, kept = self.deltas(moved, replace(spec, dare_scales=(1.0,) * len(block.fts)), staged=True)
        full = ops.task_vectors(base, moved.fts, spec.given)
        work = full.dtype if spec.opts.sparsify in ("trim", "band") else None  # mergekit's magnitude sparsifiers
        scales = tuple(ops.l1_rescale(full[i], kept[i], work) for i in range(len(block.fts)))
        self.sparsified = ((block.r0, block.r1), base, kept)
        return scales

    def _deltas_once(self, block: Block, spec: ops.TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """`deltas`, from l1_scales' unscaled ones when it left this block's. The same bits: every
        sparsifier in `deltas` ends with τ̂·scale when scale != 1 (ops.dare, ops.della without p, the
        band), and a tensor none of them touches has scale ‖τ‖₁/‖τ‖₁ = 1."""
        if self.sparsified is None or self.sparsified[0] != (block.r0, block.r1):
            return self.deltas(block, spec)
        _, base, deltas = self.sparsified
        self.sparsified = None
        for d, scale in zip(deltas, spec.dare_scales):
            if scale != 1.0:
                d.mul_(scale)
        return base, deltas

    def merge(self, block: Block, spec: ops.TensorSpec, out: torch.Tensor) -> torch.cuda.Event | None:
        """Writes the merged block into `out` (CPU); returns the event to wait for before reading it."""
        opts = spec.opts
        if not spec.merged:
            base = block.base.reshape(-1)
            if opts.combine == "copy" and base.is_floating_point():  # passthrough: as mergekit, in its dtype, times scale
                if spec.scale != 1.0:
                    base = base.to(self.compute) * spec.scale
                elif torch.promote_types(base.dtype, self.compute) != self.compute:  # a narrower dtype rounds first
                    base = base.to(self.compute)
            out.copy_(base)
            return None
        if opts.combine == "average":
            result = ops.linear_block(self._on_device(block).fts, spec.weights, opts, self.compute)
        else:
            base, deltas = self._deltas_once(block, spec)
            result = ops.merge_block(base, deltas, spec.weights, spec.lam, opts, spec.majority)
        if self.staging is not None:  # rounded on the GPU (round-to-nearest-even there too): fewer bytes travel back
            result = result.to(out.dtype)
        out.copy_(result.reshape(-1), non_blocking=True)
        return record_event(self.device)


class HooksBackend(TorchBackend):
    """A method of its own (methods/base.py): its stats passes and its merge over row blocks, with torch,
    on the CPU or a GPU. The state its passes build goes into the TensorSpec, as every whole-tensor
    quantity does.

    On the CPU a block goes through the hooks in slices of about SLICE elements (whole rows), on the
    compute threads: eager torch makes one pass over memory per op, and small slices keep those
    passes in cache and reuse the allocator's memory instead of faulting in fresh pages for every
    temporary (benchmarks/hooks_slices.py: 1.1-2.1x on a 4096x4096 tensor, 2 cores). Any row split gives the same bytes,
    by the hooks' contract; a method that needs the whole tensor at once gets it whole.
    """

    SLICE = 1 << 16
    # a method running on the compiled kernels (ctx.compiled): each C step stays in cache whatever the
    # slice, and bigger slices spread the per-call costs (ctypes, Python per slice, a histogram's scan
    # of its bins): TinyLlama warm, 2^16 -> 2^18 elements, slerp 7.1 -> 5.7 s, model_stock 9.4 -> 6.4 s,
    # sce 6.9 -> 5.7 s, karcher 7.7 -> 6.6 s, arcee_fusion 15.5 -> 12.8 s (2^20: no better)
    COMPILED_SLICE = COMPILED_SLICE

    def __init__(self, method: Method, compute: torch.dtype, device: torch.device = torch.device("cpu"),
                 pool: ThreadPoolExecutor | None = None):
        super().__init__(compute, device)
        self.method = method
        self.pool = pool

    def rows(self, block: Block) -> Rows:
        moved = self._on_device(block)
        cols = (block.base if block.base is not None else block.fts[0]).reshape(block.r1 - block.r0, -1).shape[1]

        def view(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(block.r1 - block.r0, cols)

        return Rows(block.r0, block.r1, None if moved.base is None else view(moved.base), [view(t) for t in moved.fts])

    def _slices(self, ctx, rows: Rows) -> list[tuple[int, int, Rows]]:
        """(first, last) row within the block and the rows of each slice; one slice on a GPU or whole."""
        n = rows.r1 - rows.r0
        cols = (rows.base if rows.base is not None else rows.models[0]).shape[1]
        size = self.COMPILED_SLICE if ctx.compiled else self.SLICE
        step = n if self.staging is not None or self.method.whole_tensor(ctx) else max(1, size // max(1, cols))
        return [(a, min(n, a + step), Rows(rows.r0 + a, rows.r0 + min(n, a + step),
                                          None if rows.base is None else rows.base[a : a + step],
                                          [m[a : a + step] for m in rows.models]))
                for a in range(0, n, step)] or [(0, 0, rows)]

    def _map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items) if self.pool is not None and len(items) > 1 else map(fn, items))

    def stats(self, block: Block, spec: ops.TensorSpec, p: int, state) -> list:
        """Pass p's partial results of one block, a slice's at a time, in row order."""
        return self._map(lambda sl: self.method.stats(spec.ctx, p, sl[2], state), self._slices(spec.ctx, self.rows(block)))

    def merge(self, block: Block, spec: ops.TensorSpec, out: torch.Tensor) -> torch.cuda.Event | None:
        if not spec.merged:
            return super().merge(block, spec, out)
        rows = self.rows(block)
        cols = out.numel() // max(1, block.r1 - block.r0)

        def one(sl) -> None:
            a, b, part = sl
            result = self.method.merge(spec.ctx, part, spec.state)
            if self.staging is not None:  # rounded on the GPU: fewer bytes travel back
                result = result.to(out.dtype)
            out[a * cols : b * cols].copy_(result.reshape(-1), non_blocking=True)

        self._map(one, self._slices(spec.ctx, rows))
        return record_event(self.device)


# ---- one tensor ------------------------------------------------------------------------------


class TensorJob:
    """How one tensor is read and merged: its blocks, its parameters, its backend."""

    def __init__(self, tp: TensorPlan, plan: Plan, reference: Checkpoint, finetuned: list[Checkpoint], pool, compiled=None,
                 device: torch.device = torch.device("cpu"), device_budget: int | None = None):
        self.tp, self.opts = tp, plan.options
        self.compiled, self.pool = compiled, pool  # the compiled kernel's module, or None (engine.compiled_kernel); compute threads
        base_name, ft_names = tp.name, [tp.name] * len(finetuned)
        if tp.inputs:  # stacked layers: this tensor's own inputs and their names (plan.stacked_tensors)
            every = [reference, *finetuned]
            (b, base_name), *fts = tp.inputs
            reference, finetuned, ft_names = every[b], [every[i] for i, _ in fts], [n for _, n in fts]
        self.reference = reference
        self.method = registry.get(self.opts.method)
        self.hooks = tp.merged and not isinstance(self.method, TaskVectorMethod)  # a method of its own (methods/base.py)
        self.is_linear = tp.merged and self.opts.combine == "average"
        # linear (and a method of its own without base_model) needs no θ₀; a copied tensor nothing but θ₀
        self.finetuned = finetuned if tp.merged else []
        self.read_base = not self.is_linear and not (self.hooks and (plan.config.base is None or plan.config.base_is_input()))
        self.base_name = base_name
        self.ft_names = ft_names if tp.merged else []
        self.sources = ([reference] if self.read_base else []) + self.finetuned  # what is read, in Block order
        self.names = ([base_name] if self.read_base else []) + self.ft_names  # each source's tensor
        # a vocabulary tensor under a tokenizer source: rows gathered by token, fills read from other models
        reindex = plan.reindex
        self.gather = (RowGather(reindex, tp.name, [reference, *finetuned])
                       if reindex is not None and tp.name in reindex.tensors else None)
        donors = [(c, tp.name) for c in [reference, *finetuned] if self.gather and c.label in reindex.donors()]
        # what is read ahead and downloaded: (checkpoint, tensor name)
        self.touched = list({(id(c), n): (c, n) for c, n in [*zip(self.sources, self.names), *donors]}.values())
        in_dtypes = [self.gather.dtype if self._gathered(c) else DTYPES[c.tensors[n].dtype] for c, n in zip(self.sources, self.names)]
        promoted = functools.reduce(torch.promote_types, in_dtypes)
        compute = self.opts.compute_dtype or promoted
        # float32 by default; float64 inputs stay float64 (no silent loss)
        self.compute = torch.promote_types(compute, promoted) if compute == torch.float32 else compute
        self.out_dtype = DTYPES[tp.block_dtype]  # FP8 output: what the merge rounds to, then quantized (quantize)
        # passthrough's copies go through the compute dtype (mergekit's `dtype`) and the scale, as
        # mergekit loads, multiplies and saves them; a copy that neither changes goes straight out
        rounds = self.opts.combine == "copy" and in_dtypes[0].is_floating_point and (
            tp.scale != 1.0 or torch.promote_types(in_dtypes[0], self.compute) != self.compute)
        # FP8 inputs read as new float32 tensors (quant.py): through the pool, not straight out
        fp8_inputs = [isinstance(c.tensors[n], quant.QuantTensor) for c, n in zip(self.sources, self.names)]
        self.passthrough = not tp.merged and in_dtypes[0] == self.out_dtype and not rounds and not any(fp8_inputs) and not tp.quantized
        use_numpy = uses_chunk_kernel(self.opts, tp, in_dtypes, self.compute, device.type)
        if tp.merged and "gpu" not in self.method.paths:
            device = torch.device("cpu")

        def backend(on: torch.device):
            return (HooksBackend(self.method, self.compute, on, pool) if self.hooks else
                    NumpyBackend(pool, compiled) if use_numpy else TorchBackend(self.compute, on))
        self.backend = backend(device)

        n = len(self.finetuned)
        self.row_elems = tp.row_elems
        # LoRA adapters hand over τ rows (lora.py); one that drops its factors does DARE's drop itself
        # (linear and slerp read θ: an adapter's rows then come as θ₀ + τ)
        uses_deltas = tp.merged and self.opts.combine in ("sum", "ties")
        self.delta_rows = lora.delta_inputs(tp, plan, self.finetuned) if uses_deltas else [None] * n
        # an adapter's rows gathered by token are θ rows (its view), not τ
        self.delta_rows = [None if self._gathered(c) else d for c, d in zip(self.finetuned, self.delta_rows)]
        # inputs built per block (gathered rows, a LoRA's float32 τ) are memory of their own, unlike mapped views
        given = sum(d is not None for d in self.delta_rows)
        held = sum(self.gather.dtype.itemsize for c in self.sources if self._gathered(c)) + 4 * given + (lora.PRODUCT_SCRATCH if given else 0)
        # FP8 inputs: the compiled kernel dequantizes a mapped file's rows as it reads them where it
        # takes every pass of this tensor (ckernel.supports: a method that declares it, a base or an
        # average, one kind of fine-tune; no majority-sign pass, which reads float32; DELLA's ranks
        # at these densities); any other FP8 input's float32 rows are built per block
        compiled_passes = compiled is not None and isinstance(self.backend, NumpyBackend) and (not tp.merged or (
            "compiled" in self.method.paths and (self.read_base or self.is_linear)
            and not (self.opts.zero_sign == "majority" and self.opts.combine == "ties")
            and (self.opts.sparsify != "magprune" or compiled.ranks_della(tp.della_row, tp.densities, tp.epsilons))))
        self.raw_fp8 = compiled_passes and len(set(fp8_inputs[self.read_base :])) <= 1
        held += 4 * sum(q and not (self.raw_fp8 and _mapped(c)) for q, c in zip(fp8_inputs, self.sources))
        # every block read is views of mapped files: readers side by side cost no memory
        self.views_only = held == 0 and all(_mapped(c) for c in self.sources)
        self.rows = job_rows(tp, plan, in_dtypes, isinstance(self.backend, NumpyBackend) or self.passthrough, held)
        if device_budget is not None and tp.merged and not use_numpy:
            fits = device_rows(tp, plan, in_dtypes, device_budget)
            if fits < self.rows and whole_tensor(tp, plan):
                log.info("%s: the whole tensor's working set exceeds the GPU memory budget; merged on the CPU (the same bytes)", tp.name)
                self.backend = backend(torch.device("cpu"))
            else:
                self.rows = fp8_rows(tp, max(1, min(self.rows, fits)))  # (job_rows' rows are whole FP8 slabs already)
        self.blocks = [(r, min(r + self.rows, tp.rows)) for r in range(0, tp.rows, self.rows)]
        self.scales = None  # FP8 output: the tensor's weight_scale_inv, filled block by block (quantize)
        self.prepared = False
        self.given_cache: dict[int, torch.Tensor] = {}
        densities = tuple(1.0 if d is not None and d.drops_factors else x for d, x in zip(self.delta_rows, tp.densities))
        keys = tuple(mask_key(plan.config.seed, i, tp.name) for i in range(n))
        # a method of its own on the compiled kernels: declared, under the default semantics, on inputs
        # they read (bf16, float32, FP8 rows dequantized to float32); it then takes bigger slices
        hooks_compiled = (compiled is not None and "compiled" in self.method.paths and plan.config.semantics != "mergekit"
                          and all(q or d in (torch.bfloat16, torch.float32) for q, d in zip(fp8_inputs, in_dtypes)))
        self.spec = ops.TensorSpec(
            opts=self.opts,
            weights=tp.weights,
            lam=tp.lam,
            dare=tp.dare,
            keys=keys if tp.dare or tp.epsilons else (),
            densities=densities,
            dare_scales=tuple(1.0 / d if tp.dare and self.opts.rescale == "inverse" else 1.0 for d in densities),
            trims=(None,) * n,
            merged=tp.merged,
            given=tuple(d is not None for d in self.delta_rows),
            gammas=tp.gammas,
            epsilons=tp.epsilons,
            della_row=tp.della_row if tp.epsilons else 0,
            scale=tp.scale,
            ctx=tensor_ctx(tp, plan, self.compute, keys, hooks_compiled) if self.hooks else None,
        )

    def _gathered(self, ckpt: Checkpoint) -> bool:
        return self.gather is not None and self.gather.permutes(ckpt.label)

    def block_bytes(self, r0: int, r1: int) -> int:
        return sum(c.tensors[n].row_bytes for c, n in zip(self.sources, self.names)) * (r1 - r0)

    def _rows(self, ckpt: Checkpoint, name: str, r0: int, r1: int) -> torch.Tensor:
        if self._gathered(ckpt):
            return self.gather.rows(ckpt.label, r0, r1)
        if self.raw_fp8 and _mapped(ckpt) and isinstance(ckpt.tensors[name], quant.QuantTensor):
            return ckpt.view(name, r0, r1, dequantize=False)
        return ckpt.view(name, r0, r1)

    def read(self, r0: int, r1: int) -> Block:
        base = self._rows(self.reference, self.base_name, r0, r1) if self.read_base else None
        fts = [self._rows(c, n, r0, r1) if d is None else self._given_rows(i, r0, r1) for i, (c, n, d) in
               enumerate(zip(self.finetuned, self.ft_names, self.delta_rows))]
        return Block(r0, r1, r0 * self.row_elems, base, fts, self.block_bytes(r0, r1))

    def _given_rows(self, i: int, r0: int, r1: int) -> torch.Tensor:
        """A LoRA adapter's τ rows. A one-block tensor is read by every pass (trim thresholds, ties,
        the merge): its τ is rebuilt once and kept, as its inputs' bytes stay mapped."""
        if len(self.blocks) > 1:
            return self.delta_rows[i].read(r0, r1)
        if i not in self.given_cache:
            self.given_cache[i] = self.delta_rows[i].read(r0, r1)
        return self.given_cache[i]

    def prefetch_steps(self) -> list[list[tuple[Checkpoint, str, int | None, int | None]]]:
        """What io/prefetch.py reads ahead for this tensor, step by step: each row block's rows when
        the blocks are read once (each block's bytes released as it is merged: a tensor bigger than
        the staging memory is staged too), else whole tensors, read by every pass."""
        if len(self.blocks) > 1 and self.gather is None and not self.stats_passes:
            return [[(c, n, r0, r1) for c, n in self.touched] for r0, r1 in self.blocks]
        return [[(c, n, None, None) for c, n in self.touched]]

    @property
    def stats_passes(self) -> bool:
        """Whether prepare_tensor reads this tensor's blocks before the merge pass does."""
        opts = self.opts
        if self.hooks:
            return self.method.passes(self.spec.ctx) > 0
        return self.radix_trim and (opts.sparsify == "band" or opts.trim_scope == "tensor")

    def blocks_read(self) -> Iterator[Block]:
        for r0, r1 in self.blocks:
            yield self.read(r0, r1)

    @property
    def radix_trim(self) -> bool:
        """Whether this tensor's trim thresholds come from radix selection."""
        if not self.tp.merged or self.is_linear or self.opts.trim_rule == "argsort":
            return False
        return self.opts.sparsify in ("trim", "band") or (self.opts.sparsify == "dare" and any(d < 1 for d in self.tp.trim_densities))

    def trim_densities(self) -> tuple[float, ...]:
        return self.tp.densities if self.opts.sparsify == "trim" else self.tp.trim_densities

    def quantize(self, block: Block, out: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """FP8 output: the merged block `out` (in `buf`) quantized in place, its scales kept for the
        end of the tensor (quant.quantize_rows); returns the FP8 rows to write."""
        rows, scales = block.r1 - block.r0, self._block_scales(block)
        if self.compiled is not None and out.dtype in (torch.bfloat16, torch.float32):  # the same bytes, compiled
            self.compiled.quantize_rows(kernels.as_numpy(out), self.row_elems, buf.numpy(), scales.numpy(), self.pool)
            return self._fp8_rows(buf, rows)
        return quant.quantize_rows(out.view(rows, self.row_elems), buf, scales)

    def merge_quantized(self, block: Block, buf: torch.Tensor) -> torch.Tensor | None:
        """FP8 output merged and quantized in one pass where the compiled kernel merges the block
        (ckernel.merge_quantize: the bytes of `backend.merge` then `quantize`), into `buf`; None elsewhere."""
        if not isinstance(self.backend, NumpyBackend) or self.out_dtype not in (torch.bfloat16, torch.float32):
            return None
        rows = block.r1 - block.r0
        if not self.backend.merge_quantized(block, self.spec, self.out_dtype, self.row_elems, buf.numpy(),
                                            self._block_scales(block).numpy()):
            return None
        return self._fp8_rows(buf, rows)

    def _block_scales(self, block: Block) -> torch.Tensor:
        """The rows of the tensor's scales (kept for its end) that a block's quantization fills."""
        if self.scales is None:
            self.scales = torch.empty(self.tp.entries[1][2], dtype=torch.float32)
        first = block.r0 // quant.BLOCK
        return self.scales[first : first + -(-(block.r1 - block.r0) // quant.BLOCK)]

    def _fp8_rows(self, buf: torch.Tensor, rows: int) -> torch.Tensor:
        return buf[: rows * self.row_elems].view(torch.float8_e4m3fn).view(rows, self.row_elems)

    def out_bytes(self, block: Block) -> int:
        return (block.r1 - block.r0) * self.row_elems * self.out_dtype.itemsize


# ---- stats passes ------------------------------------------------------------------------------


def select_thresholds(jobs: list[TensorJob], numel: int, densities: tuple[float, ...], rule: str) -> list[list[ops.TrimThreshold | None]]:
    """Exact top-k thresholds of each model over the given tensors (one, or all for a global domain).

    Returns, per job, the per-model thresholds: a whole tensor in one block is selected in place
    (NumpyBackend.select's bracket, or a sort on torch); otherwise radix selection gives the value,
    then a scan in flat (and plan) order finds the last kept tie when only some ties at the
    threshold are kept.
    """
    return select_rank_thresholds(jobs, [ops.trim_rank(numel, d, rule) for d in densities], rule)


def select_rank_thresholds(jobs: list[TensorJob], ranks: list[int | None], rule: str) -> list[list[ops.TrimThreshold | None]]:
    """select_thresholds for given ranks k (None keeps everything, 0 nothing), rank q of model q mod n
    (n fine-tunes; breadcrumbs asks two ranks of each)."""
    if len(jobs) == 1 and len(jobs[0].blocks) == 1 and isinstance(jobs[0].backend, TorchBackend):
        return [_sorted_thresholds(jobs[0], ranks, rule)]  # one block in memory anyway: no radix passes
    if len(jobs) == 1 and (bracketed := _bracketed(jobs[0], ranks, rule)) is not None:
        return [bracketed]  # every rank in one pass
    n = len(jobs[0].finetuned)  # the radix passes: one rank of each model at a time
    per_job: list[list[ops.TrimThreshold | None]] = [[] for _ in jobs]
    for g in range(0, len(ranks), n):
        for row, part in zip(per_job, _radix_thresholds(jobs, ranks[g : g + n], rule)):
            row.extend(part)
    return per_job


def _radix_thresholds(jobs: list[TensorJob], ranks: list[int | None], rule: str) -> list[list[ops.TrimThreshold | None]]:
    """select_rank_thresholds by the radix passes and tie scans, one rank per model."""
    n = len(ranks)
    selectors = [ops.RadixSelect(k) if k else None for k in ranks]
    for pass_index in range(2):
        wanted = [s is not None and s.found is None for s in selectors]
        if not any(wanted):  # pass 1 settled every threshold
            break
        high = [None if s is None else s.high for s in selectors]
        for job in jobs:
            spec = replace(job.spec, trims=(None,) * n, outliers=())
            for block in job.blocks_read():
                for sel, w, hist in zip(selectors, wanted, job.backend.hist(block, spec, high, wanted)):
                    if w:
                        sel.add(hist)
        if pass_index == 0:
            for sel in selectors:
                if sel is not None:
                    sel.end_pass()

    per_job: list[list[ops.TrimThreshold | None]] = [[None] * n for _ in jobs]
    for i, k in enumerate(ranks):
        if k == 0:
            for row in per_job:
                row[i] = ops.TrimThreshold(math.inf, -1)

    def threshold(i: int) -> None:
        value, greater, equal = selectors[i].result()
        last = _last_tie(jobs, i, value, equal if rule == "inclusive" else ranks[i] - greater, equal)
        for j, row in enumerate(per_job):
            row[i] = ops.TrimThreshold(value, last[j])

    # each model's tie scan is one thread's work: run side by side on the compute threads (idle here)
    selected = [i for i, k in enumerate(ranks) if k]
    side_by_side = len(selected) > 1 and all(isinstance(j.backend, NumpyBackend) and j.views_only for j in jobs)
    pool = jobs[0].pool if side_by_side else None
    if pool is None:
        for i in selected:
            threshold(i)
    else:
        for f in [pool.submit(threshold, i) for i in selected]:
            f.result()
    return per_job


def _bracketed(job: TensorJob, ranks: list[int | None], rule: str) -> list[ops.TrimThreshold | None] | None:
    """NumpyBackend.select over the whole tensor as one block, for ranks q of model q mod n; None
    where it does not apply (the radix passes then). The rows of a tensor read in row blocks are
    views (of the staged or mapped files) where `views_only`: one block then costs nothing."""
    if not isinstance(job.backend, NumpyBackend) or (len(job.blocks) > 1 and not job.views_only):
        return None
    block = job.read(0, job.tp.rows) if len(job.blocks) > 1 else next(job.blocks_read())
    spec = replace(job.spec, trims=(None,) * len(job.finetuned), outliers=())
    return job.backend.select(block, spec, ranks, rule)


def _trim_threshold(value: float | None, greater: int, equal: int, k: int | None, rule: str, locate) -> ops.TrimThreshold | None:
    """The trim for rank k (None keeps everything, 0 nothing) of the k-th largest |τ| `value`, with
    `greater` elements above it and `equal` at it; locate(keep) gives the flat index of the keep-th tie."""
    if k is None or k == 0:
        return None if k is None else ops.TrimThreshold(math.inf, -1)
    keep = equal if rule == "inclusive" else k - greater
    if keep in (0, equal) or math.isnan(value):  # nothing compares equal to NaN: the radix passes' ALL_TIES
        return ops.TrimThreshold(value, -1 if keep == 0 else ops.ALL_TIES)
    return ops.TrimThreshold(value, locate(keep))


def _sorted_select(bits: np.ndarray, k: int | None) -> tuple[float | None, int, int]:
    """The k-th largest of |τ| bit patterns, how many lie above it and how many equal it."""
    if not k:
        return None, 0, 0
    value = np.partition(bits, len(bits) - k)[len(bits) - k]
    return float(value.view(np.float32)), int((bits > value).sum()), int((bits == value).sum())


def _bits(value: float) -> int:
    """A float32's bit pattern (|τ|'s, as the selections count them)."""
    return int(np.float32(value).view(np.uint32))


def _sorted_thresholds(job: TensorJob, ranks: list[int | None], rule: str) -> list[ops.TrimThreshold | None]:
    """The thresholds select_rank_thresholds finds, from one whole-tensor block by a top-k."""
    (block,) = job.blocks_read()
    n = len(job.spec.weights)  # fine-tunes
    _, deltas = job.backend.deltas(block, replace(job.spec, trims=(None,) * n, outliers=()))
    out: list[ops.TrimThreshold | None] = []
    for q, k in enumerate(ranks):
        if not k:
            out.append(_trim_threshold(None, 0, 0, k, rule, None))
            continue
        flat = deltas[q % n].abs().reshape(-1).float().cpu()  # one copy from a GPU, then no round trips
        value = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest (NaN above everything)
        nans = flat.isnan()
        if value.isnan():  # the NaNs are its ties (none compares equal to it, so which are kept does not matter)
            greater, ties = 0, torch.nonzero(nans).reshape(-1)
        else:  # the NaNs lie above it
            greater, ties = int((flat > value).sum() + nans.sum()), torch.nonzero(flat == value).reshape(-1)
        out.append(_trim_threshold(float(value), greater, len(ties), k, rule, lambda keep, t=ties: int(t[keep - 1])))
    return out


def _last_tie(jobs: list[TensorJob], i: int, value: float, keep: int, total: int) -> list[int]:
    """Per job, the flat index of the last kept tie: ALL_TIES before the crossing, -1 after it."""
    if keep == total:
        return [ops.ALL_TIES] * len(jobs)
    if keep == 0:
        return [-1] * len(jobs)
    out, needed = [], keep
    for job in jobs:
        if needed == 0:
            out.append(-1)
            continue
        spec = replace(job.spec, trims=(None,) * len(job.finetuned), outliers=())
        found = None
        for block in job.blocks_read():
            pos, seen = job.backend.find_tie(block, spec, i, value, needed)
            if pos is not None:
                found = pos
                break
            needed -= seen
        out.append(ops.ALL_TIES if found is None else found)
        if found is not None:
            needed = 0
    return out


def run_passes(job: TensorJob) -> object:
    """The stats passes a method of its own declares (methods/base.py), each over every block of the
    tensor in order; returns the state the last one leaves for the merge pass."""
    method, ctx, state = job.method, job.spec.ctx, None
    for p in range(method.passes(ctx)):
        if method.skips(ctx, p, state):  # nothing to compute: no block read, staged or sliced
            partials = []
        else:
            partials = [part for block in job.blocks_read() for part in job.backend.stats(block, job.spec, p, state)]
        state = method.reduce(ctx, p, partials, state)
    return state


def prepare_tensor(job: TensorJob) -> None:
    """Whole-tensor quantities of one tensor (per-tensor trim domain, L1 factors, a method's own passes)."""
    if job.prepared:
        return
    job.prepared = True
    opts = job.opts
    if job.hooks:
        job.spec = replace(job.spec, state=run_passes(job))
        return
    if job.radix_trim and opts.sparsify == "band":
        ranks = [ops.breadcrumbs_ranks(job.tp.numel, d, g) for d, g in zip(job.tp.densities, job.tp.gammas)]
        (both,) = select_rank_thresholds([job], [r[0] for r in ranks] + [r[1] for r in ranks], opts.trim_rule)
        job.spec = replace(job.spec, trims=tuple(both[: len(ranks)]), outliers=tuple(both[len(ranks) :]))
    elif job.radix_trim and opts.trim_scope == "tensor":
        (trims,) = select_thresholds([job], job.tp.numel, job.trim_densities(), opts.trim_rule)
        job.spec = replace(job.spec, trims=tuple(trims))
    # mergekit's L1 factor, of what the sparsifier actually keeps (after any thresholds above)
    if opts.rescale == "l1" and (job.tp.dare or (job.tp.merged and opts.sparsify in ("trim", "band", "magprune"))):
        (block,) = job.blocks_read()
        job.spec = replace(job.spec, dare_scales=job.backend.l1_scales(block, job.spec))


def _global_trim(jobs: list[TensorJob]) -> bool:
    return bool(jobs) and jobs[0].opts.trim_scope == "global" and any(j.radix_trim for j in jobs)


def _majority_sign(jobs: list[TensorJob]) -> bool:
    return bool(jobs) and jobs[0].opts.zero_sign == "majority" and jobs[0].opts.combine == "ties"


def global_pass_needed(jobs: list[TensorJob]) -> bool:
    """Whether `prepare_global` reads every tensor before the output pass."""
    return _global_trim(jobs) or _majority_sign(jobs)


def prepare_global(jobs: list[TensorJob]) -> None:
    """FusionBench's model-wide quantities: one trim threshold per model over every merged tensor,
    and the majority sign that breaks γ = 0."""
    if not global_pass_needed(jobs):
        return
    opts = jobs[0].opts
    trimmed = [j for j in jobs if j.radix_trim]
    if _global_trim(jobs):
        numel = sum(j.tp.numel for j in trimmed)
        for job, trims in zip(trimmed, select_thresholds(trimmed, numel, trimmed[0].trim_densities(), opts.trim_rule)):
            job.spec = replace(job.spec, trims=tuple(trims))
    if _majority_sign(jobs):
        total = 0.0
        for job in (j for j in jobs if j.tp.merged):
            if opts.trim_scope == "tensor":
                prepare_tensor(job)
            total += sum(job.backend.sign_total(block, job.spec) for block in job.blocks_read())
        majority = math.copysign(1.0, total) if total != 0 else 0.0
        for job in jobs:
            job.spec = replace(job.spec, majority=majority)
