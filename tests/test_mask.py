"""Tests of the counter-based DARE keep mask (streammerge/mask.py, spec in docs/mask.md)."""

from __future__ import annotations

import hashlib
import math
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from streammerge.methods import mask as m
from streammerge.methods.mask import (
    hash32,
    keep_mask,
    keep_mask_into,
    keep_threshold,
    mask_key,
)

DOWN = "model.layers.0.mlp.down_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
T_HALF = 1 << 31  # keep_threshold(0.5)
T_TENTH = 429496729  # keep_threshold(0.1)

# (seed, model_index, name) -> key, as in docs/mask.md.
GOLDEN_KEYS = [
    (0, 0, "lm_head.weight", 0x76863E842284B194),
    (42, 0, DOWN, 0xC52898D381C26DE8),
    (42, 1, DOWN, 0x17C3568405738AE3),
    (42, 2, DOWN, 0x971B7F8B1D95738C),
    (42, 1, UP, 0x328432070FB39395),
    (2**64 - 1, 7, "\u00fc.weight", 0xCA0E91AFF2CD21F1),
    (12345, 0, "", 0x04EBFC2C4DAA5158),
]

# (seed, model_index, name, index) -> hash32; keep at 0.5 = hash < 2**31, at 0.1 = hash < T_TENTH.
GOLDEN_HASHES = [
    (0, 0, "lm_head.weight", 0, 0x841A4F61),
    (0, 0, "lm_head.weight", 1, 0x2E1F6ED3),
    (0, 0, "lm_head.weight", 2**40 + 12345, 0x07A888E1),
    (42, 0, DOWN, 0, 0x02013D51),
    (42, 0, DOWN, 1, 0xD712FDB7),
    (42, 0, DOWN, 65535, 0x68DDB50B),
    (42, 1, DOWN, 0, 0x288DBAF0),
    (42, 1, DOWN, 1, 0x577E030C),
    (42, 1, DOWN, 65535, 0x2A7A90B4),
    (42, 1, DOWN, 65536, 0x61DB570B),
    (42, 1, DOWN, 2**32 - 1, 0xCAD3DF72),
    (42, 1, DOWN, 2**32, 0x0AA14225),
    (42, 1, DOWN, 2**40 + 12345, 0x9787FC73),
    (42, 1, DOWN, 2**63 - 1, 0x02FD7520),
    (42, 2, DOWN, 0, 0x938A8EB2),
    (42, 2, DOWN, 65535, 0x024D40F1),
    (42, 1, UP, 0, 0x9CF16649),
    (42, 1, UP, 65536, 0x5BF088A2),
    (2**64 - 1, 7, "\u00fc.weight", 2**32 - 1, 0x164FB391),
    (12345, 0, "", 2**63 - 1, 0x0011C57D),
]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two bool masks."""
    a, b = a.double(), b.double()
    cov = ((a - a.mean()) * (b - b.mean())).mean()
    return float(cov / (a.std(unbiased=False) * b.std(unbiased=False)))


def _torch_path(key: int, start: int, count: int, density: float) -> torch.Tensor:
    """The device (torch int64) implementation, forced on CPU."""
    out = torch.empty(count, dtype=torch.bool)
    m._fill_torch(key, start, out, keep_threshold(density))
    return out


def test_fmix32_is_murmur3_finalizer() -> None:
    # MurmurHash3_x86_32 of the empty input with seed s is fmix32(s): published test vectors.
    assert m._fmix32(0) == 0
    assert m._fmix32(1) == 0x514E28B7
    assert m._fmix32(0xFFFFFFFF) == 0x81F16F39


def test_key_derivation_bytes() -> None:
    message = (
        b"streammerge.dare_mask.v1\x00"
        + (42).to_bytes(8, "little")
        + (1).to_bytes(8, "little")
        + (35).to_bytes(8, "little")
        + DOWN.encode()
    )
    digest = hashlib.sha256(message).hexdigest()
    assert digest.startswith("e38a73058456c317")
    key = int.from_bytes(bytes.fromhex(digest[:16]), "little")
    assert mask_key(42, 1, DOWN) == key == 0x17C3568405738AE3
    assert struct.pack("<Q", mask_key(42, 1, DOWN)).hex() == "e38a73058456c317"


@pytest.mark.parametrize("seed, model_index, name, key", GOLDEN_KEYS)
def test_golden_keys(seed: int, model_index: int, name: str, key: int) -> None:
    assert mask_key(seed, model_index, name) == key


@pytest.mark.parametrize("seed, model_index, name, index, expected", GOLDEN_HASHES)
def test_golden_hashes(seed: int, model_index: int, name: str, index: int, expected: int) -> None:
    key = mask_key(seed, model_index, name)
    assert hash32(key, index) == expected
    assert m._hash32_torch(key, torch.tensor([index])).item() == expected
    for density, threshold in ((0.5, T_HALF), (0.1, T_TENTH)):
        bit = expected < threshold
        assert keep_mask(key, index, 1, density).item() is bit
        assert _torch_path(key, index, 1, density).item() is bit


def test_golden_keep_bits_table() -> None:
    # The keep columns of the docs table, as (key seed/model/name, index) -> (keep 0.5, keep 0.1).
    key = mask_key(42, 1, DOWN)
    indices = [0, 1, 65535, 65536, 2**32 - 1, 2**32, 2**40 + 12345, 2**63 - 1]
    assert [int(keep_mask(key, i, 1, 0.5).item()) for i in indices] == [1, 1, 1, 1, 0, 1, 0, 1]
    assert [int(keep_mask(key, i, 1, 0.1).item()) for i in indices] == [0, 0, 0, 0, 0, 1, 0, 1]
    # The bit strings of the docs, on both paths.
    for start, density, bits in (
        (0, 0.5, "11010001100011001010001011110111"),
        (0, 0.1, "00010000000010000000000000010100"),
        (2**32 - 16, 0.5, "01111100111000101011001111001010"),
    ):
        for mask in (keep_mask(key, start, 32, density), _torch_path(key, start, 32, density)):
            assert "".join(str(int(b)) for b in mask.tolist()) == bits


def test_thresholds() -> None:
    assert keep_threshold(0.0) == 0
    assert keep_threshold(1.0) == 2**32
    assert keep_threshold(1) == 2**32
    assert keep_threshold(0.5) == T_HALF
    assert keep_threshold(0.1) == T_TENTH  # floor(429496729.6000000238...)
    assert keep_threshold(2**-40) == 0
    for bad in (-0.1, 1.0000001, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            keep_threshold(bad)


def test_density_one_keeps_all_zero_keeps_none() -> None:
    key = mask_key(1, 0, "w")
    assert bool(keep_mask(key, 2**32 - 10, 1000, 1.0).all())
    assert not bool(keep_mask(key, 2**32 - 10, 1000, 0.0).any())
    # The smallest non-zero threshold keeps only hashes equal to 0: none here.
    assert not bool(keep_mask(key, 0, 10000, 2**-32).any())


def test_chunk_invariance() -> None:
    rng = random.Random(0)
    key = mask_key(7, 3, UP)
    for start in (0, 12345, 2**32 - 200_000, 2**63 - 300_000):
        count = 300_000
        for density in (0.1, 0.5, 0.9):
            whole = keep_mask(key, start, count, density)
            cuts = sorted(rng.sample(range(1, count), 25))
            bounds = list(zip([0, *cuts], [*cuts, count]))
            parts = [keep_mask(key, start + a, b - a, density) for a, b in bounds]
            assert torch.equal(torch.cat(parts), whole)
            # Filling slices of one preallocated buffer gives the same bits too.
            out = torch.empty(count, dtype=torch.bool)
            for a, b in bounds:
                keep_mask_into(key, start + a, out[a:b], density)
            assert torch.equal(out, whole)


def test_keep_mask_into_any_shape_memory_order() -> None:
    key = mask_key(5, 0, "w")
    out = torch.empty(64, 1000, dtype=torch.bool)
    keep_mask_into(key, 999, out, 0.3)
    assert torch.equal(out.view(-1), keep_mask(key, 999, 64_000, 0.3))


@pytest.mark.parametrize("density", [0.001, 0.1, 0.3, 0.5, 0.9, 0.99])
def test_kept_fraction(density: float) -> None:
    n = 1 << 22
    kept = keep_mask(mask_key(0, 1, DOWN), 2**32 - n // 2, n, density).sum().item()
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 5 * sigma


def test_masks_independent_across_seed_model_name_and_neighbours() -> None:
    n = 1 << 21
    limit = 5 / math.sqrt(n)
    base = keep_mask(mask_key(0, 0, DOWN), 0, n, 0.5)
    for other in (mask_key(1, 0, DOWN), mask_key(0, 1, DOWN), mask_key(0, 0, UP)):
        mask = keep_mask(other, 0, n, 0.5)
        assert not torch.equal(mask, base)
        assert abs(_corr(base, mask)) < limit
    # Neighbouring elements of one mask are uncorrelated too.
    for lag in (1, 2, 65536):
        assert abs(_corr(base[:-lag], base[lag:])) < 5 / math.sqrt(n - lag)


def test_torch_path_equals_numpy_path() -> None:
    rng = random.Random(1234)
    starts = [0, 1, 65535, 2**32 - 7_000, 2**32 + 3, 2**33 - 5_000, 2**48 + 77, 2**63 - 20_000]
    for trial in range(48):
        key = rng.getrandbits(64)
        if trial < 2 * len(starts):
            start = starts[trial % len(starts)]
        else:
            start = rng.randrange(2**63 - 20_000)
        count = rng.randrange(1, 20_000)
        for density in (0.5, 0.1, rng.random()):  # 0.5: final-xorshift shortcut; others: full hash
            expected = _torch_path(key, start, count, density)
            assert torch.equal(keep_mask(key, start, count, density), expected)
        # Whole 32-bit hash values, not only the keep bits, against the plain-Python reference.
        picks = [start + rng.randrange(count) for _ in range(8)]
        assert m._hash32_torch(key, torch.tensor(picks)).tolist() == [hash32(key, i) for i in picks]


def test_range_ends_at_int64_limit() -> None:
    key = mask_key(3, 0, "w")
    start = 2**63 - 70_000
    whole = keep_mask(key, start, 70_000, 0.4)
    assert torch.equal(whole, _torch_path(key, start, 70_000, 0.4))
    assert whole[-1].item() == (hash32(key, 2**63 - 1) < keep_threshold(0.4))


def test_threads_give_same_bits() -> None:
    key = mask_key(9, 2, DOWN)
    n, step = 1_000_003, 65_000
    out = torch.empty(n, dtype=torch.bool)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda a: keep_mask_into(key, a, out[a : a + step], 0.2), range(0, n, step)))
    assert torch.equal(out, keep_mask(key, 0, n, 0.2))


def test_argument_errors() -> None:
    key = mask_key(0, 0, "w")
    with pytest.raises(ValueError):
        mask_key(-1, 0, "w")
    with pytest.raises(ValueError):
        mask_key(0, 2**64, "w")
    with pytest.raises(TypeError):
        mask_key(0, 0, b"w")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        keep_mask(2**64, 0, 1, 0.5)
    with pytest.raises(ValueError):
        keep_mask(key, -1, 1, 0.5)
    with pytest.raises(ValueError):
        keep_mask(key, 2**63 - 1, 2, 0.5)
    with pytest.raises(ValueError):
        keep_mask(key, 0, -1, 0.5)
    with pytest.raises(TypeError):
        keep_mask_into(key, 0, torch.empty(4, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError):
        keep_mask_into(key, 0, torch.empty(4, 4, dtype=torch.bool).t(), 0.5)
    assert keep_mask(key, 5, 0, 0.5).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    rng = random.Random(99)
    for trial in range(20):
        key = rng.getrandbits(64)
        start = rng.choice([0, 2**32 - 3_000_000, rng.randrange(2**62)])
        count = rng.randrange(1, 6_000_000)  # crosses the torch path's 2**22 step
        for density in (0.5, 0.1, rng.random()):
            cpu = keep_mask(key, start, count, density)
            gpu = keep_mask(key, start, count, density, device="cuda")
            assert gpu.device.type == "cuda"
            assert torch.equal(gpu.cpu(), cpu)
