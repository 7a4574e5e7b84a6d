"""Pix2Pix GAN baseline inside the kidneys mask (dataset config `kidneys`).

Same data, masks and conditioning as `configs/kidneys.py`; `model_family='pix2pix'` makes the
trainer run `ctdiff_jax.training.tasks.pix2pix`, configured by `config.pix2pix` (the diffusion
fields stay but are unused). Variants: "" (paper settings, 64 base filters) and "smoke" (64 px,
8 base filters, CPU-sized).
"""

from configs import default


def get_config(variant: str = ""):
  config = default.for_dataset("kidneys", variant, mask_mode="organ")
  config.model_family = "pix2pix"
  config.pix2pix = default.pix2pix_config(variant)
  return config
