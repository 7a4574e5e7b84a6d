"""Tests for ctdiff_jax.models.unet: parameter counts, numerics, dtypes, dropout, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ctdiff_jax.models import unet

MONAI_REFERENCE_PARAMS = 72_730_113  # MONAI DiffusionModelUNet, reference config, in_channels=3


def _count_ref(channels, attention_levels, num_res_blocks, in_channels, scale_shift):
  """Closed-form parameter count of MONAI's DiffusionModelUNet layout (independent of Flax)."""
  conv = lambda i, o, k=3: k * k * i * o + o
  lin = lambda i, o: i * o + o
  temb = 4 * channels[0]

  def res(i, o):
    p = 2 * i + conv(i, o) + lin(temb, (2 if scale_shift else 1) * o) + 2 * o + conv(o, o)
    return p + (conv(i, o, 1) if i != o else 0)

  attn = lambda c: 2 * c + 4 * lin(c, c)
  p = conv(in_channels, channels[0]) + lin(channels[0], temb) + lin(temb, temb)
  skips, c = [channels[0]], channels[0]
  for lvl, o in enumerate(channels):
    for _ in range(num_res_blocks):
      p, c = p + res(c, o) + (attn(o) if attention_levels[lvl] else 0), o
      skips.append(c)
    if lvl < len(channels) - 1:
      p += conv(c, c)
      skips.append(c)
  p += 2 * res(c, c) + attn(c)
  for lvl in reversed(range(len(channels))):
    o = channels[lvl]
    for _ in range(num_res_blocks + 1):
      p, c = p + res(c + skips.pop(), o) + (attn(o) if attention_levels[lvl] else 0), o
    if lvl > 0:
      p += conv(c, c)
  return p + 2 * c + conv(c, 1)


def _abstract_count(cfg, cond_channels=2):
  model = unet.create_model(cfg)
  shapes = jax.eval_shape(
      lambda k: unet.init_variables(model, k, image_size=64, cond_channels=cond_channels),
      jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  return unet.count_params(shapes)


def test_reference_config_matches_monai_param_count():
  cfg = default.get_config("reference").model
  cfg.dtype, cfg.attention_impl = "float32", None
  n = _abstract_count(cfg)
  assert n == _count_ref(cfg.channels, cfg.attention_levels, 2, 3, False)
  assert n == MONAI_REFERENCE_PARAMS
  # The GPU variant (bf16 + cuDNN attention) initialises on a CPU host to the same tree.
  cfg.dtype, cfg.attention_impl = "bfloat16", "cudnn"
  assert _abstract_count(cfg) == MONAI_REFERENCE_PARAMS


def test_default_and_smoke_param_counts():
  cfg = default.get_config().model
  assert _abstract_count(cfg) == _count_ref(cfg.channels, cfg.attention_levels, 2, 3, True)
  # AdaGN adds one (temb -> out) projection per block: about 2.5% more than MONAI.
  assert abs(_abstract_count(cfg) / MONAI_REFERENCE_PARAMS - 1.025) < 0.005
  cfg = default.get_config("smoke").model
  assert _abstract_count(cfg, 3) == _count_ref(cfg.channels, cfg.attention_levels, 1, 4, True)


def test_num_groups_fallback():
  assert [unet.num_groups(c) for c in (768, 64, 48, 16, 3)] == [32, 32, 16, 16, 1]


def test_timestep_embedding_matches_numpy():
  t = np.array([0, 1, 17, 999.5])
  emb = np.asarray(unet.timestep_embedding(jnp.asarray(t), 8), np.float64)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  ref = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
  np.testing.assert_allclose(emb, ref, atol=2e-4)  # float32 args up to ~1e3 rad


def test_attention_block_matches_numpy():
  block = unet.AttentionBlock(head_dim=4)
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 8))
  variables = random_like(jax.eval_shape(block.init, jax.random.key(2), x), 3)
  out = np.asarray(jax.jit(block.apply)(variables, x), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  xs = np.asarray(x, np.float64).reshape(2, 9, 8)
  # GroupNorm with gcd(32, 8) = 8 groups = per-channel over the 9 positions.
  mu, var = xs.mean(1, keepdims=True), xs.var(1, keepdims=True)
  h = (xs - mu) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  proj = lambda n, a: a @ p[n]["kernel"] + p[n]["bias"]
  q, k, v = (proj(n, h).reshape(2, 9, 2, 4) for n in ("to_q", "to_k", "to_v"))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 9, 8)
  ref = xs + proj("proj_out", a)
  np.testing.assert_allclose(out.reshape(2, 9, 8), ref, atol=1e-5)


def random_variables(model, seed, image_size=32, cond_channels=2):
  """Seeded random variables shaped like `model`'s, with no zero-initialised layers.

  Built in numpy from `jax.eval_shape`: compiling the real initialisers costs 10-20 s on a busy
  CPU, and the zero-initialised output convs would make the output identically 0.
  """
  return random_like(jax.eval_shape(
      lambda k: unet.init_variables(model, k, image_size=image_size,
                                    cond_channels=cond_channels), jax.random.key(0)), seed)


def random_like(shapes, seed):
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "kernel":
      return jnp.asarray(noise / np.sqrt(math.prod(leaf.shape[:-1])))
    return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.05 * noise)

  return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def smoke():
  cfg = default.get_config("smoke").model
  model = unet.create_model(cfg)
  variables = random_variables(model, 0)
  k1, k2 = jax.random.split(jax.random.key(2))
  x = jax.random.normal(k1, (2, 32, 32, 1))
  cond = jax.random.normal(k2, (2, 32, 32, 2))
  t = jnp.array([3, 600], jnp.int32)
  fwd = jax.jit(model.apply)
  return dict(cfg=cfg, model=model, variables=variables, x=x, cond=cond, t=t,
              out=fwd(variables, x, t, cond), fwd=fwd)


def test_forward_shape_dtype_and_time_dependence(smoke):
  out = smoke["out"]
  assert out.shape == (2, 32, 32, 1) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3
  fwd, v, x, c = smoke["fwd"], smoke["variables"], smoke["x"], smoke["cond"]
  # Float timesteps are accepted and give the same result as the equal ints.
  np.testing.assert_allclose(fwd(v, x, smoke["t"].astype(jnp.float32), c), out, atol=1e-6)
  other_t = fwd(v, x, jnp.array([4, 601], jnp.int32), c)
  assert float(jnp.max(jnp.abs(other_t - out))) > 1e-4
  # The conditioning reaches the output.
  assert float(jnp.max(jnp.abs(fwd(v, x, smoke["t"], 0 * c) - out))) > 1e-4


def test_bfloat16_compute_close_to_float32(smoke):
  cfg = smoke["cfg"].copy_and_resolve_references()
  cfg.dtype = "bfloat16"
  model = unet.create_model(cfg)
  out = jax.jit(model.apply)(smoke["variables"], smoke["x"], smoke["t"], smoke["cond"])
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  ref = smoke["out"]
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 0.05  # bf16 has ~3 significant digits; 0 would mean bf16 was not used


def _reference_attention(q, k, v, **unused):
  """softmax(q k^T / sqrt(d)) v per head, written out: [B, L, heads, d] in and out."""
  del unused
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _forward_with_attention(monkeypatch, cfg, smoke, attention):
  """UNet(cfg) on the smoke inputs with jax.nn.dot_product_attention replaced by `attention`.

  Returns (output, the `implementation` of every attention call). A fresh function is jitted,
  so it is traced (and the patched attention called) anew.
  """
  seen = []

  def spy(q, k, v, *args, implementation=None, **kw):
    seen.append(implementation)
    return attention(q, k, v, *args, implementation=implementation, **kw)

  model = unet.create_model(cfg)
  with monkeypatch.context() as patch:
    patch.setattr(jax.nn, "dot_product_attention", spy)
    out = jax.jit(lambda *a: model.apply(*a))(
        smoke["variables"], smoke["x"], smoke["t"], smoke["cond"])
  return out, seen


@pytest.mark.parametrize("impl,dtype", [(None, "float32"), ("xla", "float32"),
                                        ("cudnn", "bfloat16")])
def test_attention_impl_is_dispatched(monkeypatch, smoke, impl, dtype):
  # The reference stands in for the kernel, so even 'cudnn' traces on a CPU host.
  cfg = smoke["cfg"].copy_and_resolve_references()
  cfg.attention_impl, cfg.dtype = impl, dtype
  _, seen = _forward_with_attention(monkeypatch, cfg, smoke, _reference_attention)
  # Middle block + per attention level num_res_blocks down and num_res_blocks + 1 up blocks.
  n_attn = 1 + sum(cfg.attention_levels) * (2 * cfg.num_res_blocks + 1)
  assert seen == [impl] * n_attn


def test_xla_attention_impl_matches_reference_attention(monkeypatch, smoke):
  cfg = smoke["cfg"].copy_and_resolve_references()
  cfg.attention_impl = "xla"
  out, seen = _forward_with_attention(monkeypatch, cfg, smoke, jax.nn.dot_product_attention)
  assert set(seen) == {"xla"}
  ref, _ = _forward_with_attention(monkeypatch, cfg, smoke, _reference_attention)
  assert float(jnp.max(jnp.abs(ref - smoke["out"]))) < 1e-4
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Attention matters here: without it the output is far from the reference.
  no_attn, _ = _forward_with_attention(monkeypatch, cfg, smoke, lambda q, k, v, **kw: v)
  assert float(jnp.max(jnp.abs(no_attn - ref))) > 1e-3


def test_dropout_uses_dropout_rng(smoke):
  cfg = smoke["cfg"].copy_and_resolve_references()
  cfg.dropout = 0.3
  model = unet.create_model(cfg)
  fwd = jax.jit(model.apply, static_argnames="train")
  args = (smoke["variables"], smoke["x"], smoke["t"], smoke["cond"])
  # rbg keys compile much faster than threefry on CPU; the model must not care which.
  key = lambda seed: jax.random.key(seed, impl="rbg")
  a = fwd(*args, train=True, rngs={"dropout": key(5)})
  b = fwd(*args, train=True, rngs={"dropout": key(5)})
  c = fwd(*args, train=True, rngs={"dropout": key(6)})
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-4
  # Eval mode: dropout off, so it equals the dropout-free model.
  np.testing.assert_allclose(fwd(*args, train=False), smoke["out"], atol=1e-6)


def test_bad_inputs_raise(smoke):
  model, v = smoke["model"], smoke["variables"]
  with pytest.raises(ValueError, match="divisible by 4"):
    model.apply(v, jnp.zeros((1, 30, 32, 1)), jnp.zeros((1,)), jnp.zeros((1, 30, 32, 2)))
  with pytest.raises(ValueError, match="same B,H,W"):
    model.apply(v, jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,)), jnp.zeros((1, 16, 16, 2)))
  bad = default.get_config("smoke").model
  bad.attention_levels = (False, True)
  with pytest.raises(ValueError, match="one entry per level"):
    unet.init_variables(unet.create_model(bad), jax.random.key(0), image_size=32,
                        cond_channels=2)
  with pytest.raises(ValueError, match="unknown model config fields"):
    unet.create_model({"channels": (16,), "widths": 3})
  with pytest.raises(ValueError, match=r"missing model config fields \['attention_impl'"):
    unet.create_model({"channels": (16,)})  # No library defaults: configs/default.py has them.
  smoke_cfg = default.get_config("smoke").model.to_dict()
  with pytest.raises(ValueError, match="attention_impl"):
    unet.create_model(dict(smoke_cfg, attention_impl="flash")).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,)), jnp.zeros((1, 32, 32, 2)))
  with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
    unet.create_model(dict(smoke_cfg, attention_impl="cudnn")).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,)), jnp.zeros((1, 32, 32, 2)))
