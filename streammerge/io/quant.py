"""Quantized checkpoints: FP8 weights read as their dequantization, FP8 written back, other formats named.

In: an FP8 weight W (float8_e4m3fn or float8_e5m2) with a float scale tensor next to it reads as the
float32 tensor W·s, the scale applied per block of rows and columns (`QuantRows.dequantize`). Two layouts:

- fine-grained (DeepSeek-V3/R1, transformers' FineGrainedFP8): `X.weight_scale_inv` of shape
  (⌈R/128⌉, ⌈C/128⌉), one float32 per 128×128 block; the last block row and column cover what is left
  when R or C is not a multiple of 128 (as DeepSeek's kernel and transformers' `_dequantize_fp8_weight` do);
- compressed-tensors (and fbgemm/ModelOpt) FP8: `X.weight_scale`, one per output channel (R, 1) or
  one per tensor (a scalar), or blocks (`block_structure`); `input_scale`/`k_scale`/`v_scale`
  (activation scales) are dropped.

The product is formed in float32, one rounding: fp32(W)·fp32(s). A checkpoint opened here therefore
looks exactly like its float32 dequantization (dtype "F32"), and merges to the same bytes. The scale
tensors do not appear among the checkpoint's tensors. The compiled kernel takes the stored rows
instead (`QuantRows`) and forms the same product as it reads them (methods/ckernel.c).

Out: `quantize_rows` (or its compiled twin, ckernel.quantize_rows) writes a merged block as float8_e4m3fn with one float32 `weight_scale_inv`
per 128×128 block: s = amax/448 (1 for an all-zero block), q = e4m3(clamp(fp32(x / s), ±448)) rounded to
nearest even by torch's conversion. Dequantized, q·s is within half an e4m3 step of x.

Other quantizations (bitsandbytes, GPTQ, AWQ, MXFP4, int compressed-tensors, GGUF, ...) are named
in one line with how to dequantize them first (`check_supported`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from streammerge.errors import CheckpointError
from streammerge.io.sources import TensorInfo

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
BLOCK = 128  # the fine-grained block written (and assumed when a checkpoint's config does not say)
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # after the weight's name: X.weight_scale_inv, X.weight_scale
ACTIVATION_SCALES = (".input_scale", ".k_scale", ".v_scale", ".activation_scale", ".output_scale")
WRITE_METHODS = ("fp8", "compressed-tensors", "fbgemm_fp8", "modelopt")  # read when the tensors are FP8 + scales

# quant_method -> (what it is, how to get full-precision weights)
_OTHER = {
    "bitsandbytes": ("bitsandbytes (4-bit/8-bit)", "transformers: from_pretrained, model.dequantize(), save_pretrained"),
    "gptq": ("GPTQ", "merge the full-precision model it was quantized from, or dequantize it (gptqmodel / optimum) and save_pretrained"),
    "awq": ("AWQ", "merge the full-precision model it was quantized from, or dequantize it (autoawq / transformers) and save_pretrained"),
    "mxfp4": ("MXFP4", "transformers: from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True)), save_pretrained"),
    "aqlm": ("AQLM", "merge the full-precision model it was quantized from"),
    "hqq": ("HQQ", "merge the full-precision model it was quantized from"),
    "eetq": ("EETQ", "merge the full-precision model it was quantized from"),
    "quanto": ("quanto", "merge the full-precision model it was quantized from"),
    "exl2": ("EXL2", "merge the full-precision model it was quantized from"),
    "torchao": ("torchao", "merge the full-precision model it was quantized from"),
    "bitnet": ("BitNet", "merge the full-precision model it was quantized from"),
}
_CT_DEQUANTIZE = ("transformers: from_pretrained(..., quantization_config=CompressedTensorsConfig(run_compressed=False)), "
                  "save_pretrained")
# tensor name endings that give a format away when config.json does not
_SUFFIXES = (
    (".qweight", "gptq"), (".qzeros", "gptq"), (".g_idx", "gptq"),
    (".absmax", "bitsandbytes"), (".quant_map", "bitsandbytes"), (".nested_absmax", "bitsandbytes"),
    (".SCB", "bitsandbytes"), (".weight_format", "bitsandbytes"), ("quant_state.bitsandbytes__nf4", "bitsandbytes"),
    ("quant_state.bitsandbytes__fp4", "bitsandbytes"), (".W_q", "hqq"),
    (".weight_packed", "compressed-tensors"), (".weight_zero_point", "compressed-tensors"),
)


@dataclass(frozen=True)
class QuantTensor(TensorInfo):
    """An FP8 weight as the merge sees it: dtype "F32" (its dequantization), shape the weight's; `file`,
    `offset` and `nbytes` are the stored bytes (weight and scale), for readahead and accounting."""

    weight: TensorInfo | None = None
    scale: TensorInfo | None = None
    block: tuple[int, int] = (BLOCK, BLOCK)  # rows × columns sharing one scale
    scheme: str = "block"  # block | channel | tensor

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys((self.weight.file, self.scale.file)))


def describe(infos: dict[str, TensorInfo]) -> str:
    """One line on how a checkpoint is quantized ("" when it is not), for `plan`."""
    quant = [t for t in infos.values() if isinstance(t, QuantTensor)]
    if not quant:
        return ""
    kinds = {}
    for t in quant:
        what = {"block": f"{t.block[0]}x{t.block[1]} blocks", "channel": "per channel", "tensor": "per tensor"}[t.scheme]
        kinds.setdefault(f"{'float8_e4m3fn' if t.weight.dtype == 'F8_E4M3' else 'float8_e5m2'} {what} "
                         f"({t.scale.name.rsplit('.', 1)[-1]})", []).append(t)
    parts = ", ".join(f"{len(v)} {k}" for k, v in kinds.items())
    return f"FP8: {parts}; read as float32 (weight x scale), {len(infos) - len(quant)} tensors unquantized"


def check_supported(where: object, config: dict | None, names: dict | set) -> None:
    """Refuses, in one line, a checkpoint quantized in a format other than FP8 with scales."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method == "compressed-tensors":
        fmt = str(qc.get("format", ""))
        if fmt and fmt not in ("float-quantized", "naive-quantized"):
            raise CheckpointError(where, f"a compressed-tensors {fmt} checkpoint (config.json quantization_config): streammerge "
                                  f"reads FP8 and full-precision weights only; dequantize it first ({_CT_DEQUANTIZE}) and merge that")
    elif method in _OTHER:
        fmt, how = _OTHER[method]
        raise CheckpointError(where, f"a {fmt} quantized checkpoint (config.json quantization_config.quant_method "
                              f"{method!r}): streammerge reads FP8 and full-precision weights only; {how}, and merge that")
    for name in names:
        if name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in names:  # gpt-oss's experts
            fmt, how = _OTHER["mxfp4"]
            raise CheckpointError(where, f"tensor {name!r} looks {fmt} quantized: streammerge reads FP8 and "
                                  f"full-precision weights only; {how}, and merge that")
        for suffix, method in _SUFFIXES:
            if name.endswith(suffix):
                fmt, how = _OTHER.get(method, ("compressed-tensors int", _CT_DEQUANTIZE))
                raise CheckpointError(where, f"tensor {name!r} looks {fmt} quantized: streammerge reads FP8 and "
                                      f"full-precision weights only; {how}, and merge that")


def block_size(config: dict | None) -> tuple[int, int] | None:
    """The block a config.json declares: quantization_config.weight_block_size (fine-grained) or a
    compressed-tensors group's weights.block_structure."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        return None
    sizes = [qc.get("weight_block_size")]
    groups = qc.get("config_groups")
    if isinstance(groups, dict):
        sizes += [g.get("weights", {}).get("block_structure") for g in groups.values() if isinstance(g, dict)
                  and isinstance(g.get("weights"), dict)]
    for size in sizes:
        if isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size):
            return size[0], size[1]
    return None


def wrap(where: object, stored: dict[str, TensorInfo], config: dict | None) -> dict[str, TensorInfo]:
    """The tensors of a checkpoint as the merge reads them: each FP8 weight with its scale becomes one
    QuantTensor, the scales and activation scales go; unchanged when nothing is FP8.

    Raises:
        CheckpointError: another quantization format, an FP8 tensor without a scale, a scale that
            does not fit its weight.
    """
    check_supported(where, config, stored)
    if not any(t.dtype in FP8_DTYPES for t in stored.values()):
        return stored
    declared = block_size(config)
    out: dict[str, TensorInfo] = {}
    used: set[str] = set()
    for name, info in stored.items():
        if info.dtype not in FP8_DTYPES:
            continue
        scale = next((stored[name + s] for s in SCALE_SUFFIXES if name + s in stored), None)
        if scale is None:
            raise CheckpointError(info.file, f"tensor {name!r} is FP8 without a scale ({name}_scale_inv or {name}_scale): "
                                  "streammerge reads the fine-grained (DeepSeek) and compressed-tensors FP8 layouts")
        if len(info.shape) != 2:
            raise CheckpointError(info.file, f"tensor {name!r}: FP8 of shape {list(info.shape)}; streammerge reads 2-D FP8 weights only")
        if scale.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(scale.file, f"tensor {scale.name!r}: scales of dtype {scale.dtype} (e.g. ue8m0) are not read; "
                                  "dequantize the checkpoint first (transformers: FineGrainedFP8Config(dequantize=True), save_pretrained)")
        block, scheme = _layout(info, scale, declared)
        used.add(scale.name)
        out[name] = QuantTensor(name, "F32", info.shape, info.file, info.offset, info.nbytes + scale.nbytes,
                                weight=info, scale=scale, block=block, scheme=scheme)
    result = {}
    for name, info in stored.items():
        if name in out:
            result[name] = out[name]
        elif name not in used and not name.endswith(ACTIVATION_SCALES):
            result[name] = info
    return result


def _layout(weight: TensorInfo, scale: TensorInfo, declared: tuple[int, int] | None) -> tuple[tuple[int, int], str]:
    rows, cols = weight.shape
    if len(scale.shape) < 2 and math.prod(scale.shape) == 1:
        return (rows, cols), "tensor"
    if scale.shape in ((rows,), (rows, 1)) and rows != -(-rows // (declared or (BLOCK,))[0]):
        return (1, cols), "channel"
    br, bc = declared or (BLOCK, BLOCK)
    if len(scale.shape) == 2 and scale.shape == (-(-rows // br), -(-cols // bc)):
        return (br, bc), "block"
    raise CheckpointError(scale.file, f"tensor {scale.name!r} of shape {list(scale.shape)} does not fit weight {weight.name!r} "
                          f"{list(weight.shape)}: expected per-tensor, per-channel ({rows}, 1) or {br}x{bc} blocks "
                          f"({-(-rows // br)}, {-(-cols // bc)}) (weight_block_size in config.json)")


def scale_rows(info: QuantTensor, r0: int, r1: int) -> tuple[int, int]:
    """The rows of the scale tensor that rows r0..r1 of the weight need."""
    if info.scheme == "tensor":
        return 0, 1
    return r0 // info.block[0], -(-r1 // info.block[0])


@dataclass(frozen=True)
class QuantRows:
    """Rows r0.. of an FP8 weight as stored (a view of the mapped file) and the scale rows they need:
    the compiled kernel dequantizes them as it reads (methods/ckernel.c); every other path calls
    `dequantize` for the float32 rows."""

    info: QuantTensor
    weight: torch.Tensor  # (rows, cols), float8
    scale: torch.Tensor  # the scale tensor's rows `scale_rows` gives
    r0: int

    def dequantize(self) -> torch.Tensor:
        """The rows times their scales, in float32: a new (rows, cols) tensor."""
        out = self.weight.to(torch.float32)
        if out.numel() == 0:
            return out
        grid, first = self.scale_grid()
        if self.info.scheme == "tensor":
            return out.mul_(grid.reshape(()))
        rows, cols = out.shape
        br, bc = self.info.block
        s = grid.repeat_interleave(br, dim=0)[first : first + rows]  # (rows, column blocks): small
        full, rem = divmod(cols, bc)
        if full:  # broadcast over a view of the weight rather than expanding the scales to its size
            out[:, : full * bc].unflatten(1, (full, bc)).mul_(s[:, :full, None])
        if rem:
            out[:, full * bc :].mul_(s[:, full : full + 1])
        return out

    def scale_grid(self) -> tuple[torch.Tensor, int]:
        """The scales as a float32 (scale rows, column blocks) grid, and the row of the grid's first
        row block where these rows start: weight row r's scale column j is grid[(first + r) // br, j // bc]."""
        rows, cols = self.weight.shape
        br, bc = self.info.block
        width = 1 if self.info.scheme != "block" else -(-cols // bc)
        grid = self.scale.to(torch.float32).reshape(-1, width)
        return grid, self.r0 - scale_rows(self.info, self.r0, self.r0 + rows)[0] * br


def decode_table(dtype: torch.dtype) -> torch.Tensor:
    """float32 value of each of the 256 bit patterns of an FP8 dtype (torch's own conversion)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)


# ---- writing FP8 ---------------------------------------------------------------------------------


def scale_name(name: str) -> str:
    """The fine-grained scale tensor's name: X.weight -> X.weight_scale_inv."""
    return name + "_scale_inv"


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether an output tensor can be written as fine-grained FP8: a 2-D linear weight (not an
    embedding or the output head) of whole 128x128 blocks, what transformers' FP8 loader expects."""
    return (len(shape) == 2 and name.endswith(".weight") and shape[0] % BLOCK == 0 and shape[1] % BLOCK == 0
            and not any(m in name for m in ("embed", "wte", "wpe", "lm_head", "shared.weight", "embed_out")))


def quantize_rows(x: torch.Tensor, dst: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Quantizes rows of x (rows × cols, a multiple of 128 rows unless the tensor ends) into `dst` (uint8,
    at least rows·cols bytes; it may be x's own buffer: each 128-row slab is copied before its bytes are
    written, and the FP8 bytes of a slab never reach past the slab's own input bytes) and their
    per-block scales into `scales` (float32, ⌈rows/128⌉ × cols/128). Returns the FP8 view of `dst`."""
    rows, cols = x.shape
    q = dst[: rows * cols].view(torch.float8_e4m3fn).view(rows, cols)
    for i, r in enumerate(range(0, rows, BLOCK)):
        slab = x[r : r + BLOCK].to(torch.float32, copy=True).unflatten(1, (cols // BLOCK, BLOCK))  # (n, blocks, 128): a copy
        amax = slab.abs().amax(dim=(0, 2))
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero block keeps 1
        scales[i] = s
        q[r : r + BLOCK].copy_(slab.div_(s[:, None]).clamp_(-FP8_MAX, FP8_MAX).flatten(1))  # rounds to nearest even
    return q


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole tensor as (FP8 weight, weight_scale_inv), the bytes a merge writes for it."""
    rows, cols = x.shape
    scales = torch.empty(-(-rows // BLOCK), cols // BLOCK, dtype=torch.float32)
    dst = torch.empty(rows * cols, dtype=torch.uint8)
    return quantize_rows(x, dst, scales).clone(), scales


def quantization_config(not_converted: list[str]) -> dict:
    """config.json's quantization_config for the fine-grained layout written (DeepSeek's keys)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": not_converted}
