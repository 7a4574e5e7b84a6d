"""Jitted inpainting samplers (DDPM ancestral and DDIM) for the conditional diffusion UNet.

`sample` is a plain per-device function of a local batch: the whole reverse process is one
`lax.fori_loop`, so under `jax.jit` (see `make_sampler`) it compiles once and the network is
traced once whatever the number of steps. To run on several devices, map it with
`shard_map`/`pmap` and fold the device index into `rng` before the call.

Inpainting: the network sees `batch['cond']` (masked image + mask) at every step. With
`repaint=True` the known region (mask == 0) of x_t is also overwritten at every step by the
original image noised to that level (RePaint, Lugmayr et al. 2022), and `resample` > 1 re-noises
each step's output back to its input level and denoises it again `resample - 1` extra times.
Finally the known region is pasted back, so outside the mask the output is the input, bit for
bit.

The model is called as `apply_fn(variables, x_t, t [B] int32, cond, train=False)`.

`rng` is one key for the batch, or [B] keys, one per example: with per-example keys (derived
from each slice's global index, see training/tasks) every example's noise is its own, so the
output does not depend on the batch size or the device count.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ctdiff_jax.diffusion import schedule as schedule_lib

SAMPLERS = ("ddim", "ddpm")


def timestep_sequence(num_timesteps: int, sampler: str, num_steps: int) -> np.ndarray:
  """Descending timesteps visited: all T for DDPM, `num_steps` evenly spread for DDIM.

  DDIM's sequence always starts at T-1 (pure noise) and ends at 0.
  """
  if sampler == "ddpm":
    return np.arange(num_timesteps - 1, -1, -1, dtype=np.int32)
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"sample: num_steps must be in [1, {num_timesteps}], got {num_steps}")
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  # Spacing >= 1, so rounding keeps the steps distinct.
  ts = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)
  return ts[::-1].copy()


def _validate(schedule: schedule_lib.Schedule, sampler: str, num_steps: int, eta: float,
              prediction: str, repaint: bool, resample: int) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"sample: unknown sampler {sampler!r}, expected one of {SAMPLERS}")
  if prediction not in schedule_lib.PREDICTIONS:
    raise ValueError(f"sample: unknown prediction {prediction!r}, "
                     f"expected one of {schedule_lib.PREDICTIONS}")
  if eta < 0:
    raise ValueError(f"sample: eta must be >= 0, got {eta}")
  if resample < 1:
    raise ValueError(f"sample: resample must be >= 1, got {resample}")
  if resample > 1 and not repaint:
    raise ValueError("sample: resample > 1 only makes sense with repaint=True")
  timestep_sequence(schedule.num_timesteps, sampler, num_steps)


def _check_batch(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(image float32, mask, cond) of `batch`, with clear errors for missing keys or shapes."""
  for key in ("image", "mask", "cond"):
    if key not in batch:
      raise ValueError(f"sample: batch lacks {key!r} (has {sorted(batch)})")
  image = jnp.asarray(batch["image"], jnp.float32)
  mask = jnp.asarray(batch["mask"])
  if image.ndim != 4 or image.shape[-1] != 1:
    raise ValueError(f"sample: image must be [B,H,W,1], got {image.shape}")
  if mask.shape != image.shape:
    raise ValueError(f"sample: mask shape {mask.shape} != image shape {image.shape}")
  return image, mask, batch["cond"]


def _split(key: jax.Array, n: int) -> tuple[jax.Array, ...]:
  """`jax.random.split` of one key, or of each of [B] per-example keys (then [B] each)."""
  if key.ndim == 0:
    return tuple(jax.random.split(key, n))
  keys = jax.vmap(lambda k: jax.random.split(k, n))(key)
  return tuple(keys[:, i] for i in range(n))


def _fold_in(key: jax.Array, i) -> jax.Array:
  if key.ndim == 0:
    return jax.random.fold_in(key, i)
  return jax.vmap(lambda k: jax.random.fold_in(k, i))(key)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """N(0, I) of `shape` [B, ...]: from one key, or per example from [B] keys."""
  if key.ndim == 0:
    return jax.random.normal(key, shape, jnp.float32)
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(key)


def _abar_at(schedule: schedule_lib.Schedule, t: jax.Array) -> jax.Array:
  """alpha-bar at t, with abar(-1) = 1 for the final step to x0."""
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def _denoise(model_out: jax.Array, schedule: schedule_lib.Schedule, x: jax.Array, t: jax.Array,
             t_prev: jax.Array, z: jax.Array, *, sampler: str, eta: float, prediction: str,
             clip_x0: bool) -> jax.Array:
  """One reverse step x_t -> x_{t_prev} from the network output at (x, t); `z` ~ N(0, I)."""
  tb = jnp.full(x.shape[:1], t, jnp.int32)
  x0 = schedule_lib.predict_x0(schedule, x, tb, model_out, prediction)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  if sampler == "ddpm":
    mean, _, log_var = schedule_lib.q_posterior(schedule, x0, x, tb)
    return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * z
  # DDIM (Song et al. 2021, eq. 12), with eps re-derived from the (clipped) x0.
  eps = schedule_lib.eps_from_x0(schedule, x, tb, x0)
  a, a_prev = _abar_at(schedule, t), _abar_at(schedule, t_prev)
  sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  dir_coef = jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0))
  return jnp.sqrt(a_prev) * x0 + dir_coef * eps + sigma * z


def sample(apply_fn: Callable[..., jax.Array], variables: Any, schedule: schedule_lib.Schedule,
           batch: Mapping[str, jax.Array], rng: jax.Array, *, sampler: str, num_steps: int,
           eta: float, prediction: str, repaint: bool, resample: int,
           clip_x0: bool = True) -> jax.Array:
  """Inpaints `batch['image']` inside `batch['mask']`; returns x0 [B,H,W,1] float32.

  Args:
    apply_fn: the model, `apply_fn(variables, x_t, t, cond, train=False)`.
    variables: model variables.
    schedule: the noise schedule the model was trained with.
    batch: image [B,H,W,1] in [-1,1], mask [B,H,W,1] (1 = generate), cond [B,H,W,C].
    rng: one key, or [B] per-example keys; the same keys give the same output.
    sampler / num_steps / eta / repaint / resample: config.sampling (configs/default.py):
      'ddim' (strided, `num_steps` steps, stochasticity `eta`) or 'ddpm' (ancestral, all T
      steps; `num_steps` and `eta` are ignored); RePaint known-region overwrite and jumps per
      step (resample > 1 needs repaint=True).
    prediction: what the model outputs, 'eps' or 'v' (config.diffusion.prediction).
    clip_x0: clip each x0 estimate to [-1, 1].

  All keyword arguments are static: wrap with `make_sampler` (or jit with them bound).
  """
  _validate(schedule, sampler, num_steps, eta, prediction, repaint, resample)
  image, mask, cond = _check_batch(batch)
  generate = mask > 0.5
  ts_np = timestep_sequence(schedule.num_timesteps, sampler, num_steps)
  ts = jnp.asarray(ts_np)
  ts_prev = jnp.asarray(np.append(ts_np[1:], -1).astype(np.int32))
  step_opts = dict(sampler=sampler, eta=eta, prediction=prediction, clip_x0=clip_x0)

  def jump(t, t_prev, key, x):
    """One RePaint jump at level t: overwrite the known region, denoise, maybe re-noise."""
    known_key, denoise_key, renoise_key = _split(key, 3)
    tb = jnp.full(image.shape[:1], t, jnp.int32)
    if repaint:
      noise = _normal(known_key, x.shape)
      x = jnp.where(generate, x, schedule_lib.q_sample(schedule, image, tb, noise))
    out = apply_fn(variables, x, tb, cond, train=False).astype(jnp.float32)
    z = _normal(denoise_key, x.shape)
    x_prev = _denoise(out, schedule, x, t, t_prev, z, **step_opts)
    # Back from level t_prev to t: q(x_t | x_{t_prev}) has this mean and variance.
    ratio = _abar_at(schedule, t) / _abar_at(schedule, t_prev)
    noise = _normal(renoise_key, x.shape)
    return x_prev, jnp.sqrt(ratio) * x_prev + jnp.sqrt(1 - ratio) * noise

  def step(i: jax.Array, x: jax.Array) -> jax.Array:
    step_key = _fold_in(loop_key, i)
    if resample == 1:
      return jump(ts[i], ts_prev[i], _fold_in(step_key, 0), x)[0]

    def body(u, x):
      x_prev, x_back = jump(ts[i], ts_prev[i], _fold_in(step_key, u), x)
      return jnp.where(u < resample - 1, x_back, x_prev)

    return jax.lax.fori_loop(0, resample, body, x)

  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # Raw uint32 key data.
  if rng.ndim not in (0, 1) or (rng.ndim == 1 and rng.shape[0] != image.shape[0]):
    raise ValueError(f"sample: rng must be one key or [B={image.shape[0]}] keys, "
                     f"got shape {rng.shape}")
  init_key, loop_key = _split(rng, 2)
  x = _normal(init_key, image.shape)
  x = jax.lax.fori_loop(0, len(ts_np), step, x)
  return jnp.where(generate, x, image)


def make_sampler(apply_fn: Callable[..., jax.Array], schedule: schedule_lib.Schedule, *,
                 sampler: str, num_steps: int, eta: float, prediction: str, repaint: bool,
                 resample: int, clip_x0: bool = True
                 ) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array]:
  """Jitted `fn(variables, batch, rng) -> x0` with the keyword options of `sample` bound."""
  opts = dict(sampler=sampler, num_steps=num_steps, eta=eta, prediction=prediction,
              repaint=repaint, resample=resample)
  _validate(schedule, **opts)  # fail here, not at the first call

  def run(variables: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> jax.Array:
    return sample(apply_fn, variables, schedule, batch, rng, clip_x0=clip_x0, **opts)

  return jax.jit(run)
