#!/usr/bin/env bash
# Create a separate virtual environment holding the reference implementation
# (mergekit 0.1.5 on the pinned CPU torch 2.13.0) used by make_fixtures.py and
# reimpl_check.py.  Usage: bash benchmarks/mergekit/install.sh [VENV_PATH]
# Default VENV_PATH: benchmarks/mergekit/.venv (git-ignored).
set -euo pipefail
VENV="${1:-benchmarks/mergekit/.venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0 mergekit==0.1.5
echo "mergekit venv ready: $VENV"
