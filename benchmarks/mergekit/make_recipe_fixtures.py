"""Build the mergekit 0.1.5 multi-stage recipe fixtures under tests/fixtures/mergekit_recipes/.

Run with the interpreter of the mergekit venv (see install.sh):

    /work/mergekit-venv/bin/python benchmarks/mergekit/make_recipe_fixtures.py

The inputs are those of make_fixtures.py (tests/fixtures/mergekit/inputs: a 2-layer and a 5-layer
bf16 Llama with three fine-tunes each); it must have run first. Each recipe below is run by the real
``mergekit-multi`` (CPU) with cwd = that inputs folder, which writes every named stage to its
intermediate folder and the final merge to --out-path; the final shard, its config.json and each
stage's shard are kept. Deterministic methods only (mergekit's DARE draws its masks with torch).

Layout (FIX = tests/fixtures/mergekit_recipes):
    FIX/configs/<name>.yaml
    FIX/outputs/<name>/  model.safetensors, config.json, stages/<stage>.safetensors
    FIX/manifest.json    versions and sha256 of every file
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mergekit_run import mergekit_multi, write_manifest  # beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIX = REPO / "tests" / "fixtures" / "mergekit_recipes"
INPUTS = REPO / "tests" / "fixtures" / "mergekit" / "inputs"

CONFIGS = {
    # ties, then slerp between the base and the ties merge: each stage rounds to bfloat16
    "ties_then_slerp": """\
name: tied
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: ft2
    parameters: {weight: 0.5, density: 0.5}
dtype: bfloat16
---
merge_method: slerp
base_model: base
models:
  - model: tied
parameters:
  t: 0.6
dtype: bfloat16
""",
    # three stages, a float32 one among them: the final ties reads a float32 and a bfloat16 stage
    "task_arithmetic_linear_ties": """\
name: ta
merge_method: task_arithmetic
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.7}
  - model: ft3
    parameters: {weight: 0.4}
dtype: float32
---
name: lin
merge_method: linear
models:
  - model: ft2
    parameters: {weight: 1.0}
  - model: ft3
    parameters: {weight: 2.0}
dtype: bfloat16
---
merge_method: ties
base_model: base
models:
  - model: ta
    parameters: {weight: 1.0, density: 0.6}
  - model: lin
    parameters: {weight: 0.5, density: 0.4}
dtype: bfloat16
""",
    # a stage that stacks layers (new names for the layers it takes), read by a task arithmetic merge
    "stack_then_task_arithmetic": """\
name: stacked
slices:
  - sources:
      - model: deep_ft1
        layer_range: [0, 3]
  - sources:
      - model: deep_ft2
        layer_range: [3, 5]
merge_method: passthrough
dtype: bfloat16
---
merge_method: task_arithmetic
base_model: deep_base
models:
  - model: stacked
    parameters: {weight: 0.8}
  - model: deep_ft3
    parameters: {weight: 0.3}
dtype: bfloat16
""",
}


def run_cli(name: str) -> None:
    with mergekit_multi(FIX / "configs" / f"{name}.yaml", INPUTS) as (out, stages):
        (shard,) = sorted(out.glob("*.safetensors"))
        dest = FIX / "outputs" / name
        (dest / "stages").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard, dest / "model.safetensors")
        shutil.copyfile(out / "config.json", dest / "config.json")
        for stage in sorted(p for p in stages.iterdir() if p.is_dir()):
            (stage_shard,) = sorted(stage.glob("*.safetensors"))
            shutil.copyfile(stage_shard, dest / "stages" / f"{stage.name}.safetensors")


def main() -> None:
    from importlib.metadata import version

    import torch

    assert (INPUTS / "deep_base" / "model.safetensors").is_file(), "run make_fixtures.py first"
    for sub in ("configs", "outputs"):
        shutil.rmtree(FIX / sub, ignore_errors=True)
        (FIX / sub).mkdir(parents=True)
    for name, text in CONFIGS.items():
        (FIX / "configs" / f"{name}.yaml").write_text(text)
        print("mergekit-multi", name, flush=True)
        run_cli(name)
    write_manifest(FIX, {
        "generator": "benchmarks/mergekit/make_recipe_fixtures.py",
        "inputs": "tests/fixtures/mergekit/inputs",
        "mergekit": version("mergekit"),
        "torch": torch.__version__,
    }, limit=400_000)


if __name__ == "__main__":
    main()
