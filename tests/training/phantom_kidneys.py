"""The training tests' dataset: the 4-case phantom cohort built as `kidneys` at 32 px."""

import pathlib

from ctdiff_jax import phantom
from ctdiff_jax.ingest import build as ingest_build

SIZE, SPACING = 32, 12.0  # 32 px x 12 mm covers the phantom's 384 mm field of view.


def build(root: pathlib.Path) -> pathlib.Path:
  """Writes the cohort under root/raw, builds it into root/tfds; returns the data_dir."""
  phantom.write_cohort(root / "raw", 4, seed=0, progress=False)
  ingest_build.build("kidneys", root / "raw", root / "tfds", image_size=SIZE, spacing_mm=SPACING)
  return root / "tfds"
