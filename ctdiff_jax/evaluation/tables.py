"""Table 1's files: table1.md / table1.csv / table1.json of evaluated rows, and `--merge`.

A row is what table1.evaluate returns for one organ config. `merge_tables` concatenates the
rows of several table1.json files; rows with the same key (organ, dataset, split, N) appear
once, the later file's row replacing the earlier one in the earlier one's place (re-running
an organ and merging again updates it rather than duplicating it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

# The column vocabulary of Table 1 (the evaluators fill these keys).
FID_KINDS = ("fid_whole", "fid_crop")
IMAGE_METRICS = ("mae_hu", "psnr_db", "ssim")


METHODS = ("pix2pix", "diffusion", "neighbour")
GENERATIVE = ("pix2pix", "diffusion")
METHOD_TITLES = {"pix2pix": "Pix2Pix", "diffusion": "Diffusion",
                 "neighbour": "Neighbouring slice"}
FID_TITLES = {"fid_whole": "FID (whole)", "fid_crop": "FID (crop)"}
METRIC_TITLES = {"mae_hu": "MAE (HU)", "psnr_db": "PSNR (dB)", "ssim": "SSIM"}
METRIC_FORMATS = {"mae_hu": ".1f", "psnr_db": ".2f", "ssim": ".4f"}
TABLE_FILES = ("table1.md", "table1.csv", "table1.json")
# The fields that identify a row: a merged table holds one row per key.
ROW_KEY = ("organ", "dataset", "split", "num_slices")



def _finite_or_none(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite_or_none(v) for v in x]
  return x


def csv_columns() -> list[str]:
  """Column names of table1.csv."""
  cols = ["organ", "dataset", "split", "num_slices"]
  for m in METHODS:
    for k in FID_KINDS:
      cols += [f"{m}_{k}", f"{m}_{k}_std", f"{m}_{k}_n_real", f"{m}_{k}_n_generated"]
    if m in GENERATIVE:
      for k in IMAGE_METRICS:
        cols += [f"{m}_{k}", f"{m}_{k}_std"]
  return cols


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: row.get(k, "") for k in ("organ", "dataset", "split", "num_slices")}
  for m in METHODS:
    entry = row["methods"].get(m) or {}
    for k in FID_KINDS:
      r = entry.get(k) or {}
      out[f"{m}_{k}"] = r.get("fid", "")
      out[f"{m}_{k}_std"] = r.get("std") if r.get("std") is not None else ""
      out[f"{m}_{k}_n_real"] = r.get("n1", "")
      out[f"{m}_{k}_n_generated"] = r.get("n2", "")
    if m in GENERATIVE:
      for k in IMAGE_METRICS:
        r = entry.get(k) or {}
        mean, std = r.get("mean"), r.get("std")
        out[f"{m}_{k}"] = "" if mean is None else mean
        out[f"{m}_{k}_std"] = "" if std is None else std
  return out


def _fmt_fid(r: Mapping[str, Any] | None, n: int) -> str:
  if not r:
    return "—"
  s = f"{r['fid']:.2f}"
  if r.get("std") is not None:
    s += f" ± {r['std']:.2f}"
  if r.get("n1") != n or r.get("n2") != n:
    s += f" (n={r.get('n1')}/{r.get('n2')})"
  return s


def _fmt_metric(r: Mapping[str, Any] | None, fmt: str) -> str:
  if not r or r.get("mean") is None:
    return "—" if not r else "inf"
  s = format(r["mean"], fmt)
  if r.get("std") is not None:
    s += f" ± {format(r['std'], fmt)}"
  return s


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table 1 in Markdown: organ rows; Pix2Pix | Diffusion | Neighbouring slice columns."""
  head = ["Organ", "N"]
  for m in METHODS:
    for k in FID_KINDS:
      head.append(f"{METHOD_TITLES[m]} {FID_TITLES[k]}")
    if m in GENERATIVE:
      head += [f"{METHOD_TITLES[m]} {METRIC_TITLES[k]}" for k in IMAGE_METRICS]
  lines = ["# Table 1: organ inpainting on real CT", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    n = int(row["num_slices"])
    cells = [f"{row['organ']} ({row['split']})", str(n)]
    for m in METHODS:
      entry = row["methods"].get(m)
      for k in FID_KINDS:
        cells.append(_fmt_fid(entry.get(k) if entry else None, n))
      if m in GENERATIVE:
        cells += [_fmt_metric(entry.get(k) if entry else None, METRIC_FORMATS[k])
                  for k in IMAGE_METRICS]
    lines.append("| " + " | ".join(cells) + " |")
  settings = rows[0].get("settings", {}) if rows else {}
  lines += [
      "",
      "N: slices with the organ; every FID compares those N real slices with the N slices of "
      "the method (n=real/generated shown where different). ± is the bootstrap std "
      "(config.eval.bootstrap resamples), — means not evaluated.",
      f"FID (whole): whole slices windowed to {settings.get('fid_window')} HU. "
      f"FID (crop): organ bounding box + {settings.get('crop_margin_mm')} mm, squared, "
      f"resized to {settings.get('crop_size')} px. MAE (raw HU), PSNR and SSIM (windowed, "
      "Gaussian SSIM) inside the organ mask, mean ± std over slices.",
      "Neighbouring slice: the adjacent real slice of the same volume as the 'generated' "
      "image (how different neighbouring real slices are).",
  ]
  warnings = [w for row in rows for w in row.get("warnings", [])]
  if warnings:
    lines += ["", "**Warning:** " + " ".join(warnings)]
  return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict:
  """Writes table1.md / table1.csv / table1.json for `rows`; returns {name: path}."""
  if not rows:
    raise ValueError("write_tables: no rows")
  out = pathlib.Path(output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  rows = [_finite_or_none(dict(r)) for r in rows]
  paths = {name: out / name for name in TABLE_FILES}
  paths["table1.md"].write_text(markdown_table(rows))
  with open(paths["table1.csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=csv_columns())
    w.writeheader()
    for row in rows:
      w.writerow(_csv_row(row))
  paths["table1.json"].write_text(json.dumps({"table": "table1", "rows": rows}, indent=2,
                                             allow_nan=False) + "\n")
  return {k: str(v) for k, v in paths.items()}


def merge_tables(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
  """The rows of several table1.json files, in order, de-duplicated (see dedupe_rows)."""
  rows = []
  for p in paths:
    p = pathlib.Path(p).expanduser()
    try:
      data = json.loads(p.read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"--merge: {p} does not exist") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"--merge: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
      raise ValueError(f"--merge: {p} is not a table1.json (no 'rows' list)")
    for i, row in enumerate(data["rows"]):
      if not isinstance(row, dict) or not {"organ", "num_slices", "methods"} <= set(row):
        raise ValueError(f"--merge: row {i} of {p} lacks organ/num_slices/methods")
      rows.append(row)
  if not rows:
    raise ValueError(f"--merge: no rows in {', '.join(map(str, paths))}")
  return dedupe_rows(rows)


def row_key(row: Mapping[str, Any]) -> tuple:
  return tuple(row.get(k) for k in ROW_KEY)


def dedupe_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per ROW_KEY: the last one wins, at the position of the first."""
  out: dict[tuple, Any] = {}
  for row in rows:
    out[row_key(row)] = row  # A re-assigned key keeps its first insertion position.
  return list(out.values())
