"""Grain input pipeline over TFDS slice records (array_record), with on-the-fly masks.

    source = load_source(data_dir, "kidneys", "train")
    loader = create_loader(source, config.data, batch_shape=(jax.local_device_count(), 8),
                           seed=config.seed)
    it = iter(loader)            # checkpointable: it.get_state() / it.set_state(state)
    batch = next(it)             # dict of numpy arrays with leading dims batch_shape

Batches hold `image`, `mask`, `cond`, `labels`, `slice_index` (see data/transforms.py), each
with leading dims `batch_shape`, plus `valid` when `drop_remainder=False`.

Data config fields (`config.data`; the defaults are in configs/default.py):

  dataset           TFDS builder config name under ct_slices/, e.g. 'kidneys'.
  data_dir          TFDS data dir (holds ct_slices/<dataset>/<version>/).
  image_size        Slice size in pixels (the dataset is built at this size).
  spacing_mm        In-plane pixel spacing (mm) used for mm-based masks when a record carries
                    none; records' own `spacing_mm` wins.
  intensity_hu      Increasing HU knots of the piecewise-linear map to [-1, 1] (outside: clipped).
  intensity_unit    Their model units, from -1 to 1 (data/transforms.py IntensityMap).
  mask_mode         'organ' | 'bbox' | 'shape' | 'lesion' | 'mixed' (see data/masks.py). Organ-free slices
                    in organ/bbox mode get a 'shape' mask.
  mask_labels       Label ids whose union is the organ region; () = every organ (label > 0).
  dilation_mm       organ mode: grow the organ mask by this many mm.
  bbox_margin_mm    bbox mode: margin around the organ bounding box (mm, rounded up to pixels).
  shape_area        shape mode: (lo, hi) fraction of the image the random mask covers.
  shape_kinds       shape mode: subset of ('ellipse', 'polygon', 'brush').
  mixed_weights     mixed mode: weights of (organ, bbox, shape[, lesion]).
  lesion_label_id   lesion mode: the dataset's lesion label (0 = none).
  lesion_dilation_mm  lesion mode: grow the lesion mask by this many mm.
  neighbours        Add the previous/next slices and 0/1 present flags to `cond` (2 -> 6).
  flip_lr_prob      Probability of a left-right flip (0: anatomy has laterality).
  translate_px      Max random translation in pixels, shifting in air (0 = off).
  intensity_jitter  j > 0: image (and neighbours) -> clip(x * (1 + a) + b), a, b ~ U(-j, j).
  worker_count      Grain worker processes (0 = load in the main process).
  worker_buffer_size  Batches each worker prepares ahead.

The seed is not a data field: callers pass the run's seed to `create_loader`.

Multi-process training passes `process=(index, count)`: every process walks the same global
batch order and reads only its own block of each global batch (`ProcessSliceSampler`), so
2 processes x 2 devices see exactly the batches of 1 process x 4 devices. `set_position` puts a
fresh iterator after n batches (a checkpoint of another process count, training/trainer.py).
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import grain.python as grain

from ctdiff_jax.data import transforms
from ctdiff_jax.data.transforms import cond_channels  # pylint: disable=unused-import


def ensure_flags_parsed() -> None:
  """Grain reads absl flags; outside absl.app (tests, notebooks) mark them parsed with defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class ProcessSliceSampler:
  """Process `index`'s block of every global batch of a global-order sampler.

  Global batch b holds the sampler's records [b * G, (b + 1) * G), G = count * local; this
  process reads [b * G + index * local, ...) of it: disjoint between processes. The records
  keep their global metadata (index, rng), so masks and augmentations match a 1-process run.
  """

  def __init__(self, sampler: grain.IndexSampler, local: int, index: int, count: int):
    if not 0 <= index < count:
      raise ValueError(f"process index {index} not in [0, {count})")
    self._sampler, self._local, self._index, self._count = sampler, local, index, count

  def _global(self, k: int) -> int:
    return (k // self._local) * self._local * self._count + self._index * self._local + (
        k % self._local)

  def __len__(self) -> int:
    n = len(self._sampler) // (self._local * self._count)  # whole global batches only
    return n * self._local

  def __repr__(self) -> str:
    return (f"ProcessSliceSampler({self._sampler!r}, local={self._local}, "
            f"process={self._index}/{self._count})")

  def __getitem__(self, k: int):
    if k < 0 or k >= len(self):
      raise IndexError(f"index {k} out of range [0, {len(self)})")
    return self._sampler[self._global(k)]


def set_position(data_iter, num_batches: int, batch: int) -> None:
  """Puts a fresh DataLoader iterator after its first `num_batches` batches of `batch` records.

  Nothing is loaded. Grain's DataLoader state: worker w makes batches w, w + W, ... from the
  sampler's records w, w + W, ... (`last_seen_indices` are sampler indices); W = 0 reads in order.
  """
  state = json.loads(data_iter.get_state())
  workers = int(state["worker_count"])
  if workers == 0:
    state["last_seen_indices"] = {"0": num_batches * batch - 1}
    state["last_worker_index"] = -1
  else:
    made = [(num_batches - w + workers - 1) // workers for w in range(workers)]
    state["last_seen_indices"] = {str(w): (made[w] * batch - 1) * workers + w
                                  for w in range(workers)}
    state["last_worker_index"] = (num_batches - 1) % workers
  data_iter.set_state(json.dumps(state, indent=4).encode())


class ListSource(grain.RandomAccessDataSource):
  """A list of records as a Grain data source (tests, small in-memory sets)."""

  def __init__(self, items: Sequence[Any]):
    self._items = list(items)

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int):
    return self._items[index]

  def __repr__(self) -> str:
    return f"ListSource(len={len(self._items)})"


def create_loader(
    data_source,
    data_cfg: Any,
    *,
    batch_shape: tuple[int, ...],
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int | None = None,
    drop_remainder: bool = True,
    shard_by_process: bool = True,
    process: tuple[int, int] | None = None,
) -> grain.DataLoader:
  """A Grain DataLoader yielding dicts of numpy arrays with leading dims `batch_shape`.

  Args:
    data_source: a Grain RandomAccessDataSource of slice records (e.g. `load_source(...)`).
    data_cfg: the data config (see module docstring).
    batch_shape: leading batch dims, e.g. (local_device_count, per_device_batch).
    seed: shuffling and mask/augmentation randomness (same seed -> same batches).
    shuffle: global shuffle each epoch.
    num_epochs: None repeats forever.
    worker_count: Grain worker processes; None -> data_cfg.worker_count (default 0).
    drop_remainder: drop a short final batch; if False it is padded and batches carry `valid`.
    shard_by_process: give each JAX process a disjoint shard of the records.
    process: (index, count) of a multi-process run: the loader yields this process's block
      of each global batch of count * prod(batch_shape) records (module docstring); it
      replaces `shard_by_process`.
  """
  ensure_flags_parsed()
  batch_shape = tuple(int(d) for d in batch_shape)
  if not batch_shape or any(d < 1 for d in batch_shape):
    raise ValueError(f"batch_shape must be non-empty positive dims, got {batch_shape}")
  if len(data_source) == 0:
    raise ValueError(f"data source {data_source!r} is empty")
  if worker_count is None:
    worker_count = int(getattr(data_cfg, "worker_count", 0))
  multi = process is not None and int(process[1]) > 1
  shard = (grain.ShardByJaxProcess(drop_remainder=True) if shard_by_process and not multi
           else grain.NoSharding())
  sampler = grain.IndexSampler(
      num_records=len(data_source),
      shard_options=shard,
      shuffle=shuffle,
      num_epochs=num_epochs,
      seed=int(seed),
  )
  if multi:
    sampler = ProcessSliceSampler(sampler, math.prod(batch_shape), int(process[0]),
                                  int(process[1]))
  operations = [
      transforms.MakeExample(data_cfg),
      grain.Batch(math.prod(batch_shape), drop_remainder=drop_remainder),
      transforms.ReshapeBatch(batch_shape, pad=not drop_remainder),
  ]
  return grain.DataLoader(
      data_source=data_source,
      sampler=sampler,
      operations=operations,
      worker_count=worker_count,
      worker_buffer_size=int(getattr(data_cfg, "worker_buffer_size", 1)),
      shard_options=shard,
  )
