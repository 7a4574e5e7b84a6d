"""The Beam half of tests/ingest/test_builder_beam.py, run with the Beam venv's python.

apache-beam cannot live in .venv (pyproject.toml, the beam extra), so the test runs this
script in the Beam venv: `python beam_side.py SPEC_JSON` with a list of builds
[{"config", "manual_dir", "data_dir", "options", "beam_options"}]; it prints one JSON line,
a list of {"summary": build summary} or {"error": [exception type, message]} per build.
"""

from __future__ import annotations

import json
import sys

from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import volumes


def _run(spec: dict) -> dict:
  try:
    summary = ingest_build.build(spec["config"], spec["manual_dir"], spec["data_dir"],
                                 beam_options=spec["beam_options"], **spec.get("options", {}))
  except volumes.VolumeError as e:  # what a bad case raises in the local build
    return {"error": [type(e).__name__, str(e)]}
  return {"summary": summary}


def main(argv: list[str]) -> None:
  results = [_run(spec) for spec in json.loads(argv[1])]
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv)
