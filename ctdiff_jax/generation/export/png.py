"""PNG: per-slice previews of the generated slices and the poster's Figure 4 (first rows)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ctdiff_jax import figures
from ctdiff_jax.data import transforms
from ctdiff_jax.generation.export import base
from ctdiff_jax.training import writers

FIGURE_ROWS = 8
FIGURE_TILE_PX = 128  # figure tiles are upscaled (nearest) to at least this size
FIGURE_COLUMNS = ("ground truth", "masked input", "generated")
FIGURE_HEADER_PX = 16  # the column titles above the grid
FIGURE_PAD_PX = 2
# Small masks (new tumours: a few pixels at 64 px) are invisible at full-slice scale: when every
# mask's bounding box fits in a quarter of the slice, two zoomed columns around the mask follow,
# contrast-stretched to the crop (the full-slice window spends most of its grey on bone and gas).
ZOOM_COLUMNS = ("ground truth, zoom", "generated, zoom")
ZOOM_MAX_EXTENT = 0.25  # of the slice side
ZOOM_MIN_CROP_PX = 16
ZOOM_PERCENTILES = (1.0, 99.0)


def display_unit(hu: np.ndarray, window) -> np.ndarray:
  """HU -> [-1, 1] in the display window (what figures.comparison_grid expects)."""
  return transforms.hu_to_unit(hu, window)


def _label_strip(width: int, columns: Sequence[str], col_w: int, pad: int,
                 height: int = FIGURE_HEADER_PX) -> np.ndarray:
  strip = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for j, name in enumerate(columns):
    x = pad + j * (col_w + pad)
    tw = draw.textlength(name)
    draw.text((x + max((col_w - tw) / 2, 0), 2), name, fill=(0, 0, 0))
  return np.asarray(strip, np.float32) / 255.0


def zoom_boxes(mask: np.ndarray) -> list[tuple[slice, slice]] | None:
  """Square crops centred on each row's mask, or None when some mask is too large to zoom on."""
  m = np.asarray(mask).reshape(np.shape(mask)[:3]) > 0.5
  h, w = m.shape[1:]
  extents, centres = [], []
  for row in m:
    ys, xs = np.nonzero(row)
    if ys.size == 0:
      return None
    extents.append(max(np.ptp(ys), np.ptp(xs)) + 1)
    centres.append(((ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2))
  if max(extents) > ZOOM_MAX_EXTENT * min(h, w):
    return None
  crop = int(min(max(3 * max(extents), ZOOM_MIN_CROP_PX), h, w))
  start = lambda c, n: int(np.clip(c - crop // 2, 0, n - crop))
  return [(slice(start(cy, h), start(cy, h) + crop), slice(start(cx, w), start(cx, w) + crop))
          for cy, cx in centres]


def _zoomed(real_hu: np.ndarray, generated_hu: np.ndarray, mask: np.ndarray, boxes, size: int):
  """The crops of both columns in [-1, 1] (one contrast window per row) and of the mask,
  resized to `size`."""
  cols = ([], [], [])
  for i, box in enumerate(boxes):
    crops = [np.asarray(x[i], np.float32).reshape(x.shape[1:3])[box]
             for x in (real_hu, generated_hu, mask)]
    lo, hi = np.percentile(np.concatenate([c.ravel() for c in crops[:2]]), ZOOM_PERCENTILES)
    window = (float(lo), float(max(hi, lo + 1.0)))
    k = -(-size // crops[0].shape[0])
    for col, c in zip(cols, [display_unit(c, window) for c in crops[:2]] + crops[2:]):
      col.append(np.repeat(np.repeat(c, k, axis=0), k, axis=1)[:size, :size, None])
  return [np.stack(c) for c in cols]


def figure4(path: str, real_hu: np.ndarray, mask: np.ndarray, generated_hu: np.ndarray,
            window, title_columns: Sequence[str] = FIGURE_COLUMNS) -> str:
  """Poster Figure 4: rows of ground truth | masked input | generated ([N, H, W, 1] HU), plus
  zoomed ground truth | generated around the mask when every mask is small (zoom_boxes)."""
  real = display_unit(real_hu, window)
  gen = display_unit(generated_hu, window)
  m = np.asarray(mask, np.float32).reshape(real.shape)
  masked = real * (1.0 - m)  # 0 = mid-grey in the display window, like the model's input
  h = real.shape[1]
  scale = max(1, -(-FIGURE_TILE_PX // h))
  up = lambda x: np.repeat(np.repeat(x, scale, axis=1), scale, axis=2)
  columns, titles = [up(real), up(masked), up(gen)], list(title_columns)
  outlines = [None, up(m), None]
  boxes = zoom_boxes(m)
  if boxes is not None:
    # The zoomed ground truth shows where the mask sits; the zoomed output is left bare.
    zoom_real, zoom_gen, zoom_mask = _zoomed(real_hu, generated_hu, m, boxes, h * scale)
    columns += [zoom_real, zoom_gen]
    outlines += [zoom_mask, None]
    titles += ZOOM_COLUMNS
  grid = figures.comparison_grid(columns, pad=FIGURE_PAD_PX, outlines=outlines)
  header = _label_strip(grid.shape[1], titles, h * scale, FIGURE_PAD_PX)
  writers.save_png(path, np.concatenate([header, grid], axis=0))
  return path


class PngExporter(base.Exporter):
  """<stem>.png: the generated slice in the display window (grey, uint8)."""

  files = {"png_file": ".png"}

  def add(self, samples) -> None:
    for j in self.todo(samples):
      preview = (display_unit(samples.generated_hu[j], self.target.window) + 1.0) / 2.0
      writers.save_png(self.target.path(base.sample_stem(samples, j) + ".png"), preview)
      self.slice_files += 1


class FigureExporter(base.Exporter):
  """figure4.png: ground truth | masked input | generated of samples 0 .. FIGURE_ROWS - 1."""

  def __init__(self, target: base.Target):
    super().__init__(target)
    self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

  def needs(self, indices) -> bool:
    # The figure is drawn in finish: a resumed run generates its first rows again.
    return any(int(i) < FIGURE_ROWS for i in indices)

  def add(self, samples) -> None:
    for j in range(len(samples)):
      if int(samples.index[j]) < FIGURE_ROWS:
        self.rows.append((samples.image_hu[j], samples.mask[j], samples.generated_hu[j]))

  def finish(self) -> dict[str, str]:
    if not self.rows:
      return {}
    real, mask, gen = (np.stack(x) for x in zip(*self.rows))
    return {"figure": figure4(self.target.path("figure4.png"), real, mask, gen,
                              self.target.window)}
