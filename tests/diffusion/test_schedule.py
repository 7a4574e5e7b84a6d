"""Tests for ctdiff_jax.diffusion: schedules, forward process, parameterisations and the loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctdiff_jax.diffusion import schedule as schedule_lib


def _cosine_abar_ref(num_timesteps: int, s: float = 0.008) -> np.ndarray:
  """abar[t] = f(t+1) / f(0), the closed form the cosine betas are built from (float64)."""
  f = lambda t: math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([f(t + 1) / f(0) for t in range(num_timesteps)], np.float64)


def test_linear_schedule_matches_ddpm():
  sched = schedule_lib.make_schedule("linear", 1000)
  betas = np.asarray(sched.betas, np.float64)
  assert sched.betas.dtype == jnp.float32 and sched.num_timesteps == 1000
  np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-3)
  abar = np.asarray(sched.alphas_cumprod, np.float64)
  assert np.all(np.diff(abar) < 0)
  # DDPM's T=1000 linear schedule ends at abar ~= 4.036e-5 (sqrt ~= 0.00635).
  np.testing.assert_allclose(abar[-1], 4.0358e-5, rtol=1e-3)


def test_linear_schedule_rescales_with_t():
  betas = np.asarray(schedule_lib.make_schedule("linear", 100).betas, np.float64)
  np.testing.assert_allclose(betas[[0, -1]], [1e-3, 0.2], rtol=1e-6)


@pytest.mark.parametrize("num_timesteps", [1000, 20])
def test_cosine_schedule_matches_closed_form(num_timesteps):
  sched = schedule_lib.make_schedule("cosine", num_timesteps)
  abar = np.asarray(sched.alphas_cumprod, np.float64)
  ref = _cosine_abar_ref(num_timesteps)
  # Betas are clipped to 0.999 only at the last step (f(T) = 0), so compare the rest exactly.
  np.testing.assert_allclose(abar[:-1], ref[:-1], rtol=1e-5, atol=1e-9)
  assert float(sched.betas[-1]) == pytest.approx(0.999, rel=1e-6)
  # Last step: abar[T-2] * (1 - 0.999).
  assert abar[-1] == pytest.approx(abar[-2] * 1e-3, rel=1e-4)
  assert np.all(np.diff(abar) < 0) and abar[0] < 1
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod_prev)[1:], abar[:-1], rtol=1e-6)
  assert float(sched.alphas_cumprod_prev[0]) == 1.0


def test_make_schedule_rejects_unknown_kind():
  with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
    schedule_lib.make_schedule("quadratic", 10)
  with pytest.raises(ValueError, match="betas outside"):
    schedule_lib.make_schedule("linear", 20)
  with pytest.raises(ValueError, match="unknown prediction 'x'"):
    schedule_lib.target(schedule_lib.make_schedule("cosine", 10), jnp.zeros((1, 2, 2, 1)),
                     jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2, 2, 1)), "x")


def test_q_sample_statistics():
  sched = schedule_lib.make_schedule("cosine", 1000)
  n, c = 200_000, 0.7
  t = jnp.array([0, 300, 700, 999], jnp.int32)
  x0 = jnp.full((4, n), c, jnp.float32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = np.asarray(schedule_lib.q_sample(sched, x0, t, noise), np.float64)
  abar = _cosine_abar_ref(1000)[np.asarray(t)]
  abar[-1] = float(sched.alphas_cumprod[-1])
  std_ref = np.sqrt(1 - abar)
  # 5 standard errors of the mean / of the std estimate.
  np.testing.assert_allclose(x_t.mean(1), np.sqrt(abar) * c, atol=5 * std_ref.max() / n**0.5)
  np.testing.assert_allclose(x_t.std(1), std_ref, rtol=5 / (2 * n) ** 0.5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_predict_inverts_q_sample(kind):
  sched = schedule_lib.make_schedule(kind, 1000)
  k1, k2 = jax.random.split(jax.random.key(1))
  t = jnp.arange(0, 1000, 37, dtype=jnp.int32)
  x0 = jax.random.uniform(k1, (t.shape[0], 8, 8, 1), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  x_t = schedule_lib.q_sample(sched, x0, t, noise)
  # v: every coefficient is <= 1, so the inversion is exact to float32 rounding at any t.
  v = schedule_lib.target(sched, x0, t, noise, "v")
  np.testing.assert_allclose(schedule_lib.predict_x0(sched, x_t, t, v, "v"), x0, atol=1e-5)
  np.testing.assert_allclose(schedule_lib.predict_eps(sched, x_t, t, v, "v"), noise, atol=1e-5)
  # eps: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) amplifies rounding by 1/sqrt(abar),
  # so check the 1e-5 bound where abar > 0.01 (t up to ~93% of T).
  eps = schedule_lib.target(sched, x0, t, noise, "eps")
  np.testing.assert_array_equal(eps, noise)
  ok = np.asarray(sched.alphas_cumprod)[np.asarray(t)] > 0.01
  x0_eps = schedule_lib.predict_x0(sched, x_t, t, eps, "eps")
  np.testing.assert_allclose(np.asarray(x0_eps)[ok], np.asarray(x0)[ok], atol=1e-5)
  np.testing.assert_array_equal(schedule_lib.predict_eps(sched, x_t, t, eps, "eps"), eps)
  np.testing.assert_allclose(schedule_lib.eps_from_x0(sched, x_t, t, x0), noise, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_posterior_matches_gaussian_conjugacy(kind):
  sched = schedule_lib.make_schedule(kind, 1000)
  betas = np.asarray(sched.betas, np.float64)
  abar = np.cumprod(1 - betas)
  rng = np.random.default_rng(0)
  t = np.array([1, 2, 10, 250, 500, 998, 999])
  x0 = rng.uniform(-1, 1, (t.size, 4, 4, 1))
  x_t = rng.normal(size=x0.shape)
  mean, var, log_var = schedule_lib.q_posterior(
      sched, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  # Bayes: prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}),
  # likelihood x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t).
  prior_var = 1 - abar[t - 1]
  var_ref = 1 / (1 / prior_var + (1 - betas[t]) / betas[t])
  mean_ref = var_ref[:, None, None, None] * (
      np.sqrt(abar[t - 1])[:, None, None, None] * x0 / prior_var[:, None, None, None]
      + np.sqrt(1 - betas[t])[:, None, None, None] * x_t / betas[t][:, None, None, None])
  np.testing.assert_allclose(np.asarray(var).ravel(), var_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(log_var).ravel(), np.log(var_ref), atol=1e-5)
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-4, atol=1e-5)
  # t = 0: q(x_{-1} | x_0, x_0) is a point mass at x0; log-variance clipped to t=1's.
  mean0, var0, log_var0 = schedule_lib.q_posterior(
      sched, jnp.asarray(x0[:1], jnp.float32), jnp.asarray(x_t[:1], jnp.float32),
      jnp.zeros((1,), jnp.int32))
  np.testing.assert_allclose(mean0, x0[:1], atol=1e-6)
  assert float(var0.ravel()[0]) == 0.0
  assert float(log_var0.ravel()[0]) == pytest.approx(float(np.log(var_ref[0])), abs=1e-5)


def _batch(key, b=4, h=8, c=2):
  k1, k2 = jax.random.split(key)
  image = jax.random.uniform(k1, (b, h, h, 1), minval=-1, maxval=1)
  mask = (jax.random.uniform(k2, (b, h, h, 1)) > 0.7).astype(jnp.float32)
  cond = jnp.concatenate([image * (1 - mask), mask], -1)[..., :c]
  return {"image": image, "mask": mask, "cond": cond}


def _oracle_apply(sched, image, prediction, error_in_mask=0.0, mask=None):
  """A 'model' that outputs the exact target (it knows x0), plus a fixed error in the mask."""
  seen = {}

  def apply_fn(variables, x_t, t, cond, train, rngs):
    seen.update(variables=variables, train=train, rngs=rngs, cond=cond)
    noise = schedule_lib.eps_from_x0(sched, x_t, t, image)
    out = schedule_lib.target(sched, image, t, noise, prediction)
    return out + (0.0 if mask is None else error_in_mask * mask)

  return apply_fn, seen


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_zero_for_exact_target(prediction):
  sched = schedule_lib.make_schedule("cosine", 1000)
  batch = _batch(jax.random.key(2))
  apply_fn, seen = _oracle_apply(sched, batch["image"], prediction)
  loss, aux = schedule_lib.diffusion_loss(apply_fn, {"params": 1}, batch, jax.random.key(3), sched,
                                       prediction=prediction, mask_weight=3.0, train=True)
  # eps_from_x0 round-trips x_t in float32, so "exact" means rounding-level.
  assert float(loss) < 1e-8 and float(aux["mse"]) < 1e-8
  assert seen["train"] is True and set(seen["rngs"]) == {"dropout"}
  assert seen["variables"] == {"params": 1} and seen["cond"] is batch["cond"]


@pytest.mark.parametrize("mask_weight", [0.0, 4.0])
def test_loss_mask_weighting(mask_weight):
  sched = schedule_lib.make_schedule("linear", 100)
  batch = _batch(jax.random.key(4))
  err = 0.5
  apply_fn, _ = _oracle_apply(sched, batch["image"], "v", err, batch["mask"])
  loss, aux = schedule_lib.diffusion_loss(apply_fn, {}, batch, jax.random.key(5), sched,
                                       prediction="v", mask_weight=mask_weight)
  frac = float(np.asarray(batch["mask"], np.float64).mean())
  # Squared error is err^2 inside the mask, 0 outside: loss = err^2 (1+m) frac / (1 + m frac).
  ref = err**2 * (1 + mask_weight) * frac / (1 + mask_weight * frac)
  assert float(loss) == pytest.approx(ref, rel=1e-4)
  assert float(aux["mse"]) == pytest.approx(err**2 * frac, rel=1e-4)
  assert float(aux["mse_mask"]) == pytest.approx(err**2, rel=1e-4)


def test_loss_of_zero_model_is_noise_power_and_seeded():
  sched = schedule_lib.make_schedule("cosine", 1000)
  batch = _batch(jax.random.key(6), b=8, h=32)
  zero_fn = lambda v, x_t, t, cond, train, rngs: jnp.zeros_like(x_t)
  run = lambda k: schedule_lib.diffusion_loss(zero_fn, {}, batch, k, sched, prediction="eps",
                                              mask_weight=0.0)[0]
  loss = float(run(jax.random.key(7)))
  # E[eps^2] = 1; 8192 samples give a std error of sqrt(2/8192) ~= 0.016.
  assert loss == pytest.approx(1.0, abs=0.08)
  assert float(run(jax.random.key(7))) == loss
  assert float(run(jax.random.key(8))) != loss
