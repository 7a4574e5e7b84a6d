"""Is a generation scenario's output right? In-mask error and HU distributions vs simple baselines.

Per scenario, over all generated slices (arrays [N, H, W] or [N, H, W, 1], HU):

  in-mask MAE     mean |generated - real| over every masked pixel (pooled over slices),
  W1              Wasserstein-1 distance (scipy.stats.wasserstein_distance) between the HU
                  samples generated under the masks and the real HU under the same masks,

each beside the same numbers for the ring-mean fill: every mask filled with the mean HU of a
`RING_PX`-pixel ring around it (the cheapest inpainting; a model that does not beat it paints
flat patches with visible borders).

For the tumour scenario the question is whether the placed masks became lesion tissue
(`tumor_scores`): W1(generated, real lesion HU) against W1(generated, the host HU the new
lesion replaced); the new lesion is where the synthetic label map says lesion and the source's
did not.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy import stats

# Width (pixels) of the ring whose mean HU fills the mask in the baseline.
RING_PX = 2


def _stack(x) -> np.ndarray:
  """[N, H, W] float64 from [N, H, W], [N, H, W, 1] or one (H, W) slice."""
  x = np.asarray(x)
  if x.ndim >= 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim == 2:
    x = x[None]
  if x.ndim != 3:
    raise ValueError(f"expected [N, H, W] slices, got shape {x.shape}")
  return x.astype(np.float64)


def ring(mask: np.ndarray, width_px: int = RING_PX) -> np.ndarray:
  """Bool (H, W): the pixels within `width_px` (8-connected steps) of the mask, outside it."""
  mask = np.asarray(mask, bool)
  grown = ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=int(width_px))
  return grown & ~mask


def ring_fill(image_hu, mask, width_px: int = RING_PX) -> np.ndarray:
  """[N, H, W]: each slice with its mask filled by the mean HU of the ring around it.

  A mask with no ring (it covers the image) is filled with the mean of the unmasked pixels,
  or 0 when there are none.
  """
  image, m = _stack(image_hu), _stack(mask) > 0
  out = image.copy()
  for j in range(len(image)):
    around = ring(m[j], width_px)
    pool = image[j][around] if around.any() else image[j][~m[j]]
    out[j][m[j]] = pool.mean() if pool.size else 0.0
  return out


def in_mask_mae(pred_hu, real_hu, mask) -> float:
  """Mean |pred - real| (HU) over every masked pixel of every slice."""
  m = _stack(mask) > 0
  if not m.any():
    raise ValueError("the masks are empty: no pixel to compare")
  return float(np.abs(_stack(pred_hu)[m] - _stack(real_hu)[m]).mean())


def w1(a, b) -> float:
  """Wasserstein-1 distance (HU) between two samples of HU values."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if not a.size or not b.size:
    raise ValueError("W1 needs two non-empty HU samples")
  return float(stats.wasserstein_distance(a, b))


def scenario_scores(image_hu, generated_hu, mask, width_px: int = RING_PX) -> dict[str, Any]:
  """In-mask MAE and W1 of the model and of the ring-mean fill, against the real slices."""
  real, gen, m = _stack(image_hu), _stack(generated_hu), _stack(mask) > 0
  fill = ring_fill(real, m, width_px)
  return {
      "n": int(len(real)), "mask_pixels": int(m.sum()),
      "mae_model": in_mask_mae(gen, real, m), "mae_ring": in_mask_mae(fill, real, m),
      "w1_model": w1(gen[m], real[m]), "w1_ring": w1(fill[m], real[m]),
      "hu_model": (float(gen[m].min()), float(gen[m].max())),
      "hu_real": (float(real[m].min()), float(real[m].max())),
  }


def new_lesion(source_labels, labels, lesion_id: int) -> np.ndarray:
  """Bool [N, H, W]: pixels the synthetic label map marks lesion and the source did not."""
  return (_stack(labels) == lesion_id) & (_stack(source_labels) != lesion_id)


def tumor_scores(image_hu, generated_hu, source_labels, labels, lesion_id: int,
                 real_lesion_hu) -> dict[str, Any]:
  """W1(generated, real lesions) vs W1(generated, replaced host) over the new lesions."""
  placed = new_lesion(source_labels, labels, lesion_id)
  if not placed.any():
    raise ValueError("no new lesion pixel: the label maps mark no placed tumour")
  gen, host = _stack(generated_hu)[placed], _stack(image_hu)[placed]
  real = np.asarray(real_lesion_hu, np.float64).ravel()
  return {
      "lesion_pixels": int(placed.sum()),
      "w1_gen_lesion": w1(gen, real), "w1_gen_host": w1(gen, host),
      "w1_host_lesion": w1(host, real),
      "mean_gen": float(gen.mean()), "mean_lesion": float(real.mean()),
      "mean_host": float(host.mean()),
  }


def lesion_hu(sources: Iterable[Any], lesion_id: int) -> np.ndarray:
  """Every real lesion pixel's HU in the given record sources (e.g. all splits)."""
  parts = []
  for source in sources:
    for i in range(len(source)):
      rec = source[i]
      lab, img = _stack(rec["labels"])[0], _stack(rec["image"])[0]
      parts.append(img[lab == lesion_id])
  out = np.concatenate(parts) if parts else np.zeros(0)
  if not out.size:
    raise ValueError(f"no pixel with the lesion label {lesion_id} in the sources")
  return out


def markdown(rows: Mapping[str, Mapping[str, Any]],
             tumor: Mapping[str, Any] | None = None) -> str:
  """The report's scenarios.md: one row per scenario, then the tumour's W1 numbers."""
  lines = ["# Generation scenarios vs the ring-mean fill", "",
           f"In-mask MAE and W1 (HU, generated vs real under the same masks); ring fill = "
           f"each mask filled with the mean HU of a {RING_PX}-px ring around it.", "",
           "| scenario | N slices | MAE model | MAE ring fill | W1 model | W1 ring fill "
           "| HU range generated | HU range real |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['n']} | {r['mae_model']:.1f} | {r['mae_ring']:.1f} | "
                 f"{r['w1_model']:.1f} | {r['w1_ring']:.1f} | {_range(r['hu_model'])} | "
                 f"{_range(r['hu_real'])} |")
  if tumor is not None:
    lines += ["", f"Tumour scenario, over the {tumor['lesion_pixels']} pixels of the placed "
              f"tumours (W1 in HU; the generated lesions should be closer to real lesions "
              f"than to the host tissue they replaced):", "",
              f"- W1(generated, real lesions) = {tumor['w1_gen_lesion']:.1f}",
              f"- W1(generated, replaced host) = {tumor['w1_gen_host']:.1f}",
              f"- W1(replaced host, real lesions) = {tumor['w1_host_lesion']:.1f}",
              f"- mean HU: generated {tumor['mean_gen']:.1f}, real lesions "
              f"{tumor['mean_lesion']:.1f}, replaced host {tumor['mean_host']:.1f}"]
  return "\n".join(lines) + "\n"


def _range(lo_hi: Sequence[float]) -> str:
  return f"{lo_hi[0]:.0f}..{lo_hi[1]:.0f}"
