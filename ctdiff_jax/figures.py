"""Image grids for logs and reports: ground truth | masked input | generated (poster Figure 4).

Inputs are model-space images in [-1, 1] (the HU window of the config); the mask is drawn as
a red outline on the masked-input column so the regenerated region is visible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def to_unit(x: np.ndarray) -> np.ndarray:
  """[-1, 1] -> [0, 1] float, grey to RGB."""
  x = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  if x.ndim == 2:
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def outline(rgb: np.ndarray, mask: np.ndarray, color=(1.0, 0.15, 0.15)) -> np.ndarray:
  m = np.asarray(mask).reshape(rgb.shape[:2]) > 0.5
  edge = m & ~ndimage.binary_erosion(m)
  out = rgb.copy()
  out[edge] = color
  return out


def comparison_grid(columns: Sequence[np.ndarray], masks: np.ndarray | None = None,
                    outline_columns: Sequence[int] = (1,), pad: int = 2,
                    outlines: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
  """Rows = examples, columns = image sets (each [N, H, W, 1] in [-1, 1]) -> (H', W', 3) in [0,1].

  `masks` [N, H, W, 1] is outlined on the columns listed in `outline_columns`; or `outlines`
  gives each column its own masks (None: no outline), e.g. for zoomed columns.
  """
  n, h, w = np.asarray(columns[0]).shape[:3]
  ncol = len(columns)
  if outlines is None:
    outlines = [masks if j in outline_columns else None for j in range(ncol)]
  grid = np.ones((n * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.float32)
  for i in range(n):
    for j, col in enumerate(columns):
      tile = to_unit(np.asarray(col)[i])
      if outlines[j] is not None:
        tile = outline(tile, np.asarray(outlines[j])[i])
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = tile
  return grid
