"""volumes/<case>_r<k>_{ct,seg,mask}.nii.gz: per-case stacks of the generated slices.

Stack k of a case holds the k-th use of the case's slices (`round`); z gaps between them are
filled with PAD_HU / label 0 / mask 0. Same orientation and affine as the slice files. The
stacks are written into `.volumes.incomplete/`, renamed to `volumes/` when all are on disk.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from ctdiff_jax.generation.export import base
from ctdiff_jax.generation.export import nifti

PAD_HU = -1024  # fills z gaps in stacked volumes (the builder's padding HU)
# Volume kind -> (Samples field, dtype, gap fill).
KINDS = {"ct": ("generated_hu", np.int16, PAD_HU), "seg": ("labels", np.uint8, 0),
         "mask": ("mask", np.uint8, 0)}


class VolumeExporter(base.Exporter):
  """Spools the slices, then writes one ct/seg/mask stack per (case, round) in `finish`."""

  def __init__(self, target: base.Target):
    super().__init__(target)
    self.spool = base.Spool(target.path(".spool", "volumes"), target.num_samples,
                            int(target.meta["image_size"]),
                            {field: dtype for field, dtype, _ in KINDS.values()})

  def needs(self, indices) -> bool:
    return True  # every slice, also on resume (base.Spool)

  def add(self, samples) -> None:
    self.spool.add(samples)

  def finish(self) -> dict[str, list[str]]:
    # Written into a temporary folder, renamed when complete: a kill leaves no half volumes/.
    final, root = self.target.path("volumes"), self.target.path(".volumes.incomplete")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    groups: dict[tuple[str, int], list[int]] = {}
    for k, m in enumerate(self.spool.meta):
      groups.setdefault((m["case"], m["round"]), []).append(k)
    written = []
    for (case, rnd), ks in sorted(groups.items()):
      zs = [self.spool.meta[k]["slice"] for k in ks]
      z0, nz = min(zs), max(zs) - min(zs) + 1
      spacing = self.spool.meta[ks[0]]["spacing"]
      scale = float(self.spool.meta[ks[0]].get("value_scale", 1.0))  # MR / PET: per case
      for kind, (field, dtype, fill) in KINDS.items():
        arr = self.spool.arrays[field]
        if kind == "ct" and "value_scale" in self.spool.meta[ks[0]]:
          fill = 0  # MR / PET air (ingest/modality.py AIR)
        vol = np.full((nz,) + arr.shape[1:3], fill, dtype)
        for k, z in zip(ks, zs):
          vol[z - z0] = arr[k, ..., 0]
        name = f"{base.safe_name(case)}_r{rnd}_{kind}.nii.gz"
        nifti.save_nifti(os.path.join(root, name), vol, spacing, z0, dtype,
                         scale if kind == "ct" else 1.0)
        written.append(os.path.join(final, name))
    base.replace_dir(root, final)
    return {"volumes": written}

  def close(self) -> None:
    self.spool.close()
