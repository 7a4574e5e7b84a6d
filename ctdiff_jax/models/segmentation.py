"""A small 2D segmentation UNet: CT slice in [-1, 1] -> per-pixel class logits.

The downstream test (ctdiff_jax/evaluation/downstream.py) trains it on real and/or synthetic
slices and scores it by per-class Dice on the real test split; the mask-consistency check
(evaluation/consistency.py) uses it to segment synthetic slices.

Per level: two 3x3 convs with GroupNorm and SiLU; max-pool down, a stride-2 transposed conv up,
skip concatenation. GroupNorm has no cross-example statistics, so a prediction does not depend
on its batch. Class 0 is background; classes 1..K are the dataset's label ids.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def _groups(channels: int) -> int:
  """The largest of 4, 2, 1 that divides `channels`."""
  return next(g for g in (4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Module):
  """Two (3x3 conv, GroupNorm, SiLU)."""

  channels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for _ in range(2):
      x = nn.Conv(self.channels, (3, 3))(x)
      x = nn.silu(nn.GroupNorm(num_groups=_groups(self.channels))(x))
    return x


class SegmentationUNet(nn.Module):
  """UNet with len(channels) levels; [B, H, W, C_in] -> logits [B, H, W, num_classes].

  H and W must be divisible by 2 ** (len(channels) - 1).
  """

  num_classes: int
  channels: Sequence[int] = (8, 16, 32)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    skips = []
    for level, ch in enumerate(self.channels):
      if level:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = ConvBlock(ch)(x)
      skips.append(x)
    for ch, skip in zip(reversed(self.channels[:-1]), reversed(skips[:-1])):
      x = nn.ConvTranspose(ch, (2, 2), strides=(2, 2))(x)
      x = ConvBlock(ch)(jnp.concatenate([x, skip], axis=-1))
    return nn.Conv(self.num_classes, (1, 1))(x).astype(jnp.float32)


def create_model(seg_cfg) -> SegmentationUNet:
  """The UNet of `config.segmentation` (num_classes including background, channels)."""
  num_classes = int(seg_cfg.num_classes)
  if num_classes < 2:
    raise ValueError(f"segmentation.num_classes must be >= 2 (background + a class), got "
                     f"{num_classes}; the downstream CLI sets it from the dataset's labels")
  return SegmentationUNet(num_classes=num_classes,
                          channels=tuple(int(c) for c in seg_cfg.channels))


def check_size(image_size: int, channels: Sequence[int]) -> None:
  """Raises ValueError unless `image_size` halves cleanly at every level."""
  factor = 2 ** (len(channels) - 1)
  if image_size % factor:
    raise ValueError(f"image_size {image_size} must be divisible by {factor} for a "
                     f"{len(channels)}-level segmentation UNet")
