"""Golden vectors of the merge semantics (docs/methods.md), worked out by hand, through the real engine (plan -> passes -> writer).

One "model" is a single 12-element tensor (stored 3x4 so that it counts as a linear weight). The
DARE goldens use fixed masks M1..M3, injected in place of the counter-based mask.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from streammerge import MergeConfig, ModelSpec, merge

NAME = "model.layers.0.mlp.up_proj.weight"
B = [0.5, -0.25, 1.0, 0.0, 2.0, -1.5, 0.75, -0.5, 0.125, 1.25, -2.0, 0.25]
T = [
    [1.0, -0.5, 0.9, 0.0, 0.8, -0.2, 0.05, -0.7, 0.6, -0.1, 0.4, 0.3],
    [0.6, 0.4, -0.9, 0.0, -0.8, 0.1, 0.5, -0.7, -0.2, 0.35, -0.3, 0.15],
    [0.2, -0.7, 0.05, 0.0, 0.45, 0.55, -0.65, 0.3, -0.75, 0.85, -0.25, -0.95],
]
M = [
    [1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1],
    [0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1],
    [1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0],
]


def _merge(tmp_path, method, *, semantics="default", weights=(1, 1, 1), density=None, delta_only=False,
           masks=None, **params):
    base = torch.zeros(12) if delta_only else torch.tensor(B)
    save_file({NAME: base.view(3, 4)}, tmp_path / "base.safetensors")
    models = []
    for i, t in enumerate(T):
        save_file({NAME: (base + torch.tensor(t)).view(3, 4)}, tmp_path / f"ft{i}.safetensors")
        p = {"weight": weights[i]}
        if density is not None:
            p["density"] = density
        models.append(ModelSpec(str(tmp_path / f"ft{i}.safetensors"), p))
    if masks:  # the fixed M1..M3 in place of the counter-based mask
        masks(lambda i, name, start, count: torch.tensor(M[i][start:start + count]))
    cfg = MergeConfig(method=method, base=str(tmp_path / "base.safetensors"), models=tuple(models),
                      parameters=params, semantics=semantics)
    merge(cfg, tmp_path / "out")
    (out_file,) = (tmp_path / "out").glob("model-*.safetensors")
    return load_file(out_file)[NAME].view(-1)


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected), atol=2e-6, rtol=0)


def test_task_arithmetic_lambda(tmp_path):
    _close(_merge(tmp_path, "task_arithmetic", **{"lambda": 0.3}),
           [1.04, -0.49, 1.015, 0, 2.135, -1.365, 0.72, -0.83, 0.02, 1.58, -2.045, 0.1])


def test_mergekit_task_arithmetic_weights(tmp_path):
    _close(_merge(tmp_path, "task_arithmetic", semantics="mergekit", weights=(0.3, 0.3, 0.3)),
           [1.04, -0.49, 1.015, 0, 2.135, -1.365, 0.72, -0.83, 0.02, 1.58, -2.045, 0.1])


def test_simple_average(tmp_path):
    _close(_merge(tmp_path, "linear"),
           [1.1, -0.516667, 1.016667, 0, 2.15, -1.35, 0.716667, -0.866667, 0.008333, 1.616667, -2.05, 0.083333])


@pytest.mark.parametrize("semantics", ["mergekit", "default"])
def test_ties_unit_weights(tmp_path, semantics):
    _close(_merge(tmp_path, "ties", semantics=semantics, density=0.5),
           [1.3, -0.85, 1.9, 0, 2.8, -0.95, 0.1, -1.2, -0.625, 2.1, -2.0, -0.7])


@pytest.mark.parametrize("semantics", ["mergekit", "default"])
def test_ties_weighted(tmp_path, semantics):
    _close(_merge(tmp_path, "ties", semantics=semantics, density=0.5, weights=(1, 0.5, 0.25)),
           [1.366667, -0.79, 1.9, 0, 2.8, -0.95, 1.25, -1.2, 0.725, 2.1, -2.0, -0.7])


def test_peft_ties_total(tmp_path):
    _close(_merge(tmp_path, "ties", semantics="peft", density=0.5, delta_only=True),
           [0.8, -0.6, 0.9, 0, 0.8, 0.55, -0.65, -0.7, -0.75, 0.85, 0, -0.95])


def test_peft_ties_frequency(tmp_path):
    _close(_merge(tmp_path, "ties", semantics="peft", density=0.5, delta_only=True, sign_method="count"),
           [0.8, -0.6, 0.9, 0, 0.8, 0.55, 0.5, -0.7, 0.6, 0.85, 0, -0.95])


def test_peft_ties_weighted(tmp_path):
    _close(_merge(tmp_path, "ties", semantics="peft", density=0.5, delta_only=True, weights=(1, 0.5, 0.25)),
           [0.65, -0.3375, 0.9, 0, 0.8, 0.1375, -0.1625, -0.525, -0.1875, 0.2125, 0, -0.2375])


@pytest.mark.parametrize(("density", "expected"), [
    (0.5, [1.6, -0.8, 0, 0, 0, 0.55, -0.15, -1.4, -0.15, 0.85, 0, -0.95]),
    (0.2, [1.0, 0, 0, 0, -0.8, 0, 0, 0, 0, 0.85, 0, -0.95]),
])
def test_peft_magnitude_prune(tmp_path, density, expected):
    _close(_merge(tmp_path, "magnitude_prune", semantics="peft", density=density, delta_only=True), expected)


@pytest.mark.parametrize(("merge_func", "expected"), [
    ("sum", [1.6, -1.2, -0.9, 0, 1.25, 0.55, -0.65, -1.4, -0.75, 1.2, 0.4, -0.95]),
    ("mean", [0.8, -0.6, -0.9, 0, 0.625, 0.55, -0.65, -0.7, -0.75, 0.6, 0.4, -0.95]),
    ("max", [1.0, -0.7, 0, 0, 0.8, 0.55, -0.65, -0.7, -0.75, 0.85, 0.4, -0.95]),
])
def test_fusionbench_ties_merged_vector(tmp_path, merge_func, expected):
    _close(_merge(tmp_path, "ties", semantics="fusionbench", density=0.5, delta_only=True, merge_func=merge_func), expected)


def test_fusionbench_ties_full(tmp_path):
    _close(_merge(tmp_path, "ties", semantics="fusionbench", density=0.5, **{"lambda": 0.3}),
           [0.98, -0.61, 0.73, 0, 2.375, -1.335, 0.555, -0.92, -0.1, 1.61, -1.88, -0.035])


DARED = [
    [2, 0, 1.8, 0, 0, -0.4, 0, -1.4, 1.2, 0, 0, 0.6],
    [0, 0.8, -1.8, 0, -1.6, 0.2, 1, 0, 0, 0.7, 0, 0.3],
    [0.4, -1.4, 0, 0, 0, 0, -1.3, 0.6, 0, 1.7, -0.5, 0],
]


@pytest.mark.parametrize("semantics", ["default", "peft", "fusionbench"])
def test_dare_each_model(tmp_path, inject_masks, semantics):
    # One model at a time with dare_linear, weight 1: the merged delta is that model's dare(τ).
    for i in range(3):
        w = [0, 0, 0]
        w[i] = 1
        sub = tmp_path / f"m{i}"
        sub.mkdir()
        out = _merge(sub, "dare_linear", semantics=semantics, density=0.5, delta_only=True, weights=w, masks=inject_masks)
        _close(out, DARED[i])


def test_peft_dare_linear(tmp_path, inject_masks):
    _close(_merge(tmp_path, "dare_linear", semantics="peft", density=0.5, delta_only=True, masks=inject_masks),
           [2.4, -0.6, 0, 0, -1.6, -0.2, -0.3, -0.8, 1.2, 2.4, -0.5, 0.9])


def test_peft_dare_ties(tmp_path, inject_masks):
    _close(_merge(tmp_path, "dare_ties", semantics="peft", density=0.5, delta_only=True, masks=inject_masks),
           [1.2, -1.4, 1.8, 0, -1.6, -0.4, -1.3, -1.4, 1.2, 1.2, -0.5, 0.45])


def test_fusionbench_dare_task_arithmetic(tmp_path, inject_masks):
    _close(_merge(tmp_path, "dare_linear", semantics="fusionbench", density=0.5, masks=inject_masks, **{"lambda": 0.3}),
           [1.22, -0.43, 1.0, 0, 1.52, -1.56, 0.66, -0.74, 0.485, 1.97, -2.15, 0.52])


def test_fusionbench_dare_simple_average(tmp_path, inject_masks):
    _close(_merge(tmp_path, "dare_linear", semantics="fusionbench", density=0.5, masks=inject_masks,
                  weights=(1 / 3, 1 / 3, 1 / 3)),
           [1.3, -0.45, 1.0, 0, 1.466667, -1.566667, 0.65, -0.766667, 0.525, 2.05, -2.166667, 0.55])


@pytest.mark.parametrize(("merge_func", "expected"), [
    ("sum", [1.22, -0.67, 0.46, 0, 1.52, -1.62, 0.36, -0.92, 0.485, 1.97, -2.15, 0.52]),
    ("mean", [0.86, -0.67, 0.46, 0, 1.52, -1.62, 0.36, -0.92, 0.485, 1.61, -2.15, 0.385]),
])
def test_fusionbench_dare_ties(tmp_path, inject_masks, merge_func, expected):
    _close(_merge(tmp_path, "dare_ties", semantics="fusionbench", density=0.5, masks=inject_masks,
                  merge_func=merge_func, trim_density=0.5, **{"lambda": 0.3}), expected)


def test_mergekit_dare_linear_l1_rescale(tmp_path, inject_masks):
    _close(_merge(tmp_path, "dare_linear", semantics="mergekit", density=0.5, masks=inject_masks),
           [2.386441, -0.977542, 0.94375, 0, 0.75, -1.64375, 0.275318, -0.970339, 1.025, 3.439248, -2.483051, 0.934375])


def test_mergekit_dare_ties_l1_rescale(tmp_path, inject_masks):
    _close(_merge(tmp_path, "dare_ties", semantics="mergekit", density=0.5, masks=inject_masks),
           [2.386441, -1.602542, -0.40625, 0, 0.75, -1.8, -0.505932, -1.55, 1.025, 3.439248, -2.483051, 0.934375])


def test_tie_rule_lowest_index_first(tmp_path):
    # The spec's tie case: x = [.5, −.5, .5, .1, .2, .5], keep 50 %: ours keeps indices {0, 1, 2}.
    x = torch.tensor([0.5, -0.5, 0.5, 0.1, 0.2, 0.5])
    save_file({NAME: torch.zeros(2, 3)}, tmp_path / "base.safetensors")
    save_file({NAME: x.view(2, 3)}, tmp_path / "ft.safetensors")
    cfg = MergeConfig(method="magnitude_prune", base=str(tmp_path / "base.safetensors"),
                      models=(ModelSpec(str(tmp_path / "ft.safetensors"), {"density": 0.5}),))
    merge(cfg, tmp_path / "out", max_memory=64)  # tiny budget: one row per block, ties span blocks
    (out_file,) = (tmp_path / "out").glob("model-*.safetensors")
    assert load_file(out_file)[NAME].view(-1).tolist() == [0.5, -0.5, 0.5, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("semantics", ["peft", "fusionbench"])
def test_peft_and_fusionbench_dare_divides_by_the_density(tmp_path, inject_masks, semantics):
    # PEFT and FusionBench rescale with a float32 division by the keep probability; × (1/density)
    # is one ulp away from it at a density that is not a power of two (0.3 here, checked below).
    got = _merge(tmp_path, "dare_linear", semantics=semantics, density=0.3, delta_only=True, masks=inject_masks)
    kept = torch.tensor(T) * torch.tensor(M, dtype=torch.float32)
    divided = kept.div(0.3).sum(dim=0)
    assert torch.equal(got, divided)
    assert not torch.equal(divided, kept.mul(1 / 0.3).sum(dim=0))  # the test tells the two rules apart
