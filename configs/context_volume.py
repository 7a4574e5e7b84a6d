"""The context model of `generate --volume_mode=2.5d`: configs/context.py with each neighbour
hidden inside the box half the time in training.

In a 2.5D volume a neighbour not generated yet is unknown inside its own slice of the 3D box
(its real content is what the volume replaces), so the model must have seen hidden neighbours
(data/transforms.py). The 2D context scenario keeps configs/context.py: training with hidden
neighbours costs it (quickstart, in-box MAE / W1 against the real box 53.6 / 20.4 -> 73.7 /
36.7 HU), while 2.5D boxes come out closer to real than independent slices (README, 2.5D).
"""

from configs import context


def get_config(variant: str = ""):
  config = context.get_config(variant)
  config.data.neighbour_hide_prob = 0.5  # A not-yet-generated neighbour is hidden (2.5D).
  return config
