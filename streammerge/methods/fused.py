"""The fused CPU kernel: kernels.py's arithmetic as one torch.compile'd loop per 1M-element chunk.

Inductor turns the whole per-element pipeline (bf16 loads, the DARE hash, trim, election, disjoint
merge, rounding) into one vectorized OpenMP loop: about 4x the numpy chunk kernel on this 2-core
machine, after a compile of ~10 s per kernel shape (cached on disk by inductor across runs). So it
is used for merges big enough to repay that, and the numpy kernel stays the reference and fallback.

Bits: the ops are the same IEEE float32 operations in the same order as kernels.py, and inductor
compiles with -ffp-contract=off (no fused multiply-add). It also compiles with -fno-signed-zeros,
which may flip the sign of a zero result; so every float32 path writes merged zeros as +0 (see
`kernels.store`), and the three paths give identical bytes (tests/test_fused.py checks it).
Parameters enter as tensors, not constants, so a new weight or density does not recompile; the
chunk length is fixed (the last chunk is padded) so a new tensor shape does not either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from streammerge.methods import registry
from streammerge.methods.mask import hash32_halves, keep_threshold
from streammerge.methods.ops import TensorSpec

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_BITS = {2: torch.int16, 4: torch.int32}
_M32 = 0xFFFFFFFF
_MIN_ELEMENTS = 300_000_000  # merged elements from which compiling pays off ("auto")


def worth_compiling(merged_elements: int, mode: str) -> bool:
    """mode: "auto" (compile for big merges), "on" or "off"."""
    if mode == "off":
        return False
    return mode == "on" or merged_elements >= _MIN_ELEMENTS


@dataclass(frozen=True)
class _Shape:
    """What a compiled kernel is specialised on (anything else is a tensor argument)."""

    n: int
    combine: str
    dare: bool
    trimmed: tuple[bool, ...]
    weighted_sign: bool
    sign_method: str
    zero_sign: str
    merge_func: str
    mean_divisor: str
    normalize: bool
    out_dtype: torch.dtype


def _kernel(shape: _Shape):
    def merge(base, fts, start, k0, k1, keep_below, scales, trim_value, last_tie, w, lam, majority, norm):
        index = torch.arange(CHUNK, dtype=torch.int64) + start
        b = base.float()
        ds = []
        for i in range(shape.n):
            d = fts[i].float() - b
            if shape.dare:
                d = d * (hash32_halves(index, k0[i], k1[i]) < keep_below[i])
                d = d * scales[i]
            if shape.trimmed[i]:
                a = d.abs()
                d = d * ((a > trim_value[i]) | ((a == trim_value[i]) & (index <= last_tie[i])))
            ds.append(d)
        weighted = [d * w[i] for i, d in enumerate(ds)]
        if shape.combine == "ties":
            voters = weighted if shape.weighted_sign else ds
            votes = [v.sign() for v in voters] if shape.sign_method == "count" else voters
            score = votes[0] + 0.0
            for v in votes[1:]:
                score = score + v
            if shape.zero_sign == "majority":
                gamma = score.sign()
                gamma = torch.where(gamma == 0, majority, gamma)
                side = (gamma > 0).float() * 2 - 1
            else:
                gamma = (score >= 0).float() * 2 - 1
                side = gamma
            agree = [((v * side) > 0).float() for v in voters]
            if shape.merge_func == "max":
                merged = ds[0].abs() * agree[0]
                for d, a in zip(ds[1:], agree[1:]):
                    merged = torch.maximum(merged, d.abs() * a)
                merged = merged * gamma
            else:
                merged = weighted[0] * agree[0] + 0.0
                for v, a in zip(weighted[1:], agree[1:]):
                    merged = merged + v * a
                if shape.merge_func == "mean":
                    if shape.mean_divisor == "count":
                        div = agree[0] + 0.0
                        for a in agree[1:]:
                            div = div + a
                    else:
                        div = agree[0] * w[0] + 0.0
                        for i in range(1, shape.n):
                            div = div + agree[i] * w[i]
                    merged = merged / torch.where(div == 0, 1.0, div)
        else:
            merged = weighted[0] + 0.0
            for v in weighted[1:]:
                merged = merged + v
            if shape.normalize:
                merged = merged / norm
        merged = merged * lam
        return (b + merged).to(shape.out_dtype)

    # Every shape compiles the same code object, and dynamo counts recompiles per code object.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    return torch.compile(merge, dynamic=False, fullgraph=True)


class FusedMerger:
    """Compiled kernels by shape, with a one-way fallback to the numpy kernel if compiling fails."""

    def __init__(self) -> None:
        self.kernels: dict[_Shape, object] = {}
        self.staging: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # by (n, base dtype, fts dtype)
        self.broken = False

    def supports(self, spec: TensorSpec, fts: list[torch.Tensor]) -> bool:
        declared = "compiled" in registry.get(spec.opts.method).paths  # opt-in: methods/task_vectors.py
        return (not self.broken and spec.merged and declared and spec.opts.positive_zeros
                and not spec.opts.divide_by_density  # its DARE rescale multiplies
                and len({f.dtype for f in fts}) == 1 and not any(spec.given))

    def merge(self, spec: TensorSpec, base: torch.Tensor, fts: list[torch.Tensor], out: torch.Tensor, start: int) -> bool:
        """Merges flat `base`/`fts` into flat `out`; False if compiling failed (use the fallback)."""
        opts = spec.opts
        n = len(fts)
        shape = _Shape(n, opts.combine, spec.dare, tuple(t is not None for t in spec.trims), opts.weighted_sign,
                       opts.sign_method, opts.zero_sign, opts.merge_func, opts.mean_divisor, opts.normalize, out.dtype)
        f32 = torch.float32
        keys = spec.keys if spec.dare else (0,) * n
        weights = torch.tensor(spec.weights, dtype=f32)
        total = weights[0] + 0.0
        for x in weights[1:]:
            total = total + x
        args = (
            torch.tensor([k & _M32 for k in keys]), torch.tensor([k >> 32 for k in keys]),
            torch.tensor([keep_threshold(d) if spec.dare else 0 for d in spec.densities]),
            torch.tensor(spec.dare_scales, dtype=f32),
            torch.tensor([t.value if t is not None else 0.0 for t in spec.trims], dtype=f32),
            torch.tensor([t.last_tie if t is not None else 0 for t in spec.trims]),
            weights, torch.tensor(spec.lam, dtype=f32),
            torch.tensor(spec.majority, dtype=f32), torch.where(total.abs() < 1e-8, 1.0, total),
        )
        try:
            kernel = self.kernels.get(shape)
            if kernel is None:
                kernel = self.kernels[shape] = _kernel(shape)
            # Inputs are copied into two fixed, reused buffers (page-cache views of every shape and
            # offset would make dynamo recompile), the last chunk zero-padded to the compiled length.
            key = (n, base.dtype, fts[0].dtype)
            if key not in self.staging:
                self.staging[key] = (torch.zeros(CHUNK, dtype=base.dtype), torch.zeros((n, CHUNK), dtype=fts[0].dtype))
            b, x = self.staging[key]
            bits_out = out.view(_BITS[out.element_size()])
            for c in range(0, base.numel(), CHUNK):
                m = min(CHUNK, base.numel() - c)
                b[:m] = base[c : c + m]
                for i, f in enumerate(fts):
                    x[i, :m] = f[c : c + m]
                if m < CHUNK:
                    b[m:] = 0
                    x[:, m:] = 0
                bits_out[c : c + m] = kernel(b, x, torch.tensor(start + c), *args)[:m].view(bits_out.dtype)
            # −0 -> +0 on the bits: the compiled code is free to ignore a zero's sign
            bits_out[bits_out == torch.iinfo(bits_out.dtype).min] = 0
        except Exception as e:  # no C++ compiler, an inductor bug: the numpy kernel gives the same bits
            log.warning("torch.compile failed (%s: %s); using the numpy kernel", type(e).__name__, str(e).splitlines()[0][:200])
            self.broken = True
            return False
        return True
