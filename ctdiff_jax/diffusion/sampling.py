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


def sample(apply_fn: Callable[..., jax.Array], variables: Any, schedule: schedule_lib.Schedule,
           batch: Mapping[str, jax.Array], rng: jax.Array, *, sampler: str = "ddim",
           num_steps: int = 50, eta: float = 0.0, prediction: str = "eps",
           repaint: bool = False, resample: int = 1, clip_x0: bool = True) -> jax.Array:
  """Inpaints `batch['image']` inside `batch['mask']`; returns x0 [B,H,W,1] float32.

  Args:
    apply_fn: the model, `apply_fn(variables, x_t, t, cond, train=False)`.
    variables: model variables.
    schedule: the noise schedule the model was trained with.
    batch: image [B,H,W,1] in [-1,1], mask [B,H,W,1] (1 = generate), cond [B,H,W,C].
    rng: key; the same key gives the same output.
    sampler: 'ddim' (strided, `num_steps` steps) or 'ddpm' (ancestral, all T steps;
      `num_steps` and `eta` are ignored).
    num_steps: DDIM steps.
    eta: DDIM stochasticity (0 = deterministic given the initial noise, 1 = DDPM-like).
    prediction: what the model outputs, 'eps' or 'v'.
    repaint: overwrite the known region of x_t with the noised original at each step.
    resample: RePaint jumps per step (needs repaint=True).
    clip_x0: clip each x0 estimate to [-1, 1].

  All keyword arguments are static: wrap with `make_sampler` (or jit with them bound).
  """
  _validate(schedule, sampler, num_steps, eta, prediction, repaint, resample)
  for key in ("image", "mask", "cond"):
    if key not in batch:
      raise ValueError(f"sample: batch lacks {key!r} (has {sorted(batch)})")
  image = jnp.asarray(batch["image"], jnp.float32)
  mask = jnp.asarray(batch["mask"])
  cond = batch["cond"]
  if image.ndim != 4 or image.shape[-1] != 1:
    raise ValueError(f"sample: image must be [B,H,W,1], got {image.shape}")
  if mask.shape != image.shape:
    raise ValueError(f"sample: mask shape {mask.shape} != image shape {image.shape}")
  generate = mask > 0.5

  ts_np = timestep_sequence(schedule.num_timesteps, sampler, num_steps)
  ts = jnp.asarray(ts_np)
  ts_prev = jnp.asarray(np.append(ts_np[1:], -1).astype(np.int32))
  batch_size = image.shape[0]

  def abar_at(t: jax.Array) -> jax.Array:
    # alpha-bar at t, with abar(-1) = 1 for the final step to x0.
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)

  def denoise(x: jax.Array, t: jax.Array, t_prev: jax.Array, key: jax.Array) -> jax.Array:
    tb = jnp.full((batch_size,), t, jnp.int32)
    out = apply_fn(variables, x, tb, cond, train=False).astype(jnp.float32)
    x0 = schedule_lib.predict_x0(schedule, x, tb, out, prediction)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    z = jax.random.normal(key, x.shape, jnp.float32)
    if sampler == "ddpm":
      mean, _, log_var = schedule_lib.q_posterior(schedule, x0, x, tb)
      return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * z
    # DDIM (Song et al. 2021, eq. 12), with eps re-derived from the (clipped) x0.
    eps = schedule_lib.eps_from_x0(schedule, x, tb, x0)
    a, a_prev = abar_at(t), abar_at(t_prev)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    dir_coef = jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0))
    return jnp.sqrt(a_prev) * x0 + dir_coef * eps + sigma * z

  init_key, loop_key = jax.random.split(rng)
  x = jax.random.normal(init_key, image.shape, jnp.float32)

  def step(i: jax.Array, x: jax.Array) -> jax.Array:
    t, t_prev = ts[i], ts_prev[i]
    step_key = jax.random.fold_in(loop_key, i)

    def jump(u: jax.Array, x: jax.Array) -> jax.Array:
      known_key, denoise_key, renoise_key = jax.random.split(jax.random.fold_in(step_key, u), 3)
      if repaint:
        noise = jax.random.normal(known_key, x.shape, jnp.float32)
        tb = jnp.full((batch_size,), t, jnp.int32)
        x = jnp.where(generate, x, schedule_lib.q_sample(schedule, image, tb, noise))
      x_prev = denoise(x, t, t_prev, denoise_key)
      if resample > 1:
        # Back from level t_prev to t: q(x_t | x_{t_prev}) has this mean and variance.
        ratio = abar_at(t) / abar_at(t_prev)
        noise = jax.random.normal(renoise_key, x.shape, jnp.float32)
        x_back = jnp.sqrt(ratio) * x_prev + jnp.sqrt(1 - ratio) * noise
        x_prev = jnp.where(u < resample - 1, x_back, x_prev)
      return x_prev

    if resample == 1:
      return jump(jnp.int32(0), x)
    return jax.lax.fori_loop(0, resample, jump, x)

  x = jax.lax.fori_loop(0, len(ts_np), step, x)
  return jnp.where(generate, x, image)


def make_sampler(apply_fn: Callable[..., jax.Array], schedule: schedule_lib.Schedule,
                 **static: Any) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array]:
  """Jitted `fn(variables, batch, rng) -> x0` with the keyword options of `sample` bound."""
  unknown = set(static) - {"sampler", "num_steps", "eta", "prediction", "repaint", "resample",
                           "clip_x0"}
  if unknown:
    raise ValueError(f"make_sampler: unknown options {sorted(unknown)}")
  defaults = dict(sampler="ddim", num_steps=50, eta=0.0, prediction="eps", repaint=False,
                  resample=1)
  opts = {**defaults, **{k: v for k, v in static.items() if k != "clip_x0"}}
  _validate(schedule, **opts)  # fail here, not at the first call

  def run(variables: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> jax.Array:
    return sample(apply_fn, variables, schedule, batch, rng, **static)

  return jax.jit(run)
