"""Inpainting masks computed on the fly from a slice's label map (pure numpy/scipy).

A mask is (H, W) with 1 = the region the model regenerates. Modes:

  organ  union of the selected label ids (default: every id > 0), optionally grown by
         `dilation_mm` (exact Euclidean distance in mm, using the pixel spacing).
  bbox   the bounding box of that union plus `margin_mm` on every side, clipped to the image.
  shape  random free-form masks (ellipses, star-shaped polygons, thick brush strokes, in the
         spirit of Palette/LaMa) whose area fraction lies within `area=(lo, hi)`.
  lesion the lesion label (`lesion_label_id`, e.g. kidney_tumor's 2) grown by
         `lesion_dilation_mm` and clipped to the labelled organs: the tumour model learns to
         paint lesion tissue where a lesion-shaped mask sits inside an organ (the generation
         `tumor` scenario's mask: a placed tumour plus a rim inside the host organ).
  mixed  a random choice among organ/bbox/shape/lesion with weights `mixed_weights` (3 weights
         = no lesion).

A slice without any selected organ in organ/bbox mode falls back to a `shape` mask, so every
training example still has something to inpaint; a slice without lesion in lesion mode falls
back to the organ mask (so the model also keeps the organ's texture, and a whole-organ mask
never reads as "lesion here").

Pixel spacing is `(row_mm, col_mm)`: the size of one pixel along axis 0 and axis 1.

Tumour helpers (`valid_offsets`, `fits_inside`, `place_mask`) find translations that put a
lesion mask entirely inside a host organ mask.

Every random function takes an explicit np.random.Generator; the same generator state gives the
same mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, signal

MODES = ("organ", "bbox", "shape", "lesion", "mixed")
# Order of `mixed_weights` (a 3-weight tuple leaves lesion out).
MIXED_MODES = ("organ", "bbox", "shape", "lesion")
SHAPE_KINDS = ("ellipse", "polygon", "brush")

# Below this many pixels of organ a slice counts as organ-free (a single stray voxel is noise).
MIN_ORGAN_PIXELS = 1


def as_2d(labels: np.ndarray, name: str = "labels") -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim == 3 and labels.shape[-1] == 1:
    labels = labels[..., 0]
  if labels.ndim != 2:
    raise ValueError(f"{name} must be (H, W) or (H, W, 1), got shape {labels.shape}")
  return labels


def _spacing(spacing_mm) -> tuple[float, float]:
  s = np.broadcast_to(np.asarray(spacing_mm, np.float64).reshape(-1), (2,))
  if not np.all(s > 0):
    raise ValueError(f"pixel spacing must be positive, got {spacing_mm}")
  return float(s[0]), float(s[1])


def organ_union(labels: np.ndarray, label_ids: Sequence[int] = ()) -> np.ndarray:
  """Bool (H, W): pixels whose label is in `label_ids` (empty = every organ, i.e. label > 0)."""
  labels = as_2d(labels)
  if len(label_ids) == 0:
    return labels > 0
  return np.isin(labels, np.asarray(label_ids, labels.dtype))


def dilate_mm(mask: np.ndarray, dilation_mm: float, spacing_mm=(1.0, 1.0)) -> np.ndarray:
  """Grows a bool mask by every pixel whose centre is within `dilation_mm` (Euclidean, in mm)."""
  mask = as_2d(mask, "mask").astype(bool)
  if dilation_mm < 0:
    raise ValueError(f"dilation_mm must be >= 0, got {dilation_mm}")
  if dilation_mm == 0 or not mask.any():
    return mask
  dist = ndimage.distance_transform_edt(~mask, sampling=_spacing(spacing_mm))
  # Tiny tolerance so a distance of exactly d mm (e.g. 3 px * 1 mm) counts as inside.
  return dist <= dilation_mm + 1e-6


def organ_mask(
    labels: np.ndarray,
    label_ids: Sequence[int] = (),
    dilation_mm: float = 0.0,
    spacing_mm=(1.0, 1.0),
) -> np.ndarray:
  """Bool (H, W): the organ union, dilated by `dilation_mm`."""
  return dilate_mm(organ_union(labels, label_ids), dilation_mm, spacing_mm)


def margin_pixels(margin_mm: float, spacing_mm=(1.0, 1.0)) -> tuple[int, int]:
  """(rows, cols) of margin covering at least `margin_mm` (rounded up, exact multiples kept)."""
  if margin_mm < 0:
    raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
  sr, sc = _spacing(spacing_mm)
  return (int(np.ceil(margin_mm / sr - 1e-6)), int(np.ceil(margin_mm / sc - 1e-6)))


def bbox_mask(
    labels: np.ndarray,
    label_ids: Sequence[int] = (),
    margin_mm: float = 10.0,
    spacing_mm=(1.0, 1.0),
) -> np.ndarray:
  """Bool (H, W): the organ union's bounding box plus `margin_mm`, clipped to the image.

  Returns an all-False mask when no selected organ is present.
  """
  union = organ_union(labels, label_ids)
  out = np.zeros(union.shape, bool)
  if not union.any():
    return out
  rows = np.flatnonzero(union.any(axis=1))
  cols = np.flatnonzero(union.any(axis=0))
  mr, mc = margin_pixels(margin_mm, spacing_mm)
  r0, r1 = max(rows[0] - mr, 0), min(rows[-1] + mr, union.shape[0] - 1)
  c0, c1 = max(cols[0] - mc, 0), min(cols[-1] + mc, union.shape[1] - 1)
  out[r0:r1 + 1, c0:c1 + 1] = True
  return out


# ----------------------------------------------------------------------------- random shapes


def _ellipse(shape, rng: np.random.Generator, target_px: float) -> np.ndarray:
  h, w = shape
  aspect = rng.uniform(0.35, 1.0)
  a = np.sqrt(max(target_px, 1.0) / (np.pi * aspect))  # semi-axes a, a*aspect
  b = a * aspect
  theta = rng.uniform(0, np.pi)
  cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
  u = dx * np.cos(theta) + dy * np.sin(theta)
  v = -dx * np.sin(theta) + dy * np.cos(theta)
  return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _polygon(shape, rng: np.random.Generator, target_px: float) -> np.ndarray:
  h, w = shape
  n = int(rng.integers(3, 11))
  angles = np.sort(rng.uniform(0, 2 * np.pi, n))
  # Star-shaped polygon of random radii around a mean radius matching the target area.
  radius = np.sqrt(max(target_px, 1.0) / np.pi) * 1.15
  radii = radius * rng.uniform(0.5, 1.3, n)
  cy, cx = rng.uniform(0, h), rng.uniform(0, w)
  pts = [(float(cx + r * np.cos(t)), float(cy + r * np.sin(t))) for r, t in zip(radii, angles)]
  img = Image.new("1", (w, h), 0)
  ImageDraw.Draw(img).polygon(pts, fill=1)
  return np.asarray(img, bool)


def _brush(shape, rng: np.random.Generator, target_px: float) -> np.ndarray:
  """A LaMa-style thick free-form stroke: a random walk drawn with round joints."""
  h, w = shape
  size = min(h, w)
  width = max(2, int(round(rng.uniform(0.03, 0.1) * size)))
  length = max(target_px, 1.0) / width  # total stroke length (px) for the target area
  n_seg = int(rng.integers(2, 6))
  seg = length / n_seg
  y, x = rng.uniform(0, h), rng.uniform(0, w)
  angle = rng.uniform(0, 2 * np.pi)
  pts = [(x, y)]
  for _ in range(n_seg):
    angle += rng.uniform(-np.pi / 2, np.pi / 2)
    x = float(np.clip(x + seg * np.cos(angle), 0, w - 1))
    y = float(np.clip(y + seg * np.sin(angle), 0, h - 1))
    pts.append((x, y))
  img = Image.new("1", (w, h), 0)
  draw = ImageDraw.Draw(img)
  draw.line(pts, fill=1, width=width)
  r = width / 2
  for px, py in pts:
    draw.ellipse((px - r, py - r, px + r, py + r), fill=1)
  return np.asarray(img, bool)


_SHAPE_FNS = {"ellipse": _ellipse, "polygon": _polygon, "brush": _brush}


def shape_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    area: tuple[float, float] = (0.05, 0.3),
    kinds: Sequence[str] = SHAPE_KINDS,
    max_tries: int = 200,
) -> np.ndarray:
  """Bool (H, W): random ellipses/polygons/brush strokes covering a fraction in [lo, hi].

  Shapes are added one at a time, each sized to the area still missing from a target drawn
  uniformly in [lo, hi], until the target is reached; a shape that would push the area past
  `hi` is rejected and the next one is made smaller. If that does not converge, a rectangle of
  the target area is returned instead.
  """
  h, w = int(shape[0]), int(shape[1])
  lo, hi = float(area[0]), float(area[1])
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"shape area bounds must satisfy 0 < lo <= hi <= 1, got {area}")
  kinds = tuple(kinds)
  for k in kinds:
    if k not in _SHAPE_FNS:
      raise ValueError(f"unknown shape kind {k!r}; expected some of {SHAPE_KINDS}")
  if not kinds:
    raise ValueError("shape kinds must not be empty")
  n = h * w
  target = rng.uniform(lo, hi) * n
  mask = np.zeros((h, w), bool)
  scale, rejected = 1.0, 0
  for _ in range(max_tries):
    count = int(mask.sum())
    # Done at the target; or within bounds when shapes keep overshooting (crowded image).
    if count >= target or (count >= lo * n and rejected >= 3):
      return mask
    kind = kinds[int(rng.integers(len(kinds)))]
    cand = mask | _SHAPE_FNS[kind]((h, w), rng, scale * max(target - count, 1.0))
    if cand.sum() <= hi * n:
      mask, rejected = cand, 0
    else:
      scale, rejected = scale * 0.7, rejected + 1
  return _rectangle((h, w), rng, target, lo * n, hi * n)


def _rectangle(shape, rng, target, lo_px, hi_px) -> np.ndarray:
  h, w = shape
  for rh in range(max(1, int(np.sqrt(target))), h + 1):
    rw = int(round(target / rh))
    if 1 <= rw <= w and lo_px <= rh * rw <= hi_px:
      out = np.zeros(shape, bool)
      r0, c0 = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
      out[r0:r0 + rh, c0:c0 + rw] = True
      return out
  raise ValueError(
      f"cannot draw a mask of area fraction [{lo_px / (h * w):.4f}, {hi_px / (h * w):.4f}] "
      f"on a {h}x{w} image")


# ----------------------------------------------------------------------------- dispatch


def resolve_mode(mode: str, rng: np.random.Generator, mixed_weights=(1.0, 1.0, 1.0)) -> str:
  """The concrete mode for one example: `mode` itself, or a weighted pick for 'mixed'."""
  if mode not in MODES:
    raise ValueError(f"unknown mask mode {mode!r}; expected one of {MODES}")
  if mode != "mixed":
    return mode
  p = np.asarray(mixed_weights, np.float64)
  if p.shape not in ((3,), (4,)) or np.any(p < 0) or p.sum() <= 0:
    raise ValueError(f"mixed_weights must be 3 or 4 non-negative weights for {MIXED_MODES}, "
                     f"got {mixed_weights}")
  # A zero 4th weight leaves the cumulative weights, hence the draws, of 3 weights unchanged.
  p = np.pad(p, (0, 4 - len(p)))
  return MIXED_MODES[int(rng.choice(4, p=p / p.sum()))]


def lesion_mask(labels: np.ndarray, lesion_label_id: int, dilation_mm: float = 0.0,
                spacing_mm=(1.0, 1.0)) -> np.ndarray:
  """Bool (H, W): the lesion grown by `dilation_mm`, clipped to the labelled organs (label > 0).

  All-False when the slice has no lesion.
  """
  labels = as_2d(labels)
  if int(lesion_label_id) <= 0:
    raise ValueError(f"lesion mask mode needs a lesion label id > 0, got {lesion_label_id} "
                     f"(set config.data.lesion_label_id to the dataset's lesion_label_id)")
  lesion = labels == int(lesion_label_id)
  return dilate_mm(lesion, dilation_mm, spacing_mm) & (labels > 0)


def make_mask(
    labels: np.ndarray,
    mode: str,
    rng: np.random.Generator,
    *,
    label_ids: Sequence[int] = (),
    dilation_mm: float = 0.0,
    bbox_margin_mm: float = 10.0,
    spacing_mm=(1.0, 1.0),
    shape_area: tuple[float, float] = (0.05, 0.3),
    shape_kinds: Sequence[str] = SHAPE_KINDS,
    mixed_weights=(1.0, 1.0, 1.0),
    lesion_label_id: int = 0,
    lesion_dilation_mm: float = 0.0,
    return_mode: bool = False,
):
  """Float32 (H, W) mask in {0, 1} for one slice; see the module docstring for the modes.

  Lesion-free slices in lesion mode get the organ mask; organ-free slices (no selected label
  present) in organ/bbox mode get a `shape` mask. With `return_mode=True` returns
  `(mask, mode_used)`, mode_used in {'organ', 'bbox', 'shape', 'lesion'}.
  """
  labels = as_2d(labels)
  used = resolve_mode(mode, rng, mixed_weights)
  mask = None
  if used == "lesion":
    mask = lesion_mask(labels, lesion_label_id, lesion_dilation_mm, spacing_mm)
    if mask.sum() < MIN_ORGAN_PIXELS:
      mask, used = None, "organ"
  if used in ("organ", "bbox"):
    union = organ_union(labels, label_ids)
    if union.sum() >= MIN_ORGAN_PIXELS:
      if used == "organ":
        mask = dilate_mm(union, dilation_mm, spacing_mm)
      else:
        mask = bbox_mask(labels, label_ids, bbox_margin_mm, spacing_mm)
    else:
      used = "shape"
  if mask is None:
    mask = shape_mask(labels.shape, rng, shape_area, shape_kinds)
  mask = mask.astype(np.float32)
  return (mask, used) if return_mode else mask


# ----------------------------------------------------------------------------- tumour placement


def fits_inside(mask: np.ndarray, host: np.ndarray) -> bool:
  """True when every pixel of `mask` is also in `host` (same shape)."""
  mask, host = as_2d(mask, "mask").astype(bool), as_2d(host, "host").astype(bool)
  if mask.shape != host.shape:
    raise ValueError(f"mask shape {mask.shape} != host shape {host.shape}")
  return bool(np.all(host[mask]))


def _crop(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], int(rows[0]), int(cols[0])


def valid_offsets(tumor_mask: np.ndarray, host_mask: np.ndarray) -> np.ndarray:
  """(K, 2) int array of translations (dy, dx) that put `tumor_mask` entirely inside the host.

  A translation moves the tumour array's pixel (r, c) to (r + dy, c + dx) on the host grid; the
  tumour array may be the host's size or a smaller stamp. K = 0 when nothing fits.
  """
  tumor = as_2d(tumor_mask, "tumor_mask").astype(bool)
  host = as_2d(host_mask, "host_mask").astype(bool)
  if not tumor.any():
    raise ValueError("tumor_mask is empty")
  stamp, r0, c0 = _crop(tumor)
  sh, sw = stamp.shape
  if sh > host.shape[0] or sw > host.shape[1] or stamp.sum() > host.sum():
    return np.zeros((0, 2), np.int64)
  # counts[i, j] = host pixels under the stamp placed with its top-left at (i, j); a placement
  # is valid when all stamp pixels land on host. FFT is exact after rounding (integer counts).
  counts = signal.correlate(host.astype(np.float64), stamp.astype(np.float64), mode="valid",
                            method="fft")
  ii, jj = np.nonzero(np.rint(counts) == stamp.sum())
  return np.stack([ii - r0, jj - c0], axis=1).astype(np.int64)


def shift_mask(tumor_mask: np.ndarray, offset: tuple[int, int], shape: tuple[int, int]):
  """Bool `shape` mask: the tumour's pixels translated by `offset`; raises if any leave it."""
  tumor = as_2d(tumor_mask, "tumor_mask").astype(bool)
  rr, cc = np.nonzero(tumor)
  rr, cc = rr + int(offset[0]), cc + int(offset[1])
  if rr.size and (rr.min() < 0 or cc.min() < 0 or rr.max() >= shape[0] or cc.max() >= shape[1]):
    raise ValueError(f"offset {tuple(offset)} moves the tumour mask outside the {shape} image")
  out = np.zeros(shape, bool)
  out[rr, cc] = True
  return out


def place_mask(
    tumor_mask: np.ndarray,
    host_mask: np.ndarray,
    rng: np.random.Generator | None = None,
    offset: tuple[int, int] | None = None,
) -> np.ndarray:
  """Bool host-shaped mask: the tumour translated to lie entirely inside `host_mask`.

  Give either `offset` (checked) or `rng` (a uniformly random valid translation).
  Raises ValueError('cannot fit ...') when no translation (or the given one) fits.
  """
  host = as_2d(host_mask, "host_mask").astype(bool)
  tumor = as_2d(tumor_mask, "tumor_mask").astype(bool)
  if (rng is None) == (offset is None):
    raise ValueError("place_mask needs exactly one of rng or offset")
  n_t, n_h = int(tumor.sum()), int(host.sum())
  if offset is not None:
    try:
      placed = shift_mask(tumor, offset, host.shape)
    except ValueError as e:
      raise ValueError(f"cannot fit tumour mask at offset {tuple(offset)}: {e}") from None
    if not tumor.any() or not np.all(host[placed]):
      raise ValueError(f"cannot fit tumour mask ({n_t} px) inside host ({n_h} px) at offset "
                       f"{tuple(offset)}")
    return placed
  offsets = valid_offsets(tumor, host)
  if len(offsets) == 0:
    stamp, _, _ = _crop(tumor)
    raise ValueError(f"cannot fit tumour mask ({n_t} px, bbox {stamp.shape[0]}x{stamp.shape[1]})"
                     f" inside host mask ({n_h} px) at any translation")
  dy, dx = offsets[int(rng.integers(len(offsets)))]
  return shift_mask(tumor, (dy, dx), host.shape)
