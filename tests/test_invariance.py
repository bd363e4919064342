"""Same config and seed, same bytes: whatever the thread count, block size, device or how often it runs.
(Block sizes: test_e2e.py; resume after a kill: test_resume.py.)"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import shard_hashes

from streammerge import MergeConfig, ModelSpec, merge
from streammerge.demo import TinyLlama, finetune_of, random_state, save_checkpoint

SHAPE = TinyLlama(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=300)
METHODS = ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inv")
    base = random_state(SHAPE, seed=1)
    save_checkpoint(base, root / "base", shards=2)
    for i in range(3):
        save_checkpoint(finetune_of(base, seed=40 + i, scale=0.01), root / f"ft{i}", shards=1)
    return root


def _merge(root, out, method, semantics="default", **kwargs) -> dict[str, str]:
    models = tuple(ModelSpec(str(root / f"ft{i}"), {"weight": [0.5, 0.3, 0.2][i], "density": [0.5, 0.7, 0.3][i]}) for i in range(3))
    params = {"weight": 0.1} if (semantics, method) == ("mergekit", "linear") else {}
    cfg = MergeConfig(method=method, base=str(root / "base"), models=models, seed=3, semantics=semantics, parameters=params,
                      dtype="bfloat16" if semantics == "mergekit" else None)
    merge(cfg, out, max_shard_size=40_000, **kwargs)
    return shard_hashes(out)


@pytest.mark.parametrize("semantics", ["default", "mergekit", "fusionbench"])
@pytest.mark.parametrize("method", METHODS)
def test_thread_count_changes_nothing(models, tmp_path, method, semantics):
    one = _merge(models, tmp_path / "t1", method, semantics, threads=1, compile="off")
    two = _merge(models, tmp_path / "t2", method, semantics, threads=2, compile="off")
    again = _merge(models, tmp_path / "t2b", method, semantics, threads=2, compile="off")
    assert one == two == again


def test_cuda_without_cuda_falls_back_to_the_same_cpu_bytes(models, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        gpu = _merge(models, tmp_path / "cuda", "dare_ties", device="cuda")
    assert "CUDA is not available" in caplog.text
    assert gpu == _merge(models, tmp_path / "cpu", "dare_ties", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_gpu_gives_the_cpu_bytes(models, tmp_path, method):
    # float32 arithmetic, one IEEE op at a time in the same order, masks from the same integer hash:
    # the GPU's bytes must equal the CPU's.
    assert _merge(models, tmp_path / "gpu", method, device="cuda") == _merge(models, tmp_path / "cpu", method, device="cpu")
