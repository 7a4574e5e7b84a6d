"""Metric and image writers: clu's (TensorBoard) when TensorFlow is installed, JSONL always.

`clu.metric_writers` and `clu.periodic_actions` import TensorFlow, which is optional (the GPU
image has none). So metrics always go to `<workdir>/metrics.jsonl` and the log, and images to
`<workdir>/images/*.png`; with TensorFlow they also go to TensorBoard through clu, and clu's
`ReportProgress` / `Profile` periodic actions run. Only process 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np


def tensorflow_available() -> bool:
  """True when TensorFlow (and so clu's writers) import; CTDIFF_NO_TF=1 forces the TF-free path."""
  if os.environ.get("CTDIFF_NO_TF"):
    return False
  try:
    if importlib.util.find_spec("tensorflow") is None:
      return False
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    from clu import metric_writers  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except (ImportError, ValueError):
    return False


def _to_float(v: Any) -> float:
  return float(np.asarray(v))


def save_png(path: str, image: np.ndarray) -> None:
  """Writes an (H, W) or (H, W, 1|3) image in [0, 1] (float) or uint8 as PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(arr).save(path)


class Writer:
  """Writes scalars/images once (process 0): JSONL + PNG, plus TensorBoard via clu if present."""

  def __init__(self, workdir: str, *, use_tensorboard: bool | None = None):
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self._clu = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if use_tensorboard is None:
      use_tensorboard = tensorflow_available()
    if use_tensorboard:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._clu = metric_writers.create_default_writer(
          os.path.join(workdir, "tensorboard"), asynchronous=True)

  @property
  def uses_tensorboard(self) -> bool:
    return self._clu is not None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
    self._jsonl.flush()
    if self._clu is not None:
      self._clu.write_scalars(int(step), values)  # clu's LoggingWriter logs them too.
    else:
      logging.info("[%d] %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(values.items())))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> (H, W, C) float in [0, 1]."""
    if not self.active:
      return
    for name, img in images.items():
      save_png(os.path.join(self.workdir, "images", f"{name}_{int(step):07d}.png"), img)
    if self._clu is not None:
      self._clu.write_images(int(step), {k: np.asarray(v)[None] for k, v in images.items()})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self.active and self._clu is not None:
      self._clu.write_hparams(dict(hparams))

  def flush(self) -> None:
    if self._clu is not None:
      self._clu.flush()

  def close(self) -> None:
    if self._clu is not None:
      self._clu.close()
    if self._jsonl is not None:
      self._jsonl.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """Reads back `<workdir>/metrics.jsonl` (for plots and tests)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def periodic_actions(workdir: str, num_train_steps: int, writer: Writer,
                     profile: bool) -> list[Any]:
  """clu's ReportProgress (and Profile) when TensorFlow is there; nothing otherwise."""
  if not (writer.active and writer.uses_tensorboard):
    return []
  from clu import periodic_actions as pa  # pylint: disable=g-import-not-at-top
  hooks = [pa.ReportProgress(num_train_steps=num_train_steps, writer=writer._clu)]  # pylint: disable=protected-access
  if profile:
    hooks.append(pa.Profile(num_profile_steps=5, logdir=os.path.join(workdir, "profile")))
  return hooks
