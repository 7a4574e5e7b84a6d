"""Diffusion inpainting inside the lungs mask (dataset config `lungs`)."""

from configs import default


def get_config(variant: str = ""):
  config = default.for_dataset("lungs", variant, mask_mode="organ",
                               hu_window=(-1000.0, 200.0))  # Air-filled lung tissue.
  config.eval.fid_window = (-1350.0, 150.0)  # Lung window for FID images.
  return config
