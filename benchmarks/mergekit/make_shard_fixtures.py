"""Record how mergekit 0.1.5 splits its output into shards for `--out-shard-size`: tests/fixtures/mergekit_shards.json.

Run with the interpreter of the mergekit venv (see install.sh):

    benchmarks/mergekit/.venv/bin/python benchmarks/mergekit/make_shard_fixtures.py

The inputs are built here from streammerge's demo generator (seeded, so the test rebuilds them):
a 12-layer Llama (hidden 16), base and two fine-tunes, each saved as 3 safetensors shards in
transformers' order (embeddings first, lm_head last; layers 10 and 11 after layer 9), so the
file order differs from mergekit's write order (tensor names sorted: "layers.10" before "layers.2").
Only the split is recorded (the shard of every tensor, per size), not the weights.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

import mergekit  # noqa: E402
import torch  # noqa: E402
from mergekit_run import mergekit_yaml  # noqa: E402  (beside this script)

from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "mergekit_shards.json"
SHAPE = {"hidden": 16, "intermediate": 32, "layers": 12, "heads": 2, "kv_heads": 1, "vocab": 64}
CONFIG = """\
merge_method: {method}
base_model: base
models:
  - model: ft1
    parameters: {{weight: 0.5, density: 0.5}}
  - model: ft2
    parameters: {{weight: 0.5, density: 0.5}}
dtype: {dtype}
"""
CASES = [  # (method, dtype, --out-shard-size)
    ("ties", "bfloat16", "5B"), ("ties", "bfloat16", "4K"), ("ties", "bfloat16", "10k"), ("ties", "bfloat16", "2000"),
    ("task_arithmetic", "float32", "8K"), ("task_arithmetic", "float32", "1M"), ("ties", "bfloat16", "0"),
]


def build(root: Path) -> None:
    shape = TinyLlama(**SHAPE)
    config = shape.config_json(torch.bfloat16)
    base = random_state(shape, seed=0)
    save_checkpoint(base, root / "base", shards=3, config=config)
    for i in (1, 2):
        save_checkpoint(finetune_of(base, seed=100 + i), root / f"ft{i}", shards=3, config=config)


def main() -> None:
    cases = []
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        build(root)
        for method, dtype, size in CASES:
            config = root / "config.yaml"
            config.write_text(CONFIG.format(method=method, dtype=dtype))
            with mergekit_yaml(config, root, extra=["--out-shard-size", size]) as out:
                index = out / "model.safetensors.index.json"
                if index.exists():
                    weight_map = json.loads(index.read_text())["weight_map"]
                else:  # one shard: mergekit names it model.safetensors and writes no index
                    from safetensors import safe_open

                    with safe_open(out / "model.safetensors", "pt") as f:
                        weight_map = {name: "model.safetensors" for name in f.keys()}
            shards = sorted(set(weight_map.values()))
            cases.append({"method": method, "dtype": dtype, "out_shard_size": size,
                          "shards": [sorted(n for n, s in weight_map.items() if s == shard) for shard in shards]})
            print(f"{method} {dtype} --out-shard-size {size}: {len(shards)} shard(s)")
    OUT.write_text(json.dumps({"mergekit": mergekit.__version__ if hasattr(mergekit, "__version__") else "0.1.5",
                               "inputs": {"shape": SHAPE, "shards": 3, "dtype": "bfloat16", "models": ["base", "ft1", "ft2"]},
                               "config": CONFIG, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
