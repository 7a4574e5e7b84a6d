"""Paired image metrics inside the inpainting mask: MAE (HU), PSNR and SSIM (windowed HU).

Used by `evaluate` (Table 1) to compare each inpainted slice with its real slice, only over
the pixels the model regenerated. numpy/scipy only, float64 throughout.

  mae_hu   mean |generated - real| in raw HU over mask pixels.
  psnr_db  10 log10(L^2 / MSE) with both images clipped to the HU `window` and L its width;
           inf when the masked pixels are identical.
  ssim     Wang et al. (2004) SSIM map on the window-clipped images: 11-tap Gaussian window
           (sigma 1.5, truncated at 3.5 sigma), weighted (population) moments, K1 = 0.01,
           K2 = 0.03, data range L = window width, 'reflect' boundaries (no border crop, so
           masks touching the edge count); the map is averaged over the mask pixels.

Every function takes one image [H, W] (or [H, W, 1]) pair and a mask; `masked_metrics`
maps a batch [N, H, W] to per-image values.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctdiff_jax.data.masks import as_2d  # (H, W) or (H, W, 1) -> (H, W), one place
from ctdiff_jax.evaluation.fid.preprocess import check_window

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 taps, as in Wang et al.
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check(generated, real, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  g = as_2d(generated, "generated").astype(np.float64)
  r = as_2d(real, "real").astype(np.float64)
  m = as_2d(mask, "mask") > 0.5
  if not g.shape == r.shape == m.shape:
    raise ValueError(f"shape mismatch: generated {g.shape}, real {r.shape}, mask {m.shape}")
  if not m.any():
    raise ValueError("mask is empty: no pixels to compare")
  if not (np.isfinite(g).all() and np.isfinite(r).all()):
    raise ValueError("image contains NaN or inf")
  return g, r, m


def mae_hu(generated: np.ndarray, real: np.ndarray, mask: np.ndarray) -> float:
  """Mean absolute difference in HU over the mask pixels (no windowing)."""
  g, r, m = _check(generated, real, mask)
  return float(np.abs(g - r)[m].mean())


def psnr_db(generated: np.ndarray, real: np.ndarray, mask: np.ndarray,
            window: tuple[float, float]) -> float:
  """PSNR in dB over the mask pixels of the window-clipped images (peak = window width)."""
  g, r, m = _check(generated, real, mask)
  lo, hi = check_window(window)
  mse = float(((np.clip(g, lo, hi) - np.clip(r, lo, hi))[m] ** 2).mean())
  if mse == 0.0:
    return float("inf")
  return float(10.0 * np.log10((hi - lo) ** 2 / mse))


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
  """Per-pixel Gaussian-window SSIM (Wang et al. 2004) of two float [H, W] images."""
  x = as_2d(x, "x").astype(np.float64)
  y = as_2d(y, "y").astype(np.float64)
  if x.shape != y.shape:
    raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
  if not data_range > 0:
    raise ValueError(f"data_range must be > 0, got {data_range}")

  def blur(a):
    return ndimage.gaussian_filter(a, SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

  mu_x, mu_y = blur(x), blur(y)
  # Weighted population moments: E_w[xy] - mu_x mu_y (no sample-size correction, as in Wang).
  var_x = blur(x * x) - mu_x * mu_x
  var_y = blur(y * y) - mu_y * mu_y
  cov = blur(x * y) - mu_x * mu_y
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return num / den


def ssim(generated: np.ndarray, real: np.ndarray, mask: np.ndarray,
         window: tuple[float, float]) -> float:
  """Mean of the SSIM map of the window-clipped images over the mask pixels."""
  g, r, m = _check(generated, real, mask)
  lo, hi = check_window(window)
  smap = ssim_map(np.clip(g, lo, hi), np.clip(r, lo, hi), hi - lo)
  return float(smap[m].mean())


def masked_metrics(generated: np.ndarray, real: np.ndarray, masks: np.ndarray,
                   window: tuple[float, float]) -> dict[str, np.ndarray]:
  """Per-image {'mae_hu', 'psnr_db', 'ssim'} float64 [N] for HU batches [N, H, W(, 1)]."""
  generated, real, masks = np.asarray(generated), np.asarray(real), np.asarray(masks)
  if not len(generated) == len(real) == len(masks):
    raise ValueError(f"batch sizes differ: generated {len(generated)}, real {len(real)}, "
                     f"masks {len(masks)}")
  out = {k: np.empty(len(real), np.float64) for k in ("mae_hu", "psnr_db", "ssim")}
  for i, (g, r, m) in enumerate(zip(generated, real, masks)):
    out["mae_hu"][i] = mae_hu(g, r, m)
    out["psnr_db"][i] = psnr_db(g, r, m, window)
    out["ssim"][i] = ssim(g, r, m, window)
  return out


def summarize(values: np.ndarray) -> dict[str, float | int | None]:
  """{'mean', 'std' (ddof=1; None for one value or any inf), 'n'} of per-image values."""
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0:
    raise ValueError("no values to summarise")
  std = float(np.std(v, ddof=1)) if v.size > 1 and np.isfinite(v).all() else None
  return {"mean": float(v.mean()), "std": std, "n": int(v.size)}
