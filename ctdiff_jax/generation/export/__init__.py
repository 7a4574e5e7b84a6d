"""Writes generated slices as a synthetic dataset: NIfTI, PNG, manifest, Figure 4, volumes, TFDS.

Layout of an export (`output_dir`):

  <i>_<case>_<slice>_ct.nii.gz    generated slice, HU int16 (outside the mask: the source HU)
  <i>_<case>_<slice>_seg.nii.gz   its label map, uint8 (the dataset's ids; tumour scenario:
                                  the placed tumour carries the lesion id)
  <i>_<case>_<slice>_mask.nii.gz  the regenerated region, uint8 0/1
  <i>_<case>_<slice>.png          preview of the generated slice (display window)
  volumes/<case>_r<k>_{ct,seg,mask}.nii.gz   (volumes=True) per-case stacks: k-th use of
                                  the case's slices; z gaps between them are filled with
                                  -1024 HU / label 0 / mask 0
  tfds/ct_slices/<config>/1.0.0/  (tfds=True) the same records as the source dataset
                                  (records.tfds_features), array_record, split = source split
  manifest.csv                    one row per slice (MANIFEST_COLUMNS)
  figure4.png                     ground truth | masked input | generated, first rows
  run.json                        what the export was asked for; `complete` once finished

One exporter per output (base.Exporter: `add(samples)` per chunk, `finish() -> dict`):
nifti.py (orientation: see there), png.py (previews, Figure 4), manifest.py, volumes.py,
tfds.py (how to read the export like real data: see there). `Exporter` fans each chunk out to
the ones a run asks for. Volumes and TFDS stream through on-disk spools (`.spool/`, numpy
memmaps, deleted at the end), so endless exports do not have to fit in memory.

A killed export loses nothing (resume.py): per-slice files are written before their manifest
row, TFDS and volumes go to temporary folders renamed at the end, and running the same
request again into the same output_dir resumes, skipping the slices already written.

Several processes (hosts) write one export as parts, `parts/part-<p>-of-<P>/`, joined by
`merge` into the layout above (parts.py).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ctdiff_jax.generation.export import base
from ctdiff_jax.generation.export import manifest
from ctdiff_jax.generation.export import nifti
from ctdiff_jax.generation.export import parts
from ctdiff_jax.generation.export import png
from ctdiff_jax.generation.export import resume
from ctdiff_jax.generation.export import tfds
from ctdiff_jax.generation.export import volumes

# The submodules' public names, for callers of `export.<name>`.
safe_name, stem, Target = base.safe_name, base.stem, base.Target
MANIFEST_COLUMNS = manifest.MANIFEST_COLUMNS
to_ras, from_ras, slice_affine, save_nifti = (
    nifti.to_ras, nifti.from_ras, nifti.slice_affine, nifti.save_nifti)
FIGURE_COLUMNS, FIGURE_ROWS = png.FIGURE_COLUMNS, png.FIGURE_ROWS
FIGURE_TILE_PX = png.FIGURE_TILE_PX
display_unit, figure4 = png.display_unit, png.figure4
TFDS_VERSION, write_tfds = tfds.TFDS_VERSION, tfds.write_tfds
RUN_FILE, request_of, check_output_dir = (
    resume.RUN_FILE, resume.request_of, resume.check_output_dir)
PAD_HU = volumes.PAD_HU
Shard, merge, MergeError = parts.Shard, parts.merge, parts.MergeError

# Per-slice file formats (--formats), in the order their files are written.
SLICE_EXPORTERS: dict[str, type[base.Exporter]] = {
    "nifti": nifti.NiftiExporter, "png": png.PngExporter}
FORMATS = tuple(SLICE_EXPORTERS)
# Whole-export outputs switched on by the flag of the same name (--volumes, --tfds).
OPTIONAL_EXPORTERS: dict[str, type[base.Exporter]] = {
    "volumes": volumes.VolumeExporter, "tfds": tfds.TfdsExporter}


class Exporter:
  """Fans generated chunks out to the exporters of one export; `finish()` merges what they wrote.

  Args:
    output_dir: where everything goes (created).
    meta: the source dataset's metadata (read_dataset_metadata).
    num_samples: slices that will be added (sizes the spools).
    formats: subset of FORMATS for the per-slice files.
    tfds / volumes: also write the TFDS dataset / per-case volumes.
    display_window: HU window of the PNGs and the figure.
    provenance: scenario, source_split, seed, checkpoint, checkpoint_step, ... (manifest,
      TFDS metadata).
    request: what decides the slices (resume.request_of); with it the export keeps run.json
      and resumes an interrupted export of the same request (resume.py); None: no run.json.
    overwrite: start afresh even over an export (else check_output_dir may refuse).
    part: output_dir is one process's part of a multi-process export (parts.py).
  """

  def __init__(self, output_dir: str, meta: Mapping[str, Any], num_samples: int, *,
               formats: Sequence[str] = FORMATS, tfds: bool = False, volumes: bool = False,
               display_window=(-160.0, 240.0), provenance: Mapping[str, Any] | None = None,
               request: Mapping[str, Any] | None = None, overwrite: bool = False,
               part: bool = False):
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
      raise ValueError(f"unknown export format(s) {unknown}; expected some of {FORMATS}")
    output_dir = os.path.abspath(output_dir)
    per_slice = [SLICE_EXPORTERS[name] for name in FORMATS if name in formats]
    files = {column: suffix for cls in per_slice for column, suffix in cls.files.items()}
    done = self._start(output_dir, request, overwrite, provenance or {}, files)
    self.target = base.Target(output_dir, dict(meta), int(num_samples),
                              tuple(float(v) for v in display_window), dict(provenance or {}),
                              frozenset(done))
    self.request = request
    figure = parts.FigureRowsExporter if part else png.FigureExporter
    self.parts: list[base.Exporter] = [
        *(cls(self.target) for cls in per_slice),
        manifest.ManifestExporter(self.target, files, done), figure(self.target)]
    wanted = {"volumes": volumes, "tfds": tfds}
    if part:  # TFDS and volumes are written by parts.merge, from the part's record chunks
      self.parts.append(parts.RecordExporter(self.target, records=tfds or volumes))
    else:
      self.parts += [cls(self.target) for name, cls in OPTIONAL_EXPORTERS.items()
                     if wanted[name]]

  @staticmethod
  def _start(output_dir, request, overwrite, provenance, files) -> dict[int, dict[str, str]]:
    """Checks output_dir, writes run.json; returns the rows an interrupted run left to keep."""
    os.makedirs(output_dir, exist_ok=True)
    if request is None:
      return {}
    resuming = resume.check_output_dir(output_dir, request, overwrite)
    if resuming:
      resume.check_provenance(output_dir, provenance)
    resume.write_run(output_dir, {"request": request, "provenance": provenance,
                                  "complete": False})
    return resume.done_rows(output_dir, files) if resuming else {}

  @property
  def resumed(self) -> int:
    """Slices an interrupted earlier run had written (kept, not written again)."""
    return len(self.target.done)

  def wanted(self, indices: Sequence[int]) -> bool:
    """Whether a chunk of these sample indices must be generated (False: all written)."""
    return any(part.needs(indices) for part in self.parts)

  def add(self, samples) -> None:
    """Hands one chunk (a runner.Samples) to every exporter (per-slice files before rows)."""
    for part in self.parts:
      part.add(samples)

  def finish(self) -> dict[str, Any]:
    """Finishes every exporter (manifest, figure, volumes, TFDS); returns what went where."""
    out: dict[str, Any] = {"output_dir": self.target.output_dir,
                           "slice_files": sum(p.slice_files for p in self.parts),
                           "resumed_slices": self.resumed}
    try:
      for part in self.parts:
        out.update(part.finish())
    finally:
      for part in self.parts:
        part.close()
    if self.request is not None:
      resume.write_run(self.target.output_dir, {"request": self.request, "complete": True,
                                                "provenance": self.target.provenance})
    return out
