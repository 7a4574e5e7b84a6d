"""The Pix2Pix GAN baseline task: U-Net generator + PatchGAN, one D-then-G step per device.

Same interface and conditioning as the diffusion task (`cond` = [masked image, mask, ...]);
the generator produces the full slice and everything outside the mask is pasted back from the
input, `composite = where(mask > 0.5, gen, image)`, at generation AND in the losses:

  * L1 (weight `l1_weight`, 100) is the mean |composite - image| over the mask pixels of each
    example, averaged over examples. The composite equals the image outside the mask, so an L1
    over the full image would only be scaled down by the (small, varying) mask fraction.
  * The discriminator sees (cond, image) vs (cond, composite): the fake differs from the real
    only where the model had to invent pixels, as in the generated slices we export.

One `train_step` = the reference order: G forward (one dropout sample), D update on the
detached fake, then G update against the updated D with the same fake (one G forward, pulled
back with `jax.vjp`). Gradients are pmean'd over `parallel.AXIS`; a non-finite loss or
gradient leaves both networks untouched and sets `finite` False (the trainer aborts).

Device-split invariance: instance norm (no cross-example statistics) and dropout masks drawn
per example from `fold_in(fold_in(run_key, step), global_example_index)`, so the N-device step
equals the 1-device step on the same global batch, dropout included (norm="batch" breaks this).

Generation uses the raw generator params (Pix2Pix has no EMA; the EMA is kept in the state for
comparison) and, by default, dropout as the noise source like the paper
(`dropout_at_generation`); with it off, generation is deterministic.
"""

from __future__ import annotations

from typing import Any

from clu import metrics as clu_metrics
import jax
from jax import lax
import jax.numpy as jnp
import optax

from ctdiff_jax.models import pix2pix
from ctdiff_jax.training import parallel
from ctdiff_jax.training import train_state as ts
from ctdiff_jax.training.tasks import base

GEN = "generator"
DISC = "discriminator"
GAN_LOSSES = ("vanilla", "lsgan")
_GEN_SALT = 2**30  # Separates generation dropout keys from the training ones.


def learning_rate_schedule(lr: float, num_train_steps: int,
                           decay_fraction: float = 0.5) -> optax.Schedule:
  """Pix2Pix schedule: `lr` for the first steps, then linear to 0 at `num_train_steps`."""
  if not 0.0 <= decay_fraction <= 1.0:
    raise ValueError(f"pix2pix.lr_decay_fraction must be in [0, 1], got {decay_fraction}")
  num_train_steps = max(int(num_train_steps), 1)
  decay_steps = int(round(num_train_steps * decay_fraction))
  constant_steps = num_train_steps - decay_steps
  if decay_steps == 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
      [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay_steps)],
      [constant_steps])


def make_optimizer(pcfg, num_train_steps: int) -> tuple[optax.GradientTransformation,
                                                        optax.Schedule]:
  """Adam(lr, b1=0.5, b2=0.999), no clipping or weight decay (one instance per network).

  Flattened (moments are one vector per network): one fused update instead of one per leaf,
  which cuts the step's compile time on CPU by about a quarter; same numbers.
  """
  lr = learning_rate_schedule(pcfg.lr, num_train_steps, pcfg.lr_decay_fraction)
  # optax.adam with the scheduled LR replaced by the traced one (same state tree).
  adam = optax.chain(optax.scale_by_adam(b1=pcfg.b1, b2=pcfg.b2), ts.scale_by_traced_lr())
  return optax.flatten(adam), lr


def gan_loss(logits: jax.Array, real: bool, kind: str) -> jax.Array:
  """Mean GAN loss of patch logits against the all-real (or all-fake) target."""
  target = jnp.ones_like(logits) if real else jnp.zeros_like(logits)
  if kind == "vanilla":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  if kind == "lsgan":
    return jnp.mean(jnp.square(logits - target))
  raise ValueError(f"pix2pix.gan_loss must be one of {GAN_LOSSES}, got {kind!r}")


def d_score(logits: jax.Array, kind: str) -> jax.Array:
  """Mean discriminator output: P(real) for vanilla, the raw score for LSGAN."""
  return jnp.mean(jax.nn.sigmoid(logits) if kind == "vanilla" else logits)


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean |pred - target| over each example's mask pixels, averaged over examples."""
  m = (mask > 0.5).astype(jnp.float32)
  err = jnp.sum(m * jnp.abs(pred - target), axis=(1, 2, 3))
  return jnp.mean(err / jnp.maximum(jnp.sum(m, axis=(1, 2, 3)), 1.0))


def paste(gen: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Generated pixels inside the mask, the input slice outside (bit for bit)."""
  return jnp.where(batch["mask"] > 0.5, gen, batch["image"])


# Built with `create`: a class body's annotations are strings under `from __future__ import
# annotations`, which clu cannot turn into metrics.
Pix2PixMetrics = clu_metrics.Collection.create(
    g_loss=clu_metrics.Average.from_output("g_loss"),
    g_gan=clu_metrics.Average.from_output("g_gan"),
    g_l1=clu_metrics.Average.from_output("g_l1"),
    d_loss=clu_metrics.Average.from_output("d_loss"),
    d_real=clu_metrics.Average.from_output("d_real"),
    d_fake=clu_metrics.Average.from_output("d_fake"),
    g_grad_norm=clu_metrics.Average.from_output("g_grad_norm"),
    d_grad_norm=clu_metrics.Average.from_output("d_grad_norm"),
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"))


class Pix2PixTask(base.OneShotTask):
  """Pix2Pix inpainting: G(cond) -> slice, PatchGAN D on (cond, slice), GAN + lambda * L1."""

  nets = (GEN, DISC)
  metrics_collection = Pix2PixMetrics

  def __init__(self, config, cond_channels: int):
    super().__init__(config, cond_channels)
    pcfg = config.pix2pix
    if pcfg.gan_loss not in GAN_LOSSES:
      raise ValueError(f"pix2pix.gan_loss must be one of {GAN_LOSSES}, got {pcfg.gan_loss!r}")
    if pcfg.norm not in pix2pix.NORMS:
      raise ValueError(f"pix2pix.norm must be one of {pix2pix.NORMS}, got {pcfg.norm!r}")
    size = int(config.image_size)
    if pix2pix.patch_grid_size(size, pcfg.disc_layers) < 1:
      raise ValueError(f"image_size {size} is too small for a PatchGAN with "
                       f"{pcfg.disc_layers} stride-2 layers")
    num_downs = pcfg.num_downs or pix2pix.num_downsamplings(size)
    if size % 2**num_downs:
      raise ValueError(f"pix2pix.num_downs={num_downs} needs image_size divisible by "
                       f"{2**num_downs}, got {size}")
    self.generator = pix2pix.UNetGenerator(
        num_downs=num_downs, base_filters=pcfg.base_filters, out_channels=1, norm=pcfg.norm,
        dropout_rate=pcfg.dropout, dropout_blocks=pcfg.dropout_blocks)
    self.discriminator = pix2pix.PatchDiscriminator(
        base_filters=pcfg.base_filters, norm=pcfg.norm, n_layers=pcfg.disc_layers)
    self.tx, self.lr = make_optimizer(pcfg, config.num_train_steps)

  # --- state -------------------------------------------------------------------------------
  def init_params(self, key: jax.Array) -> dict[str, Any]:
    size = self.config.image_size
    cond = jnp.zeros((1, size, size, self.cond_channels), jnp.float32)
    image = jnp.zeros((1, size, size, 1), jnp.float32)
    g_key, d_key = jax.random.split(key)
    return {GEN: self.generator.init(g_key, cond)["params"],
            DISC: self.discriminator.init(d_key, cond, image)["params"]}

  def init_state(self, key: jax.Array) -> ts.TrainState:
    params = self.init_params(key)
    return ts.TrainState(step=jnp.zeros((), jnp.int32),
                         nets={name: ts.init_net(params[name], self.tx) for name in self.nets})

  def sampling_variables(self, state: ts.TrainState) -> dict[str, Any]:
    """Raw generator params (standard Pix2Pix; the EMA is not used)."""
    return {"params": state.nets[GEN].params}

  def apply_generator(self, variables, cond, dropout_keys=None):
    return self.generator.apply(variables, cond, dropout_keys=dropout_keys)

  def apply_discriminator(self, variables, cond, image):
    return self.discriminator.apply(variables, cond, image)

  # --- training ----------------------------------------------------------------------------
  def train_step(self, state: ts.TrainState, batch: dict[str, jax.Array], key_data: jax.Array,
                 learning_rate: jax.Array | None = None
                 ) -> tuple[ts.TrainState, dict[str, jax.Array]]:
    """Per-device D-then-G step; `key_data` is the run's base key (raw uint32), same everywhere.

    `learning_rate`: this step's LR of both networks, traced (None: the schedule's).
    """
    pcfg = self.config.pix2pix
    lr = self.lr(state.step) if learning_rate is None else learning_rate
    upd = dict(step=state.step, learning_rate=lr)
    kind = pcfg.gan_loss
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), state.step)
    keys = parallel.example_keys(key, batch["image"].shape[0]) if pcfg.dropout > 0 else None
    g_net, d_net = state.nets[GEN], state.nets[DISC]
    cond, image = batch["cond"], batch["image"]

    # One generator forward (one dropout sample) shared by the D and G updates.
    gen, g_vjp = jax.vjp(lambda p: self.apply_generator({"params": p}, cond, keys),
                         g_net.params)
    fake = lax.stop_gradient(paste(gen, batch))

    def d_objective(d_params):
      real_logits = self.apply_discriminator({"params": d_params}, cond, image)
      fake_logits = self.apply_discriminator({"params": d_params}, cond, fake)
      loss = 0.5 * (gan_loss(real_logits, True, kind) + gan_loss(fake_logits, False, kind))
      return loss, (d_score(real_logits, kind), d_score(fake_logits, kind))

    (d_loss, (d_real, d_fake)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(
        d_net.params)
    new_d, d_grad_norm, d_finite = ts.update_net(d_net, d_grads, self.tx, pcfg.ema_decay, **upd)

    def g_objective(gen):
      composite = paste(gen, batch)
      logits = self.apply_discriminator({"params": new_d.params}, cond, composite)
      g_gan = gan_loss(logits, True, kind)
      g_l1 = masked_l1(composite, image, batch["mask"])
      return g_gan + pcfg.l1_weight * g_l1, (g_gan, g_l1)

    (g_loss, (g_gan, g_l1)), d_gen = jax.value_and_grad(g_objective, has_aux=True)(gen)
    (g_grads,) = g_vjp(d_gen)
    new_g, g_grad_norm, g_finite = ts.update_net(g_net, g_grads, self.tx, pcfg.ema_decay, **upd)

    scalars = lax.pmean({"g_loss": g_loss, "g_gan": g_gan, "g_l1": g_l1, "d_loss": d_loss,
                         "d_real": d_real, "d_fake": d_fake}, parallel.AXIS)
    finite = jnp.all(jnp.isfinite(jnp.stack(list(scalars.values())))) & g_finite & d_finite
    # A non-finite step leaves both networks untouched; the host aborts when it sees the flag.
    new_nets = jax.tree.map(lambda a, b: jnp.where(finite, a, b),
                            {GEN: new_g, DISC: new_d}, {GEN: g_net, DISC: d_net})
    metrics = dict(scalars, loss=scalars["g_loss"],  # `loss`: what the trainer's abort names.
                   g_grad_norm=g_grad_norm, d_grad_norm=d_grad_norm,
                   learning_rate=jnp.asarray(lr, jnp.float32), finite=finite)
    return ts.TrainState(step=state.step + 1, nets=new_nets), metrics

  # --- generation --------------------------------------------------------------------------

  def generate(self, variables, batch: dict[str, jax.Array],
               key_data: jax.Array) -> jax.Array:
    """Per-device inpainting of `batch`; returns [B, H, W, 1] in [-1, 1], input outside mask."""
    pcfg = self.config.pix2pix
    keys = None
    if pcfg.dropout_at_generation and pcfg.dropout > 0:
      keys = base.generation_keys(key_data, batch)
      keys = jax.vmap(lambda k: jax.random.fold_in(k, _GEN_SALT))(keys)
    gen = self.apply_generator(variables, batch["cond"], keys)
    return paste(gen, batch).astype(jnp.float32)
