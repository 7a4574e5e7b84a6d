"""manifest.csv: one row per generated slice (source, scenario details, provenance, files)."""

from __future__ import annotations

import csv
from typing import Any, Mapping

from ctdiff_jax.generation.export import base

MANIFEST_COLUMNS = (
    "index", "scenario", "source_split", "source_case", "slice_index", "source_index", "round",
    "seed", "checkpoint_step", "checkpoint", "mask_pixels", "lesion_pixels", "donor_case",
    "donor_slice", "offset_dy", "offset_dx", "ct_file", "seg_file", "mask_file", "png_file")
# Copied from the run's provenance into every row.
RUN_COLUMNS = ("scenario", "source_split", "seed", "checkpoint_step", "checkpoint")


class ManifestExporter(base.Exporter):
  """Rows in sample order; `files` (column -> suffix) names the per-slice files written."""

  def __init__(self, target: base.Target, files: Mapping[str, str]):
    super().__init__(target)
    self.file_suffixes = dict(files)
    self.rows: list[dict[str, Any]] = []

  def add(self, samples) -> None:
    run = {k: self.target.provenance.get(k, "") for k in RUN_COLUMNS}
    for j in range(len(samples)):
      info = samples.info[j]
      off = info.get("offset", ("", ""))
      name = base.sample_stem(samples, j)
      files = {column: name + suffix for column, suffix in self.file_suffixes.items()}
      self.rows.append({
          **run, "index": int(samples.index[j]), "source_case": samples.case_id[j],
          "slice_index": int(samples.slice_index[j]),
          "source_index": int(samples.source_index[j]), "round": int(samples.round[j]),
          "mask_pixels": int(samples.mask[j].sum()),
          "lesion_pixels": info.get("lesion_pixels", ""),
          "donor_case": info.get("donor_case", ""), "donor_slice": info.get("donor_slice", ""),
          "offset_dy": off[0], "offset_dx": off[1],
          **{k: files.get(k, "") for k in ("ct_file", "seg_file", "mask_file", "png_file")},
      })

  def finish(self) -> dict[str, str]:
    path = self.target.path("manifest.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
      writer.writeheader()
      writer.writerows(self.rows)
    return {"manifest": path}
