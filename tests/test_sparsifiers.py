"""Model Breadcrumbs and DELLA (mergekit's breadcrumbs, breadcrumbs_ties, della, della_linear):
an independent float32 reference written here, the DELLA mask's spec and statistics, and the same
bytes for any row-block size and thread count. (Bit-exactness with mergekit: test_mergekit_compat.py.)"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import shard_hashes, ties_disjoint_mean
from safetensors.torch import load_file

from streammerge import ConfigError, MergeConfig, ModelSpec, merge, plan
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.methods import kernels, ops
from streammerge.methods.mask import hash32, keep_mask_varying, mask_key
from streammerge.pipeline.passes import Block, NumpyBackend, TorchBackend

SHAPE = TinyLlama(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=40)
NEW = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
WEIGHTS, DENSITIES, GAMMAS, EPSILONS = (0.6, 0.4, 0.5), (0.5, 0.7, 0.3), (0.05, 0.1, 0.0), (0.1, 0.2, 0.15)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsifiers")
    base = random_state(SHAPE, seed=1)
    save_checkpoint(base, root / "base", shards=2)
    fts = [finetune_of(base, seed=20 + i, scale=0.01) for i in range(3)]
    for i, ft in enumerate(fts):
        # quantized deltas: many exact |τ| ties, so the tie rule matters
        ft = {n: (base[n].float() + torch.round((t.float() - base[n].float()) * 256) / 256).to(t.dtype) for n, t in ft.items()}
        fts[i] = ft
        save_checkpoint(ft, root / f"ft{i}", shards=1)
    return root, base, fts


def _config(root, method, semantics="default", **params) -> MergeConfig:
    extra = "gamma" if method.startswith("breadcrumbs") else "epsilon"
    values = GAMMAS if extra == "gamma" else EPSILONS
    models = tuple(ModelSpec(str(root / f"ft{i}"), {"weight": WEIGHTS[i], "density": DENSITIES[i], extra: values[i]})
                   for i in range(3))
    return MergeConfig(method=method, base=str(root / "base"), models=models, parameters=params, seed=5, semantics=semantics,
                       dtype="bfloat16" if semantics == "mergekit" else None)


def _out(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return {k: v for shard in set(index["weight_map"].values()) for k, v in load_file(folder / shard).items()}


# ---- independent reference: whole tensors, float32, written from the definitions -------------


def _band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs as mergekit defines the band, ties by lower flat index first (descending |τ|)."""
    n = tau.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_top = min(n_top, n - target)
    order = torch.sort(tau.flatten().abs(), descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_top : n_top + target]] = True
    return tau * keep.view(tau.shape)


def _della(tau: torch.Tensor, density: float, eps: float, key: int) -> torch.Tensor:
    """MagPrune: rank within rows, p linear in the rank, the hash reference per element, kept ÷ p."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    out = torch.zeros_like(rows)
    cols = rows.shape[1]
    for r in range(rows.shape[0]):
        order = sorted(range(cols), key=lambda j: (abs(rows[r, j].item()), j))
        for rank, j in enumerate(order):
            p = (density - eps) + rank / (cols - 1) * 2 * eps
            if hash32(key, r * cols + j) < int(p * 2**32):
                out[r, j] = rows[r, j] / torch.tensor(p, dtype=torch.float64).float()
    return out.view(tau.shape)


def _reference(method, name, base, fts) -> torch.Tensor:
    b = base.float()
    taus = [ft.float() - b for ft in fts]
    if method.startswith("breadcrumbs"):
        taus = [_band(t, d, g) for t, d, g in zip(taus, DENSITIES, GAMMAS)]
    else:
        taus = [_della(t, d, e, mask_key(5, i, name)) for i, (t, d, e) in enumerate(zip(taus, DENSITIES, EPSILONS))]
    if method in ("breadcrumbs_ties", "della"):
        return b + ties_disjoint_mean(taus, WEIGHTS)
    return b + sum(w * t for w, t in zip(WEIGHTS, taus))


@pytest.mark.parametrize("method", NEW)
def test_matches_independent_float32_reference(tmp_path, models, method):
    root, base, fts = models
    merge(_config(root, method), tmp_path / "out")
    out = _out(tmp_path / "out")
    names = list(base) if method.startswith("breadcrumbs") else [n for n in base if "layers.0" in n or "norm" in n]
    for name in names:  # (DELLA's per-element Python reference is slow: a subset of tensors)
        expected = _reference(method, name, base[name], [f[name] for f in fts]).to(torch.bfloat16)
        torch.testing.assert_close(out[name].float(), expected.float(), rtol=2**-7, atol=1e-6, msg=name)
        assert (out[name] == expected).float().mean() > 0.99, name


@pytest.mark.parametrize("semantics", ["default", "mergekit"])
@pytest.mark.parametrize("method", NEW)
def test_same_bytes_for_any_row_blocks_and_threads(tmp_path, models, method, semantics):
    root, _, _ = models
    cfg = _config(root, method, semantics, rescale=True)
    merge(cfg, tmp_path / "whole", threads=1)
    merge(cfg, tmp_path / "blocks", max_memory=2000, threads=2)  # a few rows per block
    assert shard_hashes(tmp_path / "whole") == shard_hashes(tmp_path / "blocks")


# ---- DELLA's mask -------------------------------------------------------------------------


def test_varying_threshold_mask_is_the_hash_below_each_threshold():
    key = mask_key(42, 1, "model.layers.0.mlp.down_proj.weight")
    gen = torch.Generator().manual_seed(0)
    thresholds = torch.randint(0, 2**32 + 1, (3, 700), generator=gen, dtype=torch.int64)
    whole = keep_mask_varying(key, 1000, thresholds)
    expected = torch.tensor([hash32(key, 1000 + i) < int(t) for i, t in enumerate(thresholds.flatten())]).view(3, 700)
    assert torch.equal(whole, expected)
    split = torch.cat([keep_mask_varying(key, 1000 + a, thresholds.flatten()[a:b]) for a, b in [(0, 5), (5, 1024), (1024, 2100)]])
    assert torch.equal(split, whole.flatten())
    # golden bits: seed 42, model 1, down_proj, indices 0..7 at p = 0.5 (same as DARE at density 0.5)
    half = keep_mask_varying(key, 0, torch.full((8,), 2**31, dtype=torch.int64))
    assert half.tolist() == [hash32(key, i) < 2**31 for i in range(8)] == [True, True, False, True, False, False, False, True]


def test_della_probabilities_rank_magnitudes_within_rows():
    delta = torch.tensor([[0.3, -0.1, 0.0, -0.3], [1.0, 2.0, 3.0, 4.0]])
    p = ops.della_probabilities(delta, 0.5, 0.15)
    # row 0 by |τ|: 0.0 < 0.1 < 0.3 = 0.3 (tie: lower index first) -> ranks 2, 1, 0, 3; p = 0.35 + r·0.1
    assert torch.allclose(p, torch.tensor([[0.55, 0.45, 0.35, 0.65], [0.35, 0.45, 0.55, 0.65]], dtype=torch.float64))
    assert p.dtype == torch.float64
    assert ops.della_probabilities(torch.tensor([[5.0], [6.0]]), 0.5, 0.1).tolist() == [[0.5], [0.5]]  # one column: p = density
    assert ops.keep_thresholds(torch.tensor([0.5, 1.0, 0.0])).tolist() == [2**31, 2**32, 0]


def test_della_keeps_large_magnitudes_more_often_and_is_unbiased():
    # One row of 4096 ranks; 64 keys: the kept share follows p, and E[τ̂] = τ.
    tau = torch.linspace(0.001, 1.0, 4096).view(1, -1)
    p = ops.della_probabilities(tau, 0.4, 0.2)
    kept = torch.stack([keep_mask_varying(mask_key(s, 0, "t"), 0, ops.keep_thresholds(p)) for s in range(64)]).double().view(64, -1)
    low, high = kept[:, :1024].mean().item(), kept[:, -1024:].mean().item()
    assert abs(low - 0.25) < 0.02 and abs(high - 0.55) < 0.02
    assert abs(kept.mean().item() - 0.4) < 0.01
    estimate = (kept * tau.double().view(-1) / p.view(-1)).mean(dim=0)
    assert abs(estimate.sum().item() / tau.double().sum().item() - 1) < 0.01


def test_della_with_injected_masks_is_tau_times_mask_over_p(tmp_path, models, inject_masks):
    root, base, fts = models
    gen = torch.Generator().manual_seed(3)
    masks = {}

    def mask_of(i, name, start, count):
        if (i, name) not in masks:
            masks[i, name] = torch.rand(base[name].numel(), generator=gen) < 0.5
        return masks[i, name][start : start + count]

    inject_masks(mask_of)
    merge(_config(root, "della_linear"), tmp_path / "out")
    out = _out(tmp_path / "out")
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        b = base[name].float()
        merged = b.clone()
        for i, ft in enumerate(fts):
            tau = ft[name].float() - b
            p = ops.della_probabilities(tau, DENSITIES[i], EPSILONS[i]).float()
            merged += WEIGHTS[i] * (tau * masks[i, name].view(tau.shape) / p)
        torch.testing.assert_close(out[name].float(), merged.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)


# ---- validation ---------------------------------------------------------------------------


def test_epsilon_must_keep_probabilities_inside_0_1(tmp_path, models):
    root, _, _ = models
    cfg = _config(root, "della")
    bad = MergeConfig(**{**cfg.__dict__, "models": (ModelSpec(str(root / "ft0"), {"weight": 1.0, "density": 0.9, "epsilon": 0.2}),)})
    with pytest.raises(ConfigError, match=r"ft0: tensor '.*': density 0.9 ± epsilon 0.2 must lie in \(0, 1\)"):
        merge(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"epsilon must be in \[0, 0.5\)"):
        MergeConfig(**{**cfg.__dict__, "parameters": {"epsilon": 0.7}}).validate()
    with pytest.raises(ConfigError, match=r"gamma \(the share of largest \|delta\| dropped\) must be in \[0, 1\]"):
        MergeConfig(**{**_config(root, "breadcrumbs").__dict__, "parameters": {"gamma": -0.1}}).validate()
    with pytest.raises(ConfigError, match="semantics: peft has no della method"):
        MergeConfig(**{**cfg.__dict__, "semantics": "peft"}).validate()


# ---- DELLA in the numpy chunk kernel: the torch path's bytes --------------------------------

# shape, base dtype, fine-tunes' dtype. The kernel's chunks hold the most whole rows that fit in
# 65536 elements: 32 rows of 2048 (140 rows leave a partial chunk), 21 of 3000, one of 65536. Two
# threads split tensors above 4 chunks (the 2048- and 65536-wide ones) into row-aligned ranges.
KERNEL_SHAPES = [
    ((5000,), torch.bfloat16, torch.bfloat16),  # 1-D: one row
    ((), torch.float32, torch.float32),  # a scalar: one row of one element, p = density
    ((7, 33), torch.float32, torch.float32),
    ((140, 2048), torch.bfloat16, torch.bfloat16),
    ((50, 3000), torch.float16, torch.float16),
    ((5, 65536), torch.bfloat16, torch.bfloat16),
    ((4, 6, 5), torch.bfloat16, torch.float32),  # 3-D: rows of 30; mixed input dtypes
]
# per model: (density, epsilon); density 1 leaves a model's τ as it is, epsilon 0 gives every rank p = density
KERNEL_PARAMS = [((0.5, 0.1), (0.3, 0.2), (0.9, 0.05)), ((0.7, 0.0), (1.0, 0.15), (0.2, 0.15))]


def _quantized_models(shape, base_dtype, ft_dtype, seed):
    """A base and 3 fine-tunes whose τ are multiples of 2^-9 in a narrow range: many exact |τ| ties,
    of equal and of opposite signs, and zeros."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=gen) * 0.02).to(base_dtype)
    fts = [(base.float() + torch.randint(-6, 7, shape, generator=gen) / 512).to(ft_dtype) for _ in range(3)]
    return base, fts


@pytest.mark.parametrize("rescale", ["inverse", "none"])
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(("shape", "base_dtype", "ft_dtype"), KERNEL_SHAPES, ids=lambda v: str(v))
def test_della_numpy_kernel_gives_the_torch_paths_bytes(shape, base_dtype, ft_dtype, method, rescale):
    base, fts = _quantized_models(shape, base_dtype, ft_dtype, seed=7)
    row = base.numel() if len(shape) < 2 else base[0].numel()
    bits = torch.int32 if base_dtype == torch.float32 else torch.int16
    n_rows = shape[0] if shape else 1
    for params in KERNEL_PARAMS:
        opts = ops.MergeOptions(method=method, rescale=rescale)
        spec = ops.TensorSpec(opts=opts, weights=(0.6, -0.3, 0.5), lam=0.8, dare=False, keys=tuple(mask_key(5, i, "t") for i in range(3)),
                              densities=tuple(d for d, _ in params), dare_scales=(1.0,) * 3, trims=(None,) * 3,
                              epsilons=tuple(e for _, e in params), della_row=row)
        # the whole tensor, and a block of rows from the middle (its mask starts at its flat index)
        for r0, r1 in [(0, n_rows)] + ([(n_rows // 3, n_rows)] if len(shape) >= 2 else []):
            rows = [t[r0:r1] if shape else t for t in (base, *fts)]
            block = Block(r0, r1, r0 * row, rows[0], rows[1:], 0)
            numel = rows[0].numel()
            expected = torch.empty(numel, dtype=base_dtype)
            TorchBackend(torch.float32).merge(block, spec, expected)
            for threads in (1, 2):
                got = torch.empty(numel, dtype=base_dtype)
                with ThreadPoolExecutor(threads) as pool:
                    NumpyBackend(pool if threads > 1 else None).merge(block, spec, got)
                assert torch.equal(got.view(bits), expected.view(bits)), (params, r0, threads)


def test_della_rows_longer_than_a_chunk_stay_on_torch_in_the_plan_and_the_engine(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 64, generator=gen).bfloat16(), "long": torch.randn(kernels.CHUNK + 1, generator=gen).bfloat16()}
    save_checkpoint(base, tmp_path / "base", shards=1)
    for i in (1, 2):
        save_checkpoint({n: (t.float() + torch.randn(t.shape, generator=gen) * 0.01).bfloat16() for n, t in base.items()}, tmp_path / f"ft{i}", shards=1)

    def config(method, include=("*",)):
        models = tuple(ModelSpec(str(tmp_path / f"ft{i}"), {"weight": 0.5, "density": 0.5}) for i in (1, 2))
        return MergeConfig(method=method, base=str(tmp_path / "base"), models=models, include=include, seed=1)

    # the kernel's scratch only, as for ties, unless the 1-D tensor's one row needs torch's working set
    assert plan(config("della", ("w",))).peak_memory == plan(config("ties", ("w",))).peak_memory
    assert plan(config("della")).peak_memory > plan(config("ties")).peak_memory
    ranked = []
    monkeypatch.setattr(TorchBackend, "deltas", lambda self, block, *a, real=TorchBackend.deltas, **k: ranked.append(block.fts[0].shape) or real(self, block, *a, **k))
    merge(config("della"), tmp_path / "out")
    assert ranked == [(kernels.CHUNK + 1,)]
    monkeypatch.setattr(kernels, "supported", lambda dtypes, compute: False)
    merge(config("della"), tmp_path / "torch")
    assert shard_hashes(tmp_path / "out") == shard_hashes(tmp_path / "torch")
