"""Generation scenarios: which region of which source slice to regenerate, and the new labels.

A scenario turns the slices of one split into an endless stream of `Job`s (pure numpy, no
model): job i names a source slice, the (H, W) mask the model regenerates and the label map
of the synthetic slice.

  organ    the organ mask: union of the dataset's organs (or the `label_ids` subset), grown
           by `config.data.dilation_mm`. Labels unchanged.
  context  the organs' bounding box plus `margin_mm` (default `config.data.bbox_margin_mm`),
           or one fixed user mask (`mask_file`) for every slice. Labels unchanged.
  tumor    (datasets with a lesion label, e.g. kidney_tumor: 1 kidney, 2 kidney_tumor) slice A
           must show the host organ (every non-lesion organ, or `label_ids`); one connected
           tumour component of another slice B (a different case when the split has one) is
           translated to lie entirely inside A's host organ (a random valid position, or
           the given `offset`) and regenerated there. The mask is the placed tumour grown
           by `blend_px` pixels (so its rim blends into the surrounding tissue), clipped to
           the host organ, so it never touches A's own lesion or anything outside the organ.
           New labels = A's labels with the placed tumour set to the lesion id (A's original
           lesion kept as is).

"Endless": jobs cycle over the usable source slices (sorted by case and slice index) for as
many samples as asked; job i's randomness (tumour choice and position) comes from
np.random.default_rng((seed, i)). Slices whose mask is empty (no organ; no host organ; no
tumour that fits) are skipped and counted in `Planner.skipped`; if no slice is usable the
planner raises a ScenarioError that says why.

Mask files (`load_mask_file`): .npy or .png hold the mask in the record layout (H, W), row 0
anterior, column 0 the patient's right, like the dataset's slices; a .nii/.nii.gz mask is read
in the exporter's RAS+ layout (see ctdiff_jax/generation/export.py), so an exported `*_mask.nii.gz` can be
used again. Nonzero = regenerate.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage
from tqdm import auto as tqdm

from ctdiff_jax.ingest import records
from ctdiff_jax.data import masks
from ctdiff_jax.data import transforms

SCENARIOS = ("organ", "context", "tumor")
# Tumour donors tried per host slice before that slice counts as "nothing fits".
MAX_TUMOR_TRIES = 20
# The tumour scenario's default rim (pixels) regenerated around the placed tumour.
BLEND_PX = 1


class ScenarioError(ValueError):
  """A scenario that cannot run on this dataset / split / mask (the message says why)."""


def text(value: Any) -> str:
  """A record's text field (TFDS gives bytes) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class Job:
  """One synthetic slice to generate."""

  index: int  # sample index (0..num_samples-1)
  source_index: int  # record index in the split
  record: Mapping[str, Any]
  mask: np.ndarray  # (H, W) bool: region the model regenerates
  labels: np.ndarray  # (H, W) uint8: label map of the synthetic slice
  round: int  # how many earlier jobs used this source slice
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # scenario details

  @property
  def case_id(self) -> str:
    return text(self.record[records.CASE_ID])

  @property
  def slice_index(self) -> int:
    return int(self.record[records.SLICE_INDEX])


@dataclasses.dataclass(frozen=True)
class _Donor:
  """One connected tumour component of a donor slice (cropped stamp + its top-left)."""

  source_index: int
  case_id: str
  slice_index: int
  stamp: np.ndarray
  r0: int
  c0: int

  def full(self, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[self.r0:self.r0 + self.stamp.shape[0], self.c0:self.c0 + self.stamp.shape[1]] = self.stamp
    return out


def load_mask_file(path: str, shape: tuple[int, int]) -> np.ndarray:
  """Bool (H, W) mask from .npy / .png / .nii(.gz) (layouts: see the module docstring)."""
  if not os.path.exists(path):
    raise ScenarioError(f"mask file {path} does not exist")
  lower = path.lower()
  try:
    if lower.endswith(".npy"):
      arr = np.load(path, allow_pickle=False)
    elif lower.endswith(".png"):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      arr = np.asarray(Image.open(path))
      if arr.ndim == 3:  # RGB(A): any nonzero colour channel counts
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    elif lower.endswith((".nii", ".nii.gz")):
      import nibabel as nib  # pylint: disable=g-import-not-at-top
      from ctdiff_jax.generation import export  # pylint: disable=g-import-not-at-top
      arr = np.asarray(nib.load(path).dataobj)
      if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
      if arr.ndim == 2:
        arr = export.from_ras(arr)
    else:
      raise ScenarioError(f"mask file {path}: unsupported type (use .npy, .png or .nii.gz)")
  except ScenarioError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ScenarioError(f"mask file {path} cannot be read: {e}") from e
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.shape != tuple(shape):
    raise ScenarioError(f"mask file {path} has shape {arr.shape}; the dataset's slices are "
                        f"{tuple(shape)} (H, W)")
  if not np.all(np.isfinite(arr)):
    raise ScenarioError(f"mask file {path} contains NaN/Inf")
  mask = arr != 0
  if not mask.any():
    raise ScenarioError(f"mask file {path} is empty (no nonzero pixel): nothing to regenerate")
  return mask


def parse_offset(value: str | Sequence[int] | None) -> tuple[int, int] | None:
  """'dy,dx' or (dy, dx) -> (dy, dx) ints; None stays None."""
  if value is None or value == "":
    return None
  parts = value.split(",") if isinstance(value, str) else list(value)
  try:
    dy, dx = (int(str(p).strip()) for p in parts)
  except ValueError:
    raise ScenarioError(f"offset must be 'dy,dx' (two integers), got {value!r}") from None
  return dy, dx


class Planner:
  """Turns a split into a stream of Jobs for one scenario (see the module docstring).

  Args:
    source: random-access records of the split (datasets.open_split).
    meta: the dataset metadata (organs, lesion_label_id, image_size, ...).
    data_config: the run's config.data (mask labels, dilation, bbox margin, spacing).
    scenario: 'organ', 'context' or 'tumor'.
    seed: job i uses np.random.default_rng((seed, i)).
    label_ids: organ ids of the mask (organ/context) or of the host organ (tumor).
    margin_mm: context margin (default data_config.bbox_margin_mm).
    mask: context only: one fixed (H, W) mask for every slice (see load_mask_file).
    offset: tumor only: (dy, dx) moving the donor tumour's pixels onto slice A.
    blend_px: tumor only: rim regenerated around the placed tumour.
    max_tumor_tries: tumor only: donor tumours tried per host slice.
    split: the split's name (for messages).
  """

  def __init__(self, source, meta: Mapping[str, Any], data_config: Any, scenario: str, *,
               seed: int = 0, label_ids: Sequence[int] | None = None,
               margin_mm: float | None = None, mask: np.ndarray | None = None,
               offset: tuple[int, int] | None = None, blend_px: int = BLEND_PX,
               max_tumor_tries: int = MAX_TUMOR_TRIES, split: str | None = None,
               progress: bool = True):
    if scenario not in SCENARIOS:
      raise ScenarioError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    self.source, self.meta, self.scenario = source, dict(meta), scenario
    self.seed = int(seed)
    self.dataset = meta.get("dataset", meta.get("config", "?"))
    self.where = f"split {split!r} of {self.dataset}" if split else self.dataset
    self.ecfg = transforms.ExampleConfig.from_data_config(data_config)
    self.organs = list(meta.get("organs", []))
    self.lesion_id = meta.get("lesion_label_id")
    self.margin_mm = float(self.ecfg.bbox_margin_mm if margin_mm is None else margin_mm)
    if self.margin_mm < 0:
      raise ScenarioError(f"margin_mm must be >= 0, got {self.margin_mm}")
    self.fixed_mask = mask
    self.offset = offset
    self.blend_px = int(blend_px)
    self.max_tumor_tries = int(max_tumor_tries)
    self.progress = progress
    self.skipped: dict[str, str] = {}  # 'case/slice' -> reason
    if mask is not None and scenario != "context":
      raise ScenarioError(f"a mask file is only used by --scenario=context, not {scenario!r}")
    if offset is not None and scenario != "tumor":
      raise ScenarioError(f"an offset is only used by --scenario=tumor, not {scenario!r}")
    if self.blend_px < 0:
      raise ScenarioError(f"blend_px must be >= 0, got {blend_px}")
    valid_ids = list(range(1, len(self.organs) + 1))
    ids = tuple(int(i) for i in (label_ids if label_ids else self.ecfg.mask_labels))
    bad = [i for i in ids if i not in valid_ids]
    if bad:
      raise ScenarioError(f"label ids {bad} are not organs of {self.dataset} (ids: "
                          f"{dict(zip(valid_ids, self.organs))})")
    if scenario == "tumor":
      if self.lesion_id is None:
        raise ScenarioError(
            f"scenario 'tumor' needs a dataset with a lesion label, but {self.dataset} "
            f"(organs {self.organs}) has none: use a tumour dataset config such as "
            f"configs/kidney_tumor.py (kidney=1, kidney_tumor=2)")
      self.lesion_id = int(self.lesion_id)
      if self.lesion_id in ids:
        raise ScenarioError(f"host label ids {list(ids)} must not include the lesion id "
                            f"{self.lesion_id}")
      ids = ids or tuple(i for i in valid_ids if i != self.lesion_id)
    self.label_ids = ids
    self._scan()

  # ---------------------------------------------------------------------------- scanning

  def _key(self, record) -> str:
    return f"{text(record[records.CASE_ID])}/{int(record[records.SLICE_INDEX])}"

  def _spacing(self, record) -> tuple[float, float]:
    return transforms.pixel_spacing(record, self.ecfg.spacing_mm)

  def _labels(self, record) -> np.ndarray:
    lab = np.asarray(record[records.LABELS])
    return lab[..., 0] if lab.ndim == 3 else lab

  def region(self, record) -> np.ndarray:
    """The organ/context mask of one record (bool (H, W); may be empty)."""
    labels = self._labels(record)
    if self.scenario == "context":
      if self.fixed_mask is not None:
        if self.fixed_mask.shape != labels.shape:
          raise ScenarioError(f"mask shape {self.fixed_mask.shape} != slice shape "
                              f"{labels.shape} ({self._key(record)})")
        return self.fixed_mask.copy()
      return masks.bbox_mask(labels, self.label_ids, self.margin_mm, self._spacing(record))
    if self.scenario == "organ":
      return masks.organ_mask(labels, self.label_ids, self.ecfg.dilation_mm,
                              self._spacing(record))
    return masks.organ_union(labels, self.label_ids)  # tumor: the host organ

  def _scan(self) -> None:
    """Finds the usable slices (and, for tumours, the donor tumours) of the split."""
    n = len(self.source)
    if n == 0:
      raise ScenarioError(f"{self.where} has no slices")
    usable, donors = [], []
    bar = tqdm.tqdm(range(n), desc=f"scanning slices ({self.scenario})", unit="slice",
                    disable=not self.progress)
    for i in bar:
      rec = self.source[i]
      key = (text(rec[records.CASE_ID]), int(rec[records.SLICE_INDEX]), i)
      if self.fixed_mask is not None:
        usable.append(key)
        continue
      if self.region(rec).sum() >= masks.MIN_ORGAN_PIXELS:
        usable.append(key)
      else:
        what = "host organ" if self.scenario == "tumor" else "organ"
        self.skipped[self._key(rec)] = f"no {what} {list(self.label_ids) or 'any'}: empty mask"
      if self.scenario == "tumor":
        lesion = self._labels(rec) == self.lesion_id
        if lesion.any():
          comps, k = ndimage.label(lesion, structure=np.ones((3, 3), bool))
          for c in range(1, k + 1):
            rows, cols = np.nonzero(comps == c)
            r0, c0 = int(rows.min()), int(cols.min())
            stamp = (comps == c)[r0:rows.max() + 1, c0:cols.max() + 1]
            donors.append(_Donor(i, key[0], key[1], stamp, r0, c0))
    usable.sort()
    self.usable = [(i, c, s) for c, s, i in usable]
    self.donors = donors
    if not self.usable:
      raise ScenarioError(
          f"no usable slice in {self.where}: all {n} slices have an empty "
          f"{self.scenario} mask (labels {list(self.label_ids) or 'any organ'}); try another "
          f"split or --labels")
    if self.scenario == "tumor" and not donors:
      raise ScenarioError(
          f"no tumour (label {self.lesion_id}, {self.organs[self.lesion_id - 1]}) in any of the "
          f"{n} slices of {self.where}: nothing to take a tumour mask from; use "
          f"a split with tumours (e.g. --split=train)")

  # ---------------------------------------------------------------------------- jobs

  def jobs(self, num_samples: int) -> Iterator[Job]:
    """`num_samples` jobs, cycling over the usable slices (see the module docstring)."""
    if num_samples < 1:
      raise ScenarioError(f"num_samples must be >= 1, got {num_samples}")
    uses: dict[int, int] = {}
    cursor = 0
    for i in range(num_samples):
      rng = np.random.default_rng((self.seed, i))
      while True:
        if not self.usable:
          raise ScenarioError(self._nothing_fits_message())
        src, case_id, slice_index = self.usable[cursor % len(self.usable)]
        record = self.source[src]
        job = self._make_job(i, src, record, rng)
        if job is not None:
          cursor += 1
          break
        # Nothing fits this slice: drop it for the rest of the run (counted in skipped).
        self.usable.pop(cursor % len(self.usable))
      job.round = uses.get(src, 0)
      uses[src] = job.round + 1
      yield job

  def _make_job(self, i: int, src: int, record, rng: np.random.Generator) -> Job | None:
    labels = self._labels(record).astype(np.uint8)
    region = self.region(record)
    if self.scenario != "tumor":
      return Job(i, src, record, region, labels.copy(), 0, {})
    placed, info = self._place_tumour(src, record, region, rng)
    if placed is None:
      self.skipped[self._key(record)] = info["reason"]
      return None
    mask = masks.dilate_mm(placed, float(self.blend_px), (1.0, 1.0)) & region
    new = labels.copy()
    new[placed] = self.lesion_id
    info["lesion_pixels"] = int(placed.sum())
    return Job(i, src, record, mask, new, 0, info)

  def _place_tumour(self, src: int, record, host: np.ndarray, rng: np.random.Generator):
    case_id = text(record[records.CASE_ID])
    others = [d for d in self.donors if d.case_id != case_id]
    same = [d for d in self.donors if d.case_id == case_id and d.source_index != src]
    # Prefer tumours of other cases; the same case (other slices) only as a fallback.
    order = [others[j] for j in rng.permutation(len(others))]
    order += [same[j] for j in rng.permutation(len(same))]
    order = order[: self.max_tumor_tries]
    for d in order:
      tumour = d.full(host.shape)
      if self.offset is not None:
        try:
          placed = masks.place_mask(tumour, host, offset=self.offset)
        except ValueError:
          continue
        off = self.offset
      else:
        offsets = masks.valid_offsets(tumour, host)
        if len(offsets) == 0:
          continue
        off = tuple(int(v) for v in offsets[int(rng.integers(len(offsets)))])
        placed = masks.shift_mask(tumour, off, host.shape)
      return placed, {"donor_case": d.case_id, "donor_slice": d.slice_index,
                      "offset": (int(off[0]), int(off[1]))}
    where = f" at offset {self.offset}" if self.offset is not None else ""
    return None, {"reason": f"none of {len(order)} tumour masks tried fits inside the host "
                            f"organ ({int(host.sum())} px){where}"}

  def _nothing_fits_message(self) -> str:
    tried = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:5])
    where = f" at offset {self.offset}" if self.offset is not None else ""
    return (f"no tumour mask fits inside the host organ (labels {list(self.label_ids)}) of any "
            f"slice of {self.where}{where}. Slices tried: {tried}"
            f"{' ...' if len(self.skipped) > 5 else ''}")
