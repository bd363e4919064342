"""Same config and seed, same bytes: whatever the thread count, block size, device or how often it runs.
(Block sizes: test_e2e.py; resume after a kill: test_resume.py.)"""

from __future__ import annotations

import logging
from contextlib import ExitStack

import pytest
import torch
from conftest import shard_hashes
from safetensors import safe_open

from streammerge import (
    ConfigError,
    DeviceError,
    MergeConfig,
    ModelSpec,
    finalize,
    merge,
)
from streammerge.front import api
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.methods import ops, registry
from streammerge.methods.task_vectors import TaskVectorMethod
from streammerge.pipeline import passes as engine
from streammerge.pipeline.device import Staging
from streammerge.pipeline.plan import build_plan, bytes_per_element

row_sums = ops.slerp_row_sums
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


# every method, and mergekit's whole-tensor paths (sorts, L1 factors) for the sparsifying ones
EVERY_METHOD = ([(m, "default") for m in METHODS + ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]]
                + [(m, "mergekit") for m in ("ties", "dare_ties", "breadcrumbs_ties", "della")])


@pytest.mark.parametrize(("method", "semantics"), EVERY_METHOD)
def test_any_split_over_workers_gives_the_same_bytes(models, tmp_path, method, semantics):
    one = _merge(models, tmp_path / "one", method, semantics)
    for rank in (1, 0):  # any order
        _merge(models, tmp_path / "split", method, semantics, rank=rank, world_size=2)
    finalize(tmp_path / "split")
    assert shard_hashes(tmp_path / "split") == one


OWN = [m.name for m in registry.all_methods() if not isinstance(m, TaskVectorMethod)]


def _merge_own(root, out, method, **kwargs) -> dict[str, str]:
    """A method of its own (methods/base.py) with as many models as it takes (up to 3) and its required t."""
    declared = registry.get(method)
    n = min(3, declared.max_models or 3)
    models = tuple(ModelSpec(str(root / f"ft{i}"), {"weight": [0.5, 0.3, 0.2][i]}) for i in range(n))
    params = {p.name: 0.5 for p in declared.params if p.default is None and p.per_tensor and not p.per_model}
    cfg = MergeConfig(method=method, base=str(root / "base"), models=models, seed=3, parameters=params)
    merge(cfg, out, max_shard_size=40_000, **kwargs)
    return shard_hashes(out)


@pytest.mark.parametrize("method", OWN)
def test_methods_of_their_own_give_the_same_bytes_for_any_threads_budget_and_split(models, tmp_path, method):
    one = _merge_own(models, tmp_path / "one", method, threads=1)
    assert _merge_own(models, tmp_path / "small", method, threads=2, max_memory=60_000) == one  # many row blocks
    for rank in (1, 0):
        _merge_own(models, tmp_path / "split", method, rank=rank, world_size=2)
    finalize(tmp_path / "split")
    assert shard_hashes(tmp_path / "split") == one


def test_compute_threads_run_torch_on_one_thread_and_leave_the_callers_count():
    from streammerge.pipeline.engine import compute_pool

    caller = torch.get_num_threads()
    pool = compute_pool(2)
    try:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(8))) == {1}
    finally:
        pool.shutdown()
    assert torch.get_num_threads() == caller
    assert compute_pool(1) is None


def test_cuda_without_cuda_falls_back_to_the_same_cpu_bytes(models, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        gpu = _merge(models, tmp_path / "cuda", "dare_ties", device="cuda")
    assert "CUDA is not available" in caplog.text
    assert gpu == _merge(models, tmp_path / "cpu", "dare_ties", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("method", "semantics"), [(m, s) for s in ("default", "mergekit", "fusionbench") for m in METHODS]
                         + [(m, s) for s in ("default", "mergekit") for m in ("breadcrumbs_ties", "della", "della_linear")])
def test_gpu_gives_the_cpu_bytes(models, tmp_path, method, semantics):
    # one IEEE op at a time in the same order (float32, or bf16 under mergekit), masks from the same
    # integer hash, mergekit's unstable sorts and L1 sums on the CPU: the GPU's bytes are the CPU's.
    gpu = _merge(models, tmp_path / "gpu", method, semantics, device="cuda", max_memory=200_000)
    assert gpu == _merge(models, tmp_path / "cpu", method, semantics, device="cpu")


# ---- the GPU pipeline's CPU-testable parts: staging, the GPU memory budget ------------------------


def _stage_as_on_a_gpu(monkeypatch) -> None:
    """Every merged tensor through TorchBackend with `Staging`, as on a GPU (on the CPU: no pinning, no events)."""
    monkeypatch.setattr(engine, "uses_chunk_kernel", lambda *args, **kwargs: False)
    init = engine.TorchBackend.__init__

    def staged(self, compute, device=torch.device("cpu")):
        init(self, compute, device)
        self.staging = Staging(device)

    monkeypatch.setattr(engine.TorchBackend, "__init__", staged)


@pytest.mark.parametrize("semantics", ["default", "mergekit"])
@pytest.mark.parametrize("method", METHODS + ["breadcrumbs_ties", "della", "della_linear"])
def test_blocks_staged_as_on_a_gpu_give_the_cpu_bytes(models, tmp_path, method, semantics, monkeypatch):
    plain = _merge(models, tmp_path / "plain", method, semantics)  # the numpy chunk kernel (default)
    _stage_as_on_a_gpu(monkeypatch)
    # a small budget: many blocks of two sizes through the two staging sets, buffers grown and reused
    assert _merge(models, tmp_path / "staged", method, semantics, max_memory=200_000) == plain


def _merge_slerp(root, out, semantics, **kwargs) -> dict[str, str]:
    t = [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.35}]
    cfg = MergeConfig(method="slerp", base=str(root / "base"), models=(ModelSpec(str(root / "ft0")),), parameters={"t": t},
                      semantics=semantics, dtype="bfloat16" if semantics == "mergekit" else None)
    merge(cfg, out, max_shard_size=40_000, **kwargs)
    return shard_hashes(out)


@pytest.mark.parametrize("semantics", ["default", "mergekit"])
def test_slerp_bytes_depend_on_no_block_size_thread_count_or_staging(models, tmp_path, semantics, monkeypatch):
    # default: per-row float64 sums by a fixed pairwise tree, added with math.fsum; mergekit: whole tensors
    sums = []
    monkeypatch.setattr(ops, "slerp_row_sums", lambda *a: sums.append(1) or row_sums(*a))
    whole = _merge_slerp(models, tmp_path / "whole", semantics, threads=1, compile="off")  # (the C kernel: below)
    blocks_before = len(sums)
    small = _merge_slerp(models, tmp_path / "small", semantics, threads=2, max_memory=200_000, compile="off")
    if semantics == "default":  # many row blocks: more stats calls than tensors
        assert len(sums) - blocks_before > blocks_before == len(_tensor_names(tmp_path / "whole"))
    _stage_as_on_a_gpu(monkeypatch)
    staged = _merge_slerp(models, tmp_path / "staged", semantics, max_memory=200_000)
    monkeypatch.undo()
    compiled = _merge_slerp(models, tmp_path / "compiled", semantics, threads=2, max_memory=200_000)  # auto: the C kernel if built
    assert whole == small == staged == compiled


def _tensor_names(out) -> list[str]:
    return [n for shard in out.glob("model-*.safetensors") for n in safe_open(shard, "pt").keys()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("semantics", ["default", "mergekit"])
def test_slerp_on_a_gpu_gives_the_cpu_bytes(models, tmp_path, semantics):
    gpu = _merge_slerp(models, tmp_path / "gpu", semantics, device="cuda", max_memory=200_000)
    assert gpu == _merge_slerp(models, tmp_path / "cpu", semantics, device="cpu")


def test_staging_refills_each_set_every_other_block():
    staging = Staging(torch.device("cpu"))
    blocks = [[torch.full((3, 4), float(i)), torch.full((2,), i, dtype=torch.bfloat16)] for i in range(3)]
    sent = [staging.send(b) for b in blocks]
    for block, moved in zip(blocks, sent[2:]):
        assert all(torch.equal(a, b) for a, b in zip(blocks[2], moved))
    assert sent[2][0].data_ptr() == sent[0][0].data_ptr() != sent[1][0].data_ptr()  # set 0 again, reused in place
    bigger = staging.send([torch.ones(5, 4), torch.ones(2, dtype=torch.bfloat16)])  # set 1 grows
    assert bigger[0].shape == (5, 4) and bool((bigger[0] == 1).all())


def _job(models, method, budget, semantics="default"):
    cfg = MergeConfig(method=method, base=str(models / "base"), semantics=semantics,
                      models=tuple(ModelSpec(str(models / f"ft{i}"), {"weight": 0.3, "density": 0.5}) for i in range(3)))
    stack = ExitStack()
    reference, finetuned = api._open(cfg, stack)
    plan = build_plan(cfg, reference, finetuned)
    tp = next(t for t in plan.tensors if t.name.endswith("mlp.down_proj.weight"))
    return engine.TensorJob(tp, plan, reference, finetuned, None, None, torch.device("cuda"), budget), stack


def test_the_gpu_budget_bounds_a_block(models):
    roomy, stack = _job(models, "dare_ties", 1 << 30)
    with stack:
        assert len(roomy.blocks) == 1 and roomy.backend.device.type == "cuda"
    size = roomy.out_dtype.itemsize  # inputs and output in the base's dtype
    per_row = roomy.tp.row_elems * bytes_per_element(3, size, size)  # 3 fine-tunes
    tight, stack = _job(models, "dare_ties", 10 * per_row)
    with stack:
        assert tight.rows == 10 and len(tight.blocks) == -(-tight.tp.rows // 10)
        assert tight.backend.device.type == "cuda"


def test_a_whole_tensor_beyond_the_gpu_budget_merges_on_the_cpu(models):
    # mergekit's sorts need the whole tensor in one block: when it does not fit, the CPU does it
    job, stack = _job(models, "ties", 1000, semantics="mergekit")
    with stack:
        assert len(job.blocks) == 1 and job.backend.device.type == "cpu"


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:x"])
def test_an_unknown_device_is_a_config_error(models, tmp_path, device):
    with pytest.raises(ConfigError, match="--device"):
        _merge(models, tmp_path / "out", "ties", device=device)


def test_running_out_of_gpu_memory_names_the_tensor_and_leaves_no_shard(models, tmp_path, monkeypatch):
    _stage_as_on_a_gpu(monkeypatch)

    def out_of_memory(self, block, spec, out):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.TorchBackend, "merge", out_of_memory)
    with pytest.raises(DeviceError, match=r"ran out of memory on tensor '[^']+': lower --gpu-memory, or merge with --device cpu"):
        _merge(models, tmp_path / "out", "ties")
    assert not list((tmp_path / "out").glob("*.safetensors"))
