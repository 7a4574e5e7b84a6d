"""Pix2Pix networks (Flax Linen): the U-Net generator and the 70x70 PatchGAN discriminator.

Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks" (CVPR 2017),
laid out like the authors' `UnetGenerator` / `NLayerDiscriminator`:

  UNetGenerator(num_downs, ...)(cond [B,H,W,C], dropout_keys=None) -> [B,H,W,out] in (-1, 1)
  PatchDiscriminator(...)(cond [B,H,W,C], image [B,H,W,1]) -> logits [B,H/8-2,W/8-2,1]

Generator: `num_downs` Conv4x4/stride-2 encoder blocks (LeakyReLU 0.2 before each conv but the
first; norm on all but the outermost and innermost), filters base*(1,2,4,8,8,...), and a
mirrored ConvTranspose4x4/stride-2 decoder (ReLU, conv, norm) whose blocks take the matching
encoder output as a skip; tanh output. Dropout 0.5 follows the norm in the first
`dropout_blocks` decoder blocks counted from the innermost (the paper's CD512-CD1024-CD1024).
Dropout masks are drawn per example from `dropout_keys` ([B] keys), so a device split of the
batch does not change them; `dropout_keys=None` turns dropout off.

Discriminator: C64-C128-C256-C512 (4x4 convs, strides 2,2,2,1, LeakyReLU 0.2, no norm on the
first) and a 1-channel 4x4 conv, all with padding 1: each output logit sees a 70x70 patch.

Norms ("instance" default): per example and channel over H,W, so no statistic crosses
examples or devices; "batch" uses the current batch's statistics in training and at generation
(the paper's test-time practice, no running averages; per device, so not split invariant);
"none" has no norm. Convs followed by a norm have no bias (the norm cancels it). Conv kernels
start from N(0, 0.02) as in the reference code.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

NORMS = ("instance", "batch", "none")
MAX_DOWNS = 8
_FILTER_MULT_CAP = 8  # Filters stop growing at base * 8 (512 for base 64).


def _init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """N(0, 0.02) conv kernels (the reference init), drawn flat: N-D draws compile ~5x slower."""
  return 0.02 * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def num_downsamplings(image_size: int, max_downs: int = MAX_DOWNS) -> int:
  """log2(image_size) capped at `max_downs`, lowered until the size divides by 2**depth."""
  if image_size < 2:
    raise ValueError(f"image_size must be >= 2 for the Pix2Pix U-Net, got {image_size}")
  depth = min(int(math.log2(image_size)), max_downs)
  while image_size % (2**depth):
    depth -= 1
  return depth


def patchgan_layers(n_layers: int = 3) -> list[tuple[int, int]]:
  """(kernel, stride) of every PatchGAN conv; n_layers=3 is the 70x70 discriminator."""
  return [(4, 2)] * n_layers + [(4, 1), (4, 1)]


def receptive_field(layers: Sequence[tuple[int, int]]) -> int:
  """Input pixels seen by one output pixel of a stack of (kernel, stride) convs."""
  field = 1
  for kernel, stride in reversed(layers):
    field = (field - 1) * stride + kernel
  return field


def patch_grid_size(image_size: int, n_layers: int = 3) -> int:
  """Side of the discriminator's logit grid (4x4 convs with padding 1)."""
  size = image_size
  for kernel, stride in patchgan_layers(n_layers):
    size = (size + 2 - kernel) // stride + 1
  return size


class Norm(nn.Module):
  """Instance / batch normalisation from the current activations only (no running stats)."""
  kind: str
  epsilon: float = 1e-5  # PyTorch's default, as in the reference implementation.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "none":
      return x
    if self.kind not in NORMS:
      raise ValueError(f"pix2pix norm must be one of {NORMS}, got {self.kind!r}")
    axes = (1, 2) if self.kind == "instance" else (0, 1, 2)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return (y * scale + bias).astype(x.dtype)


def example_dropout(x: jax.Array, keys: jax.Array, salt: int, rate: float) -> jax.Array:
  """Inverted dropout with one mask per example from its own key (split invariant)."""
  keep = 1.0 - rate
  units = math.prod(x.shape[1:])
  # Drawn flat, like `_init`: a 1-D draw compiles several times faster on XLA:CPU.
  masks = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, salt), keep,
                                                  (units,)))(keys).reshape(x.shape)
  # Materialised once, not fused (and re-drawn) into each forward/backward consumer.
  masks = lax.optimization_barrier(masks)
  return jnp.where(masks, x / keep, 0.0).astype(x.dtype)


class UNetGenerator(nn.Module):
  """The Pix2Pix U-Net: cond -> full slice in (-1, 1)."""
  # No defaults: the settings live in configs/default.py (`pix2pix_config`).
  num_downs: int
  base_filters: int
  out_channels: int
  norm: str
  dropout_rate: float
  dropout_blocks: int

  def features(self, level: int) -> int:
    return self.base_filters * min(2**level, _FILTER_MULT_CAP)

  @nn.compact
  def __call__(self, cond: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
    n = self.num_downs
    h, w = cond.shape[1:3]
    if n < 1 or h % 2**n or w % 2**n:
      raise ValueError(f"Pix2Pix U-Net with {n} downsamplings needs H and W divisible by "
                       f"{2**n}, got {h}x{w}")
    x = cond
    skips = []
    for i in range(n):
      if i > 0:
        x = nn.leaky_relu(x, 0.2)
      has_norm = 0 < i < n - 1  # Not the outermost (raw input) nor the 1x1-ish bottleneck.
      x = nn.Conv(self.features(i), (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                  use_bias=not has_norm, kernel_init=_init, name=f"down_{i}")(x)
      if has_norm:
        x = Norm(self.norm, name=f"down_norm_{i}")(x)
      skips.append(x)
    for i in reversed(range(n)):
      if i < n - 1:
        x = jnp.concatenate([skips[i], x], axis=-1)
      x = nn.relu(x)
      outermost = i == 0
      # Padding 2 on the dilated input = PyTorch ConvTranspose2d(k=4, s=2, p=1): exactly 2x.
      x = nn.ConvTranspose(self.out_channels if outermost else self.features(i - 1), (4, 4),
                           strides=(2, 2), padding=((2, 2), (2, 2)), use_bias=outermost,
                           kernel_init=_init, name=f"up_{i}")(x)
      if outermost:
        break
      x = Norm(self.norm, name=f"up_norm_{i}")(x)
      block = n - 1 - i  # 0 = the innermost decoder block.
      if dropout_keys is not None and self.dropout_rate > 0 and block < self.dropout_blocks:
        x = example_dropout(x, dropout_keys, block, self.dropout_rate)
    return jnp.tanh(x)


class PatchDiscriminator(nn.Module):
  """PatchGAN on (condition, image) pairs: one real/fake logit per receptive-field patch."""
  base_filters: int
  norm: str
  n_layers: int

  @nn.compact
  def __call__(self, cond: jax.Array, image: jax.Array) -> jax.Array:
    x = jnp.concatenate([cond, image.astype(cond.dtype)], axis=-1)
    layers = patchgan_layers(self.n_layers)
    for i, (kernel, stride) in enumerate(layers[:-1]):
      feats = self.base_filters * min(2**i, _FILTER_MULT_CAP)
      has_norm = i > 0
      x = nn.Conv(feats, (kernel, kernel), strides=(stride, stride), padding=((1, 1), (1, 1)),
                  use_bias=not has_norm, kernel_init=_init, name=f"conv_{i}")(x)
      if has_norm:
        x = Norm(self.norm, name=f"norm_{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    kernel, stride = layers[-1]
    return nn.Conv(1, (kernel, kernel), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   kernel_init=_init, name="logits")(x)
