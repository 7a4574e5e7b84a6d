"""The conditional diffusion task: UNet init, the per-device train step, jitted inpainting.

Randomness is drawn per example from `fold_in(fold_in(seed_key, step), global_example_index)`,
so timesteps and noise do not depend on how the global batch is split over devices: the
1-device and N-device steps see the same numbers (with dropout 0; dropout keys are per device).
"""

from __future__ import annotations

from typing import Any

from clu import metrics as clu_metrics
import jax
from jax import lax
import jax.numpy as jnp

from ctdiff_jax.diffusion import sampling
from ctdiff_jax.diffusion import schedule as schedule_lib
from ctdiff_jax.models import unet
from ctdiff_jax.training import parallel
from ctdiff_jax.training import train_state as ts
from ctdiff_jax.training.tasks import base

NET = "unet"


DiffusionMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    mse_mask=clu_metrics.Average.from_output("mse_mask"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"))


class DiffusionTask(base.Task):
  """Diffusion inpainting: predicts eps (or v) of the noisy slice given [masked image, mask]."""

  nets = (NET,)
  metrics_collection = DiffusionMetrics

  def __init__(self, config, cond_channels: int):
    super().__init__(config, cond_channels)
    self.model = unet.create_model(config.model)
    self.schedule = schedule_lib.make_schedule(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    self.tx, self.lr = ts.make_optimizer(config.optim, config.num_train_steps)

  # --- state -------------------------------------------------------------------------------
  def init_params(self, key: jax.Array) -> Any:
    return unet.init_variables(self.model, key, image_size=self.config.image_size,
                               cond_channels=self.cond_channels)["params"]

  def init_state(self, key: jax.Array) -> ts.TrainState:
    params = self.init_params(key)
    return ts.TrainState(step=jnp.zeros((), jnp.int32), nets={NET: ts.init_net(params, self.tx)})

  def sampling_variables(self, state: ts.TrainState) -> dict[str, Any]:
    """EMA params: what generation uses."""
    return {"params": state.nets[NET].ema_params}

  def apply(self, variables, x_t, t, cond, train=False, rngs=None):
    return self.model.apply(variables, x_t, t, cond, train=train, rngs=rngs)

  # --- training ----------------------------------------------------------------------------
  def train_step(self, state: ts.TrainState, batch: dict[str, jax.Array], key_data: jax.Array,
                 learning_rate: jax.Array | None = None
                 ) -> tuple[ts.TrainState, dict[str, jax.Array]]:
    """Per-device step; `key_data` is the run's base key (raw uint32), same on every device.

    `learning_rate`: this step's LR, traced (the trainer passes the schedule's value); None
    evaluates the schedule inside the step.
    """
    lr = self.lr(state.step) if learning_rate is None else learning_rate
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), state.step)
    bsz = batch["image"].shape[0]
    keys = parallel.example_keys(key, bsz)
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                              self.schedule.num_timesteps))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1),
                                                 batch["image"].shape[1:]))(keys)
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, 2**30),
                                     lax.axis_index(parallel.AXIS))
    net = state.nets[NET]
    dcfg = self.config.diffusion
    # Global mean pixel weight: the pmean of per-device losses is then the global batch loss.
    weight_mean = lax.pmean(jnp.mean(1.0 + dcfg.mask_weight * batch["mask"]), parallel.AXIS)

    def loss_fn(params):
      return schedule_lib.loss_at(self.model.apply, {"params": params}, batch, t, noise, dropout_key,
                               self.schedule, prediction=dcfg.prediction,
                               mask_weight=dcfg.mask_weight, train=True,
                               weight_mean=weight_mean)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(net.params)
    loss = lax.pmean(loss, parallel.AXIS)
    mse_mask = lax.pmean(aux["mse_mask"], parallel.AXIS)
    # A non-finite step leaves the state untouched; the host aborts when it sees the flag.
    new_net, grad_norm, finite = ts.update_net(net, grads, self.tx, self.config.optim.ema_decay,
                                               ok=jnp.isfinite(loss), step=state.step,
                                               learning_rate=lr)
    metrics = {"loss": loss, "grad_norm": grad_norm, "mse_mask": mse_mask,
               "learning_rate": jnp.asarray(lr, jnp.float32), "finite": finite}
    return ts.TrainState(step=state.step + 1, nets={NET: new_net}), metrics

  # --- generation --------------------------------------------------------------------------
  def generate_options(self, num_steps: int | None = None,
                       sampler: str | None = None) -> dict[str, Any]:
    scfg = self.config.sampling
    return {"num_steps": int(num_steps or scfg.num_steps), "sampler": sampler or scfg.sampler}

  def sampler_info(self, num_steps: int | None = None,
                   sampler: str | None = None) -> dict[str, Any]:
    opts = self.generate_options(num_steps, sampler)
    return {"sampler": opts["sampler"], "steps": opts["num_steps"]}

  def generate(self, variables, batch: dict[str, jax.Array], key_data: jax.Array, *,
               num_steps: int | None = None, sampler: str | None = None) -> jax.Array:
    """Per-device inpainting of `batch` (image, mask, cond); returns [B, H, W, 1] in [-1, 1].

    `num_steps` / `sampler` override config.sampling (None = the config's).
    """
    scfg = self.config.sampling
    opts = self.generate_options(num_steps, sampler)
    keys = base.generation_keys(key_data, batch)  # Per example: device/batch-size invariant.
    return sampling.sample(
        self.apply, variables, self.schedule, batch, keys,
        sampler=opts["sampler"], num_steps=opts["num_steps"], eta=scfg.eta,
        prediction=self.config.diffusion.prediction, repaint=scfg.repaint,
        resample=scfg.resample)
