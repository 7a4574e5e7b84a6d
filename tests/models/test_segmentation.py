"""Tests of the segmentation UNet and its task: shapes, the loss's Dice, a tiny overfit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import downstream as downstream_config
from ctdiff_jax.evaluation import downstream
from ctdiff_jax.models import segmentation
from ctdiff_jax.training import parallel
from ctdiff_jax.training import tasks
from ctdiff_jax.training.tasks import segmentation as seg_task


def make_config(image_size: int = 32, num_classes: int = 3, steps: int = 150):
  config = downstream_config.get_config("smoke")
  config.image_size = image_size
  config.segmentation.num_classes = num_classes
  config.segmentation.channels = (8, 16)
  config.num_train_steps = steps
  config.optim.learning_rate = 1e-2
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  return config


def make_slices(n: int = 4, size: int = 32, seed: int = 0):
  """Noisy slices: a bright disc (class 1) holding a dark square (class 2), per slice moved."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  images, labels = [], []
  for _ in range(n):
    cy, cx = rng.integers(10, size - 10, size=2)
    lab = np.zeros((size, size), np.uint8)
    lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 7 ** 2] = 1
    lab[abs(yy - cy - 1) + abs(xx - cx + 1) <= 2] = 2
    img = np.select([lab == 2, lab == 1], [-0.2, 0.6], -0.6) + rng.normal(0, 0.05, lab.shape)
    images.append(img[..., None].astype(np.float32))
    labels.append(lab[..., None])
  return np.stack(images), np.stack(labels)


def test_unet_shapes_and_size():
  model = segmentation.SegmentationUNet(num_classes=3, channels=(8, 16, 32))
  x = jnp.zeros((2, 64, 64, 1))
  params = model.init(jax.random.key(0), x)["params"]
  assert model.apply({"params": params}, x).shape == (2, 64, 64, 3)
  n = sum(p.size for p in jax.tree.leaves(params))
  assert 20_000 < n < 60_000  # The smoke segmenter.


def test_config_checks():
  with pytest.raises(ValueError, match="num_classes"):
    segmentation.create_model(make_config(num_classes=0).segmentation)
  with pytest.raises(ValueError, match="divisible"):
    segmentation.check_size(30, (8, 16, 32))
  assert isinstance(tasks.get_task(make_config(), 2), seg_task.SegmentationTask)


def test_soft_dice_known_answer():
  # Class 1: prediction 2 px, truth 2 px, overlap 1 -> (2 + 1) / (4 + 1); class 2 absent -> 1.
  labels = jnp.asarray([[0, 1, 1, 0]])
  probs = jax.nn.one_hot(jnp.asarray([[0, 0, 1, 1]]), 3)
  got = seg_task.soft_dice(probs, jax.nn.one_hot(labels, 3))
  np.testing.assert_allclose(got, (3 / 5 + 1.0) / 2, rtol=1e-6)


def train(config, images, labels):
  """Full-batch steps of the task's own train_step on one device -> final params."""
  task = tasks.get_task(config, 2)
  par = parallel.create("pmap", jax.local_devices()[:1])
  state = par.replicate(jax.jit(task.init_state)(jax.random.key(0)))
  step = par.map(task.train_step)
  key_data = par.replicate(jax.random.key_data(jax.random.key(0)))
  batch = par.shard({"image": images[None], "labels": labels[None]})
  for _ in range(config.num_train_steps):
    state, metrics = step(state, batch, key_data)
  assert bool(np.asarray(metrics["finite"])[0])
  return task, parallel.unreplicate(state).nets[seg_task.NET].params


def test_overfits_four_slices():
  config = make_config()
  images, labels = make_slices()
  task, params = train(config, images, labels)
  pred = downstream.predict_labels(task, params, images, batch_size=4)
  dice = downstream.dice_per_class(pred, labels[..., 0], 3)
  assert dice.min() > 0.9, dice
  # generate: the label map scaled to [-1, 1] (what the trainer's sample grids show).
  out = task.generate({"params": params}, {"image": jnp.asarray(images)}, None)
  np.testing.assert_allclose(np.asarray(out)[..., 0], pred / 2.0 * 2.0 - 1.0)
