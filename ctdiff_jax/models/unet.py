"""Conditional diffusion UNet (Flax Linen), ADM/Palette style, shaped like MONAI's.

The network denoises one CT channel `x_t` given a conditioning image `cond` (the masked slice
and its mask), both concatenated at the input:

  UNet(...)(x_t [B,H,W,1], t [B], cond [B,H,W,C], train) -> [B,H,W,out_channels] float32

Layout (follows MONAI `DiffusionModelUNet` so the reference config has the same 72.7M
parameters): conv_in; per level `num_res_blocks` residual blocks (+ self-attention where
`attention_levels` says so) and a strided-conv downsample except at the last level; a middle
block (res, attn, res); per level in reverse `num_res_blocks + 1` residual blocks that each
take one skip connection (+ attention) and a nearest+conv upsample except at the first level;
out = GroupNorm, SiLU, conv3x3.

Residual blocks inject the time embedding either as AdaGN scale/shift
(`norm(h) * (1 + scale) + shift`, ADM's `use_scale_shift_norm`, the default) or by adding it
after the first conv (MONAI's choice, the "reference" config variant, for parameter parity).

Parameters are always float32; `dtype` only sets the compute dtype (bfloat16 halves activation
memory on GPU). GroupNorm statistics are reduced in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ATTENTION_IMPLS = (None, "xla", "cudnn")


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm groups: 32 like MONAI/ADM, fewer when `channels` is small or not divisible."""
  return math.gcd(max_groups, channels)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [B, dim] (float32) of integer or fractional timesteps [B]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _norm(channels: int, dtype: Any, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _conv(features: int, dtype: Any, name: str, kernel: int = 3, strides: int = 1,
          zero_init: bool = False) -> nn.Conv:
  pad = kernel // 2
  kwargs = {}
  if zero_init:
    # Zero-init the last conv of a residual branch so each block starts as identity.
    kwargs["kernel_init"] = nn.initializers.zeros
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                 name=name, **kwargs)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, time injection, GroupNorm-SiLU-dropout-conv, plus a skip."""

  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    in_ch = x.shape[-1]
    h = nn.silu(_norm(in_ch, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, self.dtype, "conv1")(h)
    emb_ch = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb = nn.Dense(emb_ch, dtype=self.dtype, param_dtype=jnp.float32,
                   name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
    norm2 = _norm(self.out_channels, self.dtype, "norm2")
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = norm2(h) * (1 + scale) + shift
    else:
      h = norm2(h + emb)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_channels, self.dtype, "conv2", zero_init=True)(h)
    if in_ch != self.out_channels:
      x = _conv(self.out_channels, self.dtype, "skip", kernel=1)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Spatial multi-head self-attention with a pre-GroupNorm and a residual connection."""

  head_dim: int = 32
  implementation: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, ch = x.shape
    if ch % self.head_dim:
      raise ValueError(f"attention: channels {ch} not divisible by head_dim {self.head_dim}")
    heads = ch // self.head_dim
    h = _norm(ch, self.dtype, "norm")(x).reshape(b, hgt * wid, ch)
    dense = lambda name: nn.Dense(ch, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q, k, v = (dense(n)(h).reshape(b, hgt * wid, heads, self.head_dim)
               for n in ("to_q", "to_k", "to_v"))
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    h = dense("proj_out")(h.reshape(b, hgt * wid, ch))
    return x + h.reshape(b, hgt, wid, ch)


class UNet(nn.Module):
  """Conditional diffusion UNet; see the module docstring for the layout."""

  # No defaults: the settings live in configs/default.py (`model_config`).
  channels: Sequence[int]
  attention_levels: Sequence[bool]
  num_res_blocks: int | Sequence[int]
  head_dim: int
  dropout: float
  dtype: str
  attention_impl: str | None
  out_channels: int
  use_scale_shift_norm: bool

  def _check(self) -> tuple[tuple[int, ...], Any]:
    levels = len(self.channels)
    if len(self.attention_levels) != levels:
      raise ValueError(f"UNet: attention_levels {tuple(self.attention_levels)} needs one entry "
                       f"per level of channels {tuple(self.channels)}")
    nrb = self.num_res_blocks
    nrb = (nrb,) * levels if isinstance(nrb, int) else tuple(nrb)
    if len(nrb) != levels:
      raise ValueError(f"UNet: num_res_blocks {nrb} needs one entry per level")
    if self.dtype not in _DTYPES:
      raise ValueError(f"UNet: dtype {self.dtype!r} not in {sorted(_DTYPES)}")
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"UNet: attention_impl {self.attention_impl!r} not in {_ATTENTION_IMPLS}")
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      raise ValueError("UNet: attention_impl='cudnn' needs dtype='bfloat16' (cuDNN fused "
                       "attention has no float32 kernel)")
    return nrb, _DTYPES[self.dtype]

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, cond: jax.Array,
               train: bool = False) -> jax.Array:
    nrb, dtype = self._check()
    if x_t.ndim != 4 or cond.ndim != 4 or x_t.shape[:3] != cond.shape[:3]:
      raise ValueError(f"UNet: x_t {x_t.shape} and cond {cond.shape} must be [B,H,W,C] with "
                       "the same B,H,W")
    factor = 2 ** (len(self.channels) - 1)
    if x_t.shape[1] % factor or x_t.shape[2] % factor:
      raise ValueError(f"UNet: image size {x_t.shape[1:3]} must be divisible by {factor} "
                       f"({len(self.channels)} levels)")
    t = jnp.broadcast_to(jnp.asarray(t), x_t.shape[:1])

    temb_dim = 4 * self.channels[0]
    temb = timestep_embedding(t, self.channels[0])
    temb = nn.Dense(temb_dim, dtype=dtype, param_dtype=jnp.float32, name="time_embed_0")(temb)
    temb = nn.Dense(temb_dim, dtype=dtype, param_dtype=jnp.float32,
                    name="time_embed_1")(nn.silu(temb))

    def res(ch: int, name: str) -> ResBlock:
      return ResBlock(ch, self.dropout, self.use_scale_shift_norm, dtype, name=name)

    def attn(name: str) -> AttentionBlock:
      return AttentionBlock(self.head_dim, self.attention_impl, dtype, name=name)

    h = jnp.concatenate([x_t, cond], axis=-1).astype(dtype)
    h = _conv(self.channels[0], dtype, "conv_in")(h)
    skips = [h]
    for lvl, ch in enumerate(self.channels):
      for i in range(nrb[lvl]):
        h = res(ch, f"down_{lvl}_res_{i}")(h, temb, train)
        if self.attention_levels[lvl]:
          h = attn(f"down_{lvl}_attn_{i}")(h)
        skips.append(h)
      if lvl < len(self.channels) - 1:
        h = _conv(ch, dtype, f"down_{lvl}_downsample", strides=2)(h)
        skips.append(h)

    h = res(self.channels[-1], "mid_res_0")(h, temb, train)
    h = attn("mid_attn")(h)
    h = res(self.channels[-1], "mid_res_1")(h, temb, train)

    for lvl in reversed(range(len(self.channels))):
      ch = self.channels[lvl]
      for i in range(nrb[lvl] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(ch, f"up_{lvl}_res_{i}")(h, temb, train)
        if self.attention_levels[lvl]:
          h = attn(f"up_{lvl}_attn_{i}")(h)
      if lvl > 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        h = _conv(ch, dtype, f"up_{lvl}_upsample")(h)

    h = nn.silu(_norm(h.shape[-1], dtype, "out_norm")(h))
    h = _conv(self.out_channels, dtype, "conv_out", zero_init=True)(h)
    return h.astype(jnp.float32)


def create_model(model_cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> UNet:
  """UNet from `config.model` (configs/default.py): every field, no others."""
  cfg = dict(model_cfg.to_dict() if isinstance(model_cfg, ml_collections.ConfigDict)
             else model_cfg)
  known = {f for f in UNet.__dataclass_fields__ if f not in ("parent", "name")}
  unknown = set(cfg) - known
  if unknown:
    raise ValueError(f"create_model: unknown model config fields {sorted(unknown)}")
  missing = known - set(cfg)
  if missing:
    raise ValueError(f"create_model: missing model config fields {sorted(missing)}")
  for key in ("channels", "attention_levels"):
    if key in cfg:
      cfg[key] = tuple(cfg[key])
  if "num_res_blocks" in cfg and not isinstance(cfg["num_res_blocks"], int):
    cfg["num_res_blocks"] = tuple(cfg["num_res_blocks"])
  return UNet(**cfg)


def init_variables(model: UNet, rng: jax.Array, *, image_size: int | tuple[int, int],
                   cond_channels: int, batch_size: int = 1) -> dict:
  """Initial variables for `model` on [batch_size, H, W, 1] inputs with `cond_channels`."""
  hgt, wid = (image_size, image_size) if isinstance(image_size, int) else image_size
  x = jnp.zeros((batch_size, hgt, wid, 1), jnp.float32)
  cond = jnp.zeros((batch_size, hgt, wid, cond_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  # The attention kernel does not change the parameters, and 'cudnn' cannot even be traced
  # without a GPU, so initialise with the default kernel (works on any host).
  model = model.clone(attention_impl=None)
  # Jitted: op-by-op init of even the smoke model takes tens of seconds on CPU.
  init = jax.jit(lambda r: model.init({"params": r}, x, t, cond, train=False))
  return init(rng)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
