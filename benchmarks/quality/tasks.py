"""The synthetic tasks, their character tokenizer and exact-match evaluation (greedy decoding).

Every example is `prompt + answer + EOS`, one character per token, of a fixed length per task, so
greedy decoding of a task's prompts is a plain loop over a batch without padding. Generated from
seeded RNGs; nothing is downloaded.

    addition      "A47+85=" -> "231"               the sum, 3 digits, least significant first
    reversal      "Rqwertyuiop=" -> "poiuytrewq"   the 10 letters in reverse order
  pretraining only:
    addition_alt  "A47+85=" -> "4785"              a competing answer: the operands copied
    reversal_alt  "Rqwertyuiop=" -> "qwertyuiop"   a competing answer: the word copied
    marked_sum    "S47+85=" -> "231"               addition under another marker
    digit_sum     "A4+8=" -> "21"                  the 100 one-digit sums
    copy          "Cqw12tyu9pa=" -> "qw12tyu9pa"   the format

Why the competing answers: the base should already have the abilities and the fine-tunes only
choose which one a prompt gets, a small change on top (the regime in which the DARE paper explains
why SFT deltas are redundant). Pretraining shows each target prompt with its right answer and,
more often, with the competing one, so the base mostly answers the competing way. Addition is
learned mostly under the "S" marker, because with the two answers competing on the same prompts
the model did not learn to add within our step budget.

Addition is written least significant digit first (as in the "reversed output" setups of the
arithmetic-in-transformers literature), so each answer digit depends only on digits already seen
and the carry. Without the one-digit sums in pretraining, our small model stayed near 0 % on
two-digit addition for hundreds of steps before a sudden jump: the sum table is learned late and
abruptly, which a short fine-tune with small steps cannot do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

EOS = "."
CHARS = EOS + "0123456789abcdefghijklmnopqrstuvwxyz+=ACRS"
VOCAB = {c: i for i, c in enumerate(CHARS)}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = 2  # operand digits of the addition task (3 needs several times the training)
REVERSE_LEN = 10  # letters of the reversal task (and characters of copy)


def add(rng: random.Random, digits: int) -> tuple[str, str]:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return f"A{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1]


def addition(rng: random.Random) -> tuple[str, str]:
    return add(rng, DIGITS)


def digit_sum(rng: random.Random) -> tuple[str, str]:
    """One-digit addition, the 100 sums addition is made of (pretraining only)."""
    return add(rng, 1)


def marked_sum(rng: random.Random) -> tuple[str, str]:
    """Addition under another marker, "S" (pretraining only): the ability, apart from the "A" prompts."""
    prompt, answer = addition(rng)
    return "S" + prompt[1:], answer


def reversal(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(REVERSE_LEN))
    return f"R{word}=", word[::-1]


def copy(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS + "0123456789") for _ in range(REVERSE_LEN))
    return f"C{word}=", word


def addition_alt(rng: random.Random) -> tuple[str, str]:
    """An addition prompt answered with its operands copied: a competing answer (pretraining only)."""
    prompt, _ = addition(rng)
    return prompt, prompt[1:-1].replace("+", "")


def reversal_alt(rng: random.Random) -> tuple[str, str]:
    """A reversal prompt answered with the word copied: a competing answer (pretraining only)."""
    prompt, _ = reversal(rng)
    return prompt, prompt[1:-1]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition": addition, "reversal": reversal, "copy": copy, "digit_sum": digit_sum,
    "addition_alt": addition_alt, "reversal_alt": reversal_alt, "marked_sum": marked_sum,
}
EVAL_TASKS = ("addition", "reversal")


def encode(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (batch, length)
    labels: torch.Tensor  # -100 on the prompt: the loss is on the answer and EOS only


def held_out(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct evaluation examples of one task."""
    rng, seen, out = random.Random(f"eval-{task}-{seed}"), set(), []
    while len(out) < n:
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


class Stream:
    """Training batches from a mixture of tasks, never an evaluation prompt."""

    def __init__(self, mixture: dict[str, float], seed: int, exclude: set[str]):
        self.rng = random.Random(f"train-{seed}")
        self.tasks, self.weights = list(mixture), list(mixture.values())
        self.exclude = exclude

    def example(self) -> tuple[str, str]:
        task = self.rng.choices(self.tasks, self.weights)[0]
        while True:
            prompt, answer = TASKS[task](self.rng)
            if prompt not in self.exclude:
                return prompt, answer

    def batch(self, size: int) -> Batch:
        examples = [self.example() for _ in range(size)]
        length = max(len(p) + len(a) + 1 for p, a in examples)
        ids = torch.zeros(size, length, dtype=torch.long)  # 0 is EOS: padding after EOS, out of the loss
        labels = torch.full((size, length), -100, dtype=torch.long)
        for row, (prompt, answer) in enumerate(examples):
            seq = encode(prompt + answer + EOS)
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
        return Batch(ids, labels)


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, prompts: list[str], n_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy decoding of n_tokens after each prompt (prompts of equal length, so no padding)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor([encode(p) for p in prompts[i : i + batch_size]])
        start = ids.shape[1]
        for _ in range(n_tokens):
            logits = model(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        out += [decode(row) for row in ids[:, start:].tolist()]
    return out


def exact_match(model: torch.nn.Module, examples: list[tuple[str, str]]) -> float:
    """Fraction of examples whose greedy answer (answer + EOS) is exactly right."""
    n_tokens = len(examples[0][1]) + 1
    answers = greedy_answers(model, [p for p, _ in examples], n_tokens)
    return sum(got == want + EOS for got, (_, want) in zip(answers, examples)) / len(examples)
