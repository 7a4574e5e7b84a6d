#!/usr/bin/env bash
# Sets up the venv (if needed) and runs the main job on the embedded phantom cohort.
# Extra arguments go to `python -m ctdiff_jax.quickstart` (e.g. --steps=1000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
VENV="${CTDIFF_VENV:-.venv}"
exec "$VENV/bin/python" -m ctdiff_jax.quickstart --output_dir=quickstart_out "$@"
