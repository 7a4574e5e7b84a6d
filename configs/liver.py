"""Diffusion inpainting inside the liver mask (dataset config `liver`)."""

from configs import default


def get_config(variant: str = ""):
  return default.for_dataset("liver", variant, mask_mode="organ")
