"""Training: model shapes per config, 1- vs 2-device steps, loss decrease, resume, NaN abort."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import abdomen, kidney_tumor, kidneys, liver, lungs
from ctdiff_jax.training import checkpointing
from ctdiff_jax.training import parallel
from ctdiff_jax.training import tasks
from ctdiff_jax.training import trainer
from ctdiff_jax.training import writers
from ctdiff_jax.data import pipeline
from no_tf import run_python
from phantom_kidneys import SIZE, SPACING  # the grid of the `data_dir` fixture (conftest.py)


def smoke_config(data_dir, **overrides):
  config = kidneys.get_config("smoke")
  config.data_dir = str(data_dir)
  config.image_size = SIZE
  config.spacing_mm = SPACING
  config.per_device_batch_size = 2
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.sample_every_steps = 0
  config.async_checkpointing = False
  config.update_from_flattened_dict(dict(overrides))
  return config


def params_of(state):
  return jax.device_get(state.nets["unet"].params)


def assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.parametrize("module", [kidneys, liver, lungs, kidney_tumor, abdomen])
def test_model_output_shape_and_dtype_per_config(module):
  for variant, size in (("smoke", 64), ("", 256)):
    config = module.get_config(variant)
    assert config.image_size == size
    task = tasks.get_task(config, pipeline.cond_channels(config.data))
    state = jax.eval_shape(task.init_state, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
    cond = jax.ShapeDtypeStruct((2, size, size, pipeline.cond_channels(config.data)), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(lambda p, x, t, c: task.apply({"params": p}, x, t, c),
                         state.nets["unet"].params, x, t, cond)
    assert out.shape == (2, size, size, 1) and out.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.nets["unet"].params))


@pytest.mark.parametrize("mode", parallel.MODES)
def test_two_device_step_equals_one_device_step(mode):
  assert jax.local_device_count() >= 2, "conftest should simulate 2 CPU devices"
  config = smoke_config("/unused", **{"optim.schedule": "constant", "optim.warmup_steps": 0,
                                      "optim.learning_rate": 1e-3})
  task = tasks.get_task(config, 2)
  state = jax.device_get(jax.jit(task.init_state)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (4, SIZE, SIZE, 1)).astype(np.float32)
  mask = (rng.uniform(size=(4, SIZE, SIZE, 1)) < 0.3).astype(np.float32)
  batch = {"image": image, "mask": mask,
           "cond": np.concatenate([image * (1 - mask), mask], axis=-1)}
  key_data = jax.random.key_data(jax.random.key(1))

  def run(n):
    par = parallel.create(mode, jax.local_devices()[:n])
    step = par.map(task.train_step)
    s = par.replicate(state)
    b = par.shard({k: v.reshape((n, -1) + v.shape[1:]) for k, v in batch.items()})
    k = par.replicate(key_data)
    losses = []
    for _ in range(2):
      s, m = step(s, b, k)
      losses.append(np.asarray(m["loss"]))
    return jax.device_get(parallel.unreplicate(s)), np.stack(losses)

  s1, l1 = run(1)
  s2, l2 = run(2)
  assert np.all(l2[:, 0] == l2[:, 1]), "pmean'd loss must agree across devices"
  np.testing.assert_allclose(l1[:, 0], l2[:, 0], rtol=1e-5)
  assert int(s1.step) == int(s2.step) == 2
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(params_of(s1)), jax.tree.leaves(state.nets["unet"].params)))
  assert moved > 1e-4, "the step must change the params for the comparison to mean anything"
  assert_trees_close(params_of(s1), params_of(s2), rtol=1e-4, atol=1e-5)
  assert_trees_close(s1.nets["unet"].ema_params, s2.nets["unet"].ema_params, rtol=1e-4,
                     atol=1e-5)


def test_pmap_and_shard_map_agree(data_dir, tmp_path):
  finals = {}
  for mode in parallel.MODES:
    config = smoke_config(data_dir, parallel=mode, num_train_steps=3)
    finals[mode] = trainer.train_and_evaluate(config, str(tmp_path / mode))
  assert_trees_close(params_of(finals["pmap"]), params_of(finals["shard_map"]), rtol=1e-4,
                     atol=1e-5)


def test_smoke_training_lowers_loss(data_dir, tmp_path):
  config = smoke_config(data_dir, num_train_steps=150, log_every_steps=25,
                        checkpoint_every_steps=150, sample_every_steps=150)
  trainer.train_and_evaluate(config, str(tmp_path))
  losses = [m["loss"] for m in writers.read_metrics(str(tmp_path)) if "loss" in m]
  assert len(losses) == 6
  print(f"smoke loss per 25 steps: {np.round(losses, 4).tolist()}")
  assert losses[-1] < 0.5 * losses[0], losses
  assert (tmp_path / "checkpoints" / "150").is_dir()
  assert list((tmp_path / "images").glob("samples_*.png"))


class _Interrupt(Exception):
  pass


def stop_after(n):
  def wrap(it):
    for i, batch in enumerate(it):
      if i == n:
        raise _Interrupt()
      yield batch
  return wrap


def test_resume_gives_same_params_as_uninterrupted_run(data_dir, tmp_path):
  config = smoke_config(data_dir, num_train_steps=6, checkpoint_every_steps=3)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  with pytest.raises(_Interrupt):  # Dies during step 5: the last checkpoint is step 3.
    trainer.train_and_evaluate(config, str(tmp_path / "resumed"), iterator_wrapper=stop_after(4))
  manager = checkpointing.create_manager(str(tmp_path / "resumed"))
  assert manager.latest_step() == 3
  manager.close()
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == int(straight.step) == 6
  assert_trees_close(params_of(straight), params_of(resumed), rtol=0, atol=0)


def test_restore_onto_different_device_count(data_dir, tmp_path):
  saved = trainer.train_and_evaluate(smoke_config(data_dir, num_train_steps=2, num_devices=2),
                                     str(tmp_path))  # Checkpointed at its last step, 2.
  # Asking for the step the checkpoint is at returns the restored state as is.
  restored = trainer.train_and_evaluate(
      smoke_config(data_dir, num_train_steps=2, num_devices=1), str(tmp_path))
  assert int(restored.step) == int(saved.step) == 2
  for part in ("params", "ema_params", "opt_state"):
    a, b = (getattr(s.nets["unet"], part) for s in (saved, restored))
    assert jax.tree.structure(a) == jax.tree.structure(b), part
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=part)
  init_key, _ = jax.random.split(jax.random.key(smoke_config(data_dir).seed))  # The trainer's.
  fresh = jax.device_get(jax.jit(tasks.get_task(smoke_config(data_dir)).init_state)(init_key))
  assert not all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(params_of(fresh)), jax.tree.leaves(params_of(restored)))), \
      "the saved params must differ from the initial ones for the comparison to mean anything"
  state = trainer.train_and_evaluate(
      smoke_config(data_dir, num_train_steps=4, num_devices=1), str(tmp_path))
  assert int(state.step) == 4


def test_resume_with_another_num_train_steps_warns_and_follows_the_new_schedule(
    data_dir, tmp_path, caplog):
  trainer.train_and_evaluate(smoke_config(data_dir, num_train_steps=2), str(tmp_path))
  assert json.loads((tmp_path / trainer.SCHEDULE_FILE).read_text())["num_train_steps"] == 2
  config = smoke_config(data_dir, num_train_steps=30)
  with caplog.at_level("INFO"), pytest.raises(_Interrupt):  # Stops in step 5.
    trainer.train_and_evaluate(config, str(tmp_path), iterator_wrapper=stop_after(2))
  assert "trained with num_train_steps=2, the config says 30" in caplog.text
  assert "resuming at step 2 of 30" in caplog.text
  assert json.loads((tmp_path / trainer.SCHEDULE_FILE).read_text())["num_train_steps"] == 30
  # Steps 3 and 4 ran at the new schedule's LR (warmup of 20 steps to the peak).
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  lr = {m["step"]: m["learning_rate"] for m in lines if "learning_rate" in m}
  want = trainer.learning_rates(tasks.get_task(config), 30)
  np.testing.assert_allclose([lr[3], lr[4]], want[2:4], rtol=1e-6)
  assert lr[3] == pytest.approx(config.optim.learning_rate * 2 / 20, rel=1e-6)


def test_flip_with_sided_labels_is_refused(data_dir, tmp_path, monkeypatch):
  real = trainer.sources.open_split

  def sided(config, split):
    source, meta = real(config, split)
    return source, dict(meta, label_names={"1": "kidney_left", "2": "kidney_right"})

  monkeypatch.setattr(trainer.sources, "open_split", sided)
  with pytest.raises(ValueError, match="labels have sides"):
    trainer.train_and_evaluate(smoke_config(data_dir, **{"data.flip_lr_prob": 0.5}),
                               str(tmp_path))


def test_nan_in_batch_stops_training_with_clear_message(data_dir, tmp_path):
  def inject(it):
    for i, batch in enumerate(it):
      if i == 2:  # The third batch -> step 3.
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  config = smoke_config(data_dir, num_train_steps=6, checkpoint_every_steps=2)
  with pytest.raises(trainer.NonFiniteLossError, match=r"step 3 .*Last good checkpoint: step 2"):
    trainer.train_and_evaluate(config, str(tmp_path), iterator_wrapper=inject)


def test_training_without_tensorflow(data_dir, tmp_path):
  workdir = tmp_path / "w"
  proc = run_python(f"""
      import sys
      from configs import kidneys
      from ctdiff_jax.training import trainer
      from ctdiff_jax.training import writers
      assert not writers.tensorflow_available()
      c = kidneys.get_config("smoke")
      c.data_dir, c.image_size, c.spacing_mm = {str(data_dir)!r}, {SIZE}, {SPACING}
      c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = 2, 1, 2
      c.sample_every_steps, c.per_device_batch_size = 2, 2
      trainer.train_and_evaluate(c, {str(workdir)!r})
      assert "tensorflow" not in sys.modules
      print("TRAINED")
  """)
  assert "TRAINED" in proc.stdout
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in lines if "loss" in m] == [1, 2]
  assert (workdir / "checkpoints" / "2").is_dir()
  assert not (workdir / "tensorboard").exists()
  assert list((workdir / "images").glob("samples_*.png"))
