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


def figure4(path: str, real_hu: np.ndarray, mask: np.ndarray, generated_hu: np.ndarray,
            window, title_columns: Sequence[str] = FIGURE_COLUMNS) -> str:
  """Poster Figure 4: rows of ground truth | masked input | generated ([N, H, W, 1] HU)."""
  real = display_unit(real_hu, window)
  gen = display_unit(generated_hu, window)
  m = np.asarray(mask, np.float32).reshape(real.shape)
  masked = real * (1.0 - m)  # 0 = mid-grey in the display window, like the model's input
  h = real.shape[1]
  scale = max(1, -(-FIGURE_TILE_PX // h))
  up = lambda x: np.repeat(np.repeat(x, scale, axis=1), scale, axis=2)
  grid = figures.comparison_grid([up(real), up(masked), up(gen)], masks=up(m),
                                 pad=FIGURE_PAD_PX)
  header = _label_strip(grid.shape[1], title_columns, h * scale, FIGURE_PAD_PX)
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
