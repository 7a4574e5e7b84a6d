"""Imaging modalities (CT, MR, PET): how a volume's values are stored in records and normalised.

The one place that knows what a modality's voxel values mean (ctdiff_jax/data/transforms.py
maps the normalised values to the model's [-1, 1] with the config's IntensityMap knots):

  modality  stored int16 (records)            normalised value n (what the knots act on)
  ct        HU (value_scale 1)                n = HU (the knots are HU)
  mr        rint(value / value_scale)         n = (value - p_lo) / (p_hi - p_lo): the case's
                                              robust percentiles (MR_PERCENTILES) inside the
                                              body, so n = 0 .. 1 is p0.5 .. p99.5 of this scan
  pet       rint(SUV / value_scale)           n = log1p(max(SUV, 0))

`value_scale` (source value = stored int16 * value_scale) is 1 for integer volumes that fit
int16, else max|value| / 32000; MR/PET records carry it and the percentiles
(`records.VALUE_SCALE`, `records.INTENSITY_REF`) so a generated slice maps back to its source
scan's scale. CT records carry neither (their values are HU).

Pure numpy, no TFDS: the builder, the input pipeline and the exporters all use it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

CT, MR, PET = "ct", "mr", "pet"
MODALITIES = (CT, MR, PET)
DEFAULT = CT
NAMES = {CT: "CT", MR: "MR", PET: "PET"}
# MR: robust percentiles (inside the body) that map to n = 0 and n = 1.
MR_PERCENTILES = (0.5, 99.5)
# Unit of the normalised value n, as metrics and tables name it.
UNITS = {CT: "HU", MR: "p0.5-p99.5 range", PET: "log(1+SUV)"}
# Short unit tag used in metric keys (mae_<tag>, w1_<tag>).
UNIT_TAGS = {CT: "hu", MR: "prange", PET: "logsuv"}
# Stored value of air / outside the field of view.
AIR = {CT: -1024, MR: 0, PET: 0}
# Largest |stored| value a rescaled float volume uses (int16 headroom).
_INT16_FULL = 32000.0


class ModalityError(ValueError):
  """A dataset of one modality fed to a config (model) of another, or an unknown modality."""


def check(modality: Any) -> str:
  """The modality name, lower case; ModalityError if it is not one of MODALITIES."""
  m = str(modality or DEFAULT).strip().lower()
  if m not in MODALITIES:
    raise ModalityError(f"unknown modality {modality!r}: expected one of {', '.join(MODALITIES)}")
  return m


def of_metadata(meta: Mapping[str, Any]) -> str:
  """The modality of a built dataset (datasets built before modalities existed are CT)."""
  return check(meta.get("modality", DEFAULT))


def check_match(dataset: str, data_modality: str, config_modality: str, where: str) -> None:
  """Refuses a dataset whose modality differs from the config's, in one line."""
  d, c = check(data_modality), check(config_modality)
  if d != c:
    raise ModalityError(
        f"dataset {dataset} holds {NAMES[d]} slices but {where} is for {NAMES[c]} "
        f"(modality={c!r}): a {NAMES[c]} model cannot read {NAMES[d]} records; use a "
        f"{NAMES[d]} config (--config.modality={d} with its intensity knots, e.g. "
        f"configs/kidneys_mr.py) or a {NAMES[c]} dataset")


def value_scale(image: np.ndarray) -> float:
  """Source units per stored int16 step: 1 for integer volumes that fit int16, else rescaled."""
  arr = np.asarray(image)
  peak = float(np.max(np.abs(arr))) if arr.size else 0.0
  if arr.dtype.kind in "iub" and peak <= 32767:
    return 1.0
  if arr.dtype.kind == "f" and peak <= 32767 and np.array_equal(arr, np.rint(arr)):
    return 1.0
  return float(np.float32(peak / _INT16_FULL)) if peak > 0 else 1.0


def body_mask(image: np.ndarray) -> np.ndarray:
  """Voxels inside the body of an MR/PET volume: above 10% of the volume's 99th percentile.

  MR background (air) is near 0 with noise; a fraction of a high percentile separates it
  without assuming a scanner scale.
  """
  arr = np.asarray(image, np.float32)
  return arr > 0.1 * float(np.percentile(arr, 99.0))


def reference(image: np.ndarray, modality: str,
              organ_map: np.ndarray | None = None) -> tuple[float, float]:
  """(lo, hi) in source units: MR's body percentiles MR_PERCENTILES; PET (0, its p99.5).

  Organ voxels count as body too (a dark organ is still inside it). CT: the full HU range.
  """
  modality = check(modality)
  if modality == CT:
    return (-1024.0, 3071.0)
  arr = np.asarray(image, np.float32)
  body = body_mask(arr)
  if organ_map is not None:
    body |= np.asarray(organ_map) > 0
  values = arr[body] if body.any() else arr.reshape(-1)
  q = MR_PERCENTILES if modality == MR else (0.0, 99.5)
  lo, hi = (float(v) for v in np.percentile(values, q))
  if modality == PET:
    lo = 0.0
  if not hi > lo:
    hi = lo + 1.0  # a flat volume: any unit scale maps it
  return (lo, hi)


def normalise(values: np.ndarray, modality: str, ref: tuple[float, float] | None = None,
              xp=np) -> Any:
  """Source values -> the normalised value n the intensity knots act on (module docstring)."""
  if modality == CT:
    return values
  if modality == MR:
    lo, hi = ref
    return (values - lo) / (hi - lo)
  return xp.log1p(xp.maximum(values, 0.0))


def denormalise(n: np.ndarray, modality: str, ref: tuple[float, float] | None = None,
                xp=np) -> Any:
  """Inverse of `normalise` (PET values below 0 do not exist: n >= 0 gives SUV >= 0)."""
  if modality == CT:
    return n
  if modality == MR:
    lo, hi = ref
    return n * (hi - lo) + lo
  return xp.expm1(xp.maximum(n, 0.0))


def to_stored(values: np.ndarray, scale: float) -> np.ndarray:
  """Source values -> the records' int16 (rint(values / scale), clipped to int16)."""
  return np.clip(np.rint(np.asarray(values, np.float64) / scale), -32768, 32767).astype(np.int16)
