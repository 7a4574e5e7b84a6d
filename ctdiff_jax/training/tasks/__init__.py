"""Model families the one trainer runs: each is a `Task` (state init, per-device step, generate).

A task's `train_step(state, batch, key_data)` and `generate(variables, batch, key_data)` are
per-device functions that reduce with `lax.pmean(..., parallel.AXIS)`; `ctdiff_jax.training.parallel`
maps them with pmap or shard_map. The trainer (`train_lib`) is shared: no second loop.
"""

from __future__ import annotations


def get_task(config, cond_channels: int | None = None):
  """The task of `config.model_family`; cond_channels defaults to what config.data yields."""
  if cond_channels is None:
    from ctdiff_jax.data import transforms  # pylint: disable=g-import-not-at-top
    cond_channels = transforms.cond_channels(config.data)
  family = config.model_family
  if family == "diffusion":
    from ctdiff_jax.training.tasks import diffusion as diffusion_task  # pylint: disable=g-import-not-at-top
    return diffusion_task.DiffusionTask(config, cond_channels)
  if family == "pix2pix":
    from ctdiff_jax.training.tasks import pix2pix as pix2pix_task  # pylint: disable=g-import-not-at-top
    return pix2pix_task.Pix2PixTask(config, cond_channels)
  raise ValueError(f"config.model_family must be 'diffusion' or 'pix2pix', got {family!r}")
