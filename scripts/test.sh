#!/usr/bin/env bash
# Sets up the venv (if needed) and runs the test suite: what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh tf,dev
# apache-beam cannot share .venv (pyproject.toml, the beam extra): the Beam tests use .venv-beam.
bash scripts/setup_beam.sh
VENV="${CTDIFF_VENV:-.venv}"
# -rs: say why each test skipped (missing shared data / FID weights skip locally; under CI=true
# tests/conftest.py turns those into failures).
exec "$VENV/bin/python" -m pytest -q -rs -n 2 --durations=15 tests data_builders "$@"
