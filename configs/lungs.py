"""Diffusion inpainting inside the lungs mask (dataset config `lungs`)."""

from configs import default


def get_config(variant: str = ""):
  # Air-filled lung tissue [-1024, 200] HU keeps 90% of [-1, 1]; bone stays representable.
  config = default.for_dataset("lungs", variant, mask_mode="organ",
                               intensity_hu=(-1024.0, 200.0, 3071.0),
                               intensity_unit=(-1.0, 0.8, 1.0))
  config.eval.fid_window = (-1350.0, 150.0)  # Lung window for FID images.
  return config
