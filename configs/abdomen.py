"""Diffusion inpainting inside liver + spleen + kidneys as one binary mask (`abdomen`)."""

from configs import default


def get_config(variant: str = ""):
  return default.for_dataset("abdomen", variant, mask_mode="organ")
