"""Benchmark: the same merge from FP8 and from bf16 inputs, against the I/O floor (issue 21).

    python benchmarks/fp8.py --data /data/bench-fp8                      # TinyLlama widths, 8 layers
    python benchmarks/fp8.py --data /data/bench-fp8 --layers 22          # the whole TinyLlama-1.1B shape
    python benchmarks/fp8.py --data /data/fp8-7b --shape llama2-7b --inputs fp8   # FP8 only: 20 GB

Writes a Llama-shaped base and two fine-tunes in bf16 (make_models.py's synthetic weights), and the
same three models as fine-grained FP8 (every linear weight but lm_head quantized in 128x128 blocks,
`weight_scale_inv`, streammerge's own quantizer). Then, from a cold page cache each time (posix_fadvise
DONTNEED), the same dare_ties merge (weights 0.5, density 0.5, dtype bfloat16, --max-memory 1GiB)
runs as its own process on each set of inputs, and on the FP8 inputs with out_dtype float8_e4m3fn;
wall time and peak anonymous memory (RssAnon) are recorded, and after each run the I/O floor: reading
the same input files cold and writing as many bytes as the merge wrote, one after the other, and the
two at once as the merge does them (run.io_floor). Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from make_models import SHAPES, tensor_shapes, write_model  # noqa: E402
from run import CONFIG as MERGE_CONFIG, evict, input_files, io_floor, run_measured  # noqa: E402

from streammerge.io import quant  # noqa: E402

CONFIG = MERGE_CONFIG.replace("{method}", "dare_ties") + "{extra}"  # run.py's merge, plus FP8 output where asked


def write_pair(root: Path, shapes: dict, model: int, config: dict, shard_bytes: int, kinds: list[str]) -> None:
    """One model in bf16 (root/bf16/<name>) and/or as fine-grained FP8 (root/fp8/<name>), shard by shard."""
    name = "base" if model == 0 else f"ft{model}"
    for kind in kinds:
        folder = root / kind / name
        if (folder / "model.safetensors.index.json").exists():
            continue
        if kind == "bf16":
            write_model(folder, shapes, model, config, shard_bytes)
        else:
            write_model(folder, shapes, model, {**config, "quantization_config": quant.quantization_config([])}, shard_bytes,
                        encode=fp8_weight, stored_bytes=fp8_bytes)
        print(f"wrote {folder}", flush=True)


def fp8_weight(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A linear weight as fine-grained FP8 and its scales; anything else as it is."""
    if not quant.quantizable(name, t.shape):
        return {name: t}
    q, s = quant.quantize(t)
    return {name: q, quant.scale_name(name): s}


def fp8_bytes(name: str, shape: tuple[int, ...]) -> int:
    """The bytes fp8_weight stores for a tensor (its weight; the scales are 1/4096 of that)."""
    return torch.Size(shape).numel() * (1 if quant.quantizable(name, shape) else 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--shape", default="tinyllama", choices=["tinyllama", "llama2-7b"])
    ap.add_argument("--layers", type=int, help="the shape's widths with this many layers (default: 8 for tinyllama, "
                    "all of llama2-7b's 32)")
    ap.add_argument("--inputs", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fp8.json")
    args = ap.parse_args()
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    args.layers = args.layers or (8 if args.shape == "tinyllama" else layers)
    shapes = tensor_shapes(hidden, inter, args.layers, heads, kv, vocab)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": args.layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    for model in range(3):
        write_pair(args.data, shapes, model, config, int(2e9), args.inputs)

    rows = []
    runs = [("bf16", "bf16 in, bf16 out", ""), ("fp8", "FP8 in, bf16 out", ""),
            ("fp8", "FP8 in, FP8 out", "out_dtype: float8_e4m3fn\n")]
    runs = [r for r in runs if r[0] in args.inputs]
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        for kind, label, extra in runs:
            data = args.data / kind
            files = input_files(data)
            cfg = Path(tmp) / "merge.yaml"
            cfg.write_text(CONFIG.format(data=data, extra=extra))
            out = Path(tmp) / "out"
            evict(files)
            m = run_measured([sys.executable, "-m", "streammerge", "merge", str(cfg), str(out), "--quiet",
                              "--max-memory", args.max_memory, "--compile", args.compile])
            read = sum(f.stat().st_size for f in files)
            wrote = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            shutil.rmtree(out)
            floor = io_floor(files, wrote, Path(tmp) / "floor.bin")
            rows.append({"run": label, "input_bytes": read, "output_bytes": wrote, **m, **floor})
            print(f"{label}: {m['wall_s']:.1f} s, read {read / 1e9:.2f} GB, wrote {wrote / 1e9:.2f} GB, "
                  f"peak anon {m['peak_anon_bytes'] / 2**20:.0f} MiB; floor {floor['floor_s']:.1f} s "
                  f"(read {floor['read_s']:.1f} s + write {floor['write_s']:.1f} s; at once {floor['read_and_write_s']:.1f} s)",
                  flush=True)
    print("\n| inputs -> output | read (GB) | written (GB) | wall (s) | floor (s) | x floor | read and write at once (s) "
          "| x that | peak anon (MiB) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['input_bytes'] / 1e9:.2f} | {r['output_bytes'] / 1e9:.2f} | {r['wall_s']:.1f} | "
              f"{r['floor_s']:.1f} | {r['wall_s'] / r['floor_s']:.2f} | {r['read_and_write_s']:.1f} | "
              f"{r['wall_s'] / r['read_and_write_s']:.2f} | {r['peak_anon_bytes'] / 2**20:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": args.shape, "layers": args.layers, "compile": args.compile,
                                    "max_memory": args.max_memory, "cpus": os.cpu_count(), "torch": torch.__version__,
                                    "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
