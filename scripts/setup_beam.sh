#!/usr/bin/env bash
# Creates (or reuses) the Beam venv: ctdiff-jax with the tf and beam extras, beside .venv.
# Its own venv because apache-beam pins protobuf<7 / pyarrow<26 / pillow<13, which .venv's
# versions exceed (pyproject.toml, the beam extra). Usage: `bash scripts/setup_beam.sh`;
# tests/ingest/test_builder_beam.py runs Beam builds and `tfds build` with its python.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same venv recipe as scripts/setup.sh, with its own path and the tf + beam extras.
CTDIFF_VENV="${CTDIFF_BEAM_VENV:-.venv-beam}" exec bash scripts/setup.sh tf,beam
