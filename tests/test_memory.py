"""Bounded memory: a tensor much larger than --max-memory is merged in row blocks, the process's
anonymous memory stays within the budget (plus fixed scratch), and the bytes equal an unbounded run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

BUDGET = 16 << 20  # 16 MiB
ROWS, COLS = 32768, 1024  # one bf16 tensor of 64 MiB per model: 4x the budget

SCRIPT = r"""
import json, re, sys, threading, time
from streammerge import MergeConfig, ModelSpec, merge

def anon():
    return int(re.search(r"RssAnon:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

root, method, budget, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
models = (1,) if method == "slerp" else (1, 2)  # slerp: the base and one other model
cfg = MergeConfig(method=method, base=f"{root}/base.safetensors", seed=1, parameters={"t": 0.3} if method == "slerp" else {},
                  models=tuple(ModelSpec(f"{root}/ft{i}.safetensors", {"weight": 0.5, "density": 0.4}) for i in models))
before, peak, running = anon(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
merge(cfg, out, max_memory=budget, compile="off")
running[0] = False; t.join()
print(json.dumps({"growth": peak[0] - before}))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(ROWS, COLS, generator=gen) * 0.02).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": base, "model.norm.weight": torch.ones(COLS, dtype=torch.bfloat16)}, root / "base.safetensors")
    for i in (1, 2):
        ft = (base.float() + torch.randn(ROWS, COLS, generator=gen) * 0.002).to(torch.bfloat16)
        save_file({"model.embed_tokens.weight": ft, "model.norm.weight": torch.ones(COLS, dtype=torch.bfloat16)}, root / f"ft{i}.safetensors")
    return root


def _run(root, method, budget, out):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(root), method, str(budget), str(out)],
                          capture_output=True, text=True, check=True)
    shard = next(out.glob("model-*.safetensors"))
    return json.loads(done.stdout.strip().splitlines()[-1])["growth"], hashlib.sha256(shard.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della_linear", "slerp"])
def test_a_tensor_four_times_the_budget_stays_within_it(big, tmp_path, method):
    growth, small = _run(big, method, BUDGET, tmp_path / "small")
    tensor_bytes = ROWS * COLS * 2
    # The budget plus fixed scratch (per-thread chunk buffers, histograms), far below one copy of
    # the tensor: nothing holds it whole (its inputs are page cache, not anonymous memory).
    assert growth < BUDGET + 24 * 2**20, growth / 2**20
    assert growth < tensor_bytes / 1.5
    _, whole = _run(big, method, 1 << 30, tmp_path / "whole")
    assert small == whole
