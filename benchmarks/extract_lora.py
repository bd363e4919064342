"""Benchmark: `streammerge extract-lora` against `mergekit-extract-lora` on the same small Llama.

    python benchmarks/extract_lora.py --data /tmp/xl --mergekit benchmarks/mergekit/.venv --ranks 32 128

Generates (once) a bf16 Llama-shaped base (hidden 1024, intermediate 2816, 4 layers, vocab 32000:
117 M parameters) and a fine-tune whose every linear weight moved by a τ with a decaying spectrum
(σ_i ∝ 0.97^i over 512 directions, rms 1e-3) plus the bf16 rounding that comes with it; norms and
embeddings changed too. Then, per rank: wall time and peak anonymous memory (RssAnon, sampled) of
each tool, and each tensor's relative error ‖τ − s·B A‖_F / ‖τ‖_F computed here, in float64, from
the adapters as written (the same measure for both tools). Results: benchmarks/results/extract_lora.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import run_measured  # noqa: E402  (the same RssAnon sampler as the merge benchmark)

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB = 1024, 2816, 4, 16, 4, 32000


def make_models(root: Path) -> None:
    from make_models import tensor_shapes

    shapes = tensor_shapes(HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB)
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for name, shape in shapes.items():
        w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        base[name] = w.to(torch.bfloat16)
        if len(shape) == 1:
            delta = torch.randn(shape, generator=gen) * 1e-3
        elif "embed" in name or "lm_head" in name:
            delta = torch.randn(shape, generator=gen) * 1e-4
        else:
            k = 512
            left = torch.randn(shape[0], k, generator=gen)
            right = torch.randn(k, shape[1], generator=gen)
            delta = (left * 0.97 ** torch.arange(k)) @ right
            delta *= 1e-3 / delta.pow(2).mean().sqrt()
        ft[name] = (w + delta).to(torch.bfloat16)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    for folder, sd in (("base", base), ("ft", ft)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        save_file(sd, root / folder / "model.safetensors", metadata={"format": "pt"})
        (root / folder / "config.json").write_text(json.dumps(config, indent=2))


def errors(root: Path, adapter: Path) -> dict[str, float]:
    """Relative Frobenius error of every factored weight, from the adapter's files as written."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(adapter / "adapter_model.safetensors")
    base, ft = load_file(root / "base" / "model.safetensors"), load_file(root / "ft" / "model.safetensors")
    out = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        pattern = {k: v for k, v in cfg.get("alpha_pattern", {}).items()}
        alpha = pattern.get(module, cfg["lora_alpha"])
        scale = alpha / r if r else 0.0
        tau = ft[module + ".weight"].double() - base[module + ".weight"].double()
        err = tau - scale * (b.double() @ a.double())
        out[module] = float(err.norm() / tau.norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--mergekit", type=Path, help="venv with mergekit (its bin/mergekit-extract-lora)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "extract_lora.json")
    args = ap.parse_args()
    if not (args.data / "ft" / "model.safetensors").exists():
        make_models(args.data)
    work = Path(tempfile.mkdtemp(prefix="xl-", dir=args.data))
    streammerge = [sys.executable, "-m", "streammerge", "extract-lora"]
    rows, errs = [], {}
    try:
        for rank in args.ranks:
            runs = {
                "streammerge (auto: exact SVD, float64)": [*streammerge, str(args.data / "ft"), str(work / f"sm-{rank}"),
                                                           "--base", str(args.data / "base"), "--rank", str(rank), "-q", "--device", "cpu"],
                "streammerge --svd randomized": [*streammerge, str(args.data / "ft"), str(work / f"smr-{rank}"), "--base",
                                                 str(args.data / "base"), "--rank", str(rank), "-q", "--svd", "randomized", "--device", "cpu"],
            }
            if args.mergekit:
                runs["mergekit-extract-lora"] = [str(args.mergekit / "bin" / "mergekit-extract-lora"), "--model",
                                                 str(args.data / "ft"), "--base-model", str(args.data / "base"), "--out-path",
                                                 str(work / f"mk-{rank}"), "--max-rank", str(rank), "--quiet"]
            for tool, cmd in runs.items():
                measured = run_measured(cmd)
                folder = Path(cmd[cmd.index("--out-path") + 1]) if "--out-path" in cmd else Path(cmd[5])
                e = errors(args.data, folder)
                errs[(tool, rank)] = e
                rows.append({"tool": tool, "rank": rank, **measured, "mean_error": sum(e.values()) / len(e),
                             "max_error": max(e.values()), "errors": e})
                print(f"rank {rank:4d}  {tool:42s} {measured['wall_s']:7.1f} s  peak anon "
                      f"{measured['peak_anon_bytes'] / 2**20:6.0f} MiB  error mean {rows[-1]['mean_error']:.5f} "
                      f"max {rows[-1]['max_error']:.5f}", flush=True)
        for rank in args.ranks:
            tools = [t for (t, r) in errs if r == rank]
            print(f"\nrank {rank}: relative error per tensor (layer 0 and the last layer)")
            print("  " + "tensor".ljust(34) + "".join(t.split(" (")[0][:28].rjust(30) for t in tools))
            for name in errs[(tools[0], rank)]:
                if ".layers.0." in name or f".layers.{LAYERS - 1}." in name:
                    print("  " + name.ljust(34) + "".join(f"{errs[(t, rank)].get(name, float('nan')):30.6f}" for t in tools))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"shape": [HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB], "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
