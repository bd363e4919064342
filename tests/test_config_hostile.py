"""Hostile and odd configs (issue 18): bounded YAML (alias bombs, depth, size), every value
type-checked before any work, and no output folder created before the config validates."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import no_hang
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streammerge.front.api
from streammerge import ConfigError, MergeConfig
from streammerge.errors import StreammergeError
from streammerge.front.demo import build_demo_models

GOOD = "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: 0.5, density: 0.5}\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cfg")
    build_demo_models(root)
    return root


def bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines)


def test_alias_bomb_in_a_parameter_is_refused_at_once(models):
    text = (GOOD.replace("    parameters: {weight: 0.5, density: 0.5}\n", "    parameters:\n      density: 0.5\n      weight: *a9\n")
            .replace("merge_method", bomb() + "\nmerge_method"))
    (models / "bomb.yaml").write_text(text)
    start = time.monotonic()
    with no_hang(10), pytest.raises(ConfigError, match=r"bomb\.yaml: more than 100000 values once its aliases are expanded"):
        MergeConfig.from_yaml(models / "bomb.yaml")
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(("text", "needle"), [
    ("x: " + "[" * 40 + "]" * 40, "nested more than 32 levels"),
    ("x: " + "[" * 5000 + "]" * 5000, "nested more than 32 levels"),
    ("x: &x [*x]", "recursive alias"),
    ("x: " + "9" * 5000, "not valid YAML"),
    ("x: '" + "a" * (1 << 20) + "'", "larger than"),
])
def test_yaml_is_bounded(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    with no_hang(10), pytest.raises(ConfigError, match=needle):
        MergeConfig.from_yaml(tmp_path / "c.yaml")


def test_cli_param_values_are_bounded_too(models, tmp_path):
    value = "[" * 40 + "]" * 40
    proc = subprocess.run([sys.executable, "-m", "streammerge", "plan", "--base", str(models / "base"), "--model",
                           str(models / "ft1"), "--method", "ties", "--param", f"normalize={value}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--param normalize: nested more than 32 levels" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---- odd values: type-checked before any work, no output folder -----------------------------------

ODD = [
    ("dtype: []", "dtype: must be a string"),
    ("dtype: {a: 1}", "dtype: must be a string"),
    ("out_dtype: 16", "out_dtype: must be a string"),
    ("semantics: [mergekit]", "semantics: must be a string"),
    ("name: 2024-01-01", "name: a date is not a config value"),
    ("base_model: 2024-01-01", "base_model: a date"),
    ("parameters: {gamma: !!binary aGVsbG8=}", "parameters.gamma: binary data (!!binary)"),  # ignored by ties: still checked
    ("parameters: {weight: [{filter: !!binary aGk=, value: 1}]}", "parameters.weight[0].filter: binary data"),
    ("parameters: {weight: [{filter: 7, value: 1}]}", "a filter is a tensor name pattern"),
    ("parameters: {normalize: !!set {a, b}}", "parameters.normalize: a set (!!set)"),
    ("parameters: {2024-01-01: 1}", "key datetime.date(2024, 1, 1) is not a string"),
    ("include: 5", "include: must be a glob pattern"),
    ("exclude: {a: 1}", "exclude: must be a glob pattern"),
    ("tokenizer: [base]", "tokenizer: must be a mapping"),
    ("seed: 2024-01-01", "seed: a date"),
    ("seed: 1.5", "seed: must be a non-negative integer"),
]


@pytest.mark.parametrize(("line", "needle"), ODD)
def test_odd_values_are_one_line_config_errors_before_any_output(models, tmp_path, line, needle):
    from click.testing import CliRunner

    from streammerge.front.cli import main

    key = line.split(":")[0]
    text = "\n".join(x for x in GOOD.splitlines() if not x.startswith(key + ":")) + "\n" + line + "\n"
    (models / "odd.yaml").write_text(text)
    out = tmp_path / "out"
    for command in (["plan"], ["merge"]):
        result = CliRunner().invoke(main, [*command, str(models / "odd.yaml"), *([str(out)] if command == ["merge"] else [])])
        assert result.exit_code == 1, (line, result.output)
        assert needle in result.stderr and len(result.stderr.splitlines()) == 1 and "internal error" not in result.stderr, result.output
        assert not out.exists()


def test_a_python_config_with_odd_types_is_a_config_error():
    from streammerge.front.config import ModelSpec

    for bad in ({"dtype": []}, {"method": ["ties"]}, {"include": "x*"}, {"models": (ModelSpec(3),)},
                {"parameters": {"weight": b"1"}}, {"semantics": None}):
        cfg = MergeConfig(**{"method": "ties", "base": "b", "models": (ModelSpec("m"),), **bad})
        with pytest.raises(ConfigError):
            cfg.validate()


# ---- a bounded config fuzz ----------------------------------------------------------------------

SEED_CONFIG = {
    "merge_method": "dare_ties", "base_model": "base", "dtype": "bfloat16", "seed": 3,
    "models": [{"model": "ft1", "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.6}]}},
               {"model": "ft2", "parameters": {"weight": [0.2, 0.8], "density": 0.5}}],
    "parameters": {"lambda": 1.0, "normalize": True},
}
KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "semantics", "seed", "include",
        "exclude", "tokenizer_source", "tokenizer", "name", "vocab", "model", "weight", "density", "filter", "value", "t",
        "layer_range", "sources", "normalize", "lambda", "lora_drop", "tokens", "gamma", "", "ü", "a" * 300]
scalars = (st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.sampled_from([0, 1, -1, 10**400 // 10**397, 0.5, 1e308])
           | st.floats() | st.text(max_size=10) | st.sampled_from(KEYS + ["ties", "slerp", "ft1", "base", "*", "bfloat16", "mergekit"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4),
                      inner, max_size=4), max_leaves=12)
# YAML only text can say: aliases, tags, odd scalars
RAW = ["!!binary aGVsbG8=", "2024-01-01", "2024-01-01T10:00:00Z", "!!set {a, b}", "!!python/object:os.system x", "&a [1, *a]",
       "!!float nan", ".inf", "-.inf", "0x1F", "0o17", "1_000", "~", "!!str 1", "!!int '3'", "'\\u0000'", "\"\\x00\"", "[" * 50,
       "9" * 5000, "{? [a]: b}", "!!omap [a: 1]", "!!pairs [a: 1]", "!custom 1", "*undefined", "<<: {a: 1}", "|\n  text"]


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


@st.composite
def mutated_config(draw) -> str:
    data = copy.deepcopy(SEED_CONFIG)
    raw = []
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["value", "value", "delete", "key", "raw"]))
        if action == "value":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "key" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS) | st.text(max_size=5))] = draw(values)
        elif action == "raw":
            marker = f"RAW{len(raw)}"
            parent[path[-1]] = marker
            raw.append((marker, draw(st.sampled_from(RAW))))
    text = yaml.safe_dump(data, allow_unicode=True, default_flow_style=True, width=10**6)
    for marker, replacement in raw:
        text = text.replace(marker, replacement)
    if draw(st.booleans()):  # an anchor and its aliases, as configs write them
        text = "defaults: &d " + draw(st.sampled_from(["0.5", "[0.1, 0.2]", "{weight: 1}", "!!binary aGk="])) + "\n" + text
        text = text.replace("0.5", "*d", draw(st.integers(0, 3)))
    return text


class _Stop(Exception):
    """run_plan was reached: the config validated and planned."""


def _fuzz_once(models: Path, work: Path, text: str) -> None:
    cfg_path, out = work / "fuzz.yaml", work / "out"
    cfg_path.write_text(text, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    with no_hang(5):
        try:
            cfg = MergeConfig.from_yaml(cfg_path)
            streammerge.front.api.merge(cfg, out)
        except _Stop:
            return
        except StreammergeError:
            assert not out.exists(), f"an output folder was created for a config that did not validate:\n{text}"
            return
        except Exception as e:  # what the CLI would call an internal error (exit 3)
            raise AssertionError(f"{type(e).__name__}: {e}\n--- config ---\n{text}") from None


def _fuzz(models: Path, tmp_path: Path, monkeypatch, examples: int) -> None:
    for name in ("base", "ft1", "ft2"):
        os.symlink(models / name, tmp_path / name)

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(streammerge.front.api, "run_plan", stop)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutated_config())
    def run(text):
        _fuzz_once(models, tmp_path, text)

    run()


def test_config_fuzz(models, tmp_path, monkeypatch):
    """Mutated configs (types, nesting, aliases, tags, huge numbers, unicode, keys): each validates
    and plans, or is refused with a StreammergeError before an output folder exists; never another
    exception (the CLI's exit 3), never a hang."""
    start = time.monotonic()
    _fuzz(models, tmp_path, monkeypatch, 300)
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_config_fuzz_long(models, tmp_path, monkeypatch):
    _fuzz(models, tmp_path, monkeypatch, 5000)
