"""MR diffusion inpainting inside the kidneys mask (dataset `kidneys_mr`, built with --modality=mr).

Intensities are normalised per case (body percentiles p0.5 / p99.5 -> -1 / 1, stored in the
records); the FID / metric window is that same per-case range (0 .. 1 in normalised units).
"""

from configs import default


def get_config(variant: str = ""):
  config = default.for_dataset("kidneys", variant, mask_mode="organ",
                               intensity_hu=default.MR_INTENSITY,
                               intensity_unit=default.MR_INTENSITY_UNIT, modality="mr")
  config.eval.fid_window = (0.0, 1.0)  # Per-case p0.5 .. p99.5 (normalised units), not HU.
  return config
