"""Build the mergekit 0.1.5 layer-stacking fixtures under tests/fixtures/mergekit_slices/.

Run with the interpreter of the mergekit venv (see install.sh):

    /work/mergekit-venv/bin/python benchmarks/mergekit/make_slice_fixtures.py

The inputs are those of make_fixtures.py (tests/fixtures/mergekit/inputs/deep_*: a 5-layer bf16
Llama, hidden 8, and three fine-tunes); it must have run first. Each config below is merged by the
real ``mergekit-yaml`` (CPU) with cwd = that inputs folder; its output shard and config.json are kept.

Layout (FIX = tests/fixtures/mergekit_slices):
    FIX/configs/<name>.yaml
    FIX/outputs/<name>/  model.safetensors, config.json
    FIX/manifest.json    versions and sha256 of every file
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mergekit_run import mergekit_yaml, write_manifest  # beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIX = REPO / "tests" / "fixtures" / "mergekit_slices"
INPUTS = REPO / "tests" / "fixtures" / "mergekit" / "inputs"

CONFIGS = {
    # two models stacked: 3 + 4 = 7 layers; embeddings from deep_ft1, final norm and lm_head from deep_ft2
    "stack_two": """\
slices:
  - sources:
      - model: deep_ft1
        layer_range: [0, 3]
  - sources:
      - model: deep_ft2
        layer_range: [1, 5]
merge_method: passthrough
dtype: bfloat16
""",
    # one model's overlapping ranges repeated (9 layers), through mergekit's dtype (bf16 -> f16)
    "stack_repeat": """\
slices:
  - sources:
      - model: deep_base
        layer_range: [0, 3]
  - sources:
      - model: deep_base
        layer_range: [1, 4]
  - sources:
      - model: deep_base
        layer_range: [2, 5]
merge_method: passthrough
dtype: float16
""",
    # scale: a filter on the input name ("layers.4." is input layer 4, output layer 6), a gradient
    # over the slice's 3 layers, a slice-level and a top-level default (the embeddings: slices[0])
    "stack_scale": """\
slices:
  - sources:
      - model: deep_ft1
        layer_range: [0, 4]
    parameters:
      scale: 0.9
  - sources:
      - model: deep_ft2
        layer_range: [2, 5]
        parameters:
          scale:
            - filter: layers.4.
              value: 0.3
            - filter: o_proj
              value: 0.7
            - filter: down_proj
              value: [0.5, 1.3]
merge_method: passthrough
parameters:
  scale: 1.1
dtype: bfloat16
""",
    # several sources per slice: each output layer a TIES merge of the sources' corresponding layers,
    # one source shifted, a weight gradient within the slice, a second slice of other models
    "slices_ties": """\
slices:
  - sources:
      - model: deep_base
        layer_range: [0, 3]
      - model: deep_ft1
        layer_range: [0, 3]
        parameters: {weight: 1.0, density: 0.6}
      - model: deep_ft2
        layer_range: [1, 4]
        parameters: {weight: [0.2, 0.8], density: 0.5}
  - sources:
      - model: deep_base
        layer_range: [2, 5]
      - model: deep_ft3
        layer_range: [2, 5]
        parameters: {weight: 0.7}
    parameters:
      density: 0.4
merge_method: ties
base_model: deep_base
parameters:
  normalize: true
  lambda: 0.9
dtype: bfloat16
""",
    # linear over slices without a base; the last slice's sources give the final norm and lm_head
    "slices_linear": """\
slices:
  - sources:
      - model: deep_ft1
        layer_range: [0, 2]
        parameters: {weight: 1.0}
      - model: deep_ft2
        layer_range: [3, 5]
        parameters: {weight: [1.0, 3.0]}
  - sources:
      - model: deep_ft3
        layer_range: [1, 4]
        parameters: {weight: 0.5}
      - model: deep_ft1
        layer_range: [2, 5]
        parameters: {weight: 2.0}
merge_method: linear
dtype: bfloat16
""",
    # one slice over the first 3 of 5 layers: looks like a whole-model slice, but is partial
    "partial_task_arithmetic": """\
slices:
  - sources:
      - model: deep_base
        layer_range: [0, 3]
      - model: deep_ft1
        layer_range: [0, 3]
        parameters: {weight: 0.6}
      - model: deep_ft3
        layer_range: [0, 3]
        parameters: {weight: 0.3}
merge_method: task_arithmetic
base_model: deep_base
dtype: bfloat16
""",
}


def run_cli(name: str) -> None:
    with mergekit_yaml(FIX / "configs" / f"{name}.yaml", INPUTS) as out:
        (shard,) = sorted(out.glob("*.safetensors"))
        dest = FIX / "outputs" / name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard, dest / "model.safetensors")
        shutil.copyfile(out / "config.json", dest / "config.json")


def main() -> None:
    from importlib.metadata import version

    import torch

    assert (INPUTS / "deep_base" / "model.safetensors").is_file(), "run make_fixtures.py first"
    for sub in ("configs", "outputs"):
        shutil.rmtree(FIX / sub, ignore_errors=True)
        (FIX / sub).mkdir(parents=True)
    for name, text in CONFIGS.items():
        (FIX / "configs" / f"{name}.yaml").write_text(text)
        print("mergekit-yaml", name, flush=True)
        run_cli(name)
    write_manifest(FIX, {
        "generator": "benchmarks/mergekit/make_slice_fixtures.py",
        "inputs": "tests/fixtures/mergekit/inputs (deep_*)",
        "mergekit": version("mergekit"),
        "torch": torch.__version__,
    })


if __name__ == "__main__":
    main()
