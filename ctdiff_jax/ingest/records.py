"""The slice-record schema shared by the TFDS builder, the input pipeline and the exporters.

One record is one axial slice after reorientation to RAS+ canonical and in-plane resampling:

  image       (H, W, 1) int16   HU
  labels      (H, W, 1) uint8   0 background, 1..K = the dataset config's organs, in config order
  prev_image  (H, W, 1) int16   the neighbouring slice below (edge slice repeated at the volume end)
  next_image  (H, W, 1) int16   the neighbouring slice above (likewise)
  case_id     text
  slice_index int32             index of the slice on the canonical source grid (z)
  spacing_mm  (3,) float32      (x, y) in-plane spacing after resampling, z = source slice thickness

MR and PET records (ctdiff_jax/ingest/modality.py) store the source values as int16 with a
scale and carry the case's intensity reference, so generated slices map back to the scan:

  value_scale    float32        source value = stored int16 * value_scale (per case)
  intensity_ref  (2,) float32   the case's (lo, hi) in source units (MR: body percentiles)

The organ names behind label ids 1..K live in the dataset's metadata (see `DatasetInfo` below).
"""

from __future__ import annotations

import numpy as np

IMAGE = "image"
LABELS = "labels"
PREV_IMAGE = "prev_image"
NEXT_IMAGE = "next_image"
CASE_ID = "case_id"
SLICE_INDEX = "slice_index"
SPACING_MM = "spacing_mm"
VALUE_SCALE = "value_scale"
INTENSITY_REF = "intensity_ref"

IMAGE_KEYS = (IMAGE, PREV_IMAGE, NEXT_IMAGE)


def tfds_features(image_size: int, modality: str = "ct"):
  """TFDS FeaturesDict for slice records (zlib-encoded tensors: no TensorFlow needed to read).

  CT records keep their schema; MR / PET records add VALUE_SCALE and INTENSITY_REF.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  zlib = tfds.features.Encoding.ZLIB
  shape = (image_size, image_size, 1)
  extra = {} if modality == "ct" else {
      VALUE_SCALE: tfds.features.Scalar(dtype=np.float32),
      INTENSITY_REF: tfds.features.Tensor(shape=(2,), dtype=np.float32),
  }
  return tfds.features.FeaturesDict({
      **extra,
      IMAGE: tfds.features.Tensor(shape=shape, dtype=np.int16, encoding=zlib),
      LABELS: tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=zlib),
      PREV_IMAGE: tfds.features.Tensor(shape=shape, dtype=np.int16, encoding=zlib),
      NEXT_IMAGE: tfds.features.Tensor(shape=shape, dtype=np.int16, encoding=zlib),
      CASE_ID: tfds.features.Text(),
      SLICE_INDEX: tfds.features.Scalar(dtype=np.int32),
      SPACING_MM: tfds.features.Tensor(shape=(3,), dtype=np.float32),
  })
