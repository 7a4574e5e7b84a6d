"""Diffusion inpainting of context boxes and free shapes (dataset config `kidneys`).

The model of the `context` generation scenario (organ bounding box + margin, or any
`--mask_file`): trained on bounding boxes + `bbox_margin_mm` and random free-form shapes, so it
fills whatever a box or shape covers (organ, fat, bone, gas) and blends it into the border;
an organ-mask model paints organ-grey rectangles with visible edges there. The adjacent slices
are in the conditioning (`neighbours`): the volume around a box is known, and a box of anatomy
cannot be guessed from its border alone.

Measured at quickstart size (kidneys test split, 16 slices, 1200 steps, DDIM-25), in-box MAE /
W1 in HU against the ring-mean fill (95.4 / 79.3): without neighbours 122.3 / 41.0 (plausible
but misplaced spine, gas and kidney: worse than the flat fill by MAE); with neighbours
58.3 / 24.9. Copying the previous slice into the box scores 43.0 / 6.2.

2.5D volumes use configs/context_volume.py (neighbours hidden inside the box half the time in
training): that costs the 2D scenario (quickstart, in-box MAE / W1 53.6 / 20.4 -> 73.7 / 36.7).
"""

from configs import default


def get_config(variant: str = ""):
  config = default.for_dataset("kidneys", variant, mask_mode="mixed")
  config.data.mixed_weights = (0.0, 2.0, 1.0)  # (organ, bbox, shape)
  config.data.neighbours = True
  return config
