"""Hostile and odd configs (issue 18): bounded YAML (alias bombs, depth, size), every value
type-checked before any work, and no output folder created before the config validates."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import no_hang

from streammerge import ConfigError, MergeConfig
from streammerge.demo import build_demo_models

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

    from streammerge.cli import main

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
    from streammerge.config import ModelSpec

    for bad in ({"dtype": []}, {"method": ["ties"]}, {"include": "x*"}, {"models": (ModelSpec(3),)},
                {"parameters": {"weight": b"1"}}, {"semantics": None}):
        cfg = MergeConfig(**{"method": "ties", "base": "b", "models": (ModelSpec("m"),), **bad})
        with pytest.raises(ConfigError):
            cfg.validate()
