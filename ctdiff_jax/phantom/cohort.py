"""Procedural phantom CT cohort: the project's embedded default dataset.

Writes abdominal CT volumes with organ label maps in the same flat layout as the shared
TotalSegmentator examples (`<case>_ct.nii.gz` int16 HU, `<case>_seg.nii.gz` uint8 labels,
`labels.json` id -> name), plus a `manifest.csv`, so every downstream tool can run (and be
tested end to end) without downloading real data:

  python -m ctdiff_jax.phantom --output_dir=/tmp/phantom --num_cases=8 [--seed=0] [--lesions]
      [--modality=mr]

MR mode (`modality="mr"`): the same anatomy as the CT case (same draws), imaged T1-like
(tables.TISSUE_T1: fat bright, fluid dark, kidney / liver in between, no HU) with a smooth
bias field, a per-case scanner gain and Rician noise, written as `<case>_mr.nii.gz` (int16,
arbitrary units); build it with `--modality=mr`.

Anatomy (all sizes in mm, so a different grid or spacing shows the same body): elliptical
body with subcutaneous fat and an abdominal wall, vertebrae (cortical shell, cancellous core,
discs, posterior elements, spinal canal), paraspinal and psoas muscles, ribs, aorta and IVC,
a domed diaphragm with lungs (five lobes) and heart above it and liver, gallbladder, spleen,
stomach, kidneys (cortex, medulla, sinus fat) and bowel loops below it. With `--lesions`,
hypo-/hyperdense tumours are placed strictly inside liver and kidneys. Every case is
different (random sizes, positions, rotations, a smooth global warp, wobbly organ surfaces)
but fully determined by (seed, case index).

Where things are: tables.py holds the label and tissue vocabularies, canvas.py the geometry
(warped world coordinates, wobbly ellipsoids), anatomy.py one painter per structure walked in
a fixed order; this file draws a case's HU table, forms the image (texture, blur, noise) and
writes the cohort.

Orientation is RAS+ as nibabel reads it: array axis 0 runs towards the patient's right, axis 1
anterior, axis 2 cranial (like the shared TotalSegmentator cases); the affine is diagonal
(spacing) with the volume centred on the origin.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ctdiff_jax.phantom import anatomy
from ctdiff_jax.phantom.canvas import Canvas, check_grid
# The vocabularies live in tables.py (anatomy.py needs them too); re-exported as the API.
from ctdiff_jax.phantom.tables import (ID, KIDNEY_TUMOR, LABEL_IDS, LABELS, LIVER_TUMOR, T,
                                       TEXTURED, TISSUE_HU, TISSUE_IDS, TISSUE_T1, TISSUES)

DEFAULT_SHAPE = (128, 128, 48)
DEFAULT_SPACING = (3.0, 3.0, 5.0)
MODALITIES = ("ct", "mr")
# MR scanner gain range (arbitrary units of fat signal) and noise as a fraction of it.
MR_GAIN = (800.0, 1600.0)
MR_NOISE = 0.015


@dataclasses.dataclass
class PhantomCase:
  """One generated volume plus what the cohort writer records about it."""
  ct: np.ndarray  # int16 HU
  seg: np.ndarray  # uint8 label ids (LABELS)
  affine: np.ndarray  # 4x4 RAS
  tissues: np.ndarray  # uint8 tissue ids (TISSUES)
  num_liver_lesions: int = 0
  num_kidney_lesions: int = 0


def _as_rng(rng_or_seed) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  if isinstance(rng_or_seed, (int, np.integer, np.random.SeedSequence)) and not isinstance(
      rng_or_seed, bool):
    return np.random.default_rng(rng_or_seed)
  raise TypeError(f"expected an int seed, SeedSequence or numpy Generator, got {rng_or_seed!r}")


def case_rng(seed: int, index: int) -> np.random.Generator:
  """The generator behind case `index` of a cohort with `seed` (independent streams)."""
  if seed < 0 or index < 0:
    raise ValueError(f"seed and case index must be >= 0, got seed={seed}, index={index}")
  return np.random.default_rng(np.random.SeedSequence([seed, index]))


def affine_for(shape, spacing) -> np.ndarray:
  """Diagonal RAS affine with the volume centred on the world origin."""
  shape, spacing = check_grid(shape, spacing)
  aff = np.diag([*spacing, 1.0])
  aff[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
  return aff


def _draw_hu_table(rng: np.random.Generator) -> np.ndarray:
  """This case's HU per tissue id: each tissue's mean plus a uniform draw within its range."""
  hu_table = np.array([m + rng.uniform(-j, j) for m, j in (TISSUE_HU[t] for t in TISSUES)],
                      np.float32)
  # Keep the contrast ordering radiologists rely on whatever the draw.
  hu_table[T["kidney_medulla"]] = min(hu_table[T["kidney_medulla"]],
                                      hu_table[T["kidney_cortex"]] - 60)
  return hu_table


def _form_image(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
  """Image formation on the painted HU: texture, scanner blur (PSF), correlated noise."""
  f32 = np.float32
  sx, sy, _ = cv.spacing
  hu = cv.hu
  tex = cv.smooth_noise(rng, 4)
  tex *= f32(6.0 / (tex.std() + 1e-6))
  textured = np.isin(cv.tissue, [T[t] for t in TEXTURED])
  hu[textured] += tex[textured]
  hu = ndimage.gaussian_filter(hu, (0.45, 0.45 * sx / sy, 0.35))
  sigma_n = rng.uniform(8, 18)
  noise = ndimage.gaussian_filter(rng.standard_normal(cv.shape, dtype=f32), (0.6, 0.6, 0.0))
  noise *= f32(sigma_n / (noise.std() + 1e-6))
  return np.clip(np.rint(hu + noise), -1024, 3071).astype(np.int16)


def _form_mr_image(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
  """T1-like MR of the painted tissues: per-case table, texture, blur, bias, gain, noise.

  Drawn after the CT image from the same generator, so the anatomy is the CT case's.
  """
  f32 = np.float32
  sx, sy, _ = cv.spacing
  table = np.array([m + rng.uniform(-j, j) if j else m
                    for m, j in (TISSUE_T1[t] for t in TISSUES)], f32)
  signal = table[cv.tissue]
  tex = cv.smooth_noise(rng, 4)
  tex *= f32(0.02 / (tex.std() + 1e-6))
  textured = np.isin(cv.tissue, [T[t] for t in TEXTURED])
  signal[textured] += tex[textured]
  signal = ndimage.gaussian_filter(signal, (0.45, 0.45 * sx / sy, 0.35))
  bias = cv.smooth_noise(rng, 80)
  signal *= 1.0 + f32(0.12) * bias / (np.abs(bias).max() + 1e-6)  # coil sensitivity
  gain = f32(rng.uniform(*MR_GAIN))
  sigma = gain * f32(MR_NOISE)
  real = signal * gain + sigma * rng.standard_normal(cv.shape, dtype=f32)
  imag = sigma * rng.standard_normal(cv.shape, dtype=f32)
  return np.clip(np.rint(np.hypot(real, imag)), 0, 32767).astype(np.int16)  # magnitude


def _generate(rng: np.random.Generator, shape, spacing, lesions: bool,
              modality: str = "ct") -> PhantomCase:
  """One case from `rng`: per-case HU table, warped canvas, anatomy, image formation."""
  shape, spacing = check_grid(shape, spacing)
  if modality not in MODALITIES:
    raise ValueError(f"phantom modality must be one of {MODALITIES}, got {modality!r}")
  cv = Canvas(rng, shape, spacing, _draw_hu_table(rng))
  n_liver, n_kidney = anatomy.paint_case(cv, rng, lesions)
  ct = _form_image(cv, rng)
  if modality == "mr":
    ct = _form_mr_image(cv, rng)
  # Anatomy is modelled with +x towards the patient's left; RAS+ voxel axis 0 points to the
  # patient's right (as nibabel and the shared TotalSegmentator cases have it), so flip x.
  flip = lambda a: np.ascontiguousarray(a[::-1])
  return PhantomCase(ct=flip(ct), seg=flip(cv.seg), affine=affine_for(shape, spacing),
                     tissues=flip(cv.tissue), num_liver_lesions=n_liver,
                     num_kidney_lesions=n_kidney)


def generate_case(rng_or_seed, shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: Sequence[float] = DEFAULT_SPACING, lesions: bool = False,
                  return_tissues: bool = False, modality: str = "ct"):
  """Generates one phantom volume.

  Args:
    rng_or_seed: an int seed, a SeedSequence or a numpy Generator (consumed).
    shape: grid size (x, y, z) in voxels; anatomy is in mm so this sets the field of view.
    spacing: voxel size (x, y, z) in mm.
    lesions: add liver and kidney tumours (labels LIVER_TUMOR / KIDNEY_TUMOR).
    return_tissues: also return the tissue-class map (ids index TISSUES).
    modality: "ct" (HU) or "mr" (T1-like, arbitrary units; same anatomy).

  Returns:
    (image int16 (HU or MR signal), seg uint8 labels, affine 4x4) [+ tissues uint8].
  """
  case = _generate(_as_rng(rng_or_seed), shape, spacing, lesions, modality)
  if return_tissues:
    return case.ct, case.seg, case.affine, case.tissues
  return case.ct, case.seg, case.affine


MANIFEST_COLUMNS = ("case_id", "image", "label", "num_slices", "spacing_x", "spacing_y",
                    "spacing_z", "has_lesions", "num_liver_lesions", "num_kidney_lesions")


def write_cohort(output_dir, num_cases: int, seed: int = 0, lesions: bool = False,
                 shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] = DEFAULT_SPACING, prefix: str = "phantom",
                 progress: bool = True, modality: str = "ct") -> list[str]:
  """Writes `num_cases` phantom cases, labels.json and manifest.csv; returns the case ids.

  Case i uses `case_rng(seed, i)`, so a case does not depend on how many others are written.
  """
  if num_cases < 1:
    raise ValueError(f"num_cases must be >= 1, got {num_cases}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  shape, spacing = check_grid(shape, spacing)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "labels.json", "w") as f:
    json.dump({str(k): v for k, v in sorted(LABELS.items())}, f, indent=1)
  rows, ids = [], []
  for i in tqdm(range(num_cases), desc="phantom cases", unit="case", disable=not progress):
    case_id = f"{prefix}_{i:03d}"
    case = _generate(case_rng(seed, i), shape, spacing, lesions, modality)
    image_file = f"{case_id}_{modality}.nii.gz"  # flat layout: _ct or _mr
    img = nib.Nifti1Image(case.ct, case.affine)
    img.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, out / image_file)
    lab = nib.Nifti1Image(case.seg, case.affine)
    lab.set_data_dtype(np.uint8)
    lab.header.set_xyzt_units("mm", "sec")
    nib.save(lab, out / f"{case_id}_seg.nii.gz")
    ids.append(case_id)
    rows.append({
        "case_id": case_id, "image": image_file, "label": f"{case_id}_seg.nii.gz",
        "num_slices": shape[2], "spacing_x": spacing[0], "spacing_y": spacing[1],
        "spacing_z": spacing[2],
        "has_lesions": int(case.num_liver_lesions + case.num_kidney_lesions > 0),
        "num_liver_lesions": case.num_liver_lesions,
        "num_kidney_lesions": case.num_kidney_lesions,
    })
  with open(out / "manifest.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return ids
