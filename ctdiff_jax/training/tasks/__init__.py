"""Model families the one trainer runs: each is a `base.Task`, registered in `TASKS` by name.

A task's `train_step(state, batch, key_data)` and `generate(variables, batch, key_data, ...)`
are per-device functions that reduce with `lax.pmean(..., parallel.AXIS)`;
`ctdiff_jax.training.parallel` maps them with pmap or shard_map. The trainer is shared: no
second loop. `get_task` is the one place that looks at `config.model_family`.
"""

from __future__ import annotations

from ctdiff_jax.training.tasks import base
from ctdiff_jax.training.tasks import diffusion
from ctdiff_jax.training.tasks import pix2pix
from ctdiff_jax.training.tasks import segmentation

Task = base.Task
INDEX = base.INDEX  # Batch key of the examples' global indices at generation.

TASKS: dict[str, type[base.Task]] = {
    "diffusion": diffusion.DiffusionTask,
    "pix2pix": pix2pix.Pix2PixTask,
    "segmentation": segmentation.SegmentationTask,
}


def get_task(config, cond_channels: int | None = None) -> base.Task:
  """The task of `config.model_family`; cond_channels defaults to what config.data yields."""
  if cond_channels is None:
    from ctdiff_jax.data import transforms  # pylint: disable=g-import-not-at-top
    cond_channels = transforms.cond_channels(config.data)
  return task_class(config.model_family)(config, cond_channels)


def task_class(family: str) -> type[base.Task]:
  """The registered Task class of a model family name (ValueError naming the choices)."""
  if family not in TASKS:
    raise ValueError(f"config.model_family must be one of {sorted(TASKS)}, got {family!r}")
  return TASKS[family]
