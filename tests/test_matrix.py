"""Every registered method on every path it declares (methods/: `paths`), under every preset it
supports: the same bytes as torch's eager ops, on tensors split into several row blocks with many
|τ| ties at the thresholds. A method that declares a path it does not implement fails here."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_compiled, shard_hashes

from streammerge import MergeConfig, ModelSpec, merge
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.methods import registry
from streammerge.pipeline import passes
from streammerge.pipeline.device import Staging

SHAPE = TinyLlama(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=40)
BUDGET = 120_000  # bytes of --max-memory: several row blocks per tensor


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    base = random_state(SHAPE, seed=3)
    save_checkpoint(base, root / "base", shards=2)
    for i in range(2):
        ft = finetune_of(base, seed=40 + i, scale=0.01)
        # quantized deltas: many exact |τ| ties at every trim threshold
        ft = {n: (base[n].float() + torch.round((t.float() - base[n].float()) * 128) / 128).to(t.dtype) for n, t in ft.items()}
        save_checkpoint(ft, root / f"ft{i}", shards=1)
    return root


def _config(root, method, semantics) -> MergeConfig:
    declared = {p.name for p in registry.get(method).params}
    own = {"weight": 0.6, "density": 0.5, "gamma": 0.05, "epsilon": 0.1}
    models = tuple(ModelSpec(str(root / f"ft{i}"), {k: v for k, v in own.items() if k in declared}) for i in range(2))
    top = {k: v for k, v in {"t": 0.3, "lambda": 0.9, "weight": 0.5}.items() if k in declared}
    if method == "passthrough":
        return MergeConfig(method=method, models=models[:1], semantics=semantics)
    if registry.get(method).max_models == 1:
        models = models[:1]
    return MergeConfig(method=method, base=str(root / "base"), models=models, parameters=top, seed=7, semantics=semantics)


def _merge(root, out, method, semantics, **kwargs) -> dict[str, str]:
    merge(_config(root, method, semantics), out, max_memory=BUDGET, **kwargs)
    return shard_hashes(out)


def _torch_eager(monkeypatch) -> None:
    monkeypatch.setattr(passes, "uses_chunk_kernel", lambda *args, **kwargs: False)


def _staged(monkeypatch) -> None:
    """Blocks through TorchBackend with `Staging`, as on a GPU (on the CPU: no pinning, no events)."""
    _torch_eager(monkeypatch)
    init = passes.TorchBackend.__init__

    def staged(self, compute, device=torch.device("cpu")):
        init(self, compute, device)
        self.staging = Staging(device)

    monkeypatch.setattr(passes.TorchBackend, "__init__", staged)


CASES = [(m.name, s) for m in registry.all_methods() for s in m.semantics]


@pytest.mark.parametrize(("method", "semantics"), CASES)
def test_every_declared_path_gives_torchs_bytes(models, tmp_path, method, semantics, monkeypatch):
    paths = registry.get(method).paths
    with monkeypatch.context() as m:
        _torch_eager(m)
        reference = _merge(models, tmp_path / "torch", method, semantics, compile="off")
    if "numpy" in paths:  # the default CPU path where declared
        assert _merge(models, tmp_path / "numpy", method, semantics, compile="off") == reference
    if "gpu" in paths:
        with monkeypatch.context() as m:
            _staged(m)
            assert _merge(models, tmp_path / "staged", method, semantics, compile="off") == reference


@pytest.mark.slow
@needs_compiled
@pytest.mark.parametrize("method", [m.name for m in registry.all_methods() if "compiled" in m.paths])
def test_the_compiled_kernel_gives_torchs_bytes(models, tmp_path, method, monkeypatch):
    with monkeypatch.context() as m:
        _torch_eager(m)
        reference = _merge(models, tmp_path / "torch", method, "default", compile="off")
    assert _merge(models, tmp_path / "compiled", method, "default", compile="on") == reference


@pytest.mark.slow
@needs_compiled
def test_a_path_declared_but_not_implemented_fails_the_matrix(models, tmp_path, monkeypatch):
    # a compiled kernel that took DELLA without its ranked keep probabilities (τ left whole) must be caught
    from streammerge.methods import ckernel

    monkeypatch.setattr(ckernel, "ranks_della", lambda *args: True)
    monkeypatch.setattr(ckernel, "_della_tables", lambda *args: None)
    with pytest.raises(AssertionError):
        test_the_compiled_kernel_gives_torchs_bytes(models, tmp_path, "della", monkeypatch)
