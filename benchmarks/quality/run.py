"""Quality benchmark: do DARE, TIES and task arithmetic keep what real fine-tunes learned?

    python benchmarks/quality/run.py --out /tmp/quality            # the full run (minutes, CPU)
    python benchmarks/quality/run.py --out /tmp/quality-smoke --smoke   # the same pipeline, tiny, seconds
    python benchmarks/quality/run.py --report /tmp/quality/results.json # the table and plots again

1. Pretrains a small Llama (transformers) on a mixture of synthetic tasks (tasks.py): the format,
   the one-digit sums, and the two target tasks' prompts answered both the right way and, a little
   more often, a competing way (copying), so the base has the abilities but mostly answers wrong.
2. Fine-tunes two copies of it, one on two-digit addition, one on sequence reversal, with a small
   learning rate, so the task vectors are small next to the weights (the DARE paper's setting).
3. Saves the three as HF checkpoints and merges them with the streammerge CLI, one subprocess per
   merge (`python -m streammerge merge CONFIG OUT --json --quiet --force --threads N`), from YAML configs written
   under OUT/configs:
   - DARE alone (the DARE paper's first experiment): base + one fine-tune, dare_linear, weight 1,
     density = 1 - drop rate, for each drop rate and several mask seeds;
   - both fine-tunes: task_arithmetic, ties, dare_linear, dare_ties over a grid of density and λ.
4. Evaluates every model (transformers' LlamaForCausalLM loading the merged folder) by greedy
   decoding and exact match on held-out examples of both tasks: a validation set picks each
   method's best grid point, the test set gives the numbers reported.

Writes OUT/results.json, prints the tables and, with matplotlib installed, saves OUT/dare.png and
OUT/merges.png. Everything is seeded; the data is generated here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import tasks  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class Scale:
    hidden: int
    layers: int
    heads: int
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float  # small: the fine-tune's delta stays small next to the weights, as in the paper
    eval_examples: int  # per task and per split (validation, test)
    drop_rates: tuple[float, ...]
    dare_finetunes: tuple[str, ...]  # the fine-tunes DARE is applied to alone
    dare_seeds: tuple[int, ...]
    methods: tuple[str, ...]
    densities: tuple[float, ...]
    lambdas: tuple[float, ...]


# The one-digit sums make addition learnable in minutes; each target prompt comes with its right answer
# and, more often, a competing one (tasks.py), so the fine-tunes only have to choose: small deltas.
PRETRAIN_MIXTURE = {
    "copy": 0.05, "digit_sum": 0.15, "marked_sum": 0.38,
    "addition": 0.06, "addition_alt": 0.14, "reversal": 0.1, "reversal_alt": 0.12,
}

FULL = Scale(
    hidden=128, layers=4, heads=4, batch=64,
    pretrain_steps=1400, pretrain_lr=2e-3,
    finetune_steps=150, finetune_lr=1e-4,
    eval_examples=300,
    drop_rates=(0.0, 0.5, 0.7, 0.9, 0.95, 0.99), dare_finetunes=tasks.EVAL_TASKS, dare_seeds=(0, 1, 2),
    methods=METHODS, densities=(0.2, 0.5, 0.8), lambdas=(0.5, 1.0, 1.5),
)
SMOKE = Scale(
    hidden=32, layers=2, heads=2, batch=16,
    pretrain_steps=20, pretrain_lr=3e-3,
    finetune_steps=5, finetune_lr=3e-3,
    eval_examples=16,
    drop_rates=(0.9,), dare_finetunes=("addition",), dare_seeds=(0,),
    methods=("dare_ties",), densities=(0.5,), lambdas=(1.0,),
)


# ---- models and training ------------------------------------------------------------------------


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers: the benchmark prints its own lines."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def new_model(scale: Scale, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tasks.CHARS), hidden_size=scale.hidden, intermediate_size=4 * scale.hidden,
        num_hidden_layers=scale.layers, num_attention_heads=scale.heads, num_key_value_heads=scale.heads,
        max_position_embeddings=32, tie_word_embeddings=False,  # untied: lm_head is its own task vector
        bos_token_id=None, eos_token_id=tasks.VOCAB[tasks.EOS], pad_token_id=tasks.VOCAB[tasks.EOS],
    )
    return LlamaForCausalLM(config)


def load_model(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def train(model, stream: tasks.Stream, *, steps: int, lr: float, batch: int) -> list[float]:
    """AdamW, linear warmup then cosine decay, gradient clipping at 1. Returns the loss per step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 5)
    losses = []
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        data = stream.batch(batch)
        loss = model(input_ids=data.input_ids, labels=data.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def relative_delta(base, tuned) -> float:
    """‖θ_ft − θ_base‖ / ‖θ_base‖ over all weights: how small the task vector is."""
    base_state, num, den = base.state_dict(), 0.0, 0.0
    for name, value in tuned.state_dict().items():
        num += (value - base_state[name]).double().pow(2).sum().item()
        den += base_state[name].double().pow(2).sum().item()
    return math.sqrt(num / den)


# ---- merges through the CLI ---------------------------------------------------------------------


def merge_config(method: str, base: Path, finetunes: list[Path], *, density: float | None, lam: float, seed: int) -> dict:
    """A mergekit-style config: every fine-tune with weight 1 (and density), λ at the top level."""
    params = {"weight": 1.0} | ({} if density is None else {"density": density})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": dict(params)} for ft in finetunes],
        "parameters": {"lambda": lam},
        "seed": seed,
    }


def cli_merge(config: dict, config_path: Path, output: Path, *, threads: int) -> tuple[list[str], float]:
    """Writes the YAML and runs the streammerge CLI on it; returns the command and its wall time."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "streammerge", "merge", str(config_path), str(output),
               "--json", "--quiet", "--force", "--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"streammerge failed (exit {done.returncode}) on {config_path}:\n{done.stderr.strip()}")
    summary = json.loads(done.stdout)
    assert summary["status"] == "ok", summary
    return command, seconds


# ---- evaluation ---------------------------------------------------------------------------------


def evaluate(model, sets: dict[str, dict[str, list]]) -> dict[str, dict[str, float]]:
    """Exact-match accuracy per split ("val", "test") and task."""
    return {split: {task: tasks.exact_match(model, examples) for task, examples in by_task.items()}
            for split, by_task in sets.items()}


def eval_sets(n: int) -> dict[str, dict[str, list]]:
    """Disjoint validation and test examples of each task."""
    out: dict[str, dict[str, list]] = {"val": {}, "test": {}}
    for task in tasks.EVAL_TASKS:
        examples = tasks.held_out(task, 2 * n, seed=0)
        out["val"][task], out["test"][task] = examples[:n], examples[n:]
    return out


# ---- the run ------------------------------------------------------------------------------------


def merges_to_run(scale: Scale, models: Path) -> list[dict]:
    """Every merge of the benchmark: name, experiment, its config and its coordinates."""
    base = models / "base"
    fts = {task: models / f"ft_{task}" for task in tasks.EVAL_TASKS}
    runs = []
    for task in scale.dare_finetunes:
        for rate in scale.drop_rates:
            for seed in scale.dare_seeds if rate > 0 else scale.dare_seeds[:1]:  # no drop: nothing random
                runs.append({
                    "name": f"dare_{task}_p{rate:g}_s{seed}", "experiment": "dare", "finetune": task,
                    "method": "dare_linear", "drop_rate": rate, "density": 1 - rate, "lambda": 1.0, "seed": seed,
                    "config": merge_config("dare_linear", base, [fts[task]], density=round(1 - rate, 6), lam=1.0, seed=seed),
                })
    for method in scale.methods:
        for density in scale.densities if method != "task_arithmetic" else (None,):
            for lam in scale.lambdas:
                runs.append({
                    "name": f"{method}_d{density:g}_l{lam:g}" if density else f"{method}_l{lam:g}",
                    "experiment": "merge", "method": method, "density": density, "lambda": lam, "seed": 0,
                    "config": merge_config(method, base, list(fts.values()), density=density, lam=lam, seed=0),
                })
    return runs


def run(out: Path, scale: Scale, *, threads: int, keep_merges: bool = False) -> dict:
    torch.set_num_threads(threads)
    quiet_transformers()
    started = time.perf_counter()
    models = out / "models"
    sets = eval_sets(scale.eval_examples)
    exclude = {p for by_task in sets.values() for examples in by_task.values() for p, _ in examples}
    timings: dict[str, float] = {}
    rows: list[dict] = []

    t = time.perf_counter()
    base = new_model(scale, seed=0)
    pre_losses = train(base, tasks.Stream(PRETRAIN_MIXTURE, seed=0, exclude=exclude),
                       steps=scale.pretrain_steps, lr=scale.pretrain_lr, batch=scale.batch)
    base.save_pretrained(models / "base")
    timings["pretrain_s"] = time.perf_counter() - t
    rows.append({"name": "base", "experiment": "reference", **evaluate(base, sets)})
    n_params = sum(p.numel() for p in base.parameters())
    print(f"pretrained base ({n_params / 1e6:.2f} M parameters) in {timings['pretrain_s']:.0f} s: "
          f"loss {pre_losses[0]:.3f} -> {pre_losses[-1]:.3f}; test {fmt_pair(rows[-1]['test'])}", flush=True)

    t = time.perf_counter()
    deltas = {}
    for i, task in enumerate(tasks.EVAL_TASKS):
        tuned = load_model(models / "base")
        train(tuned, tasks.Stream({task: 1.0}, seed=1 + i, exclude=exclude),
              steps=scale.finetune_steps, lr=scale.finetune_lr, batch=scale.batch)
        tuned.save_pretrained(models / f"ft_{task}")
        deltas[task] = relative_delta(base, tuned)
        rows.append({"name": f"ft_{task}", "experiment": "reference", **evaluate(tuned, sets)})
        print(f"fine-tuned on {task}: test {fmt_pair(rows[-1]['test'])}", flush=True)
    timings["finetune_s"] = time.perf_counter() - t
    print(f"fine-tuned in {timings['finetune_s']:.0f} s; ‖τ‖/‖θ‖: "
          + ", ".join(f"{task} {d:.4f}" for task, d in deltas.items()), flush=True)

    t = time.perf_counter()
    merge_seconds = []
    for spec in merges_to_run(scale, models):
        config = spec.pop("config")
        dest = out / "merges" / spec["name"]
        command, seconds = cli_merge(config, out / "configs" / f"{spec['name']}.yaml", dest, threads=threads)
        merge_seconds.append(seconds)
        rows.append({**spec, **evaluate(load_model(dest), sets)})
        if not keep_merges:
            shutil.rmtree(dest)
        print(f"  {spec['name']}: test {fmt_pair(rows[-1]['test'])} (merge {seconds:.1f} s)", flush=True)
    timings["merges_and_eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    return {
        "command": " ".join(["python", "benchmarks/quality/run.py", *sys.argv[1:]]),
        "cli_example": " ".join(["python", "-m", "streammerge", *command[3:]]),
        "scale": asdict(scale),
        "pretrain_mixture": PRETRAIN_MIXTURE,
        "parameters": n_params,
        "relative_delta": deltas,
        "pretrain_loss": {"first": pre_losses[0], "last": pre_losses[-1]},
        "merges": len(merge_seconds),
        "merge_wall_s": {"mean": statistics.mean(merge_seconds), "max": max(merge_seconds)},
        "threads": threads,
        "timings": timings,
        "torch": torch.__version__,
        "rows": rows,
    }


# ---- reporting ----------------------------------------------------------------------------------


def fmt_pair(acc: dict[str, float]) -> str:
    return " ".join(f"{task} {acc[task]:.3f}" for task in tasks.EVAL_TASKS)


def dare_curves(rows: list[dict]) -> dict[str, list[tuple[float, dict[str, float], dict[str, float]]]]:
    """Per fine-tune: (drop rate, mean test accuracy per task over seeds, min over seeds)."""
    curves: dict[str, list] = {}
    for task in tasks.EVAL_TASKS:
        runs = [r for r in rows if r["experiment"] == "dare" and r["finetune"] == task]
        for rate in sorted({r["drop_rate"] for r in runs}):
            at = [r["test"] for r in runs if r["drop_rate"] == rate]
            mean = {t: statistics.mean(a[t] for a in at) for t in tasks.EVAL_TASKS}
            low = {t: min(a[t] for a in at) for t in tasks.EVAL_TASKS}
            curves.setdefault(task, []).append((rate, mean, low))
    return curves


def best_per_method(rows: list[dict]) -> dict[str, dict]:
    """Each method's grid point with the best mean validation accuracy over both tasks."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["experiment"] != "merge":
            continue
        score = statistics.mean(r["val"].values())
        if r["method"] not in best or score > statistics.mean(best[r["method"]]["val"].values()):
            best[r["method"]] = r
    return best


def table(results: dict) -> str:
    rows, names = results["rows"], tasks.EVAL_TASKS
    head = "| " + " | ".join(names) + " | mean |"
    lines = ["Reference models (test exact match):", "", "| model " + head, "|---" * (len(names) + 2) + "|"]
    for r in rows:
        if r["experiment"] == "reference":
            lines.append(f"| {r['name']} | " + " | ".join(f"{r['test'][t]:.3f}" for t in names)
                         + f" | {statistics.mean(r['test'].values()):.3f} |")
    seeds = results["scale"]["dare_seeds"]
    lines += ["", f"DARE alone: base + one fine-tune, dare_linear, density = 1 - p, weight 1 "
                  f"(test exact match, mean over mask seeds {seeds}; min in brackets):", "",
              "| fine-tune | p | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, curve in dare_curves(rows).items():
        for rate, mean, low in curve:
            lines.append(f"| ft_{task} | {rate:g} | " + " | ".join(f"{mean[t]:.3f} ({low[t]:.3f})" for t in names) + " |")
    best = {id(r) for r in best_per_method(rows).values()}
    lines += ["", "Two-fine-tune merges, weight 1 each (test exact match; * = the method's best grid point "
                  "on the validation set):", "",
              "| method | density | λ " + head, "|---|---|---" + "|---" * (len(names) + 1) + "|"]
    for r in rows:
        if r["experiment"] == "merge":
            density = "-" if r["density"] is None else f"{r['density']:g}"
            mark = " *" if id(r) in best else ""
            lines.append(f"| {r['method']}{mark} | {density} | {r['lambda']:g} | "
                         + " | ".join(f"{r['test'][t]:.3f}" for t in names)
                         + f" | {statistics.mean(r['test'].values()):.3f} |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[Path]:
    """dare.png and merges.png, with matplotlib's Agg backend; nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    rows, names = results["rows"], tasks.EVAL_TASKS
    refs = {r["name"]: r["test"] for r in rows if r["experiment"] == "reference"}
    saved = []

    curves = dare_curves(rows)
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for (task, curve), color in zip(curves.items(), ("C0", "C1")):
            xs = list(range(len(curve)))
            ax.plot(xs, [m[task] for _, m, _ in curve], "o-", color=color, label=f"ft_{task} on {task}")
            other = next(t for t in names if t != task)
            ax.plot(xs, [m[other] for _, m, _ in curve], "x:", color=color, label=f"ft_{task} on {other}")
            ax.axhline(refs["base"][task], color=color, lw=0.8, ls="--", label=f"base on {task}")
        ax.set_xticks(range(len(curve)), [f"{rate:g}" for rate, _, _ in curve])
        ax.set(xlabel="DARE drop rate p (density 1 - p)", ylabel="test exact match", ylim=(-0.02, 1.02),
               title="DARE on one fine-tune (mean over mask seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        saved.append(out / "dare.png")
        fig.savefig(saved[-1], dpi=120)
        plt.close(fig)

    best = best_per_method(rows)
    if best:
        bars = {**refs, **{f"{m}\n(d={r['density'] if r['density'] is not None else '-'}, λ={r['lambda']:g})": r["test"]
                           for m, r in best.items()}}
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(names)
        for k, task in enumerate(names):
            ax.bar([i + k * width for i in range(len(bars))], [acc[task] for acc in bars.values()], width, label=task)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(bars))], list(bars), fontsize=7)
        ax.set(ylabel="test exact match", ylim=(0, 1.05),
               title="Two fine-tunes merged: each method at its best grid point (chosen on validation)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        saved.append(out / "merges.png")
        fig.savefig(saved[-1], dpi=120)
        plt.close(fig)
    return saved


def report(results: dict, out: Path) -> None:
    print(table(results))
    for path in plot(results, out):
        print(f"saved {path}")
    t = results["timings"]
    print(f"total {t['total_s']:.0f} s (pretrain {t['pretrain_s']:.0f} s, fine-tunes {t['finetune_s']:.0f} s, "
          f"{results['merges']} merges + evaluation {t['merges_and_eval_s']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (models, configs, results.json, plots)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the whole pipeline in seconds")
    # One thread by default: on a shared 2-core machine two torch threads ran a training step 10x slower.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training, evaluation, each merge)")
    parser.add_argument("--keep-merges", action="store_true", help="keep every merged checkpoint (default: deleted once evaluated)")
    parser.add_argument("--report", type=Path, metavar="RESULTS_JSON", help="print the tables and plot from a previous run")
    args = parser.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()), args.report.parent)
        return
    if args.out is None:
        parser.error("--out is required (or --report RESULTS_JSON)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args.out, SMOKE if args.smoke else FULL, threads=args.threads, keep_merges=args.keep_merges)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args.out)


if __name__ == "__main__":
    main()
