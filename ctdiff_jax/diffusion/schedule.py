"""Gaussian diffusion math: noise schedules, forward process, parameterisations, training loss.

Conventions: images are [B,H,W,C] in [-1, 1]; `t` is an int array [B] in [0, T); index t is
the (t+1)-th noising step, so `alphas_cumprod[0]` is close to 1 and `alphas_cumprod[T-1]` close
to 0. Schedules are computed in float64 numpy and stored as float32 jnp arrays.

Model calling convention (shared with `ctdiff_jax.diffusion.sampling`), i.e. a Flax `module.apply`:

  apply_fn(variables, x_t, t, cond, train=bool, rngs={'dropout': key}) -> [B,H,W,1] float32

Prediction targets: 'eps' (the noise) or 'v' = sqrt(abar) * eps - sqrt(1 - abar) * x0
(Salimans & Ho 2022). Recovering x0 from 'v' is well conditioned at every t; from 'eps' it
divides by sqrt(abar), which amplifies float32 error near t = T-1.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("eps", "v")
SCHEDULES = ("linear", "cosine")

ApplyFn = Callable[..., jax.Array]


@flax.struct.dataclass
class Schedule:
  """Per-timestep coefficients, each a float32 array [T]."""

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  num_timesteps: int = flax.struct.field(pytree_node=False)


def linear_betas(num_timesteps: int) -> np.ndarray:
  """DDPM's linear betas 1e-4..0.02, rescaled by 1000/T so any T spans the same noise range."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021: abar(t) = cos((t/T + s) / (1 + s) * pi/2)^2, betas clipped."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  return np.minimum(1 - abar[1:] / abar[:-1], max_beta)


def make_schedule(kind: str, num_timesteps: int) -> Schedule:
  """Builds a `Schedule` of `kind` in {'linear', 'cosine'} with T = `num_timesteps`."""
  if num_timesteps < 2:
    raise ValueError(f"make_schedule: num_timesteps must be >= 2, got {num_timesteps}")
  if kind == "linear":
    betas = linear_betas(num_timesteps)
  elif kind == "cosine":
    betas = cosine_betas(num_timesteps)
  else:
    raise ValueError(f"make_schedule: unknown schedule {kind!r}, expected one of {SCHEDULES}")
  if not np.all((betas > 0) & (betas < 1)):
    # The rescaled linear schedule reaches beta = 20/T, so it needs T > 20.
    raise ValueError(f"make_schedule: {kind} schedule with T={num_timesteps} has betas outside "
                     f"(0, 1) (max {betas.max():.3g}); use more timesteps or 'cosine'")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  arrays = dict(
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
      posterior_variance=post_var,
      # posterior_variance[0] is 0; reuse step 1's value so the log stays finite.
      posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
  )
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()},
                  num_timesteps=num_timesteps)


def _at(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """coef[t] shaped [B, 1, ..., 1] to broadcast against an [B, ...] image of rank `ndim`."""
  return coef[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def _check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}, expected one of {PREDICTIONS}")


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
  return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array,
           prediction: str) -> jax.Array:
  """What the network should output for (x0, t, noise) under `prediction`."""
  _check_prediction(prediction)
  if prediction == "eps":
    return noise
  return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
          - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_out: jax.Array,
               prediction: str) -> jax.Array:
  """x0 implied by the network output at (x_t, t)."""
  _check_prediction(prediction)
  n = x_t.ndim
  if prediction == "eps":
    return (_at(schedule.sqrt_recip_alphas_cumprod, t, n) * x_t
            - _at(schedule.sqrt_recipm1_alphas_cumprod, t, n) * model_out)
  return (_at(schedule.sqrt_alphas_cumprod, t, n) * x_t
          - _at(schedule.sqrt_one_minus_alphas_cumprod, t, n) * model_out)


def predict_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_out: jax.Array,
                prediction: str) -> jax.Array:
  """Noise implied by the network output at (x_t, t)."""
  _check_prediction(prediction)
  if prediction == "eps":
    return model_out
  n = x_t.ndim
  return (_at(schedule.sqrt_one_minus_alphas_cumprod, t, n) * x_t
          + _at(schedule.sqrt_alphas_cumprod, t, n) * model_out)


def eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """Noise consistent with x_t and a (possibly clipped) x0 estimate."""
  # (x_t - sqrt(abar) x0) / sqrt(1 - abar): no 1/sqrt(abar) blow-up near t = T-1.
  n = x_t.ndim
  return ((x_t - _at(schedule.sqrt_alphas_cumprod, t, n) * x0)
          / _at(schedule.sqrt_one_minus_alphas_cumprod, t, n))


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
  n = x_t.ndim
  mean = (_at(schedule.posterior_mean_coef1, t, n) * x0
          + _at(schedule.posterior_mean_coef2, t, n) * x_t)
  var = _at(schedule.posterior_variance, t, n)
  log_var = _at(schedule.posterior_log_variance_clipped, t, n)
  return mean, var, log_var


def diffusion_loss(apply_fn: ApplyFn, params: Any, batch: Mapping[str, jax.Array],
                   rng: jax.Array, schedule: Schedule, *, prediction: str,
                   mask_weight: float, train: bool = True
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted MSE between the network output and the `prediction` target at a random t.

  Args:
    apply_fn: called as `apply_fn(params, x_t, t, cond, train=train, rngs={'dropout': key})`.
    params: the variables passed to `apply_fn` (e.g. {'params': ...}).
    batch: image [B,H,W,1] in [-1,1], mask [B,H,W,1] in {0,1}, cond [B,H,W,C].
    rng: key for t, the noise and dropout.
    schedule: the noise schedule.
    prediction: 'eps' or 'v' (config.diffusion.prediction).
    mask_weight: pixel weight is 1 + mask_weight * mask; the loss is divided by mean(w)
      (config.diffusion.mask_weight).
    train: passed to the model (dropout on/off).

  Returns:
    (loss, aux) with aux = {'loss', 'mse' (unweighted), 'mse_mask' (inside the mask)}.
  """
  t_key, noise_key, dropout_key = jax.random.split(rng, 3)
  image = batch["image"]
  t = jax.random.randint(t_key, image.shape[:1], 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, image.shape, jnp.float32)
  return loss_at(apply_fn, params, batch, t, noise, dropout_key, schedule,
                 prediction=prediction, mask_weight=mask_weight, train=train)


def loss_at(apply_fn: ApplyFn, params: Any, batch: Mapping[str, jax.Array], t: jax.Array,
            noise: jax.Array, dropout_key: jax.Array, schedule: Schedule, *,
            prediction: str, mask_weight: float, train: bool = True,
            weight_mean: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`diffusion_loss` at given timesteps `t` [B] and `noise` (callers that draw per example).

  `weight_mean`: the normaliser of the weighted MSE (default: this batch's mean(w)). Data-
  parallel callers pass the mean of w over the global batch, so that the average of the
  per-device losses equals the loss of the whole batch however it is split.
  """
  _check_prediction(prediction)
  image, mask, cond = batch["image"], batch["mask"], batch["cond"]
  x_t = q_sample(schedule, image, t, noise)
  out = apply_fn(params, x_t, t, cond, train=train, rngs={"dropout": dropout_key})
  sq_err = jnp.square(out.astype(jnp.float32) - target(schedule, image, t, noise, prediction))
  mask = mask.astype(jnp.float32)
  w = 1.0 + mask_weight * mask
  loss = jnp.mean(w * sq_err) / (jnp.mean(w) if weight_mean is None else weight_mean)
  mse_mask = jnp.sum(mask * sq_err) / jnp.maximum(jnp.sum(mask), 1.0)
  return loss, {"loss": loss, "mse": jnp.mean(sq_err), "mse_mask": mse_mask}
