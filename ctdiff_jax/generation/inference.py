"""Restore a trained model (any family) and inpaint batches of examples on all local devices.

Shared by `generate` (synthetic datasets) and `evaluate` (Table 1): one place that knows how
to find a checkpoint, rebuild the task from the config, and map its jitted generator over
devices (pmap or shard_map, like training).
"""

from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

from absl import logging
import jax
import numpy as np
from tqdm import auto as tqdm

from ctdiff_jax.training import checkpointing
from ctdiff_jax.training import parallel
from ctdiff_jax.training import tasks


class Inpainter:
  """Inpaints `image` inside `mask` for examples built by `data.transforms`.

  Args:
    config: the training config of the model.
    checkpoint: a training workdir or its `checkpoints` dir.
    step: checkpoint step (default: latest).
    num_steps / sampler: override config.sampling (see `Task.generate_options`).
  """

  def __init__(self, config, checkpoint: str, *, step: int | None = None,
               num_steps: int | None = None, sampler: str | None = None):
    self.config = config
    self.parallel = parallel.create(config.parallel,
                                    parallel.local_devices(config.num_devices or None))
    self.task = tasks.get_task(config)
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f"checkpoint path {checkpoint} does not exist")
    abstract = jax.eval_shape(self.task.init_state, jax.random.key(0))
    state, self.step = checkpointing.restore_state_only(checkpoint, abstract, step)
    self.checkpoint = os.path.abspath(checkpoint)
    logging.info("restored %s step %d from %s", config.model_family, self.step, checkpoint)
    variables = self.task.sampling_variables(state)
    self.variables_r = self.parallel.replicate(jax.device_get(variables))
    options = self.task.generate_options(num_steps, sampler)
    self._generate = self.parallel.map(lambda v, b, k: self.task.generate(v, b, k, **options))
    self.per_device_batch = int(config.sampling.batch_size)

  @property
  def batch_size(self) -> int:
    return self.per_device_batch * self.parallel.num_devices

  def inpaint(self, examples: Mapping[str, np.ndarray], seed: int, *,
              indices: Sequence[int] | None = None, progress: bool = True,
              desc: str = "inpainting") -> np.ndarray:
    """examples: image/mask/cond [N, H, W, C] -> generated [N, H, W, 1] in [-1, 1].

    Example i draws its noise from fold_in(key(seed), indices[i]) (default: i), whatever the
    batch size and device count: the same seed, checkpoint and inputs give the same slices,
    and a request split into parts (each with its examples' global indices) gives the slices
    of the whole.
    """
    n = int(examples["image"].shape[0])
    if n == 0:
      return np.zeros((0,) + tuple(examples["image"].shape[1:]), np.float32)
    bs, nd = self.batch_size, self.parallel.num_devices
    key_data_r = self.parallel.replicate(jax.random.key_data(jax.random.key(seed)))
    index = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if index.shape != (n,) or index.min() < 0 or index.max() > np.iinfo(np.int32).max:
      raise ValueError(f"indices must be {n} ints in [0, 2**31), got shape {index.shape}")
    outs = []
    t0 = time.time()
    bar = tqdm.tqdm(total=n, desc=desc, unit="slice", disable=not progress)
    for start in range(0, n, bs):
      chunk = {k: np.asarray(examples[k][start:start + bs], np.float32)
               for k in ("image", "mask", "cond")}
      chunk[tasks.INDEX] = index[start:start + bs].astype(np.int32)
      m = chunk["image"].shape[0]
      if m < bs:  # Pad the last batch by repeating its final example; dropped below.
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], bs - m, axis=0)]) for k, v in
                 chunk.items()}
      batch = {k: v.reshape((nd, -1) + v.shape[1:]) for k, v in chunk.items()}
      out = self._generate(self.variables_r, self.parallel.shard(batch), key_data_r)
      out = np.asarray(jax.device_get(out)).reshape((bs,) + chunk["image"].shape[1:])
      outs.append(out[:m])
      bar.update(m)
      bar.set_postfix(slices_per_s=f"{(start + m) / max(time.time() - t0, 1e-9):.2f}")
    bar.close()
    return np.concatenate(outs, axis=0)
