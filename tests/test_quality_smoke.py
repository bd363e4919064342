"""The quality benchmark (benchmarks/quality) at smoke size, so it cannot rot: train, merge through
the CLI, evaluate. Plus exact tests of its data and of its greedy exact-match evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks" / "quality"))

import tasks  # noqa: E402


class Oracle(torch.nn.Module):
    """Answers from a table: logits one-hot on the right next character, or on `wrong_at` a wrong one."""

    def __init__(self, examples: list[tuple[str, str]], wrong_at: int | None = None):
        super().__init__()
        self.full = {prompt: answer + tasks.EOS for prompt, answer in examples}
        self.prompt_len = len(examples[0][0])
        self.wrong_at = wrong_at

    def forward(self, input_ids: torch.Tensor):
        logits = torch.zeros(*input_ids.shape, len(tasks.CHARS))
        for row, ids in enumerate(input_ids.tolist()):
            prompt, done = tasks.decode(ids[: self.prompt_len]), len(ids) - self.prompt_len
            char = self.full[prompt][done]
            if done == self.wrong_at:
                char = "9" if char != "9" else "8"
            logits[row, -1, tasks.VOCAB[char]] = 1.0
        return type("Output", (), {"logits": logits})


@pytest.mark.parametrize("task", tasks.EVAL_TASKS)
def test_exact_match_is_greedy_and_counts_eos(task):
    examples = tasks.held_out(task, 20, seed=3)
    assert tasks.exact_match(Oracle(examples), examples) == 1.0
    answer_len = len(examples[0][1])
    assert tasks.exact_match(Oracle(examples, wrong_at=0), examples) == 0.0
    assert tasks.exact_match(Oracle(examples, wrong_at=answer_len), examples) == 0.0  # a missing EOS is wrong


def test_examples_are_right_and_training_never_sees_evaluation_prompts():
    (prompt, answer), = tasks.held_out("addition", 1, seed=7)
    a, b = prompt[1:-1].split("+")
    assert int(answer[::-1]) == int(a) + int(b) and len(answer) == tasks.DIGITS + 1
    (prompt, answer), = tasks.held_out("reversal", 1, seed=7)
    assert answer == prompt[1:-1][::-1]
    held = tasks.held_out("addition", 300, seed=0)
    assert len({p for p, _ in held}) == 300
    exclude = {p for p, _ in held}
    batch = tasks.Stream({"addition": 1.0}, seed=0, exclude=exclude).batch(400)
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        text = tasks.decode(ids)
        prompt = text[: text.index("=") + 1]
        assert prompt not in exclude
        # the loss sees the answer and EOS, never the prompt
        assert labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) : len(prompt) + tasks.DIGITS + 2] == ids[len(prompt) : len(prompt) + tasks.DIGITS + 2]


def test_smoke_run_trains_merges_through_the_cli_and_evaluates(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "benchmarks/quality/run.py", "--out", str(tmp_path), "--smoke", "--keep-merges"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}

    assert results["pretrain_loss"]["last"] < results["pretrain_loss"]["first"]
    assert {"base", "ft_addition", "ft_reversal"} <= set(rows)
    for r in rows.values():
        for split in ("val", "test"):
            assert set(r[split]) == set(tasks.EVAL_TASKS) and all(0 <= v <= 1 for v in r[split].values())
    assert "| ft_addition | 0.9 |" in done.stdout and "| dare_ties" in done.stdout  # the tables were printed

    # Each merge went through the CLI from the YAML the script wrote.
    merged = [r for r in results["rows"] if r["experiment"] in ("dare", "merge")]
    assert {r["method"] for r in merged} == {"dare_linear", "dare_ties"}
    for r in merged:
        config = yaml.safe_load((tmp_path / "configs" / f"{r['name']}.yaml").read_text())
        assert config["merge_method"] == r["method"] and config["base_model"] == str(tmp_path / "models" / "base")
        assert json.loads((tmp_path / "merges" / r["name"] / "streammerge_manifest.json").read_text())

    # DARE at drop rate 0.9 on the addition fine-tune: ~90 % of a projection's delta dropped, the rest x10.
    def tensor(folder: str, name: str = "model.layers.0.mlp.up_proj.weight") -> torch.Tensor:
        (shard,) = (tmp_path / folder).glob("*.safetensors")
        return load_file(shard)[name]

    base, tuned, out = tensor("models/base"), tensor("models/ft_addition"), tensor("merges/dare_addition_p0.9_s0")
    kept = (out != base) & (tuned != base)
    assert 0.05 < kept.float().mean() < 0.15
    torch.testing.assert_close(out[kept] - base[kept], 10 * (tuned[kept] - base[kept]), rtol=1e-4, atol=1e-6)
