"""Figure 4's zoomed columns: small masks (new tumours) get a crop around the mask."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from ctdiff_jax.generation.export import png

H = 64
WINDOW = (-250.0, 350.0)


def _case(radius: int, n: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  real = rng.normal(40.0, 10.0, (n, H, H, 1)).astype(np.float32)
  yy, xx = np.mgrid[:H, :H]
  centres = [(20, 12), (40, 50), (60, 3)]  # the last one touches the image border
  mask = np.stack([((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) for cy, cx in centres[:n]])
  mask = mask[..., None].astype(np.float32)
  gen = np.where(mask > 0, 120.0, real).astype(np.float32)  # a bright new "lesion"
  return real, mask, gen


def _tiles(path, columns: int, channel: int = 0):
  fig = np.asarray(Image.open(path)).astype(np.int32)
  scale = -(-png.FIGURE_TILE_PX // H)
  tile, pad, header = H * scale, png.FIGURE_PAD_PX, png.FIGURE_HEADER_PX
  rows = (fig.shape[0] - header - pad) // (tile + pad)
  assert fig.shape[1] == columns * (tile + pad) + pad
  return lambda i, j: fig[header + pad + i * (tile + pad):header + pad + i * (tile + pad) + tile,
                          pad + j * (tile + pad):pad + j * (tile + pad) + tile], rows, scale


def test_small_masks_get_zoomed_columns(tmp_path):
  real, mask, gen = _case(radius=2)
  path = png.figure4(str(tmp_path / "f.png"), real, mask, gen, WINDOW)
  tile, rows, scale = _tiles(path, 5)
  assert rows == 3
  boxes = png.zoom_boxes(mask)
  for i, (by, bx) in enumerate(boxes):
    m = mask[i, ..., 0][by, bx] > 0
    assert m.sum() == (mask[i] > 0).sum(), "the whole mask lies in the crop"
    k = -(-H * scale // m.shape[0])
    up = lambda x: np.repeat(np.repeat(x, k, axis=0), k, axis=1)[:H * scale, :H * scale]
    zr, zg = tile(i, 3), tile(i, 4)
    # In the zoom the new lesion is brighter than its surroundings by most of the grey range,
    # while in the full-slice window (600 HU wide) the same 80 HU step is ~34 grey levels.
    inside = up(m)
    core, edge = ndimage.binary_erosion(inside, iterations=2), inside & ~ndimage.binary_erosion(inside)
    assert np.all(zg == zg[..., :1]), "the zoomed output carries no outline"
    zg, zr_red = zg[..., 0], zr
    assert zg[inside].mean() - zg[~inside].mean() > 120
    # The zoomed ground truth: the mask outlined in red, no lesion inside.
    assert np.all((zr_red[edge][:, 0] > 200) & (zr_red[edge][:, 1] < 80)), "red outline"
    zr = zr[..., 1]
    assert abs(zr[core].mean() - zr[~inside].mean()) < 40, "ground truth has no lesion"
    full = tile(i, 2)[..., 0]
    full_m = np.repeat(np.repeat(mask[i, ..., 0] > 0, scale, 0), scale, 1)
    assert full[full_m].mean() - full[~full_m].mean() < 60


def test_large_masks_keep_three_columns(tmp_path):
  real, mask, gen = _case(radius=12)
  assert png.zoom_boxes(mask) is None
  path = png.figure4(str(tmp_path / "f.png"), real, mask, gen, WINDOW)
  _, rows, _ = _tiles(path, 3)
  assert rows == 3


def test_empty_mask_is_not_zoomed():
  _, mask, _ = _case(radius=2)
  mask[1] = 0
  assert png.zoom_boxes(mask) is None
