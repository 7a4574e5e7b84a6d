"""Diffusion inpainting of context boxes and free shapes (dataset config `kidneys`).

The model of the `context` generation scenario (organ bounding box + margin, or any
`--mask_file`): trained on bounding boxes + `bbox_margin_mm` and random free-form shapes, so it
fills whatever a box or shape covers (organ, fat, bone, gas) and blends it into the border;
an organ-mask model paints organ-grey rectangles with visible edges there.
"""

from configs import default


def get_config(variant: str = ""):
  config = default.for_dataset("kidneys", variant, mask_mode="mixed")
  config.data.mixed_weights = (0.0, 2.0, 1.0)  # (organ, bbox, shape)
  return config
