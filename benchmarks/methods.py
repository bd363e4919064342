"""Wall time of every merge method through the CLI on one small model, to compare the methods.

    python benchmarks/methods.py [--dir /tmp/methods-bench]

Three 5632 x 2048 bf16 tensors (35M parameters, TinyLlama's MLP shape), a base and 2 fine-tunes,
`--compile off` (the numpy kernels, or torch where a method has no numpy kernel: the methods of their
own run their hooks in ~64K-element row slices on the compute threads). The times include
the CLI's start (about 1.5 s here: importing torch); the rate excludes nothing, so it understates
the steady state of big merges (benchmarks/run.py measures those against the I/O floor).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from streammerge.front.demo import finetune_of, save_checkpoint

from streammerge.methods import registry

METHODS = [m for m in registry.names() if m != "passthrough"]  # every method that merges


def finetunes(method: str) -> int:
    """How many fine-tunes the benchmarks merge with `method`: 2, or 1 where it takes only one."""
    return min(2, registry.get(method).max_models or 2)


def config(method: str, root: str = "") -> str:
    """Two fine-tunes (one where the method takes one), weight 0.5, density 0.5, its required t = 0.5;
    the models are root + base, ft1, ft2."""
    declared = registry.get(method)
    models = ["ft1", "ft2"][: finetunes(method)]
    required = [p.name for p in declared.params if p.default is None and not p.per_model and p.per_tensor]
    lines = [f"merge_method: {method}", f"base_model: {root}base", "models:"]
    lines += [f"  - {{model: {root}{m}, parameters: {{weight: 0.5, density: 0.5}}}}" for m in models]
    if required:
        lines.append("parameters: {" + ", ".join(f"{k}: 0.5" for k in required) + "}")
    return "\n".join(lines) + "\n"


def make_models(root: Path) -> int:
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(5632, 2048, generator=gen) * 0.02).bfloat16() for i in range(3)}
    save_checkpoint(base, root / "base", shards=1)
    for j in (1, 2):
        save_checkpoint(finetune_of(base, seed=j), root / f"ft{j}", shards=1)
    return sum(v.numel() for v in base.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--models", type=Path, help="existing base/, ft1/, ft2/ to merge instead (e.g. make_models.py tinyllama); "
                    "read once first, so the times are warm-cache")
    ap.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    args = ap.parse_args()
    root = args.models or args.dir or Path(tempfile.mkdtemp(prefix="streammerge-methods-"))
    if args.models:
        from streammerge.io.sources import Checkpoint

        params = sum(t.numel for t in Checkpoint(args.models / "base").tensors.values())
        for f in args.models.glob("*/*.safetensors"):  # into the page cache
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    else:
        params = make_models(root)
    print("| method | wall (s) | M params/s |\n|---|---|---|")
    for method in args.methods:
        (root / f"{method}.yaml").write_text(config(method))
        shutil.rmtree(root / "out", ignore_errors=True)  # into an empty folder, as run.py: no deletion timed
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "streammerge", "merge", str(root / f"{method}.yaml"), str(root / "out"),
                        "-q", "--compile", args.compile], check=True)
        wall = time.perf_counter() - start
        print(f"| {method} | {wall:.1f} | {params / wall / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
