"""mergekit-multi recipes (issue 17): several YAML documents, later stages reading earlier ones by name,
merged in one streaming pass with no intermediate checkpoint (front/recipe.py, pipeline/recipe.py).

The result must be byte-identical to running the stages one after another (each rounded to its own
output dtype), and under `semantics: mergekit` to mergekit-multi's (tests/fixtures/mergekit_recipes,
made by benchmarks/mergekit/make_recipe_fixtures.py with the real mergekit-multi).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import shard_hashes, split_run_hashes
from safetensors.torch import load_file

from streammerge import ConfigError, MergeConfig, OutputError, merge
from streammerge.front import api
from streammerge.front.cli import main
from streammerge.front.config import load_yaml_all
from streammerge.front.demo import TinyLlama, build_demo_models
from streammerge.front.recipe import recipe_config

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit_recipes"
MK_INPUTS = Path(__file__).parent / "fixtures" / "mergekit" / "inputs"
SHAPE = TinyLlama(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)
SHARD = 12_000  # bytes per output shard: several shards per stage, so the stages' file order matters

TIES = """\
merge_method: ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.6, density: 0.5}}
  - {model: ft2, parameters: {weight: 0.4, density: 0.3}}
dtype: bfloat16
"""
SLERP = """\
merge_method: slerp
base_model: base
models:
  - model: <a>
parameters:
  t: [0.2, 0.7]
out_dtype: float16
"""
DARE = """\
merge_method: dare_ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.5, density: 0.6}}
  - {model: ft3, parameters: {weight: 0.5, density: 0.4}}
seed: 7
dtype: float32
"""
TASK = """\
merge_method: task_arithmetic
base_model: base
models:
  - {model: ft2, parameters: {weight: 0.8}}
  - {model: <a>, parameters: {weight: 0.3}}
dtype: bfloat16
"""
LINEAR = """\
merge_method: linear
models:
  - {model: <a>, parameters: {weight: 0.3}}
  - {model: <b>, parameters: {weight: 0.7}}
dtype: bfloat16
"""


def fill(text: str, **names: str) -> str:
    """A config template with its <a>, <b> models named."""
    for key, value in names.items():
        text = text.replace(f"<{key}>", value)
    return text


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    build_demo_models(root, n_finetunes=3, shape=SHAPE)
    return root


def _recipe(root: Path, name: str, *docs: str) -> MergeConfig:
    (root / name).write_text("---\n".join(docs))
    return MergeConfig.from_yaml(root / name)


def _stagewise(root: Path, out: Path, stages: list[tuple[str, str]], **kw) -> dict[str, str]:
    """Each stage run on its own into out/<name> (the later ones reading the earlier folders), the
    last one being the final merge; returns the final merge's shard hashes."""
    for name, text in stages:
        (root / f"{name}.yaml").write_text(text)
        merge(MergeConfig.from_yaml(root / f"{name}.yaml"), out / name, max_shard_size=SHARD, **kw)
    return shard_hashes(out / stages[-1][0])


def test_two_stages_equal_the_stages_run_one_after_another(models, tmp_path):
    cfg = _recipe(models, "two.yaml", "name: tied\n" + TIES, fill(SLERP, a="tied"))
    result = merge(cfg, tmp_path / "recipe", max_shard_size=SHARD)
    assert len(result.shards) > 1
    # the stages by hand: ties into a folder, then slerp reading it
    expected = _stagewise(models, tmp_path / "by_hand", [("s_tied", TIES), ("s_final", fill(SLERP, a=str(tmp_path / "by_hand" / "s_tied")))])
    assert shard_hashes(tmp_path / "recipe") == expected
    manifest = json.loads((tmp_path / "recipe" / "streammerge_manifest.json").read_text())
    assert [s["name"] for s in manifest["config"]["stages"]] == ["tied"]  # the whole recipe is recorded


def test_three_stages_with_a_stage_read_twice(models, tmp_path):
    # dare_ties (float32) and task_arithmetic reading it (bfloat16), then linear over both: stage 'a'
    # is read by 'b' and by the final merge, one checkpoint computed once per tensor
    cfg = _recipe(models, "three.yaml", "name: a\n" + DARE, "name: b\n" + fill(TASK, a="a"), fill(LINEAR, a="a", b="b"))
    merge(cfg, tmp_path / "recipe", max_shard_size=SHARD)
    hand = tmp_path / "by_hand"
    expected = _stagewise(models, hand, [("a", DARE), ("b", fill(TASK, a=str(hand / "a"))),
                                          ("final", fill(LINEAR, a=str(hand / "a"), b=str(hand / "b")))])
    assert shard_hashes(tmp_path / "recipe") == expected
    out = load_file(next((tmp_path / "recipe").glob("model-*.safetensors")))
    assert all(t.dtype == torch.bfloat16 for t in out.values())


def test_a_model_wide_pass_stage_streams_too(models, tmp_path):
    # FusionBench's ties trims over the whole model (and breaks ties by the majority sign): the stage
    # reads every input tensor once before its first tensor is served, and still gives its own run's bytes
    fb = TIES.replace("dtype: bfloat16", "semantics: fusionbench")
    cfg = _recipe(models, "global.yaml", "name: g\n" + fb, fill(SLERP, a="g"))
    merge(cfg, tmp_path / "recipe", max_shard_size=SHARD)
    hand = tmp_path / "by_hand"
    assert shard_hashes(tmp_path / "recipe") == _stagewise(models, hand, [("g", fb), ("final", fill(SLERP, a=str(hand / "g")))])


@pytest.mark.parametrize("name", sorted(p.stem for p in (FIXTURES / "configs").glob("*.yaml")))
def test_bit_identical_to_mergekit_multi(tmp_path, name):
    text = (FIXTURES / "configs" / f"{name}.yaml").read_text()
    cfg = recipe_config(load_yaml_all(text, name), MK_INPUTS / f"{name}.yaml")  # paths relative to the inputs
    cfg = replace(cfg, semantics="mergekit", recipe=cfg.recipe.map(lambda c: replace(c, semantics="mergekit")))
    merge(cfg, tmp_path / "out")
    expected = load_file(FIXTURES / "outputs" / name / "model.safetensors")
    actual = load_file(next((tmp_path / "out").glob("model-*.safetensors")))
    assert set(actual) == set(expected)
    assert not [n for n in expected if actual[n].dtype != expected[n].dtype or not torch.equal(actual[n], expected[n])]


def test_resume_after_an_interrupted_run(models, tmp_path):
    cfg = _recipe(models, "resume.yaml", "name: a\n" + DARE, fill(LINEAR, a="a", b="ft2"))
    reference = merge(cfg, tmp_path / "reference", max_shard_size=SHARD)
    assert len(reference.shards) >= 3
    written = []

    def stop_after_two(path: Path) -> None:
        written.append(path)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(cfg, tmp_path / "out", max_shard_size=SHARD, on_shard_file=stop_after_two)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    again = merge(cfg, tmp_path / "out", max_shard_size=SHARD)
    assert again.reused_shards == 2
    assert shard_hashes(tmp_path / "out") == shard_hashes(tmp_path / "reference")
    # a stage's own parameters decide the bytes: another density there is another merge
    other = _recipe(models, "other.yaml", "name: a\n" + DARE.replace("density: 0.4", "density: 0.5"), fill(LINEAR, a="a", b="ft2"))
    with pytest.raises(OutputError, match="holds a different merge"):
        merge(other, tmp_path / "out", max_shard_size=SHARD)


def test_two_workers_give_the_same_bytes(models, tmp_path):
    cfg = _recipe(models, "split.yaml", "name: a\n" + DARE, "name: b\n" + fill(SLERP, a="a"), fill(LINEAR, a="a", b="b"))
    one, split = split_run_hashes(cfg, tmp_path, SHARD)
    assert len(one) > 2 and one == split


def test_cli_intermediate_dir_and_plan(models, tmp_path):
    recipe = models / "cli.yaml"
    recipe.write_text("---\n".join(["name: a\n" + DARE, "name: b\n" + fill(TASK, a="a"), fill(LINEAR, a="a", b="b")]))
    shard = ["--max-shard-size", str(SHARD)]
    r = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "streamed"), "-q", *shard])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out"), "--intermediate-dir", str(tmp_path / "stages"), *shard])
    assert r.exit_code == 0, r.output
    assert "stage a:" in r.output and "stage b:" in r.output
    assert shard_hashes(tmp_path / "out") == shard_hashes(tmp_path / "streamed")
    hand = tmp_path / "by_hand"
    _stagewise(models, hand, [("a", DARE), ("b", fill(TASK, a=str(hand / "a")))])
    for stage in ("a", "b"):  # each a normal, complete streammerge output
        assert (tmp_path / "stages" / stage / "model.safetensors.index.json").is_file()
        assert shard_hashes(tmp_path / "stages" / stage) == shard_hashes(hand / stage)
    r = CliRunner().invoke(main, ["plan", str(recipe), "--json"])
    graph = json.loads(r.output)["recipe"]
    assert [(n["name"], n["method"], n["stage_reads"]) for n in graph] == [
        ("a", "dare_ties", []), ("b", "task_arithmetic", ["a"]), (None, "linear", ["a", "b"])]
    r = CliRunner().invoke(main, ["plan", str(recipe)])
    assert "stage b: task_arithmetic, output bfloat16, reads" in r.output and "final merge: linear" in r.output
    r = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "w"), "-I", str(tmp_path / "s2"), "--world-size", "2", "--rank", "0"])
    assert r.exit_code == 2 and "independent workers" in r.output


@pytest.mark.parametrize("docs, message", [
    (["name: a\n" + TIES.replace("ft2", "b"), "name: b\n" + fill(TASK, a="a"), fill(LINEAR, a="a", b="b")],
     "stage 'a': reads itself through 'a' -> 'b' -> 'a'"),
    (["name: a\n" + TIES, fill(LINEAR, a="a", b="typo")], "final merge: models[1].model: 'typo' is neither a stage of this recipe"),
    (["name: a\n" + TIES, "name: b\n" + fill(TASK, a="a")], "no final merge"),
    (["name: a\n" + TIES, "name: a\n" + DARE, fill(LINEAR, a="a", b="ft1")], "stage 'a': the name is used twice"),
    ([TIES, fill(LINEAR, a="ft1", b="ft2")], "a second document without a name"),
    (["name: a/b\n" + TIES, fill(LINEAR, a="ft1", b="ft2")], "cannot name a stage"),
    (["name: a\n" + TIES, fill(LINEAR, a="a+lora", b="ft2")], "a stage read with a LoRA (+) or a revision (@) is not supported"),
    (["name: a\n" + TIES + "bogus: 1\n", fill(LINEAR, a="a", b="ft2")], "stage 'a': unknown top-level key 'bogus'"),
])
def test_recipe_errors_name_the_stage(models, docs, message):
    (models / "bad.yaml").write_text("---\n".join(docs))
    with pytest.raises(ConfigError, match=re.escape(message)):
        MergeConfig.from_yaml(models / "bad.yaml")


def test_a_stage_problem_found_when_opening_names_the_stage(models, tmp_path):
    cfg = _recipe(models, "open.yaml", "name: a\n" + TIES.replace("density: 0.5", "density: 2"), fill(LINEAR, a="a", b="ft2"))
    with pytest.raises(ConfigError, match=r"^stage 'a': models\[0\].parameters.density"):
        api.plan(cfg)
    r = CliRunner().invoke(main, ["merge", str(models / "open.yaml"), str(tmp_path / "out")])
    assert r.exit_code == 1 and "error: stage 'a': models[0].parameters.density" in r.output


def test_a_lora_adapter_over_a_stage(models, tmp_path):
    # the final merge's base is a stage, and a LoRA adapter applies to it as to any base
    from test_lora import bounded_factor, write_adapter

    gen = torch.Generator().manual_seed(3)
    h = SHAPE.hidden
    write_adapter(models / "lora", {"model.layers.0.self_attn.q_proj": (bounded_factor((4, h), gen), bounded_factor((h, 4), gen))},
                  r=4, alpha=8)
    final = "merge_method: task_arithmetic\nbase_model: <a>\nmodels:\n  - {model: lora, parameters: {weight: 0.5}}\ndtype: bfloat16\n"
    cfg = _recipe(models, "lora.yaml", "name: a\n" + DARE, fill(final, a="a"))
    merge(cfg, tmp_path / "recipe", max_shard_size=SHARD)
    hand = tmp_path / "by_hand"
    assert shard_hashes(tmp_path / "recipe") == _stagewise(models, hand, [("a", DARE), ("final", fill(final, a=str(hand / "a")))])
