"""Counter-based DARE keep masks: the same bits on any device, chunking, thread or worker.

The keep/drop decision of one element is a pure function of (seed, model index, tensor name,
flat element index). It is computed with 32-bit unsigned integer arithmetic only, so the CPU
path (numpy) and the device path (torch int64, used on CUDA) give identical bits, and the mask
of a block [start, start + count) is exactly the slice of the whole-tensor mask.

Specification (docs/mask.md has it byte by byte, with golden values):

    key  = first 8 bytes, little-endian, of SHA-256(b"streammerge.dare_mask.v1\\x00"
           + u64le(seed) + u64le(model_index) + u64le(len(name_utf8)) + name_utf8)
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    lo, hi = i & 0xFFFFFFFF, i >> 32            # i = flat element index
    h = fmix32(fmix32(lo ^ k0) ^ hi ^ k1)        # fmix32 = MurmurHash3's 32-bit finalizer
    keep iff h < keep_threshold(density)         # threshold = floor(density * 2**32)

DELLA uses the same key and hash with a threshold per element, floor(p_i * 2**32), where p_i is
the element's keep probability (`keep_mask_varying`).
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading

import numpy as np
import torch

__all__ = ["mask_key", "keep_threshold", "keep_mask", "keep_mask_into", "keep_mask_varying", "hash32"]

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_MAX_INDEX = 1 << 63  # indices are int64: start + count may not exceed this
_DOMAIN = b"streammerge.dare_mask.v1\x00"

# MurmurHash3 fmix32 constants.
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
_C1_NP = np.uint32(_C1)
_C2_NP = np.uint32(_C2)

# numpy path: blocks of 2**16 elements aligned to multiples of 2**16, so that bits 16..31 of
# the index are constant within a block (see _fill_numpy). 64K uint32 = 256 KiB per buffer:
# two buffers fit in the 1 MiB L2 of this machine's cores, and 2**16 measured fastest.
_BLOCK_BITS = 16
_BLOCK = 1 << _BLOCK_BITS
_LOW16 = np.arange(_BLOCK, dtype=np.uint32)
_LOW16.flags.writeable = False

# torch path: elements per step; bounds the int64 temporaries to a few x 32 MiB.
_TORCH_STEP = 1 << 22

_scratch = threading.local()  # per-thread numpy buffers: numpy releases the GIL in ufuncs


def _fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int (the reference, one value at a time)."""
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 13
    x = (x * _C2) & _M32
    x ^= x >> 16
    return x


def mask_key(seed: int, model_index: int, tensor_name: str) -> int:
    """Derive the 64-bit mask key of one tensor of one model.

    The message is b"streammerge.dare_mask.v1\\x00", then seed, model_index and the byte length of
    the UTF-8 encoded name as unsigned 64-bit little-endian integers, then the name's UTF-8
    bytes (no Unicode normalization). The key is the first 8 bytes of its SHA-256 digest read as
    a little-endian unsigned integer. The length prefix makes the encoding unambiguous.

    Args:
        seed: the merge seed, 0 <= seed < 2**64.
        model_index: which fine-tuned model (0-based), 0 <= model_index < 2**64.
        tensor_name: the tensor's name as stored in the checkpoint, verbatim.

    Returns:
        The key, an int in [0, 2**64).
    """
    for label, value in (("seed", seed), ("model_index", model_index)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _M64:
            raise ValueError(f"{label} must be an int in [0, 2**64), got {value!r}")
    if not isinstance(tensor_name, str):
        raise TypeError(f"tensor_name must be a str, got {type(tensor_name).__name__}")
    name = tensor_name.encode("utf-8")
    message = _DOMAIN + struct.pack("<QQQ", seed, model_index, len(name)) + name
    return int.from_bytes(hashlib.sha256(message).digest()[:8], "little")


def keep_threshold(density: float) -> int:
    """Integer threshold of a density: an element is kept iff its hash32 < threshold.

    The threshold is floor(density * 2**32), computed exactly (scaling a float by a power of two
    is exact), so P(keep) = threshold / 2**32 is the largest multiple of 2**-32 not above
    density. Density 1 gives 2**32 (keep all), density 0 gives 0 (keep none).

    Args:
        density: the keep probability, 1 - p for drop rate p, in [0, 1].

    Returns:
        The threshold, an int in [0, 2**32].
    """
    d = float(density)
    if not 0.0 <= d <= 1.0:  # also rejects NaN
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return math.floor(d * 4294967296.0)


def hash32(key: int, index: int) -> int:
    """Reference hash of one element, in plain Python (slow; for tests and re-implementers).

    Args:
        key: the mask key from mask_key, in [0, 2**64).
        index: the flat element index, in [0, 2**64).

    Returns:
        The 32-bit hash; the element is kept iff it is < keep_threshold(density).
    """
    _check_key(key)
    if not 0 <= index <= _M64:
        raise ValueError(f"index must be in [0, 2**64), got {index!r}")
    h = _fmix32((index & _M32) ^ (key & _M32))
    return _fmix32(h ^ (index >> 32) ^ (key >> 32))


def keep_mask(
    key: int,
    start: int,
    count: int,
    density: float,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Keep mask of the flat elements start .. start + count - 1 of one tensor.

    Element i of the result is True iff hash32(key, start + i) < keep_threshold(density); it
    depends only on (key, start + i), so any split of a range into blocks gives the same bits.

    Args:
        key: the mask key from mask_key.
        start: first flat element index, >= 0.
        count: number of elements, >= 0, with start + count <= 2**63.
        density: keep probability in [0, 1].
        device: where to build the mask; CPU (the default) uses the numpy path, any other
            device the torch path. Both give the same bits.

    Returns:
        A bool tensor of shape [count] on device.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    out = torch.empty(count, dtype=torch.bool, device=device)
    keep_mask_into(key, start, out, density)
    return out


def keep_mask_into(key: int, start: int, out: torch.Tensor, density: float) -> None:
    """Fill a preallocated contiguous bool tensor with the keep mask (no allocation on CPU).

    The elements of out, in memory order, receive the mask of flat indices
    start .. start + out.numel() - 1, exactly as keep_mask would return it.

    Args:
        key: the mask key from mask_key.
        start: first flat element index, >= 0, with start + out.numel() <= 2**63.
        out: a contiguous bool tensor, any shape, on any device; CPU uses the numpy path.
        density: keep probability in [0, 1].

    Returns:
        None; out is written in place.
    """
    _check_key(key)
    threshold = keep_threshold(density)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        raise TypeError("out must be a torch.bool tensor")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    _check_range(start, out.numel())
    flat = out.view(-1)
    if threshold == 0 or threshold == 1 << 32:  # no hashing needed: keep none / keep all
        flat.fill_(threshold != 0)
    elif out.device.type == "cpu":
        _fill_numpy(key, start, flat.numpy(), threshold)
    else:
        _fill_torch(key, start, flat, threshold)


def keep_mask_varying(key: int, start: int, thresholds: torch.Tensor) -> torch.Tensor:
    """Keep mask with one threshold per element (DELLA's rank-dependent keep probabilities).

    Element i of the result is True iff hash32(key, start + i) < thresholds[i] (flat order), so as
    for keep_mask any split of a range into blocks gives the same bits, on any device.

    Args:
        key: the mask key from mask_key.
        start: flat index of the first element, >= 0.
        thresholds: int64 tensor of values in [0, 2**32], any shape, on any device.

    Returns:
        A bool tensor of thresholds' shape and device.
    """
    _check_key(key)
    if not isinstance(thresholds, torch.Tensor) or thresholds.dtype != torch.int64:
        raise TypeError("thresholds must be a torch.int64 tensor")
    flat = thresholds.reshape(-1)
    _check_range(start, flat.numel())
    out = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    if flat.device.type == "cpu":
        _fill_numpy(key, start, out.numpy(), 0, flat.contiguous().numpy())
        return out.view(thresholds.shape)
    _fill_torch(key, start, out, flat)
    return out.view(thresholds.shape)


def _check_key(key: int) -> None:
    """Raise ValueError unless key is an int in [0, 2**64)."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _M64:
        raise ValueError(f"key must be an int in [0, 2**64), got {key!r}")


def _check_range(start: int, count: int) -> None:
    """Raise ValueError unless [start, start + count) lies within the int64 index range."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if start + count > _MAX_INDEX:
        raise ValueError(f"start + count must be <= 2**63, got {start} + {count}")


def _buffers() -> tuple[np.ndarray, np.ndarray]:
    """This thread's two uint32 scratch buffers of _BLOCK elements (allocated once per thread)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = (np.empty(_BLOCK, dtype=np.uint32), np.empty(_BLOCK, dtype=np.uint32))
        _scratch.bufs = bufs
    return bufs


def _fill_numpy(key: int, start: int, out: np.ndarray, threshold: int, thresholds: np.ndarray | None = None) -> None:
    """CPU hot path: write (hash32 < threshold) for indices start.. into the 1-D bool array out.

    Computes the spec with 11-13 in-place numpy uint32 passes per 2**16-element block instead of
    the 20 a literal transcription needs, using three exact identities of 32-bit arithmetic:

    1. Right shift distributes over xor, and within a block aligned to 2**16 the bits 16..31 of
       lo (call them H) are constant. So the first xorshift of fmix32(lo ^ k0) is
       v ^ (v >> 16) = L ^ s with L = lo & 0xFFFF (a fixed arange) and the per-block scalar
       s = (H << 16 | H) ^ k0 ^ (k0 >> 16): one xor instead of arange + 3 passes.
    2. y -> y ^ (y >> 16) is an involution on 32 bits. The last step of the first fmix32 and
       the first step of the second, around "^ c" with c = hi ^ k1, reduce to z ^ c ^ (c >> 16),
       a single xor with a scalar.
    3. If threshold is a multiple of 2**16, h < threshold iff (h >> 16) < (threshold >> 16), and
       the final xorshift does not change h >> 16: the last xorshift is skipped.

    Args:
        key: the mask key.
        start: first flat element index.
        out: 1-D bool array (usually a zero-copy view of a torch tensor) to fill.
        threshold: in (0, 2**32); the callers handle 0 and 2**32.
        thresholds: int64 per-element thresholds (DELLA) in place of `threshold`, same length as out.

    Returns:
        None; out is written in place.
    """
    x_buf, tmp_buf = _buffers()
    k0, k1 = key & _M32, key >> 32
    k0_shifted = k0 ^ (k0 >> 16)
    t = np.uint32(threshold)
    final_shift = thresholds is not None or threshold & 0xFFFF != 0
    end = start + out.shape[0]
    i = start
    while i < end:
        offset = i & (_BLOCK - 1)
        n = min(end - i, _BLOCK - offset)
        x, tmp = x_buf[:n], tmp_buf[:n]
        high = (i >> _BLOCK_BITS) & 0xFFFF  # bits 16..31 of the index
        # fmix32 #1 on lo ^ k0; its first xorshift folded into the scalar (identity 1).
        s = np.uint32(((high << 16) | high) ^ k0_shifted)
        np.bitwise_xor(_LOW16[offset : offset + n], s, out=x)
        np.multiply(x, _C1_NP, out=x)  # uint32 arrays wrap mod 2**32, as the spec wants
        np.right_shift(x, 13, out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        np.multiply(x, _C2_NP, out=x)
        # Last xorshift of #1, ^ (hi ^ k1), first xorshift of #2 (identity 2).
        c = ((i >> 32) ^ k1) & _M32
        np.bitwise_xor(x, np.uint32(c ^ (c >> 16)), out=x)
        # Rest of fmix32 #2.
        np.multiply(x, _C1_NP, out=x)
        np.right_shift(x, 13, out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        np.multiply(x, _C2_NP, out=x)
        if final_shift:  # identity 3 makes it unnecessary otherwise
            np.right_shift(x, 16, out=tmp)
            np.bitwise_xor(x, tmp, out=x)
        pos = i - start
        np.less(x, t if thresholds is None else thresholds[pos : pos + n], out=out[pos : pos + n])
        i += n


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without any int64 overflow.

    c is split into 16-bit halves: x * c_lo < 2**48 and x * c_hi < 2**48, and only the low 16
    bits of x * c_hi survive the shift by 16 modulo 2**32.
    """
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & _M32


def _fmix32_torch(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 fmix32 on an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)  # x >= 0, so the arithmetic shift is a logical one
    x = _mul32(x, _C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def _hash32_torch(key: int, index: torch.Tensor) -> torch.Tensor:
    """hash32 of an int64 tensor of flat indices (>= 0), as int64 values in [0, 2**32).

    A literal transcription of the spec in exact int64 arithmetic; pure tensor ops with no
    data-dependent control flow, so it runs on any device.

    Args:
        key: the mask key.
        index: int64 tensor of flat element indices.

    Returns:
        An int64 tensor of the same shape holding the 32-bit hashes.
    """
    return _fmix32_torch(_fmix32_torch((index & _M32) ^ (key & _M32)) ^ (index >> 32) ^ (key >> 32))


def _fill_torch(key: int, start: int, out: torch.Tensor, threshold: int | torch.Tensor) -> None:
    """Device path: write (hash32 < threshold) for indices start.. into the 1-D bool tensor out.

    Args:
        key: the mask key.
        start: first flat element index.
        out: 1-D bool tensor on any device.
        threshold: in [0, 2**32]; or a 1-D int64 tensor of one threshold per element of out.

    Returns:
        None; out is written in place.
    """
    count = out.shape[0]
    for pos in range(0, count, _TORCH_STEP):
        n = min(_TORCH_STEP, count - pos)
        # arange(n) + offset rather than arange(a, b): b may be 2**63, which int64 cannot hold.
        index = torch.arange(n, dtype=torch.int64, device=out.device) + (start + pos)
        limit = threshold[pos : pos + n] if isinstance(threshold, torch.Tensor) else threshold
        torch.lt(_hash32_torch(key, index), limit, out=out[pos : pos + n])
