"""The tumour model of `generate --volume_mode=2.5d`: configs/kidney_tumor.py plus the adjacent
slices in the conditioning.

A 2.5D volume conditions every slice on its (already generated) neighbours, so its model must
be trained with them. This is a separate config, not kidney_tumor's default: at quickstart size
(phantom cohort, 64 px at 6 mm, 1200 steps, DDIM-25, 16 test slices, seed 0) the placed tumours
of the neighbour-conditioned model were closer to the host tissue they replace than to real
lesions (W1 30.5 HU to real lesions vs 13.2 HU to the replaced host; kidney_tumor without
neighbours: 26.5 vs 30.5): the real neighbours show tumour-free host organ and the model
copies it, so the 2D tumour scenario keeps the model without neighbours.

In a 2.5D volume a neighbour not generated yet is hidden inside its slice of the 3D mask (the
real host there is what the volume replaces), so the model is trained with each neighbour
hidden inside the mask half the time (`neighbour_hide_prob`; data/transforms.py).
"""

from configs import kidney_tumor


def get_config(variant: str = ""):
  config = kidney_tumor.get_config(variant)
  config.data.neighbours = True  # Previous/next slices in `cond` (2.5D generation needs them).
  # A neighbour not generated yet is hidden inside its mask (data/transforms.py).
  config.data.neighbour_hide_prob = 0.5
  return config
