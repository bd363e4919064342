"""PEFT LoRA adapters as fine-tunes (streammerge/lora.py): merges checked bit for bit against a direct
whole-tensor computation, the product's fixed order, the factor drop's expectation, and the errors."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import shard_hashes
from safetensors.torch import load_file, save_file

import streammerge.methods.kernels
from streammerge import CheckpointError, ConfigError, MergeConfig, ModelSpec, merge
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.io.lora import FactorDrop, LoraAdapter, lora_product
from streammerge.io.sources import Checkpoint
from streammerge.methods.mask import keep_mask, mask_key

SHAPE = TinyLlama(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=40)
PREFIX = "base_model.model."
F32 = torch.float32


def bounded_factor(shape, gen, dtype=torch.bfloat16) -> torch.Tensor:
    """bf16 values ±(1 + k/128)·2^e, e in [-9, -6]: every product is a multiple of 2^-32 below 2^-10, so
    float64 sums a rank-8 dot product exactly (in any order) and `.float()` rounds it once, as lora.py does."""
    k = torch.randint(0, 128, shape, generator=gen)
    e = torch.randint(-9, -5, shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (sign * (1 + k / 128) * torch.pow(2.0, e.double()).float()).to(dtype)


def write_adapter(folder, factors: dict, *, r, alpha, config=None, extra=None, adapter_name=None) -> None:
    """A PEFT-style adapter folder: factors = {module path: (A, B)} saved under PEFT's key names."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    tag = f".{adapter_name}" if adapter_name else ""
    for module, (a, b) in factors.items():
        if "embed_tokens" in module:
            tensors[f"{PREFIX}{module}.lora_embedding_A{tag}"] = a
            tensors[f"{PREFIX}{module}.lora_embedding_B{tag}"] = b
        else:
            tensors[f"{PREFIX}{module}.lora_A{tag}.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B{tag}.weight"] = b
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": "base", "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
           "task_type": "CAUSAL_LM"}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, *, transposed=False, keep=None, density=1.0) -> torch.Tensor:
    """τ as docs/lora.md defines it, whole tensor: the float64 product is exact for bounded_factor inputs."""
    a = a.double() if keep is None else a.double() * keep
    prod = (b.double() @ a).float()
    prod = prod.T if transposed else prod
    out = prod * torch.tensor(scaling, dtype=F32)
    if density != 1.0:
        out = out * torch.tensor(1.0 / density, dtype=F32)
    return out + 0.0


def _load(out_dir) -> dict[str, torch.Tensor]:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out_dir / shard))
    return tensors


R = 8
ADAPTED = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = random_state(SHAPE, seed=3)
    save_checkpoint(base, root / "base", shards=2, config=SHAPE.config_json(torch.bfloat16))
    gen = torch.Generator().manual_seed(11)
    factors = {}
    for module in ADAPTED:
        rows, cols = base[module + ".weight"].shape
        if "embed_tokens" in module:  # lora_embedding_A: r × num_embeddings, lora_embedding_B: dim × r
            factors[module] = (bounded_factor((R, rows), gen), bounded_factor((cols, R), gen))
        else:
            factors[module] = (bounded_factor((R, cols), gen), bounded_factor((rows, R), gen))
    head = (base["lm_head.weight"].float() + 0.01).to(torch.bfloat16)  # modules_to_save: stored whole
    write_adapter(root / "lora", factors, r=R, alpha=16, adapter_name="default",
                  extra={f"{PREFIX}lm_head.modules_to_save.default.weight": head})
    save_checkpoint(finetune_of(base, seed=5, scale=0.01), root / "ft", shards=1)
    return root, base, factors, head


def test_task_arithmetic_equals_base_plus_scaled_product(models, tmp_path):
    root, base, factors, head = models
    w, lam = 0.7, 1.3
    cfg = MergeConfig(method="task_arithmetic", base=str(root / "base"), models=(ModelSpec(str(root / "lora"), {"weight": w}),),
                      parameters={"lambda": lam}, out_dtype="float32")
    merge(cfg, tmp_path / "big")
    merge(cfg, tmp_path / "small", max_memory=64 << 10)  # row blocks of a few rows
    assert shard_hashes(tmp_path / "big") == shard_hashes(tmp_path / "small")
    out = _load(tmp_path / "big")
    scaling = 16 / R
    for name, theta in base.items():
        module = name.removesuffix(".weight")
        if module in factors:
            a, b = factors[module]
            tau = lora_delta(a, b, scaling, transposed="embed_tokens" in module)
        elif name == "lm_head.weight":
            tau = head.float() - theta.float()
        else:
            tau = torch.zeros(theta.shape)
        # the engine's documented op order (kernels.merge_chunk): θ₀ + ((+0 + τ·w)·λ), zeros as +0
        expected = theta.float() + ((0.0 + tau * torch.tensor(w, dtype=F32)) * torch.tensor(lam, dtype=F32)) + 0.0
        assert torch.equal(out[name].view(torch.int32), expected.view(torch.int32)), name
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"].float())


def test_bf16_output_rounds_once(models, tmp_path):
    root, base, factors, _ = models
    cfg = MergeConfig(method="task_arithmetic", base=str(root / "base"), models=(ModelSpec(str(root / "lora")),))
    merge(cfg, tmp_path / "out")
    out = _load(tmp_path / "out")
    a, b = factors["model.layers.0.self_attn.q_proj"]
    theta = base["model.layers.0.self_attn.q_proj.weight"]
    expected = (theta.float() + (0.0 + lora_delta(a, b, 16 / R)) + 0.0).to(torch.bfloat16)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"].view(torch.int16), expected.view(torch.int16))
    assert out["model.layers.0.mlp.up_proj.weight"].equal(base["model.layers.0.mlp.up_proj.weight"])  # not adapted: τ = 0


def test_slerp_reads_an_adapter_as_base_plus_its_product(models, tmp_path):
    # slerp needs θ₁ itself: the adapter's rows come as θ₀ + B A (float32), the same as a full
    # float32 checkpoint holding that sum, in one block or many
    root, base, factors, head = models
    theta = {}
    for name, t in base.items():
        module = name.removesuffix(".weight")
        if module in factors:
            a, b = factors[module]
            theta[name] = (lora_delta(a, b, 16 / R, transposed="embed_tokens" in module) + t.float()).contiguous()
        else:
            theta[name] = head.float() if name == "lm_head.weight" else t.float()
    save_checkpoint(theta, tmp_path / "full", shards=1)

    def slerp(model: str, out: str, **kw) -> dict[str, str]:
        cfg = MergeConfig(method="slerp", base=str(root / "base"), models=(ModelSpec(model),), parameters={"t": 0.4})
        merge(cfg, tmp_path / out, **kw)
        return shard_hashes(tmp_path / out)

    assert slerp(str(root / "lora"), "lora") == slerp(str(root / "lora"), "blocks", max_memory=64 << 10) \
        == slerp(str(tmp_path / "full"), "from_full")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_numpy_and_torch_paths_and_blocks_agree(models, tmp_path, monkeypatch, method):
    root = models[0]
    specs = (ModelSpec(str(root / "lora"), {"weight": 0.6, "density": 0.5}), ModelSpec(str(root / "ft"), {"weight": 0.4, "density": 0.7}))
    cfg = MergeConfig(method=method, base=str(root / "base"), models=specs, seed=2)
    merge(cfg, tmp_path / "numpy", compile="off")
    merge(cfg, tmp_path / "blocks", compile="off", max_memory=64 << 10)
    monkeypatch.setattr(streammerge.methods.kernels, "supported", lambda dtypes, compute: False)
    merge(cfg, tmp_path / "torch", compile="off")
    assert shard_hashes(tmp_path / "numpy") == shard_hashes(tmp_path / "blocks") == shard_hashes(tmp_path / "torch")


def test_fan_in_fan_out_and_rslora(tmp_path):
    # GPT-2's Conv1D stores W as in × out; PEFT then rebuilds τ as (B A)ᵀ
    base = {"h.0.attn.c_attn.weight": (torch.randn(24, 40) * 0.02).to(torch.bfloat16), "h.0.ln.weight": torch.ones(24, dtype=torch.bfloat16)}
    save_file(base, tmp_path / "base.safetensors")
    gen = torch.Generator().manual_seed(1)
    a, b = bounded_factor((4, 24), gen), bounded_factor((40, 4), gen)
    write_adapter(tmp_path / "lora", {"h.0.attn.c_attn": (a, b)}, r=4, alpha=8,
                  config={"fan_in_fan_out": True, "use_rslora": True})
    cfg = MergeConfig(method="task_arithmetic", base=str(tmp_path / "base.safetensors"), models=(ModelSpec(str(tmp_path / "lora")),),
                      out_dtype="float32")
    merge(cfg, tmp_path / "out")
    out = _load(tmp_path / "out")
    expected = base["h.0.attn.c_attn.weight"].float() + (0.0 + lora_delta(a, b, 8 / math.sqrt(4), transposed=True)) + 0.0
    assert torch.equal(out["h.0.attn.c_attn.weight"], expected)


def test_rank_and_alpha_patterns(tmp_path):
    base = {"model.layers.0.q_proj.weight": torch.randn(16, 16).to(torch.bfloat16), "model.layers.0.k_proj.weight": torch.randn(16, 16).to(torch.bfloat16)}
    save_file(base, tmp_path / "base.safetensors")
    gen = torch.Generator().manual_seed(2)
    factors = {"model.layers.0.q_proj": (bounded_factor((2, 16), gen), bounded_factor((16, 2), gen)),
               "model.layers.0.k_proj": (bounded_factor((4, 16), gen), bounded_factor((16, 4), gen))}
    write_adapter(tmp_path / "lora", factors, r=4, alpha=8, config={"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 3}})
    adapter = LoraAdapter(tmp_path / "lora")
    adapter.attach(Checkpoint(tmp_path / "base.safetensors"))
    assert adapter.tensors["model.layers.0.q_proj.weight"].scaling == 3 / 2
    assert adapter.tensors["model.layers.0.k_proj.weight"].scaling == 8 / 4


# ---- the product -----------------------------------------------------------------------------------


def test_lora_product_is_the_documented_sum_in_its_fixed_order():
    gen = torch.Generator().manual_seed(0)
    left = (torch.randn(24, 16, generator=gen) * torch.pow(10.0, torch.randint(-6, 3, (24, 16), generator=gen).float())).double()
    right = torch.randn(16, 20, generator=gen).double()
    left[2] = 0
    left[2, :3] = torch.tensor([2.0**20, 1.0, -(2.0**20)])  # 2^20·y0 + y1 − 2^20·y2: the order decides what survives
    right[:3, 2] = torch.tensor([0.3, 2.0**-30, 0.3])
    expected = np.zeros((24, 20))
    for k in range(16):  # docs/lora.md: k = 0 .. r-1, float64, then one rounding to float32
        expected = expected + np.outer(left[:, k].numpy(), right[k].numpy())
    got = lora_product(left, right)
    assert np.array_equal(got.numpy().view(np.int32), expected.astype(np.float32).view(np.int32))
    # Any split of the rows gives the same bits (unlike a BLAS matrix product's blocking).
    parts = torch.cat([lora_product(left[i : i + 5], right) for i in range(0, 24, 5)])
    assert torch.equal(parts.view(torch.int32), got.view(torch.int32))


# ---- the factor drop ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(24, 16, dtype=torch.bfloat16)}, root / "base.safetensors")
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(6, 16, generator=gen) * 0.1, torch.randn(24, 6, generator=gen) * 0.1
    write_adapter(root / "lora", {"model.layers.0.mlp.up_proj": (a, b)}, r=6, alpha=6)
    adapter = LoraAdapter(root / "lora")
    adapter.attach(Checkpoint(root / "base.safetensors"))
    return adapter


@pytest.mark.parametrize("mode", ["rank", pytest.param("element_a", marks=pytest.mark.slow), pytest.param("element_b", marks=pytest.mark.slow)])
def test_factor_drop_preserves_the_expectation(small_adapter, mode):
    name, density, seeds = "model.layers.0.mlp.up_proj.weight", 0.6, 600
    full = small_adapter.delta_rows(name, 0, 24).double()
    draws = torch.stack([small_adapter.delta_rows(name, 0, 24, FactorDrop(mode, density, mask_key(s, 0, f"{name}#lora_{mode}"))).double()
                         for s in range(seeds)])
    # each draw is τ's terms B_ik A_kj kept (rank/element masks) and scaled by 1/density; per element the
    # mean over independent draws has standard error sqrt(Var/seeds), Var <= (1-d)/d · Σ_k (s·B_ik A_kj)²
    # for the element masks; the rank mask shares m_k across a row and column but not across k, the same bound
    a, b = (small_adapter.weights.read(small_adapter.tensors[name].key_a).double(),
            small_adapter.weights.read(small_adapter.tensors[name].key_b).double())
    var = (1 - density) / density * ((b**2) @ (a**2))
    stderr = (var / seeds).sqrt()
    z = (draws.mean(0) - full).abs() / stderr.clamp_min(1e-12)
    assert z.max() < 5.5  # 384 elements: P(max |z| > 5.5) < 2e-5 for Gaussian means
    assert z.mean() < 1.0  # |z| averages sqrt(2/π) ≈ 0.8
    kept = (draws != 0).double().mean()  # a sanity check that something was dropped
    assert 0.3 < kept < 1.0


def test_factor_drop_is_deterministic_and_seeded(small_adapter):
    name = "model.layers.0.mlp.up_proj.weight"
    drop = FactorDrop("rank", 0.5, mask_key(1, 0, f"{name}#lora_rank"))
    first = small_adapter.delta_rows(name, 0, 24, drop)
    assert torch.equal(first, small_adapter.delta_rows(name, 0, 24, drop))
    assert torch.equal(first[5:17], small_adapter.delta_rows(name, 5, 17, drop))  # rows of the same τ'
    other = small_adapter.delta_rows(name, 0, 24, FactorDrop("rank", 0.5, mask_key(2, 0, f"{name}#lora_rank")))
    assert not torch.equal(first, other)


def test_dare_linear_with_rank_drop_equals_direct(models, tmp_path):
    root, base, factors, head = models
    density, seed = 0.5, 4
    cfg = MergeConfig(method="dare_linear", base=str(root / "base"), seed=seed, out_dtype="float32", parameters={"dare_scope": "all"},
                      models=(ModelSpec(str(root / "lora"), {"weight": 1.0, "density": density, "lora_drop": "rank"}),))
    merge(cfg, tmp_path / "out")
    out = _load(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = factors["model.layers.0.self_attn.q_proj"]
    keep = keep_mask(mask_key(seed, 0, f"{name}#lora_rank"), 0, R, density).double().view(-1, 1)
    assert 0 < keep.sum() < R
    expected = base[name].float() + (0.0 + lora_delta(a, b, 16 / R, keep=keep, density=density)) + 0.0
    assert torch.equal(out[name], expected)
    # the stored-whole lm_head gets DARE's drop on its delta as usual
    tau = head.float() - base["lm_head.weight"].float()
    dare = tau * keep_mask(mask_key(seed, 0, "lm_head.weight"), 0, tau.numel(), density).view(tau.shape)
    expected_head = base["lm_head.weight"].float() + (0.0 + dare * torch.tensor(1 / density, dtype=F32)) + 0.0
    assert torch.equal(out["lm_head.weight"], expected_head)


# ---- errors ------------------------------------------------------------------------------------------


def _adapter_for(tmp_path, **kw):
    save_file({"model.layers.0.q_proj.weight": torch.zeros(16, 8)}, tmp_path / "base.safetensors")
    factors = kw.pop("factors", {"model.layers.0.q_proj": (torch.zeros(2, 8), torch.zeros(16, 2))})
    write_adapter(tmp_path / "lora", factors, r=2, alpha=2, **kw)
    return MergeConfig(method="task_arithmetic", base=str(tmp_path / "base.safetensors"), models=(ModelSpec(str(tmp_path / "lora")),))


@pytest.mark.parametrize(("kw", "message"), [
    ({"config": {"peft_type": "IA3"}}, "only LoRA adapters"),
    ({"config": {"use_dora": True}}, "DoRA"),
    ({"factors": {"model.layers.0.k_proj": (torch.zeros(2, 8), torch.zeros(16, 2))}}, "adapts 'model.layers.0.k_proj', which the base"),
    ({"factors": {"model.layers.0.q_proj": (torch.zeros(2, 9), torch.zeros(16, 2))}}, "B A has shape [16, 9]"),
    ({"factors": {"model.layers.0.q_proj": (torch.zeros(3, 8), torch.zeros(16, 3))}}, "rank 3 in the file but r = 2"),
    ({"extra": {f"{PREFIX}model.layers.0.q_proj.lora_B.bias": torch.zeros(16)}}, "lora_bias"),
    ({"extra": {f"{PREFIX}model.layers.0.q_proj.lora_magnitude_vector": torch.zeros(16)}}, "DoRA"),
    ({"extra": {f"{PREFIX}model.layers.0.k_proj.lora_A.other.weight": torch.zeros(2, 8)}, "adapter_name": "default"}, "several adapters"),
])
def test_bad_adapters_get_clear_errors(tmp_path, kw, message):
    cfg = _adapter_for(tmp_path, **kw)
    with pytest.raises(CheckpointError) as e:
        merge(cfg, tmp_path / "out")
    assert message in str(e.value)
    assert "adapter" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_lora_drop_needs_an_adapter_and_a_dare_method(tmp_path):
    cfg = _adapter_for(tmp_path)
    with pytest.raises(ConfigError, match="dare_linear or dare_ties"):
        merge(MergeConfig(method="ties", base=cfg.base, models=(ModelSpec(cfg.models[0].source, {"lora_drop": "rank"}),)), tmp_path / "o")
    save_file({"model.layers.0.q_proj.weight": torch.ones(16, 8)}, tmp_path / "ft.safetensors")
    with pytest.raises(ConfigError, match="not a LoRA adapter"):
        merge(MergeConfig(method="dare_linear", base=cfg.base, models=(ModelSpec(str(tmp_path / "ft.safetensors"), {"lora_drop": "rank"}),)),
              tmp_path / "o")
    with pytest.raises(ConfigError, match="must be one of delta, rank"):
        MergeConfig(method="dare_linear", base=cfg.base, models=(ModelSpec(cfg.models[0].source, {"lora_drop": "rows"}),)).validate()


def test_adapter_cannot_be_the_base_and_a_different_base_name_only_warns(tmp_path, caplog):
    cfg = _adapter_for(tmp_path, config={"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"})
    with pytest.raises(ConfigError, match="cannot be the base"):
        merge(MergeConfig(method="linear", models=cfg.models), tmp_path / "o")
    with caplog.at_level(logging.WARNING):
        merge(cfg, tmp_path / "out")
    assert "Llama-2-7b-hf" in caplog.text


def test_pickled_adapter_is_refused(tmp_path):
    cfg = _adapter_for(tmp_path)
    (tmp_path / "lora" / "adapter_model.safetensors").rename(tmp_path / "lora" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="never loads"):
        merge(cfg, tmp_path / "out")
