"""Tests for ctdiff_jax.diffusion.sampling: paste-back, determinism, oracle reconstruction, one jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ctdiff_jax.diffusion import sampling
from ctdiff_jax.diffusion import schedule as schedule_lib
from ctdiff_jax.models import unet

SIZE = 32
# The sampler's options are required (their defaults live in configs/default.py only).
OPTS = dict(sampler="ddim", num_steps=5, eta=0.0, prediction="eps", repaint=False, resample=1)


def opts(**overrides):
  return {**OPTS, **overrides}


def _random_variables(model, seed):
  """Seeded numpy-random variables shaped like the model's (cheaper than compiling init)."""
  shapes = jax.eval_shape(
      lambda k: unet.init_variables(model, k, image_size=SIZE, cond_channels=2),
      jax.random.key(0))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1].key == "kernel":
      return jnp.asarray(noise / np.sqrt(math.prod(leaf.shape[:-1])))
    return jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + 0.05 * noise)

  return jax.tree_util.tree_map_with_path(make, shapes)


def _batch(seed, b=2, size=SIZE):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  image = np.cos(xx / 5.0)[None, ..., None] * np.linspace(0.3, 0.9, b)[:, None, None, None]
  image = (image + 0.05 * rng.standard_normal(image.shape)).clip(-1, 1).astype(np.float32)
  mask = np.zeros_like(image)
  mask[:, size // 4:size // 2, size // 4: 3 * size // 4] = 1.0
  cond = np.concatenate([image * (1 - mask), mask], -1)
  return {"image": jnp.asarray(image), "mask": jnp.asarray(mask), "cond": jnp.asarray(cond)}


@pytest.fixture(scope="module")
def smoke():
  model = unet.create_model(default.get_config("smoke").model)
  return model.apply, _random_variables(model, 0)


@pytest.fixture(scope="module")
def ddim_run(smoke):
  """One compiled DDIM sampler, reused by several tests."""
  apply_fn, variables = smoke
  fn = sampling.make_sampler(apply_fn, schedule_lib.make_schedule("cosine", 1000), **opts())
  return fn, variables


def _outside(x, batch):
  return np.asarray(x)[np.asarray(batch["mask"]) <= 0.5]


def test_ddim_pastes_back_is_deterministic_and_compiles_once(ddim_run):
  fn, variables = ddim_run
  batch = _batch(0)
  a = fn(variables, batch, jax.random.key(1))
  b = fn(variables, batch, jax.random.key(1))
  c = fn(variables, batch, jax.random.key(2))
  assert a.shape == (2, SIZE, SIZE, 1) and a.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(a)))
  np.testing.assert_array_equal(_outside(a, batch), _outside(batch["image"], batch))
  np.testing.assert_array_equal(a, b)
  inside = np.asarray(batch["mask"]) > 0.5
  assert np.abs(np.asarray(a)[inside] - np.asarray(c)[inside]).max() > 1e-3
  assert np.abs(np.asarray(a)[inside]).max() <= 1.0  # clip_x0 keeps the final x0 in range
  assert fn._cache_size() == 1  # pylint: disable=protected-access


def test_loop_is_not_unrolled(smoke):
  apply_fn, variables = smoke
  sched = schedule_lib.make_schedule("cosine", 1000)
  batch = _batch(0)

  def jaxpr_text(num_steps, **kw):
    fn = lambda v, b, r: sampling.sample(apply_fn, v, sched, b, r,
                                         **opts(num_steps=num_steps, **kw))
    return str(jax.make_jaxpr(fn)(variables, batch, jax.random.key(0)))

  two, seven = jaxpr_text(2), jaxpr_text(7)
  assert "while" in two or "scan" in two
  # The UNet is traced once inside the loop body, whatever the number of steps.
  n_conv = two.count("conv_general_dilated")
  assert n_conv > 0 and seven.count("conv_general_dilated") == n_conv
  assert jaxpr_text(3, repaint=True, resample=3).count("conv_general_dilated") == n_conv


def test_repaint_with_resampling(smoke):
  apply_fn, variables = smoke
  fn = sampling.make_sampler(apply_fn, schedule_lib.make_schedule("cosine", 1000),
                             **opts(num_steps=3, repaint=True, resample=2))
  batch = _batch(1)
  out = fn(variables, batch, jax.random.key(3))
  assert out.shape == batch["image"].shape and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_array_equal(_outside(out, batch), _outside(batch["image"], batch))
  np.testing.assert_array_equal(out, fn(variables, batch, jax.random.key(3)))


def _mixing_apply(variables, x_t, t, cond, train):
  """A toy 'network' whose output depends on every pixel: the known region reaches the hole."""
  del variables, train
  mean = jnp.mean(x_t, axis=(1, 2), keepdims=True)
  return jnp.tanh(0.5 * x_t + 0.5 * mean + cond[..., :1]) * (1 + t[:, None, None, None] / 20.0)


def _repaint_reference(sched, batch, rng, num_steps, resample):
  """RePaint (Lugmayr et al. 2022) + DDIM(eta=0) + v-prediction written out in float64 numpy.

  At every step and jump the known region of x_t is replaced by q_sample(image, t); after
  each denoise but the last jump of a step, x_{t_prev} is re-noised back to level t. The
  Gaussian draws come from the keys `sample` documents (fold_in of step, then of jump).
  """
  f64 = lambda a: np.asarray(a, np.float64)
  abar = f64(sched.alphas_cumprod)
  image, cond = f64(batch["image"]), f64(batch["cond"])
  gen = f64(batch["mask"]) > 0.5
  normal = lambda key: f64(jax.random.normal(key, image.shape, jnp.float32))
  ts = sampling.timestep_sequence(sched.num_timesteps, "ddim", num_steps)
  init_key, loop_key = jax.random.split(rng)
  x = normal(init_key)
  for i, t in enumerate(ts):
    a = abar[t]
    a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
    for u in range(resample):
      known_key, _, renoise_key = jax.random.split(
          jax.random.fold_in(jax.random.fold_in(loop_key, i), u), 3)
      x = np.where(gen, x, np.sqrt(a) * image + np.sqrt(1 - a) * normal(known_key))
      v = np.tanh(0.5 * x + 0.5 * x.mean(axis=(1, 2), keepdims=True) + cond[..., :1]) * (
          1 + t / 20.0)
      x0 = np.clip(np.sqrt(a) * x - np.sqrt(1 - a) * v, -1, 1)
      eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
      x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
      if u < resample - 1:
        x = np.sqrt(a / a_prev) * x + np.sqrt(1 - a / a_prev) * normal(renoise_key)
  return np.where(gen, x, image)


@pytest.mark.parametrize("resample", [1, 3])
def test_repaint_matches_numpy_reference(resample):
  sched = schedule_lib.make_schedule("cosine", 20)
  batch, rng = _batch(5, size=16), jax.random.key(11)
  run = lambda **kw: np.asarray(jax.jit(lambda b, r: sampling.sample(
      _mixing_apply, {}, sched, b, r, **opts(num_steps=3, prediction="v", **kw)))(batch, rng))
  out = run(repaint=True, resample=resample)
  ref = _repaint_reference(sched, batch, rng, num_steps=3, resample=resample)
  np.testing.assert_allclose(out, ref, atol=2e-4)
  # RePaint changes the generated region: it is not the plain conditional sampler.
  inside = np.asarray(batch["mask"]) > 0.5
  assert np.abs(out - run(repaint=False, resample=1))[inside].max() > 1e-2


def test_ddpm_small_schedule(smoke):
  apply_fn, variables = smoke
  fn = sampling.make_sampler(apply_fn, schedule_lib.make_schedule("cosine", 20),
                             **opts(sampler="ddpm", prediction="v"))
  batch = _batch(2)
  a, b = fn(variables, batch, jax.random.key(4)), fn(variables, batch, jax.random.key(5))
  assert bool(jnp.all(jnp.isfinite(a)))
  np.testing.assert_array_equal(_outside(a, batch), _outside(batch["image"], batch))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def _oracle(sched, x0, prediction):
  """A 'model' that knows x0 and so outputs the exact target for any x_t."""

  def apply_fn(variables, x_t, t, cond, train):
    assert not train
    noise = schedule_lib.eps_from_x0(sched, x_t, t, x0)
    return schedule_lib.target(sched, x0, t, noise, prediction)

  return apply_fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,num_timesteps,eta", [("ddim", 1000, 0.0), ("ddim", 1000, 0.5),
                                                       ("ddpm", 20, 0.0)])
def test_oracle_model_reconstructs_x0(prediction, sampler, num_timesteps, eta):
  sched = schedule_lib.make_schedule("cosine", num_timesteps)
  batch = _batch(3)
  batch["mask"] = jnp.ones_like(batch["mask"])  # generate everything
  fn = jax.jit(lambda b, r: sampling.sample(
      _oracle(sched, b["image"], prediction), {}, sched, b, r,
      **opts(sampler=sampler, eta=eta, prediction=prediction)))
  out = fn(batch, jax.random.key(6))
  np.testing.assert_allclose(out, batch["image"], atol=1e-4)


def _toy_apply(variables, x_t, t, cond, train):
  """A cheap deterministic nonlinear stand-in for the network."""
  return jnp.tanh(0.5 * x_t + cond[..., :1]) * (1 + t[:, None, None, None] / 20.0)


def test_ddim_eta1_all_steps_equals_ddpm():
  # With eta = 1 and every timestep, DDIM's update is DDPM's posterior sample (same noise).
  sched = schedule_lib.make_schedule("cosine", 20)
  batch = _batch(4)
  run = lambda **kw: jax.jit(lambda b, r: sampling.sample(_toy_apply, {}, sched, b, r,
                                                          **opts(**kw)))(batch, jax.random.key(7))
  ddpm = run(sampler="ddpm")
  ddim = run(sampler="ddim", num_steps=20, eta=1.0)
  np.testing.assert_allclose(ddim, ddpm, atol=2e-4)
  assert float(jnp.max(jnp.abs(ddim - run(sampler="ddim", num_steps=20, eta=0.0)))) > 1e-2


def test_timestep_sequence():
  np.testing.assert_array_equal(sampling.timestep_sequence(1000, "ddim", 5),
                                [999, 749, 500, 250, 0])
  np.testing.assert_array_equal(sampling.timestep_sequence(4, "ddpm", 50), [3, 2, 1, 0])
  assert len(np.unique(sampling.timestep_sequence(20, "ddim", 20))) == 20


def test_bad_options_raise():
  sched = schedule_lib.make_schedule("cosine", 20)
  with pytest.raises(ValueError, match="num_steps must be in"):
    sampling.make_sampler(_toy_apply, sched, **opts(num_steps=21))
  with pytest.raises(ValueError, match="unknown sampler 'plms'"):
    sampling.make_sampler(_toy_apply, sched, **opts(sampler="plms"))
  with pytest.raises(ValueError, match="resample > 1 only makes sense"):
    sampling.make_sampler(_toy_apply, sched, **opts(num_steps=4, resample=2))
  with pytest.raises(TypeError, match="steps"):  # Options are named: no silent typos.
    sampling.make_sampler(_toy_apply, sched, steps=4, **opts())
  with pytest.raises(TypeError, match="prediction"):  # No default: configs/default.py has it.
    sampling.make_sampler(_toy_apply, sched, **{k: v for k, v in OPTS.items()
                                                if k != "prediction"})
  with pytest.raises(ValueError, match="batch lacks 'cond'"):
    sampling.sample(_toy_apply, {}, sched, {"image": jnp.zeros((1, 4, 4, 1)),
                                            "mask": jnp.zeros((1, 4, 4, 1))},
                    jax.random.key(0), **opts(num_steps=4))
