"""Pix2Pix GAN baseline inside the kidneys mask (dataset config `kidneys`).

Same data, masks and conditioning as `configs/kidneys.py`; `model_family='pix2pix'` makes the
trainer run `ctdiff_jax.training.tasks.pix2pix`, configured by `config.pix2pix` (the diffusion
fields stay but are unused). Variants: "" (paper settings, 64 base filters) and "smoke" (64 px,
8 base filters, CPU-sized).
"""

from configs import default
from ctdiff_jax.training.tasks import pix2pix as pix2pix_task


def get_config(variant: str = ""):
  config = default.for_dataset("kidneys", variant, mask_mode="organ")
  config.model_family = "pix2pix"
  if variant == "smoke":
    config.pix2pix = pix2pix_task.smoke_config()
  else:
    config.pix2pix = pix2pix_task.default_config()
  return config
