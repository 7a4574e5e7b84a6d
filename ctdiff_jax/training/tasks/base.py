"""The interface every model family implements: the trainer and `Inpainter` see only a `Task`.

Like google-research vdm's `Experiment`: one abstract class declares what the shared code calls,
so adding a family means subclassing `Task` and registering it in `tasks.TASKS`; nothing else
branches on `config.model_family`.

Per-device methods (`train_step`, `generate`) see their local slice of the batch, reduce with
`lax.pmean(..., parallel.AXIS)` and are mapped by `parallel.DataParallel.map`.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

from ctdiff_jax.training import parallel

# States are `train_state.TrainState`s; not imported here to keep the import graph shallow.
TrainState = Any
# Batch key of the examples' global indices at generation (inference.Inpainter sets it).
INDEX = "index"


def generation_keys(key_data: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Per-device: one key per local example, fold_in(key, the example's global index).

  The index is `batch['index']` (Inpainter: the slice's position in the whole request) or,
  without it, the position in the global batch (`parallel.example_keys`). Either way the noise
  of an example does not depend on the device count, and with `index`, not on the batch size.
  """
  key = jax.random.wrap_key_data(key_data)
  if INDEX not in batch:
    return parallel.example_keys(key, batch["image"].shape[0])
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(batch[INDEX], jnp.int32))


class Task(abc.ABC):
  """A model family: state init, the per-device train step, per-device generation."""

  nets: tuple[str, ...]  # Names of the networks in `TrainState.nets` (logged at start).
  metrics_collection: Any  # clu `metrics.Collection` type of `train_step`'s metrics.
  lr: Any  # The LR schedule, step -> learning rate (set by the subclass from the config).

  def __init__(self, config, cond_channels: int):
    self.config = config
    self.cond_channels = cond_channels

  @abc.abstractmethod
  def init_state(self, key: jax.Array) -> TrainState:
    """The initial state (step 0); pure, so `jax.eval_shape` gives the restore template."""

  @abc.abstractmethod
  def train_step(self, state: TrainState, batch: dict[str, jax.Array], key_data: jax.Array,
                 learning_rate: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """Per-device step -> (new state, metrics incl. `loss` and `finite`).

    `key_data` is the run's base key (raw uint32), the same on every device. `learning_rate`
    is this step's LR as a traced value (so a new num_train_steps does not recompile the
    step); None evaluates the task's schedule `self.lr` inside the step.
    """

  @abc.abstractmethod
  def sampling_variables(self, state: TrainState) -> dict[str, Any]:
    """The variables `generate` uses (e.g. EMA params)."""

  @abc.abstractmethod
  def generate(self, variables: dict[str, Any], batch: dict[str, jax.Array],
               key_data: jax.Array, **options: Any) -> jax.Array:
    """Per-device inpainting of `batch` -> [B, H, W, 1] in [-1, 1], the input outside the mask.

    `options` are exactly the keys `generate_options` returns (subclasses name them).
    """

  @abc.abstractmethod
  def generate_options(self, num_steps: int | None = None,
                       sampler: str | None = None) -> dict[str, Any]:
    """The keyword options of `generate`, resolved from the config and the CLI overrides.

    `num_steps` / `sampler` (the generate CLI's --steps / --sampler; None = the config's) only
    mean something to iterative samplers; families without one return {} and ignore them.
    """

  @abc.abstractmethod
  def sampler_info(self, num_steps: int | None = None,
                   sampler: str | None = None) -> dict[str, Any]:
    """The `sampler` and `steps` a generation run records (None for families without one)."""


class OneShotTask(Task):
  """A family whose `generate` is one forward pass: no sampler options, nothing to record."""

  def generate_options(self, num_steps: int | None = None,
                       sampler: str | None = None) -> dict[str, Any]:
    del num_steps, sampler
    return {}

  def sampler_info(self, num_steps: int | None = None,
                   sampler: str | None = None) -> dict[str, Any]:
    del num_steps, sampler
    return {"sampler": None, "steps": None}
