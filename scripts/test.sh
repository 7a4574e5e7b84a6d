#!/usr/bin/env bash
# Sets up the venv (if needed) and runs the test suite: what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh tf,dev
VENV="${CTDIFF_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q -n 2 --durations=15 tests "$@"
