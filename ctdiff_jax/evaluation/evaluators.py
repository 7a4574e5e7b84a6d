"""Table 1's column accumulators (big_vision evaluator shape): fed batch by batch, then read.

One predict loop (table1.predict) yields, per method column, `Batch`es of the same slices:
the real int16 HU, the method's "generated" int16 HU, the organ mask and the organ crop box.
Each column owns a few evaluators:

  FIDEvaluator(kind)       Inception features of the column's images, 'fid_whole' (whole
                           slices) or 'fid_crop' (organ crops); `result(real)` is the FID
                           against the real set's evaluator of the same kind. The columns
                           share one Featurizer, which fills the network's batches.
  ImageMetricsEvaluator    per-slice MAE / PSNR / SSIM inside the mask (generative columns).
  W1Evaluator              W1 between the in-mask HU of the column and the real in-mask HU
                           (scenario_metrics.w1), pooled over the slices.
  SliceLog                 which slices were evaluated (per_slice.csv).

The neighbour column is first passed through `DisjointPairs`: it keeps only the (slice,
neighbour) pairs whose neighbours are none of the kept slices, so its real and "generated"
sets are disjoint (with every organ slice of a case evaluated, the neighbour of one slice is
the next evaluated slice, and an FID of two sets sharing all but one image per case measures
overlap, not slice-to-slice change). Its FID compares the kept neighbours with the real
features of the same rows (`rows`), at its own, smaller N.

The crops (`crop_box`, `crop`) are defined here so every column crops the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

import numpy as np

from ctdiff_jax.data import masks as masks_lib
from ctdiff_jax.evaluation import fid
from ctdiff_jax.evaluation import image_metrics
from ctdiff_jax.evaluation import scenario_metrics
from ctdiff_jax.evaluation.tables import FID_KINDS, IMAGE_METRICS



@dataclasses.dataclass
class Batch:
  """One chunk of one column: the same slices, masks and boxes in every column."""

  index: np.ndarray  # [n] record indices in the split
  case_id: list[str]
  slice_index: np.ndarray  # [n]
  real: np.ndarray  # int16 [n, H, W]
  generated: np.ndarray  # int16 [n, H, W]: the column's image of each slice
  mask: np.ndarray  # bool [n, H, W]: the organ scenario's mask
  boxes: list[tuple[int, int, int]]  # organ crop box of each slice (see crop_box)


# ---------------------------------------------------------------------------- crops


def crop_box(mask: np.ndarray, spacing_mm: tuple[float, float],
             margin_mm: float) -> tuple[int, int, int]:
  """(top, left, side) of the square organ crop: bbox + margin, centred, squared.

  The square is shifted to lie inside the slice when it fits; when it is larger than the
  slice it stays centred and `crop` pads the outside.
  """
  mask = np.asarray(mask, bool)
  if not mask.any():
    raise ValueError("crop_box: empty mask")
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  mr, mc = masks_lib.margin_pixels(margin_mm, spacing_mm)
  r0, r1 = rows[0] - mr, rows[-1] + mr
  c0, c1 = cols[0] - mc, cols[-1] + mc
  h, w = r1 - r0 + 1, c1 - c0 + 1
  side = max(h, w)
  top, left = r0 - (side - h) // 2, c0 - (side - w) // 2
  if side <= mask.shape[0]:
    top = min(max(top, 0), mask.shape[0] - side)
  if side <= mask.shape[1]:
    left = min(max(left, 0), mask.shape[1] - side)
  return int(top), int(left), int(side)


def crop(image: np.ndarray, box: tuple[int, int, int], pad_value: float) -> np.ndarray:
  """The (side, side) square of `box` from an (H, W) image, `pad_value` outside it."""
  top, left, side = box
  out = np.full((side, side), pad_value, np.asarray(image).dtype)
  h, w = image.shape
  r0, r1 = max(top, 0), min(top + side, h)
  c0, c1 = max(left, 0), min(left + side, w)
  out[r0 - top:r1 - top, c0 - left:c1 - left] = image[r0:r1, c0:c1]
  return out


def fid_images(hu: np.ndarray, boxes: Sequence[tuple[int, int, int]], window, kind: str,
               crop_size: int, pad_hu: float) -> np.ndarray:
  """uint8 RGB FID inputs of HU slices [N, H, W]: whole slices, or their organ crops."""
  if kind == "fid_whole":
    return fid.hu_to_uint8_rgb(hu, window, size=None)
  if kind != "fid_crop":
    raise ValueError(f"unknown FID kind {kind!r}; expected one of {FID_KINDS}")
  return np.stack([fid.hu_to_uint8_rgb(crop(h, b, pad_hu), window, size=crop_size)
                   for h, b in zip(hu, boxes)])


# ---------------------------------------------------------------------------- evaluators


class Featurizer:
  """Inception features for several FID evaluators, their images batched together.

  The network pads every call to a full batch, so a column's few slices per chunk would
  mostly feed padding; pooling all columns' images of one size fills the batches.
  """

  def __init__(self, batch_size: int, weights: str | os.PathLike | None = None):
    self.batch_size, self.weights = batch_size, weights
    self._pending: dict[tuple, list[tuple[list, np.ndarray]]] = {}  # size -> (owner, images)

  def submit(self, owner: list, images: np.ndarray) -> None:
    """Appends the features of `images` to `owner` (a list), now or at a later flush."""
    queue = self._pending.setdefault(images.shape[1:], [])
    queue.append((owner, images))
    if sum(len(i) for _, i in queue) >= self.batch_size:
      self._run(images.shape[1:])

  def flush(self) -> None:
    for size in list(self._pending):
      self._run(size)

  def _run(self, size: tuple) -> None:
    queue = self._pending.pop(size)
    feats = fid.features(np.concatenate([i for _, i in queue]), batch_size=self.batch_size,
                         weights=self.weights, progress=False)
    for (owner, _), f in zip(queue, np.split(feats, np.cumsum([len(i) for _, i in queue])[:-1])):
      owner.append(f)


class FIDEvaluator:
  """Accumulates Inception features of one column's whole slices or organ crops."""

  def __init__(self, kind: str, featurizer: Featurizer, *, window, crop_size: int,
               pad_hu: float):
    if kind not in FID_KINDS:
      raise ValueError(f"unknown FID kind {kind!r}; expected one of {FID_KINDS}")
    self.kind, self.featurizer = kind, featurizer
    self.window, self.crop_size, self.pad_hu = window, crop_size, pad_hu
    self._features: list[np.ndarray] = []

  def images(self, batch: Batch) -> np.ndarray:
    return fid_images(batch.generated, batch.boxes, self.window, self.kind, self.crop_size,
                      self.pad_hu)

  def update(self, batch: Batch) -> None:
    self.featurizer.submit(self._features, self.images(batch))

  @property
  def features(self) -> np.ndarray:
    self.featurizer.flush()
    return np.concatenate(self._features)

  def result(self, real: "FIDEvaluator", bootstrap: int, seed: int,
             rows: np.ndarray | None = None,
             own_rows: np.ndarray | None = None) -> dict[str, Any]:
    """FID (n1, n2, paired bootstrap std and 95% interval) of this column against `real`.

    Row i of both sets is the same slice, so the bootstrap resamples them with one index
    vector. rows: the real rows this column's images pair with (default: all, in order);
    own_rows: only these of this column's images (e.g. a generator at the neighbour's
    rows, to compare at equal N). Fewer than 2 images: fid None.
    """
    if real.kind != self.kind:
      raise ValueError(f"FID of {self.kind} against a {real.kind} real set")
    self.featurizer.flush()
    ours = np.concatenate(self._features) if self._features else np.zeros((0, 0))
    if own_rows is not None:
      ours = ours[np.asarray(own_rows, int)]
    ref = real.features if rows is None else real.features[np.asarray(rows, int)]
    if len(ref) != len(ours):
      raise ValueError(f"{self.kind}: {len(ours)} images pair with {len(ref)} real ones")
    if len(ours) < 2:
      return {"fid": None, "n1": len(ref), "n2": len(ours), "std": None, "n_bootstrap": None,
              "ci": None, "paired": None}
    return dataclasses.asdict(fid.fid_from_features(ref, ours, bootstrap, seed, paired=True))


class ImageMetricsEvaluator:
  """Per-slice MAE (HU), PSNR and SSIM inside the mask (see image_metrics)."""

  def __init__(self, window):
    self.window = window
    self.values: dict[str, list[float]] = {k: [] for k in IMAGE_METRICS}

  def update(self, batch: Batch) -> None:
    got = image_metrics.masked_metrics(batch.generated, batch.real, batch.mask, self.window)
    for k in IMAGE_METRICS:
      self.values[k].extend(got[k].tolist())

  def result(self) -> dict[str, Any]:
    return {k: image_metrics.summarize(self.values[k]) for k in IMAGE_METRICS}


class W1Evaluator:
  """W1 (HU) between the column's and the real in-mask HU, pooled over all its slices."""

  def __init__(self):
    self._real: list[np.ndarray] = []
    self._generated: list[np.ndarray] = []
    self.n = 0

  def update(self, batch: Batch) -> None:
    self._real.append(np.asarray(batch.real)[batch.mask])
    self._generated.append(np.asarray(batch.generated)[batch.mask])
    self.n += len(batch.mask)

  def result(self) -> dict[str, Any]:
    if not self.n:
      return {"w1": None, "n": 0, "pixels": 0}
    real, gen = np.concatenate(self._real), np.concatenate(self._generated)
    return {"w1": scenario_metrics.w1(gen, real), "n": self.n, "pixels": int(real.size)}


def _digest(image: np.ndarray) -> bytes:
  """Content key of one slice, independent of its dtype (HU in float64 are exact)."""
  return hashlib.sha1(np.ascontiguousarray(image, np.float64).tobytes()).digest()


class DisjointPairs:
  """Keeps the (real slice, neighbour slice) pairs of a column whose two sets are disjoint.

  Greedy in slice order: a pair is kept when its neighbour is none of the kept real slices
  nor an already kept neighbour, and its slice is none of the kept neighbours (images are
  compared by content). On a run of consecutive evaluated slices this keeps every other
  slice with its neighbour; on a sparse subset nearly every pair.
  """

  def __init__(self):
    self._real: set[bytes] = set()
    self._neighbour: set[bytes] = set()
    self.positions: list[int] = []  # kept rows, as positions in the column's slice order
    self.seen = 0

  def select(self, batch: Batch) -> Batch:
    """The kept pairs of `batch` (a neighbour column's chunk), as a Batch."""
    keep = []
    for j, (real, nb) in enumerate(zip(batch.real, batch.generated)):
      r, g = _digest(real), _digest(nb)
      if r not in self._neighbour and g not in self._real and g not in self._neighbour \
          and r != g:
        self._real.add(r)
        self._neighbour.add(g)
        keep.append(j)
    self.positions.extend(self.seen + j for j in keep)
    self.seen += len(batch.real)
    return subset(batch, np.asarray(keep, int))


def subset(batch: Batch, keep: np.ndarray) -> Batch:
  """The rows `keep` of a Batch."""
  return Batch(index=np.asarray(batch.index)[keep], case_id=[batch.case_id[j] for j in keep],
               slice_index=np.asarray(batch.slice_index)[keep], real=batch.real[keep],
               generated=batch.generated[keep], mask=batch.mask[keep],
               boxes=[batch.boxes[j] for j in keep])


class SliceLog:
  """Record index, case, slice index and mask size of every evaluated slice, in order."""

  def __init__(self):
    self.values: dict[str, list] = {"index": [], "case_id": [], "slice_index": [],
                                    "mask_pixels": []}

  def update(self, batch: Batch) -> None:
    self.values["index"].extend(int(i) for i in batch.index)
    self.values["case_id"].extend(batch.case_id)
    self.values["slice_index"].extend(int(i) for i in batch.slice_index)
    self.values["mask_pixels"].extend(int(m.sum()) for m in batch.mask)
