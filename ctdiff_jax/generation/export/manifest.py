"""manifest.csv: one row per generated slice (source, scenario details, provenance, files)."""

from __future__ import annotations

import csv
import os
from typing import Any, Mapping

from ctdiff_jax.generation.export import base

MANIFEST_COLUMNS = (
    "index", "scenario", "source_split", "source_case", "slice_index", "source_index", "round",
    "seed", "checkpoint_step", "checkpoint", "mask_pixels", "lesion_pixels", "donor_case",
    "donor_slice", "offset_dy", "offset_dx", "ct_file", "seg_file", "mask_file", "png_file")
# Copied from the run's provenance into every row.
RUN_COLUMNS = ("scenario", "source_split", "seed", "checkpoint_step", "checkpoint")


class ManifestExporter(base.Exporter):
  """Rows in sample order; `files` (column -> suffix) names the per-slice files written.

  Rows are appended (and flushed) after the chunk's per-slice files, so a row means its files
  are on disk also after a kill; `rows` are the rows an interrupted run left (resume.py), kept.
  `finish` rewrites the file in index order.
  """

  def __init__(self, target: base.Target, files: Mapping[str, str],
               rows: Mapping[int, Mapping[str, Any]] | None = None):
    super().__init__(target)
    self.file_suffixes = dict(files)
    self.rows: dict[int, dict[str, Any]] = {int(i): dict(r) for i, r in (rows or {}).items()}
    self.path = target.path("manifest.csv")
    self._write(self.path, self.rows)  # only the kept rows: drops what a kill cut short
    self.file = open(self.path, "a", newline="", encoding="utf-8")
    self.writer = csv.DictWriter(self.file, fieldnames=MANIFEST_COLUMNS)

  @staticmethod
  def _write(path: str, rows: Mapping[int, Mapping[str, Any]]) -> None:
    write_rows(path, rows)

  def _row(self, samples, j: int) -> dict[str, Any]:
    run = {k: self.target.provenance.get(k, "") for k in RUN_COLUMNS}
    info = samples.info[j]
    off = info.get("offset", ("", ""))
    name = base.sample_stem(samples, j)
    files = {column: name + suffix for column, suffix in self.file_suffixes.items()}
    return {
        **run, "index": int(samples.index[j]), "source_case": samples.case_id[j],
        "slice_index": int(samples.slice_index[j]),
        "source_index": int(samples.source_index[j]), "round": int(samples.round[j]),
        "mask_pixels": int(samples.mask[j].sum()),
        "lesion_pixels": info.get("lesion_pixels", ""),
        "donor_case": info.get("donor_case", ""), "donor_slice": info.get("donor_slice", ""),
        "offset_dy": off[0], "offset_dx": off[1],
        **{k: files.get(k, "") for k in ("ct_file", "seg_file", "mask_file", "png_file")},
    }

  def add(self, samples) -> None:
    new = [self._row(samples, j) for j in self.todo(samples)]
    for row in new:
      self.rows[row["index"]] = row
    self.writer.writerows(new)
    self.file.flush()

  def finish(self) -> dict[str, str]:
    self.close()
    self._write(self.path, self.rows)
    return {"manifest": self.path}

  def close(self) -> None:
    if not self.file.closed:
      self.file.close()


def write_rows(path: str, rows: Mapping[int, Mapping[str, Any]]) -> None:
  """Replaces the manifest at `path` with `rows` (index -> row), in index order, atomically."""
  with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows[i] for i in sorted(rows))
  os.replace(path + ".tmp", path)
