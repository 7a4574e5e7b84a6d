"""Diffusion inpainting of kidney tumours (dataset config `kidney_tumor`: kidney=1, tumour=2).

Trained with `mixed` masks (organ, bounding box and random shapes) so the model learns to fill
pasted tumour shapes: the `tumor` generation scenario places a tumour mask from another case
inside this slice's kidney and regenerates it.
"""

from configs import default


def get_config(variant: str = ""):
  return default.for_dataset("kidney_tumor", variant, mask_mode="mixed")
