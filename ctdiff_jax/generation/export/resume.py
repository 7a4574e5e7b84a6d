"""run.json: what an export was asked for, so that a killed export is resumed, never mixed.

An export writes `<output_dir>/run.json` before its first slice: the request (the
GenerateSpec's fields but --overwrite, and the model config), then the provenance of the
model it loaded (checkpoint, step), and `complete: true` once everything is written. Per-slice
files are written before their manifest row, and the manifest is flushed after every chunk,
so after a SIGKILL a row means its files are on disk. Running the same request into the same
output_dir again (without --overwrite):
- finds run.json incomplete: resumes. Rows whose files all exist are kept (the slices are not
  generated again unless the TFDS / volume export needs them), the rest is generated; slices
  depend on (seed, index) only, so the result equals an uninterrupted run's;
- finds it complete: refuses (FileExistsError), like a different request or an export without
  run.json does.
--overwrite starts afresh.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Mapping

RUN_FILE = "run.json"
MANIFEST = "manifest.csv"


def jsonable(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples -> lists, numpy scalars -> str / numbers)."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def request_of(spec: Any, config: Any) -> dict[str, Any]:
  """The part of a run that decides its slices: the spec (but overwrite) and the config."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "overwrite"}
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return jsonable({"spec": fields, "config": cfg})


def read_run(output_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except ValueError:  # killed while writing it (it is replaced atomically, but be safe)
    return {}


def write_run(output_dir: str, run: Mapping[str, Any]) -> None:
  """Replaces run.json atomically (a reader sees the old or the new file, never half)."""
  path = os.path.join(output_dir, RUN_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(jsonable(dict(run)), f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      out += _differences(x, y, f"{prefix}{k}.")
    elif x != y:
      out.append(f"{prefix}{k}: {x!r} then, {y!r} now")
  return out


def check_output_dir(output_dir: str, request: Mapping[str, Any] | None,
                     overwrite: bool) -> bool:
  """True to resume an interrupted export of `request`; raises FileExistsError if refused."""
  if overwrite or not os.path.isdir(output_dir):
    return False
  run = read_run(output_dir)
  fix = "use another --output_dir, or --overwrite to replace it"
  if run is None:
    if os.path.exists(os.path.join(output_dir, MANIFEST)):
      raise FileExistsError(f"{output_dir} already holds an export (manifest.csv); {fix}")
    return False
  if request is None or run.get("request") != jsonable(request):
    diff = _differences(run.get("request", {}), jsonable(request or {}))
    raise FileExistsError(
        f"{output_dir} already holds an export of another run ({RUN_FILE} differs in "
        f"{'; '.join(diff[:3]) or 'its request'}); {fix}")
  if run.get("complete"):
    raise FileExistsError(f"{output_dir} already holds an export (the same run, complete); "
                          f"{fix}")
  return True


def check_provenance(output_dir: str, provenance: Mapping[str, Any]) -> None:
  """On resume: the model loaded now must be the one the interrupted run used."""
  run = read_run(output_dir) or {}
  then = run.get("provenance", {})
  diff = [d for d in _differences(then, jsonable(dict(provenance)))
          if d.split(":")[0] in ("checkpoint", "checkpoint_step")]
  if then and diff:
    raise FileExistsError(
        f"{output_dir} holds an interrupted export made with another model ({'; '.join(diff)});"
        f" pass --checkpoint_step to use the same one, or --overwrite to start afresh")


def done_rows(output_dir: str, file_columns: Iterable[str]) -> dict[int, dict[str, str]]:
  """The manifest rows (by index) whose per-slice files all exist; rewrites the manifest to them.

  A row cut short by a kill (no final newline, missing fields) is dropped.
  """
  path = os.path.join(output_dir, MANIFEST)
  if not os.path.exists(path):
    return {}
  with open(path, newline="", encoding="utf-8") as f:
    text = f.read()
  lines = text.splitlines(keepends=True)
  if lines and not lines[-1].endswith("\n"):
    lines = lines[:-1]
  rows = {}
  for row in csv.DictReader(lines):
    if None in row.values() or None in row or not str(row.get("index", "")).isdigit():
      continue
    names = [row.get(c, "") for c in file_columns]
    if all(n and os.path.exists(os.path.join(output_dir, n)) for n in names):
      rows[int(row["index"])] = row
  return rows
