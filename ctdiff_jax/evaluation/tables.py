"""Table 1's files: table1.md / table1.csv / table1.json of evaluated rows, and `--merge`.

A row is what table1.evaluate returns for one organ config. Every FID is printed with its N,
its paired-bootstrap std and 95% interval and a small-N flag; the title and a column name the
data (`data_label`, and whether it is the phantom cohort). `merge_tables` concatenates the
rows of several table1.json files; rows with the same key (organ, dataset, split, N) appear
once, the later file's row replacing the earlier one in the earlier one's place (re-running
an organ and merging again updates it rather than duplicating it).

Units: rows of MR / PET models (settings.modality) hold MAE / W1 in their normalised unit
(settings.intensity_unit, e.g. the p0.5-p99.5 range), not HU: the Markdown titles and the CSV
column names say that unit (`mae_prange`, `w1_prange`); the JSON keeps the keys mae_hu / w1_hu
with settings.intensity_unit beside them. Rows of different modalities share no table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

from ctdiff_jax.ingest import modality as modality_lib

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
# FID needs thousands of images to be stable; below this the table warns (FID bias at small N).
SMALL_N = 2048
ROW_FIELDS = ("organ", "dataset", "data_label", "phantom", "split", "num_slices",
              "num_neighbour_pairs")
FID_FIELDS = {"": "fid", "_std": "std", "_ci_low": None, "_ci_high": None, "_n_real": "n1",
              "_n_generated": "n2", "_n_bootstrap": "n_bootstrap"}


def _finite_or_none(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite_or_none(v) for v in x]
  return x


def table_modality(rows: Sequence[Mapping[str, Any]]) -> str:
  """The one modality of the rows (rows before modalities are CT); ValueError if mixed."""
  found = sorted({modality_lib.check((r.get("settings") or {}).get("modality")) for r in rows})
  if len(found) > 1:
    raise ValueError(f"Table 1 rows of different modalities ({', '.join(found)}) cannot share a "
                     "table: their MAE / W1 / FID windows are in different units")
  return found[0] if found else modality_lib.CT


def unit_name(key: str, modality: str) -> str:
  """A CSV column name with the modality's unit tag in place of `hu` (mae_hu -> mae_prange)."""
  return re.sub(r"_hu(?=_|$)", "_" + modality_lib.UNIT_TAGS[modality], key)


def csv_columns(modality: str = modality_lib.CT) -> list[str]:
  """Column names of table1.csv (HU columns renamed to the modality's unit)."""
  return [unit_name(c, modality) for c in _csv_columns()]


def _csv_columns() -> list[str]:
  cols = list(ROW_FIELDS)
  for m in METHODS:
    for k in FID_KINDS:
      cols += [f"{m}_{k}{suffix}" for suffix in FID_FIELDS]
    cols.append(f"{m}_w1_hu")
    if m in GENERATIVE:
      for k in IMAGE_METRICS:
        cols += [f"{m}_{k}", f"{m}_{k}_std"]
      for k in FID_KINDS:
        cols += [f"{m}_{k}_at_pairs", f"{m}_{k}_at_pairs_std", f"{m}_{k}_at_pairs_n"]
  return cols


def _blank(v):
  return "" if v is None else v


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: _blank(row.get(k)) for k in ROW_FIELDS}
  for m in METHODS:
    entry = row["methods"].get(m) or {}
    for k in FID_KINDS:
      r = entry.get(k) or {}
      ci = r.get("ci") or (None, None)
      for suffix, field in FID_FIELDS.items():
        out[f"{m}_{k}{suffix}"] = _blank(r.get(field) if field else None)
      out[f"{m}_{k}_ci_low"], out[f"{m}_{k}_ci_high"] = _blank(ci[0]), _blank(ci[1])
    out[f"{m}_w1_hu"] = _blank((entry.get("w1_hu") or {}).get("w1"))
    if m in GENERATIVE:
      for k in IMAGE_METRICS:
        r = entry.get(k) or {}
        out[f"{m}_{k}"], out[f"{m}_{k}_std"] = _blank(r.get("mean")), _blank(r.get("std"))
      for k in FID_KINDS:
        r = (entry.get("at_neighbour_pairs") or {}).get(k) or {}
        out[f"{m}_{k}_at_pairs"], out[f"{m}_{k}_at_pairs_std"], out[f"{m}_{k}_at_pairs_n"] = (
            _blank(r.get("fid")), _blank(r.get("std")), _blank(r.get("n1")))
  return out


def fmt_fid(r: Mapping[str, Any] | None) -> str:
  """'FID ± std [95% CI] N=n', flagged when N < SMALL_N (n=real/generated if they differ)."""
  if not r:
    return "—"
  n1, n2 = r.get("n1"), r.get("n2")
  n = f"N={n1}" if n1 == n2 else f"N={n1}/{n2}"
  if r.get("fid") is None:
    return f"— ({n})"
  s = f"{r['fid']:.2f}"
  if r.get("std") is not None:
    s += f" ± {r['std']:.2f}"
  if r.get("ci"):
    s += f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
  s += f" {n}"
  if min(n1 or 0, n2 or 0) < SMALL_N:
    s += " ⚠small N"
  return s


def _fmt_w1(r: Mapping[str, Any] | None) -> str:
  return "—" if not r or r.get("w1") is None else f"{r['w1']:.1f}"


def data_title(rows: Sequence[Mapping[str, Any]]) -> str:
  """The data named in the title: the rows' labels, and whether any is the phantom."""
  labels = list(dict.fromkeys(str(r.get("data_label") or "unnamed data") for r in rows))
  s = ", ".join(labels)
  if any(r.get("phantom") for r in rows):
    name = modality_lib.NAMES[table_modality(rows)]
    s += f" (procedural phantom {name}, not real {name})"
  return s


def _data_cell(row: Mapping[str, Any]) -> str:
  label = str(row.get("data_label") or row.get("dataset") or "?")
  return label + (" [phantom]" if row.get("phantom") and "phantom" not in label else "")


def _fmt_metric(r: Mapping[str, Any] | None, fmt: str) -> str:
  if not r or r.get("mean") is None:
    return "—" if not r else "inf"
  s = format(r["mean"], fmt)
  if r.get("std") is not None:
    s += f" ± {format(r['std'], fmt)}"
  return s


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table 1 in Markdown: organ rows; Pix2Pix | Diffusion | Neighbouring slice columns."""
  unit = modality_lib.UNITS[table_modality(rows)]
  titles = {k: v.replace("(HU)", f"({unit})") for k, v in METRIC_TITLES.items()}
  head = ["Organ", "N", "Data"]
  for m in METHODS:
    head += [f"{METHOD_TITLES[m]} {FID_TITLES[k]}" for k in FID_KINDS]
    head.append(f"{METHOD_TITLES[m]} W1 ({unit})")
    if m in GENERATIVE:
      head += [f"{METHOD_TITLES[m]} {titles[k]}" for k in IMAGE_METRICS]
  lines = [f"# Table 1: organ inpainting on {data_title(rows)}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [f"{row['organ']} ({row['split']})", str(int(row["num_slices"])), _data_cell(row)]
    for m in METHODS:
      entry = row["methods"].get(m) or {}
      cells += [fmt_fid(entry.get(k)) for k in FID_KINDS]
      cells.append(_fmt_w1(entry.get("w1_hu")))
      if m in GENERATIVE:
        cells += [_fmt_metric(entry.get(k), METRIC_FORMATS[k]) for k in IMAGE_METRICS]
    lines.append("| " + " | ".join(cells) + " |")
  lines += _equal_n_table(rows)
  lines += ["", *_footnotes(rows[0].get("settings", {}) if rows else {}, unit)]
  warnings = [w for row in rows for w in row.get("warnings", [])]
  if warnings:
    lines += ["", "**Warning:** " + " ".join(warnings)]
  return "\n".join(lines) + "\n"


def _equal_n_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """FIDs of every method at the neighbouring slice's disjoint pairs (equal N), if any."""
  if not any((row["methods"].get(m) or {}).get("at_neighbour_pairs")
             for row in rows for m in GENERATIVE):
    return []
  head = ["Pairs", "Organ"] + [f"{METHOD_TITLES[m]} {FID_TITLES[k]}" for m in METHODS
                               for k in FID_KINDS]
  lines = ["", "FID at equal N: every method on the real slices of the neighbouring slice's "
           "disjoint pairs (its rows only).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [str(row.get("num_neighbour_pairs", "?")), f"{row['organ']} ({row['split']})"]
    for m in METHODS:
      entry = row["methods"].get(m) or {}
      at = entry if m == "neighbour" else entry.get("at_neighbour_pairs") or {}
      cells += [fmt_fid(at.get(k)) for k in FID_KINDS]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _footnotes(settings: Mapping[str, Any], unit: str = "HU") -> list[str]:
  notes = [
      "N: slices with the organ; every FID compares N real slices with the N images of the "
      "method (N=real/generated where different). ± is the std and [..] the 95% interval of "
      f"a paired bootstrap ({settings.get('bootstrap')} resamples, seed "
      f"{settings.get('seed')}): one index vector resamples real and generated, which are the "
      f"same slices. ⚠small N: N < {SMALL_N}, FID biased upward and unstable; compare FIDs "
      "only at equal N. — means not evaluated.",
      f"FID (whole): whole slices windowed to {settings.get('fid_window')} HU. "
      f"FID (crop): organ bounding box + {settings.get('crop_margin_mm')} mm, squared, "
      f"resized to {settings.get('crop_size')} px. W1 (HU): Wasserstein-1 distance between "
      "the method's and the real HU inside the organ masks, pooled over the slices. MAE (raw "
      "HU), PSNR and SSIM (windowed, Gaussian SSIM) inside the organ mask, mean ± std over "
      "slices.",
      "Neighbouring slice: the adjacent real slice of the same volume (prev, or next at the "
      "volume's lower end) as the 'generated' image, on disjoint sets: only (slice, "
      "neighbour) pairs whose neighbour is none of the kept slices (every other slice of a "
      "run of consecutive slices), so real and neighbour sets share no image; its N is "
      "smaller than the row's N: compare it with the methods at equal N (the second table).",
  ]
  if unit != "HU":  # MR / PET: every value is in the normalised unit, per case
    notes[1] = notes[1].replace("HU", unit) + (
        f" {unit}: each slice's values normalised by its own case (MR: (value - p0.5) / "
        "(p99.5 - p0.5) of the body, so the window (0, 1) is a per-volume percentile window).")
  return notes


def write_tables(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict:
  """Writes table1.md / table1.csv / table1.json for `rows`; returns {name: path}."""
  if not rows:
    raise ValueError("write_tables: no rows")
  out = pathlib.Path(output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  rows = [_finite_or_none(dict(r)) for r in rows]
  paths = {name: out / name for name in TABLE_FILES}
  paths["table1.md"].write_text(markdown_table(rows))
  modality = table_modality(rows)
  with open(paths["table1.csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=csv_columns(modality))
    w.writeheader()
    for row in rows:
      w.writerow({unit_name(k, modality): v for k, v in _csv_row(row).items()})
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
