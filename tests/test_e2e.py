"""End-to-end merges of small generated checkpoints (several shards, 1-D and 2-D tensors), checked
against an independent whole-tensor float32 computation written here from the papers' formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import shard_hashes, ties_disjoint_mean
from safetensors.torch import load_file, save_file

from streammerge import MergeConfig, ModelSpec, merge
from streammerge.front.demo import (
    TinyLlama,
    build_demo_models,
    finetune_of,
    random_state,
    save_checkpoint,
)
from streammerge.methods.mask import keep_mask, mask_key
from streammerge.pipeline.plan import is_linear_weight

SHAPE = TinyLlama(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=40)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = random_state(SHAPE, seed=1)
    save_checkpoint(base, root / "base", shards=3, config=SHAPE.config_json(torch.bfloat16))
    fts = [finetune_of(base, seed=10 + i, scale=0.01) for i in range(3)]
    for i, ft in enumerate(fts):
        save_checkpoint(ft, root / f"ft{i}", shards=2 if i else 1, config=SHAPE.config_json(torch.bfloat16))
    return root, base, fts


def _load(out_dir) -> dict[str, torch.Tensor]:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out_dir / shard))
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def _config(root, method, n=2, **params):
    weights, densities = [0.6, 0.4, 0.5][:n], [0.5, 0.7, 0.3][:n]
    models = tuple(ModelSpec(str(root / f"ft{i}"), {"weight": weights[i], "density": densities[i]}) for i in range(n))
    return MergeConfig(method=method, base=str(root / "base"), models=models, parameters=params, seed=7)


# ---- an independent reference: whole tensors, float32, the formulas as the papers write them ----

def _topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    k = int(tau.numel() * density)
    flat = tau.flatten()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices  # ties: lower index first
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    return (flat * keep).view(tau.shape)


def _dare(tau: torch.Tensor, seed: int, i: int, name: str, density: float) -> torch.Tensor:
    keep = keep_mask(mask_key(seed, i, name), 0, tau.numel(), density).view(tau.shape)
    return tau * keep / density


def _reference(method: str, name: str, base, fts, weights, densities, lam=1.0, seed=7) -> torch.Tensor:
    b = base.float()
    taus = [ft.float() - b for ft in fts]
    if method == "linear":
        return sum(w * ft.float() for w, ft in zip(weights, fts)) / sum(weights)
    if method in ("ties", "magnitude_prune"):
        taus = [_topk(t, d) for t, d in zip(taus, densities)]
    if method.startswith("dare") and is_linear_weight(name, tuple(base.shape)):
        taus = [_dare(t, seed, i, name, d) for i, (t, d) in enumerate(zip(taus, densities))]
    if method in ("ties", "dare_ties"):
        merged = ties_disjoint_mean(taus, weights)
    else:
        merged = sum(w * t for w, t in zip(weights, taus))
    return b + lam * merged


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_matches_independent_float32_reference(tmp_path, models, method):
    root, base, fts = models
    lam = 0.8 if method != "linear" else 1.0
    cfg = _config(root, method, **({"lambda": lam} if method != "linear" else {}))
    merge(cfg, tmp_path / "out", max_shard_size=20_000)
    out = _load(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    for name, b in base.items():
        expected = _reference(method, name, b, [f[name] for f in fts[:2]], [0.6, 0.4], [0.5, 0.7], lam).to(torch.bfloat16)
        actual = out[name]
        assert actual.dtype == torch.bfloat16 and actual.shape == b.shape
        # float32 op order may differ from ours by an ulp of float32, which can move a bf16
        # rounding by one step: everything within one bf16 step, nearly all of it exact.
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=1e-6, msg=name)
        assert (actual == expected).float().mean() > 0.99, name


@pytest.mark.parametrize("semantics", ["default", "mergekit", "peft", "fusionbench"])
@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_row_blocks_give_identical_bytes(tmp_path, models, method, semantics):
    root, _, _ = models
    cfg = _config(root, method, n=3)
    params = {**cfg.parameters, "weight": 0.2} if (semantics, method) == ("mergekit", "linear") else cfg.parameters
    cfg = MergeConfig(**{**cfg.__dict__, "semantics": semantics, "parameters": params,
                         "dtype": "bfloat16" if semantics == "mergekit" else None})
    merge(cfg, tmp_path / "whole")
    merge(cfg, tmp_path / "blocks", max_memory=2000)  # a few rows per block: every tensor split
    assert shard_hashes(tmp_path / "whole") == shard_hashes(tmp_path / "blocks")


def test_dare_keeps_base_or_rescaled_delta(tmp_path, models):
    root, base, fts = models
    density = 0.3
    cfg = MergeConfig(method="dare_linear", base=str(root / "base"),
                      models=(ModelSpec(str(root / "ft0"), {"density": density}),), out_dtype="float32", seed=3)
    merge(cfg, tmp_path / "out")
    out = _load(tmp_path / "out")
    kept = total = 0
    for name, b in base.items():
        b32, tau = b.float(), fts[0][name].float() - b.float()
        if not is_linear_weight(name, tuple(b.shape)):  # DARE scope: linear weights only
            assert torch.equal(out[name], b32 + tau), name
            continue
        rescaled = b32 + tau * (1 / density)
        is_base, is_kept = out[name] == b32, out[name] == rescaled
        assert bool((is_base | is_kept).all()), name
        changed = tau != 0
        kept += int((is_kept & changed & ~is_base).sum())
        total += int(changed.sum())
    sigma = math.sqrt(density * (1 - density) / total)
    assert abs(kept / total - density) < 5 * sigma


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, models):
    root, _, _ = models
    cfg = _config(root, "dare_ties")
    merge(cfg, tmp_path / "a")
    merge(cfg, tmp_path / "b")
    merge(MergeConfig(**{**cfg.__dict__, "seed": 8}), tmp_path / "c")
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert shard_hashes(tmp_path / "a") != shard_hashes(tmp_path / "c")


def test_excluded_tensors_are_copied_from_base(tmp_path, models):
    root, base, _ = models
    cfg = MergeConfig(**{**_config(root, "ties").__dict__, "exclude": ("*norm*", "model.embed_tokens.weight")})
    merge(cfg, tmp_path / "out")
    out = _load(tmp_path / "out")
    for name, b in base.items():
        if "norm" in name or name == "model.embed_tokens.weight":
            assert torch.equal(out[name], b), name
        else:
            assert not torch.equal(out[name], b), name


def test_mixed_input_dtypes_and_output_dtype(tmp_path):
    base = random_state(SHAPE, seed=2, dtype=torch.float32)
    save_file(base, tmp_path / "base.safetensors")
    ft = {n: t.to(torch.bfloat16) for n, t in finetune_of(base, seed=5, scale=0.01).items()}
    save_checkpoint(ft, tmp_path / "ft", shards=1)
    cfg = MergeConfig(method="task_arithmetic", base=str(tmp_path / "base.safetensors"),
                      models=(ModelSpec(str(tmp_path / "ft"), {"weight": 0.5}),))
    merge(cfg, tmp_path / "out")
    out = _load(tmp_path / "out")
    for name, b in base.items():
        assert out[name].dtype == torch.float32  # the base's dtype by default
        assert torch.equal(out[name], b + 0.5 * (ft[name].float() - b)), name
    merge(MergeConfig(**{**cfg.__dict__, "out_dtype": "float16"}), tmp_path / "out16")
    assert {t.dtype for t in _load(tmp_path / "out16").values()} == {torch.float16}


def test_side_files_card_and_manifest(tmp_path):
    base_dir, fts = build_demo_models(tmp_path / "m")
    (base_dir / "tokenizer.json").write_text('{"fake": true}')
    cfg = MergeConfig(method="ties", base=str(base_dir), models=tuple(ModelSpec(str(p), {"density": 0.5}) for p in fts), seed=11)
    result = merge(cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n- " + str(base_dir)) and "merge_method: ties" in card and "- merge" in card
    manifest = json.loads((out / "streammerge_manifest.json").read_text())
    assert manifest["seed"] == 11 and manifest["config"]["merge_method"] == "ties"
    assert {s["file"]: s["sha256"] for s in manifest["shards"]} == shard_hashes(out)
    assert {s["file"]: s["sha256"] for s in result.shards} == shard_hashes(out)
    assert not list(out.glob("*.partial"))
    with open(out / manifest["shards"][0]["file"], "rb") as f:  # safetensors metadata {"format": "pt"}
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"] == {"format": "pt"}


def test_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    base_dir, fts = build_demo_models(tmp_path / "m")
    cfg = MergeConfig(method="dare_ties", base=str(base_dir), models=tuple(ModelSpec(str(p), {"density": 0.5, "weight": 0.5}) for p in fts))
    merge(cfg, tmp_path / "out", max_shard_size=100_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    merged = _load(tmp_path / "out")
    state = model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name].to(tensor.dtype), tensor), name
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all()


def test_check_finite_names_the_tensor_and_file(tmp_path):
    from streammerge import NonFiniteError

    base = random_state(SHAPE, seed=4)
    save_checkpoint(base, tmp_path / "base", shards=1)
    ft = finetune_of(base, seed=6)
    ft["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_checkpoint(ft, tmp_path / "ft", shards=1)
    cfg = MergeConfig(method="task_arithmetic", base=str(tmp_path / "base"), models=(ModelSpec(str(tmp_path / "ft")),))
    with pytest.raises(NonFiniteError, match=r"ft/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds NaN"):
        merge(cfg, tmp_path / "checked", check_finite=True)
    assert not (tmp_path / "checked" / "model.safetensors.index.json").exists()
    merge(cfg, tmp_path / "unchecked")  # the scan is opt-in


def test_vocabulary_size_mismatch_is_an_error_unless_an_option_says_how(tmp_path):
    from streammerge import MismatchError

    base = random_state(SHAPE, seed=8)
    save_checkpoint(base, tmp_path / "base", shards=1, config=SHAPE.config_json(torch.bfloat16))
    ft = finetune_of(base, seed=9)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # a fine-tune that added 4 tokens
        ft[name] = torch.cat([ft[name], torch.ones(4, SHAPE.hidden, dtype=torch.bfloat16)])
    save_checkpoint(ft, tmp_path / "ft", shards=1)
    cfg = MergeConfig(method="task_arithmetic", base=str(tmp_path / "base"), models=(ModelSpec(str(tmp_path / "ft")),))
    with pytest.raises(MismatchError, match=r"'model.embed_tokens.weight': shape \[44, 32\] in .*ft but \[40, 32\] .*vocab"):
        merge(cfg, tmp_path / "out")

    merge(MergeConfig(**{**cfg.__dict__, "vocab": "truncate_to_smallest"}), tmp_path / "small")
    out = _load(tmp_path / "small")
    expected = (base["lm_head.weight"].float() + (ft["lm_head.weight"][:40].float() - base["lm_head.weight"].float())).to(torch.bfloat16)
    assert out["lm_head.weight"].shape == (40, SHAPE.hidden) and torch.equal(out["lm_head.weight"], expected)
    assert json.loads((tmp_path / "small" / "config.json").read_text())["vocab_size"] == 40

    # truncate_to_base needs every model to have at least the base's rows: here the base is the bigger one
    cfg2 = MergeConfig(method="task_arithmetic", base=str(tmp_path / "ft"), models=(ModelSpec(str(tmp_path / "base")),), vocab="truncate_to_base")
    with pytest.raises(MismatchError, match="fewer than the base's 44; use vocab: truncate_to_smallest"):
        merge(cfg2, tmp_path / "out2")
