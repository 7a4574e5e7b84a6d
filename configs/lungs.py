"""Diffusion inpainting inside the lungs mask (dataset config `lungs`)."""

from configs import default


def get_config(variant: str = ""):
  return default.for_dataset("lungs", variant, mask_mode="organ")
