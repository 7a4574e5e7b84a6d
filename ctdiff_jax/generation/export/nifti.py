"""NIfTI: the RAS+ orientation of exported slices and the per-slice ct/seg/mask files.

Records are stored in the radiological view: img[row, col] with row 0 anterior (rows run
anterior -> posterior) and column 0 the patient's right (columns run right -> left). The
exported array is RAS+ canonical: `to_ras(img)` = img[::-1, ::-1].T, so array axis 0 runs
towards the patient's Right, axis 1 towards Anterior, axis 2 Superior, and the affine is
diag(sx, sy, sz) (the record's spacing_mm) plus a translation. A slice file has shape
(W, H, 1) (= (H, W, 1) for the square slices of ct_slices); `nib.aff2axcodes` gives
('R', 'A', 'S') and `from_ras` (or ctdiff_jax.generation.scenarios.load_mask_file) gives back
the record layout. Records carry no source origin, so x/y are centred on the slice centre and
z = slice_index * sz (the slice's position on the canonical source grid).
"""

from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np

from ctdiff_jax.generation.export import base


def to_ras(img: np.ndarray) -> np.ndarray:
  """Record layout (H, W) [row anterior->posterior, col right->left] -> RAS+ array (W, H)."""
  return np.ascontiguousarray(np.asarray(img)[::-1, ::-1].T)


def from_ras(arr: np.ndarray) -> np.ndarray:
  """Inverse of `to_ras`: RAS+ (W, H) array -> record layout (H, W)."""
  return np.ascontiguousarray(np.asarray(arr).T[::-1, ::-1])


def slice_affine(spacing_mm: Sequence[float], shape_hw: tuple[int, int],
                 slice_index: int) -> np.ndarray:
  """RAS+ affine of a `to_ras` array: diag(sx, sy, sz), centred in-plane, z = index * sz."""
  sx, sy, sz = (float(v) for v in np.asarray(spacing_mm, np.float64).reshape(3))
  h, w = int(shape_hw[0]), int(shape_hw[1])
  affine = np.diag([sx, sy, sz, 1.0])
  affine[:3, 3] = (-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, int(slice_index) * sz)
  return affine


def save_nifti(path: str, slices_hw: np.ndarray, spacing_mm: Sequence[float],
               first_slice_index: int, dtype, scale: float = 1.0) -> None:
  """Writes record-layout slices (Z, H, W), z = first_slice_index.., as a RAS+ NIfTI.

  `scale` != 1 (MR / PET records' value_scale) goes into the header's scl_slope, so readers
  (nibabel's get_fdata) see the source scan's values.
  """
  arr = np.asarray(slices_hw)
  if arr.ndim != 3:
    raise ValueError(f"save_nifti: expected (Z, H, W) slices, got shape {arr.shape}")
  vol = np.stack([to_ras(s) for s in arr], axis=-1).astype(dtype)
  affine = slice_affine(spacing_mm, arr.shape[1:3], first_slice_index)
  img = nib.Nifti1Image(vol, affine)
  img.set_data_dtype(dtype)
  if float(scale) != 1.0:
    img.header.set_slope_inter(float(scale), 0.0)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm", "sec")
  nib.save(img, path)


# The three files of a slice: manifest column -> (file suffix, Samples field, dtype).
SLICE_FILES = {"ct_file": ("_ct.nii.gz", "generated_hu", np.int16),
               "seg_file": ("_seg.nii.gz", "labels", np.uint8),
               "mask_file": ("_mask.nii.gz", "mask", np.uint8)}


class NiftiExporter(base.Exporter):
  """<stem>_ct.nii.gz (HU int16), _seg.nii.gz (labels uint8), _mask.nii.gz (0/1 uint8).

  MR / PET keep the `_ct` file name (the manifest's ct_file column) with the source scale in
  the image's scl_slope (Samples.value_scale).
  """

  files = {column: suffix for column, (suffix, _, _) in SLICE_FILES.items()}

  def add(self, samples) -> None:
    for j in self.todo(samples):
      name = base.sample_stem(samples, j)
      scales = getattr(samples, "value_scale", None)
      for suffix, field, dtype in SLICE_FILES.values():
        scale = 1.0 if scales is None or field != "generated_hu" else float(scales[j])
        save_nifti(self.target.path(name + suffix), getattr(samples, field)[j][None, ..., 0],
                   samples.spacing_mm[j], int(samples.slice_index[j]), dtype, scale)
        self.slice_files += 1
