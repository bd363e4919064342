"""What the fixture generators share: running the real `mergekit-yaml`, and the manifest of what they wrote.

Run under mergekit's own venv (benchmarks/mergekit/install.sh), like the generators that import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def mergekit_yaml(config: Path, cwd: Path, *, copy_tokenizer: bool = False, extra: list[str] | None = None) -> Iterator[Path]:
    """Runs the mergekit-yaml next to this Python on `config` from `cwd` (model paths relative to it),
    offline, with the `extra` flags; yields its output folder, deleted afterwards."""
    exe = Path(sys.executable).with_name("mergekit-yaml")
    flags = ([] if copy_tokenizer else ["--no-copy-tokenizer"]) + list(extra or [])
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "out"
        subprocess.run([str(exe), str(config), str(out), *flags, "--no-write-model-card", "--quiet"],
                       cwd=cwd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        yield out


@contextlib.contextmanager
def mergekit_multi(config: Path, cwd: Path, *, extra: list[str] | None = None) -> Iterator[tuple[Path, Path]]:
    """Runs the mergekit-multi next to this Python on the recipe `config` from `cwd`, offline; yields
    (the final merge's folder, the folder of the named stages), deleted afterwards."""
    exe = Path(sys.executable).with_name("mergekit-multi")
    with tempfile.TemporaryDirectory() as td:
        out, stages = Path(td) / "out", Path(td) / "stages"
        subprocess.run([str(exe), str(config), "--out-path", str(out), "--intermediate-dir", str(stages),
                        "--no-copy-tokenizer", "--no-write-model-card", "--quiet", *(extra or [])],
                       cwd=cwd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        yield out, stages


def write_manifest(fix: Path, info: dict, limit: int | None = None) -> None:
    """`fix`/manifest.json: `info` and the sha256 of every fixture file; prints their total size,
    which must stay under `limit`."""
    files = {str(p.relative_to(fix)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(fix.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "README.md")}
    (fix / "manifest.json").write_text(json.dumps({**info, "files": files}, indent=2) + "\n")
    total = sum(p.stat().st_size for p in fix.rglob("*") if p.is_file())
    print(f"total fixture size: {total} bytes")
    assert limit is None or total < limit
