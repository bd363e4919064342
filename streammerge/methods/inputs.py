"""What the methods of their own read besides the rows: the dtype they compute in, their parameters
checked against their declaration, and the compiled kernels where those take the rows."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from streammerge.errors import ConfigError

from .base import Method, Rows, TensorCtx


def work_dtype(ctx: TensorCtx, rows: Rows) -> torch.dtype:
    """mergekit: its `dtype`, else the promotion of the inputs' dtypes (as it loads them). Default:
    float32, float64 inputs stay float64."""
    dtypes = [t.dtype for t in (rows.base, *rows.models) if t is not None]
    if ctx.semantics == "mergekit":
        return ctx.dtype or functools.reduce(torch.promote_types, dtypes)
    return torch.float64 if torch.float64 in dtypes else torch.float32


def compiled(ctx: TensorCtx, *tensors: torch.Tensor | None):
    """The compiled kernels' module (methods/ckernel.py) where the merge may use them (the default
    semantics: mergekit's are its own torch ops) and they read these tensors in place (the same
    bytes as torch, faster), else None."""
    if not ctx.compiled or ctx.semantics == "mergekit":
        return None
    from streammerge.methods import ckernel

    return ckernel if ckernel.readable(*tensors) else None


def resolved(method: Method, ctx: TensorCtx) -> dict[str, Any]:
    """The method's parameters for this tensor (ctx.params, else the default); a missing required
    one or a value out of range is a ConfigError naming the tensor and the parameter."""
    out = {}
    for p in method.params:
        value = ctx.params.get(p.name, p.default_for(ctx.semantics))
        if value is None:
            raise ConfigError(f"{ctx.name}: {method.name} needs parameter {p.name}")
        if p.kind is float and not (isinstance(value, (int, float)) and not math.isnan(value)):
            raise ConfigError(f"{ctx.name}: {method.name}: {p.name} must be a number, got {value!r}")
        problem = p.problem(value)
        if problem:
            raise ConfigError(f"{ctx.name}: {method.name}: {problem}")
        out[p.name] = value
    return out
