"""Diffusion inpainting inside the kidneys mask (dataset config `kidneys`)."""

from configs import default


def get_config(variant: str = ""):
  return default.for_dataset("kidneys", variant, mask_mode="organ")
