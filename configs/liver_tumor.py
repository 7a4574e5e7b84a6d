"""Diffusion inpainting of liver tumours (dataset config `liver_tumor`: liver=1, tumour=2).

The same training as configs/kidney_tumor.py (lesion masks, a minority of organ masks) on the
liver tumour dataset; the `tumor` scenario places another scan's tumour inside the liver.
"""

from configs import kidney_tumor


def get_config(variant: str = ""):
  return kidney_tumor.lesion_config("liver_tumor", variant)
