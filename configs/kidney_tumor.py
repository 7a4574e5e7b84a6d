"""Diffusion inpainting of kidney tumours (dataset config `kidney_tumor`: kidney=1, tumour=2).

Trained like the organ task on a tumour dataset, with the tumour annotation as the inpainting
mask (`lesion` mode: the lesion grown by `lesion_dilation_mm`, clipped to the organs). Slices
without a tumour, and a minority of the rest (`mixed_weights`), get the whole-organ mask, so
the model keeps the kidney's texture and learns that a lesion-shaped mask inside the kidney
means tumour. The `tumor` generation scenario places another scan's tumour mask inside this
slice's kidney and regenerates it with this model.
"""

from configs import default

# Lesion label of the kidney_tumor and liver_tumor datasets (organ = 1, tumour = 2).
LESION_LABEL_ID = 2


def lesion_config(dataset: str, variant: str = ""):
  """A tumour dataset's config: lesion masks, a minority of organ masks."""
  config = default.for_dataset(dataset, variant, mask_mode="mixed")
  config.data.lesion_label_id = LESION_LABEL_ID
  # One pixel at the dataset's spacing: the `tumor` scenario's default 1-px blend rim.
  config.data.lesion_dilation_mm = config.get_ref("spacing_mm")
  # (organ, bbox, shape, lesion); lesion-free slices fall back to the organ mask.
  config.data.mixed_weights = (1.0, 0.0, 0.0, 3.0)
  return config


def get_config(variant: str = ""):
  return lesion_config("kidney_tumor", variant)
