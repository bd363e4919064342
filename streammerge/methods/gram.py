"""Gram matrices of a few tensors, streamed over row blocks, exactly (model_stock, nuslerp,
multislerp, karcher share them).

The methods here treat each input as a vector, or as a set of vectors ("lines") cut from the tensor
the same way in every input, and need only the inner products ⟨x_i, x_j⟩ of the inputs' lines: the
Gram matrix G[i, j] of each line. Three ways to cut a tensor [rows, ...] into lines:

    "tensor"   one line, the whole tensor
    "rows"     lines along the last dimension (a 2-D weight's rows; [E, R, C] gives E·R lines of C)
    "columns"  lines along the first dimension (a 2-D weight's columns: one per element of a row)

A 1-D (or 0-D) tensor is always one line. Bytes never depend on the row blocks: "tensor" sums each
row in float64 by `base.row_sums`'s fixed tree and adds the rows exactly (`total`); a "rows" line lies
inside one block row; a "columns" line crosses every block, so each block sums its rows over the
aligned power-of-two spans it holds (adjacent pairs, then pairs of pairs: a tree fixed by the row
index alone) and `gram_reduce` joins sibling spans the same way, whatever the split.
"""

from __future__ import annotations

import functools
import math

import torch

from streammerge.errors import ConfigError

from .base import Rows, TensorCtx, row_sums_, total
from .inputs import compiled

CUTS = ("tensor", "rows", "columns")


def cut(ctx: TensorCtx, lines: str) -> str:
    """The cut actually used: a 1-D or 0-D tensor is one line whatever is asked."""
    if lines not in CUTS:
        raise ConfigError(f"{ctx.name}: unknown cut {lines!r}")
    return "tensor" if len(ctx.shape) < 2 else lines


def line_count(ctx: TensorCtx, lines: str) -> int:
    if lines == "tensor":
        return 1
    return ctx.numel // ctx.shape[-1] if lines == "rows" else ctx.row_elems


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


def _spans(r0: int, r1: int) -> list[tuple[int, int]]:
    """[r0, r1) as aligned power-of-two spans (start, size), left to right."""
    out, r = [], r0
    while r < r1:
        size = (r & -r) if r else 1 << (r1 - 1).bit_length()
        while r + size > r1:
            size //= 2
        out.append((r, size))
        r += size
    return out


def _pair_tree(x: torch.Tensor) -> torch.Tensor:
    """Sum of a power-of-two number of rows: adjacent pairs, then pairs of pairs, ..."""
    while x.shape[0] > 1:
        x = x[0::2] + x[1::2]
    return x[0]


def gram_stats(ctx: TensorCtx, lines: str, r0: int, xs: list[torch.Tensor], minus: torch.Tensor | None = None) -> object:
    """One block's partial Gram: the float64 products of every pair i ≤ j of the blocks `xs` (each
    [n, row_elems], rows r0 … r0 + n; less `minus` when given: task vectors), summed per line where
    the line lies in the block."""
    width = ctx.shape[-1] if lines == "rows" else ctx.row_elems
    kernel = compiled(ctx, *xs, minus) if lines != "columns" else None
    if kernel is not None:
        return kernel.gram(xs, minus, width)
    if minus is not None:
        minus = minus.double()  # (once)
    xs = [x.double() for x in xs] if minus is None else [x.double() - minus for x in xs]
    pairs = _pairs(len(xs))
    if lines == "columns":
        out = []
        for start, size in _spans(r0, r0 + xs[0].shape[0]):
            part = [x[start - r0 : start - r0 + size] for x in xs]
            out.append((start, size, torch.stack([_pair_tree(part[i] * part[j]) for i, j in pairs])))
        return out
    work = torch.empty_like(xs[0]).reshape(-1, width)
    sums = torch.empty(len(pairs), work.shape[0], dtype=torch.float64, device=work.device)
    for p, (i, j) in enumerate(pairs):
        torch.mul(xs[i].reshape(-1, width), xs[j].reshape(-1, width), out=work)
        sums[p] = row_sums_(work)
    return sums.cpu()


def gram_reduce(ctx: TensorCtx, lines: str, partials: list) -> torch.Tensor:
    """The Gram matrices of all lines, float64 [k, k, lines], from the blocks' partials in order."""
    pairs = (partials[0][0][2] if lines == "columns" else partials[0]).shape[0]
    k = math.isqrt(2 * pairs)  # pairs = k(k + 1)/2
    if lines == "columns":
        stack: list[tuple[int, int, torch.Tensor]] = []
        for part in partials:
            for item in part:
                stack.append(item)
                # join two sibling spans into their parent, as the tree over the row index would
                while len(stack) > 1 and stack[-2][1] == stack[-1][1] and stack[-2][0] % (2 * stack[-1][1]) == 0:
                    (s, z, a), (_, _, b) = stack[-2], stack.pop()
                    stack[-1] = (s, 2 * z, a + b)
        sums = stack[0][2].clone() if stack else torch.zeros(len(_pairs(k)), line_count(ctx, lines), dtype=torch.float64)
        for _, _, v in stack[1:]:
            sums += v
    else:
        sums = torch.cat(partials, dim=1)
        if lines == "tensor":
            sums = torch.tensor([[total(row)] for row in sums], dtype=torch.float64).reshape(-1, 1)
    gram = torch.empty(k, k, sums.shape[1], dtype=torch.float64)
    for p, (i, j) in enumerate(_pairs(k)):
        gram[i, j] = gram[j, i] = sums[p]
    return gram


def combine(ctx: TensorCtx, lines: str, rows: Rows, xs: list[torch.Tensor], coefs: torch.Tensor,
            add: torch.Tensor | None = None, minus: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i coefs[i, line] · xs[i] (+ add) over the block `rows`, in float64, each line with its own
    coefficients (float64 [k, lines]), xs less `minus` when given; then float32, or float64 when an
    input is stored in float64."""
    r0 = rows.r0
    n = xs[0].shape[0]
    if lines == "rows":
        per = ctx.row_elems // ctx.shape[-1]
        shape, c = (n * per, ctx.shape[-1]), coefs[:, r0 * per : (r0 + n) * per, None]
    elif lines == "columns":
        shape, c = (n, ctx.row_elems), coefs[:, None, :]
    else:
        shape, c = (n, ctx.row_elems), coefs[:, :, None]
    kernel = compiled(ctx, *xs, add, minus) if lines != "columns" else None
    if kernel is not None:
        return kernel.combine(xs, minus, c[:, :, 0], add, shape[1]).reshape(n, ctx.row_elems)
    if add is None:
        out = torch.zeros(shape, dtype=torch.float64, device=xs[0].device)
    else:
        out = add.to(torch.float64, copy=True).reshape(shape)
    c, term = c.to(out.device), torch.empty_like(out)
    minus = None if minus is None else minus.double()  # (once)
    for i, x in enumerate(xs):
        if minus is not None:
            x = x.double() - minus
        # c[i] is a float64 tensor with dimensions, so torch promotes x exactly to float64 first
        torch.mul(x.reshape(shape), c[i], out=term)
        out += term
    out += 0.0  # merged zeros as +0, as the engine's other default paths write them
    out = out.reshape(n, ctx.row_elems)
    wide = any(t is not None and t.dtype == torch.float64 for t in [rows.base, *rows.models])
    return out if wide else out.float()


def param(ctx: TensorCtx, method: object, name: str):
    """A parameter's value for this tensor: the resolved one, else the method's default."""
    if name in ctx.params:
        return ctx.params[name]
    (p,) = [p for p in method.params if p.name == name]
    return p.default_for(ctx.semantics)


def mergekit_inputs(ctx: TensorCtx, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole tensors as mergekit 0.1.5 hands them to a method: in its `dtype` (else all in the
    inputs' promoted dtype), shaped as stored, on the CPU: mergekit's whole-tensor reductions sum
    in each device's own order, and the fixtures are the CPU's."""
    dtype = ctx.dtype or functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return [t.cpu().reshape(ctx.shape).to(dtype) for t in tensors]
