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
           tumour component of another slice B (a different case when there is one) is
           translated to lie entirely inside A's host organ (a random valid position, or
           the given `offset`) and regenerated there. The mask is the placed tumour grown
           by `blend_px` pixels (so its rim blends into the surrounding tissue), clipped to
           the host organ, so it never touches A's own lesion or anything outside the organ.
           New labels = A's labels with the placed tumour set to the lesion id (A's original
           lesion kept as is). Donor tumours are just masks: B comes from any split of the
           dataset (`donor_split` restricts it to one), hosts A from the generated split.
           Use a model trained with lesion masks (configs/kidney_tumor.py: data/masks.py's
           `lesion` mode), so the placed mask is painted as tumour, not as host tissue.

"Endless": jobs cycle over the usable source slices (sorted by case and slice index) for as
many samples as asked; job i's randomness (tumour choice and position) comes from
np.random.default_rng((seed, i)). Slices whose mask is empty (no organ; no host organ; no
tumour that fits) are skipped and counted in `Planner.skipped`; if no slice is usable the
planner raises a ScenarioError that says why.

Each scenario is a small class (`SCENARIOS`: name -> class) that knows its mask of a record,
which slices it can use and how to make a job of one; `Planner` scans the split and cycles
over the usable slices for any of them. Both read their options from a frozen
`ScenarioSpec` (scenario, seed, labels, margin_mm, mask_file, offset, blend_px, donor_split;
checked when built), which runner.GenerateSpec extends with the model and export options.

Mask files (`load_mask_file`): .npy or .png hold the mask in the record layout (H, W), row 0
anterior, column 0 the patient's right, like the dataset's slices; a .nii/.nii.gz mask is read
in the exporter's RAS+ layout (see ctdiff_jax/generation/export/nifti.py), so an exported
`*_mask.nii.gz` can be used again. Nonzero = regenerate.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage
from tqdm import auto as tqdm

from ctdiff_jax.data import masks
from ctdiff_jax.data import transforms
from ctdiff_jax.ingest import records

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


def check_at_least(spec: Any, rules: Sequence[tuple[str, int]]) -> None:
  """Raises a ValueError when a field of `spec` named in `rules` is set and below its least."""
  for name, least in rules:
    value = getattr(spec, name)
    if value is not None and value < least:
      raise ValueError(f"{name} must be >= {least}, got {value}")


@dataclasses.dataclass(frozen=True)
class ScenarioSpec:
  """What a Planner plans: the scenario and its options, checked when built.

  runner.GenerateSpec extends it with the model and export options. `labels` becomes a tuple
  (None: the config's mask labels), `offset` ('dy,dx' or a pair) a pair.
  """

  scenario: str = "organ"
  seed: int = 0
  labels: tuple[int, ...] | None = None  # mask organs (organ/context), host organs (tumor)
  margin_mm: float | None = None  # context: bbox margin (None: config.data.bbox_margin_mm)
  mask_file: str | None = None  # context: one fixed mask (load_mask_file)
  offset: tuple[int, int] | None = None  # tumor: (dy, dx) of the donor tumour
  blend_px: int = BLEND_PX  # tumor: rim regenerated around the placed tumour
  donor_split: str | None = None  # tumor: split of the donor tumours (None: every split)

  def __post_init__(self):
    normal = {"labels": tuple(int(i) for i in self.labels) if self.labels else None,
              "offset": parse_offset(self.offset), "mask_file": self.mask_file or None,
              "donor_split": self.donor_split or None}
    for name, value in normal.items():
      object.__setattr__(self, name, value)
    if self.scenario not in SCENARIOS:
      raise ScenarioError(f"unknown scenario {self.scenario!r}; expected one of "
                          f"{tuple(SCENARIOS)}")
    for name, only in (("mask_file", "context"), ("offset", "tumor"), ("donor_split", "tumor")):
      if getattr(self, name) is not None and self.scenario != only:
        raise ScenarioError(f"--{name} is only used by --scenario={only}, not "
                            f"{self.scenario!r}")
    check_at_least(self, (("seed", 0), ("blend_px", 0), ("margin_mm", 0)))


class NothingFits(Exception):
  """A scenario cannot use this slice after all (the message says why); the planner drops it."""


def label_map(record) -> np.ndarray:
  """The (H, W) label map of a record."""
  lab = np.asarray(record[records.LABELS])
  return lab[..., 0] if lab.ndim == 3 else lab


def slice_key(record) -> str:
  """'case/slice' of a record (the key of `Planner.skipped`)."""
  return f"{text(record[records.CASE_ID])}/{int(record[records.SLICE_INDEX])}"


def _tried(skipped: Mapping[str, str], most: int = 5) -> str:
  """'Slices tried: case/slice: reason; ...' (the first `most`) for error messages."""
  tried = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:most])
  return f"Slices tried: {tried}{' ...' if len(skipped) > most else ''}"


class Scenario:
  """Base of the scenarios: the mask of a record and the job of a usable slice.

  Args:
    meta: the dataset metadata (organs, lesion_label_id, image_size, ...).
    data_config: the run's config.data (mask labels, dilation, bbox margin, spacing).
    spec: the run's ScenarioSpec (labels and the scenario's own options).
    where: the split and dataset, for messages.
  """

  name = ""
  region_name = "organ"  # what a slice with an empty mask lacks (skip reasons)

  def __init__(self, meta: Mapping[str, Any], data_config: Any, spec: ScenarioSpec,
               where: str):
    self.spec, self.where = spec, where
    self.dataset = meta.get("dataset", meta.get("config", "?"))
    self.ecfg = transforms.ExampleConfig.from_data_config(data_config)
    self.organs = list(meta.get("organs", []))
    self.image_size = int(meta.get("image_size", 0))
    valid_ids = list(range(1, len(self.organs) + 1))
    ids = tuple(int(i) for i in (spec.labels if spec.labels else self.ecfg.mask_labels))
    bad = [i for i in ids if i not in valid_ids]
    if bad:
      raise ScenarioError(f"label ids {bad} are not organs of {self.dataset} (ids: "
                          f"{dict(zip(valid_ids, self.organs))})")
    self.label_ids = ids

  def spacing(self, record) -> tuple[float, float]:
    return transforms.pixel_spacing(record, self.ecfg.spacing_mm)

  def region(self, record) -> np.ndarray:
    """The scenario's mask of one record (bool (H, W); may be empty)."""
    raise NotImplementedError

  def usable(self, record) -> bool:
    return self.region(record).sum() >= masks.MIN_ORGAN_PIXELS

  def skip_reason(self) -> str:
    return f"no {self.region_name} {list(self.label_ids) or 'any'}: empty mask"

  def attach(self, split: str | None, open_split: Callable[[str], Any] | None) -> None:
    """The planner's split and a way to open the dataset's other splits (default: unused)."""

  def observe(self, index: int, record) -> None:
    """Sees every slice of the split while the planner scans it (default: nothing to keep)."""

  def check_scan(self, num_slices: int) -> None:
    """Raises a ScenarioError when the scan found nothing the scenario needs."""

  def make_job(self, i: int, src: int, record, rng: np.random.Generator) -> Job:
    """Job i on record `src`; raises NothingFits to drop the slice. Default: labels kept."""
    del rng
    return Job(i, src, record, self.region(record), label_map(record).astype(np.uint8), 0, {})

  def nothing_fits(self, skipped: Mapping[str, str]) -> str:
    """The error once every usable slice was dropped."""
    return f"no slice of {self.where} can be used for the {self.name} scenario. {_tried(skipped)}"


class OrganScenario(Scenario):
  """The organ union (of `labels`), grown by config.data.dilation_mm."""

  name = "organ"

  def region(self, record) -> np.ndarray:
    return masks.organ_mask(label_map(record), self.label_ids, self.ecfg.dilation_mm,
                            self.spacing(record))


class ContextScenario(Scenario):
  """The organs' bounding box plus `margin_mm`, or one fixed mask file for every slice."""

  name = "context"

  def __init__(self, meta, data_config, spec, where):
    super().__init__(meta, data_config, spec, where)
    self.margin_mm = float(self.ecfg.bbox_margin_mm if spec.margin_mm is None
                           else spec.margin_mm)
    self.fixed_mask = (load_mask_file(spec.mask_file, (self.image_size,) * 2)
                       if spec.mask_file else None)

  def region(self, record) -> np.ndarray:
    if self.fixed_mask is not None:
      return self.fixed_mask.copy()
    return masks.bbox_mask(label_map(record), self.label_ids, self.margin_mm,
                           self.spacing(record))

  def usable(self, record) -> bool:
    return self.fixed_mask is not None or super().usable(record)


@dataclasses.dataclass(frozen=True)
class _Donor:
  """One connected tumour component of a donor slice (cropped stamp + its top-left)."""

  source_index: int
  case_id: str
  slice_index: int
  stamp: np.ndarray
  r0: int
  c0: int
  split: str | None = None  # None: the host split

  def full(self, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[self.r0:self.r0 + self.stamp.shape[0], self.c0:self.c0 + self.stamp.shape[1]] = self.stamp
    return out


def _components(record, source_index: int, lesion_id: int,
                split: str | None = None) -> list[_Donor]:
  """The connected lesion components of one record (8-connected), as donors."""
  lesion = label_map(record) == lesion_id
  if not lesion.any():
    return []
  comps, k = ndimage.label(lesion, structure=np.ones((3, 3), bool))
  case_id, slice_index = text(record[records.CASE_ID]), int(record[records.SLICE_INDEX])
  out = []
  for c in range(1, k + 1):
    rows, cols = np.nonzero(comps == c)
    r0, c0 = int(rows.min()), int(cols.min())
    stamp = (comps == c)[r0:rows.max() + 1, c0:cols.max() + 1]
    out.append(_Donor(source_index, case_id, slice_index, stamp, r0, c0, split))
  return out


class TumorScenario(Scenario):
  """A donor tumour placed inside the host organ and regenerated with a `blend_px` rim."""

  name = "tumor"
  region_name = "host organ"
  max_tries = MAX_TUMOR_TRIES

  def __init__(self, meta, data_config, spec, where):
    super().__init__(meta, data_config, spec, where)
    if meta.get("lesion_label_id") is None:
      raise ScenarioError(
          f"scenario 'tumor' needs a dataset with a lesion label, but {self.dataset} "
          f"(organs {self.organs}) has none: use a tumour dataset config such as "
          f"configs/kidney_tumor.py (kidney=1, kidney_tumor=2)")
    self.lesion_id = int(meta["lesion_label_id"])
    if spec.labels and self.lesion_id in spec.labels:
      raise ScenarioError(f"host label ids {list(spec.labels)} must not include the lesion "
                          f"id {self.lesion_id}")
    # The config's mask labels may include the lesion (the organ masks of lesion training).
    self.label_ids = tuple(i for i in self.label_ids if i != self.lesion_id) or tuple(
        i for i in range(1, len(self.organs) + 1) if i != self.lesion_id)
    self.offset, self.blend_px = spec.offset, int(spec.blend_px)
    self.splits = {k: int(v) for k, v in meta.get("splits", {}).items()}
    self.donors: list[_Donor] = []
    self.split, self.open_split = None, None

  def region(self, record) -> np.ndarray:
    return masks.organ_union(label_map(record), self.label_ids)  # the host organ

  def attach(self, split, open_split) -> None:
    self.split, self.open_split = split, open_split
    if self.spec.donor_split is not None and self.spec.donor_split not in self.splits:
      raise ScenarioError(f"--donor_split={self.spec.donor_split!r} is not a split of "
                          f"{self.dataset} (splits: {self.splits})")

  def _donor_splits(self) -> list[str | None]:
    """The donor splits; None = the host split (all when the others cannot be opened)."""
    if self.open_split is None or self.split is None:
      return [None] if self.spec.donor_split in (None, self.split) else []
    wanted = [self.spec.donor_split] if self.spec.donor_split else sorted(self.splits)
    return [None if s == self.split else s for s in wanted if self.splits.get(s, 1) > 0]

  def observe(self, index: int, record) -> None:
    if None in self._donor_splits():
      self.donors.extend(_components(record, index, self.lesion_id))

  def check_scan(self, num_slices: int) -> None:
    counted, where = 0, []
    for split in self._donor_splits():
      if split is None:
        counted, where = counted + num_slices, where + [self.split or self.where]
        continue
      source = self.open_split(split)
      for i in range(len(source)):
        self.donors.extend(_components(source[i], i, self.lesion_id, split))
      counted, where = counted + len(source), where + [split]
    if not self.donors:
      raise ScenarioError(
          f"no tumour (label {self.lesion_id}, {self.organs[self.lesion_id - 1]}) in any of the "
          f"{counted} slices of {self.dataset} split(s) {where}: nothing to take a tumour mask "
          f"from; use a --donor_split with tumours (or leave it unset: every split)")

  def make_job(self, i: int, src: int, record, rng: np.random.Generator) -> Job:
    labels = label_map(record).astype(np.uint8)
    host = self.region(record)
    placed, info = self._place(src, record, host, rng)
    # The rim blends the tumour into the tissue; clipped to the host organ, so it never
    # touches A's own lesion or anything outside the organ.
    mask = masks.dilate_mm(placed, float(self.blend_px), (1.0, 1.0)) & host
    labels[placed] = self.lesion_id
    info["lesion_pixels"] = int(placed.sum())
    return Job(i, src, record, mask, labels, 0, info)

  def _donor_order(self, src: int, record, rng: np.random.Generator) -> list[_Donor]:
    case_id = text(record[records.CASE_ID])
    others = [d for d in self.donors if d.case_id != case_id]
    same = [d for d in self.donors if d.case_id == case_id and (d.split, d.source_index) != (
        None, src)]
    # Prefer tumours of other cases; the same case (other slices) only as a fallback.
    order = [others[j] for j in rng.permutation(len(others))]
    order += [same[j] for j in rng.permutation(len(same))]
    return order[: self.max_tries]

  def _place(self, src: int, record, host: np.ndarray, rng: np.random.Generator):
    order = self._donor_order(src, record, rng)
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
                      "donor_split": d.split or self.split,
                      "offset": (int(off[0]), int(off[1]))}
    raise NothingFits(f"none of {len(order)} tumour masks tried fits inside the host organ "
                      f"({int(host.sum())} px){self._at()}")

  def _at(self) -> str:
    return f" at offset {self.offset}" if self.offset is not None else ""

  def nothing_fits(self, skipped: Mapping[str, str]) -> str:
    return (f"no tumour mask fits inside the host organ (labels {list(self.label_ids)}) of any "
            f"slice of {self.where}{self._at()}. {_tried(skipped)}")


# The scenarios by name (the generate CLI's --scenario).
SCENARIOS: dict[str, type[Scenario]] = {
    "organ": OrganScenario, "context": ContextScenario, "tumor": TumorScenario}


class Planner:
  """Turns a split into a stream of Jobs for one scenario (see the module docstring).

  Args:
    source: random-access records of the split (datasets.open_split).
    meta: the dataset metadata (organs, lesion_label_id, image_size, ...).
    data_config: the run's config.data (mask labels, dilation, bbox margin, spacing).
    spec: a ScenarioSpec (or a runner.GenerateSpec): scenario, seed and its options.
    split: the split's name (for messages).
    open_split: split name -> its records, to read other splits (tumour donors); None: only
      `source` is read.
  """

  def __init__(self, source, meta: Mapping[str, Any], data_config: Any, spec: ScenarioSpec,
               *, split: str | None = None, progress: bool = True,
               open_split: Callable[[str], Any] | None = None):
    self.source, self.meta, self.spec = source, dict(meta), spec
    dataset = meta.get("dataset", meta.get("config", "?"))
    self.where = f"split {split!r} of {dataset}" if split else dataset
    self.scenario = SCENARIOS[spec.scenario](meta, data_config, spec, self.where)
    self.scenario.attach(split, open_split)
    self.skipped: dict[str, str] = {}  # 'case/slice' -> reason
    self._scan(progress)

  @property
  def label_ids(self) -> tuple[int, ...]:
    return self.scenario.label_ids

  @property
  def ecfg(self) -> transforms.ExampleConfig:
    return self.scenario.ecfg

  def region(self, record) -> np.ndarray:
    """The scenario's mask of one record (bool (H, W); may be empty)."""
    return self.scenario.region(record)

  def _scan(self, progress: bool) -> None:
    """Finds the usable slices of the split (the scenario sees every slice)."""
    n = len(self.source)
    if n == 0:
      raise ScenarioError(f"{self.where} has no slices")
    usable = []
    for i in tqdm.tqdm(range(n), desc=f"scanning slices ({self.scenario.name})", unit="slice",
                       disable=not progress):
      rec = self.source[i]
      self.scenario.observe(i, rec)
      if self.scenario.usable(rec):
        usable.append((text(rec[records.CASE_ID]), int(rec[records.SLICE_INDEX]), i))
      else:
        self.skipped[slice_key(rec)] = self.scenario.skip_reason()
    usable.sort()
    self.usable = [(i, c, s) for c, s, i in usable]
    if not self.usable:
      raise ScenarioError(
          f"no usable slice in {self.where}: all {n} slices have an empty "
          f"{self.scenario.name} mask (labels {list(self.label_ids) or 'any organ'}); try "
          f"another split or --labels")
    self.scenario.check_scan(n)

  def jobs(self, num_samples: int) -> Iterator[Job]:
    """`num_samples` jobs, cycling over the usable slices (see the module docstring)."""
    if num_samples < 1:
      raise ScenarioError(f"num_samples must be >= 1, got {num_samples}")
    uses: dict[int, int] = {}
    cursor = 0
    for i in range(num_samples):
      rng = np.random.default_rng((self.spec.seed, i))
      while True:
        if not self.usable:
          raise ScenarioError(self.scenario.nothing_fits(self.skipped))
        src = self.usable[cursor % len(self.usable)][0]
        record = self.source[src]
        try:
          job = self.scenario.make_job(i, src, record, rng)
          cursor += 1
          break
        except NothingFits as e:
          # Nothing fits this slice: drop it for the rest of the run (counted in skipped).
          self.skipped[slice_key(record)] = str(e)
          self.usable.pop(cursor % len(self.usable))
      job.round = uses.get(src, 0)
      uses[src] = job.round + 1
      yield job
