"""The segmentation task: a small UNet (models/segmentation.py) trained on slices' label maps.

Used by the downstream test (ctdiff_jax/evaluation/downstream.py): the same trainer, data
pipeline and checkpoints as the generative families, with `config.model_family =
"segmentation"`. Input is the batch's `image` only (the inpainting `cond` and `mask` are
ignored); the target is `labels` (uint8 ids, 0 = background, 1..K, K + 1 =
`config.segmentation.num_classes`).

Loss = cross-entropy + (1 - soft Dice averaged over the foreground classes): the Dice term
keeps small classes (tumours: a few dozen pixels of a 64 px slice) from being drowned by the
background in the cross-entropy. Deterministic (no dropout), so a seed fixes the run.

`generate` returns the predicted label map scaled to [-1, 1] (what the trainer's sample grids
show); `predict` gives the logits.
"""

from __future__ import annotations

from typing import Any

from clu import metrics as clu_metrics
import jax
from jax import lax
import jax.numpy as jnp
import optax

from ctdiff_jax.models import segmentation
from ctdiff_jax.training import parallel
from ctdiff_jax.training import train_state as ts
from ctdiff_jax.training.tasks import base

NET = "segmenter"

SegmentationMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    ce=clu_metrics.Average.from_output("ce"),
    soft_dice=clu_metrics.Average.from_output("soft_dice"),
    grad_norm=clu_metrics.Average.from_output("grad_norm"),
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"))


def soft_dice(probs: jax.Array, onehot: jax.Array, eps: float = 1.0) -> jax.Array:
  """Mean soft Dice of the foreground classes (1..), pooled over the batch and pixels.

  `eps` makes a class absent from both target and prediction score ~1, not 0/0.
  """
  axes = tuple(range(probs.ndim - 1))
  inter = jnp.sum(probs * onehot, axis=axes)[1:]
  total = jnp.sum(probs, axis=axes)[1:] + jnp.sum(onehot, axis=axes)[1:]
  return jnp.mean((2.0 * inter + eps) / (total + eps))


def segmentation_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """(CE + 1 - soft Dice, {ce, soft_dice}); labels int [B, H, W], logits [B, H, W, C]."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  ce = jnp.mean(optax.softmax_cross_entropy(logits, onehot))
  dice = soft_dice(jax.nn.softmax(logits, axis=-1), onehot)
  return ce + 1.0 - dice, {"ce": ce, "soft_dice": dice}


class SegmentationTask(base.OneShotTask):
  """Per-pixel classification of CT slices; `generate` is the predicted label map."""

  nets = (NET,)
  metrics_collection = SegmentationMetrics

  def __init__(self, config, cond_channels: int):
    super().__init__(config, cond_channels)
    scfg = config.segmentation
    segmentation.check_size(int(config.image_size), scfg.channels)
    self.model = segmentation.create_model(scfg)
    self.num_classes = int(scfg.num_classes)
    self.tx, self.lr = ts.make_optimizer(config.optim, config.num_train_steps)

  # --- state -------------------------------------------------------------------------------
  def init_state(self, key: jax.Array) -> ts.TrainState:
    size = int(self.config.image_size)
    params = self.model.init(key, jnp.zeros((1, size, size, 1), jnp.float32))["params"]
    return ts.TrainState(step=jnp.zeros((), jnp.int32), nets={NET: ts.init_net(params, self.tx)})

  def sampling_variables(self, state: ts.TrainState) -> dict[str, Any]:
    """Raw params (short runs: the EMA lags behind)."""
    return {"params": state.nets[NET].params}

  def predict(self, variables, image: jax.Array) -> jax.Array:
    """Logits [B, H, W, num_classes] of images [B, H, W, 1] in [-1, 1]."""
    return self.model.apply(variables, image)

  # --- training ----------------------------------------------------------------------------
  def train_step(self, state: ts.TrainState, batch: dict[str, jax.Array], key_data: jax.Array,
                 learning_rate: jax.Array | None = None
                 ) -> tuple[ts.TrainState, dict[str, jax.Array]]:
    """Per-device step on (`image`, `labels`); `key_data` is unused (deterministic model)."""
    del key_data
    lr = self.lr(state.step) if learning_rate is None else learning_rate
    net = state.nets[NET]
    labels = batch["labels"][..., 0].astype(jnp.int32)

    def objective(params):
      return segmentation_loss(self.predict({"params": params}, batch["image"]), labels)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(net.params)
    scalars = lax.pmean({"loss": loss, **aux}, parallel.AXIS)
    new_net, grad_norm, finite = ts.update_net(
        net, grads, self.tx, self.config.optim.ema_decay, ok=jnp.isfinite(scalars["loss"]),
        step=state.step, learning_rate=lr)
    metrics = dict(scalars, grad_norm=grad_norm, finite=finite,
                   learning_rate=jnp.asarray(lr, jnp.float32))
    return ts.TrainState(step=state.step + 1, nets={NET: new_net}), metrics

  # --- "generation": the predicted label map -----------------------------------------------

  def generate(self, variables, batch: dict[str, jax.Array], key_data: jax.Array) -> jax.Array:
    """Per-device: the argmax label map as [B, H, W, 1] in [-1, 1] (sample grids)."""
    del key_data
    labels = jnp.argmax(self.predict(variables, batch["image"]), axis=-1)[..., None]
    return labels.astype(jnp.float32) / max(self.num_classes - 1, 1) * 2.0 - 1.0
