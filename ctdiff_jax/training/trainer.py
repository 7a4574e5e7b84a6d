"""The trainer: `train_and_evaluate(config, workdir)` for every model family.

Data-parallel over local devices (pmap or shard_map, `config.parallel`), Orbax checkpoints with
the Grain iterator state (resume from the latest step, onto any device count), clu metrics,
JSONL/TensorBoard writers on process 0, periodic sample grids, and a clear abort on NaN/Inf.
Metrics stay on device and are pulled every `log_every_steps`: no host sync per step.

Multi-host (`config.distributed`, README "Multi-host training"): every process runs this same
code over all processes' devices (training/parallel.py); each reads its own block of every
global batch (data/pipeline.py), so N processes x D devices train exactly as 1 x N*D.
Checkpoints, metrics and images are written once; a checkpoint restores on any process count.

The step's learning rate is an argument of the compiled step, evaluated on the host from the
task's schedule for this config's `num_train_steps`; `<workdir>/schedule.json` records the
`num_train_steps` a run was trained towards, and resuming with another one logs a warning.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
from clu import parameter_overview
import jax
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from ctdiff_jax.training import checkpointing
from ctdiff_jax.data import sources
from ctdiff_jax.training import parallel
from ctdiff_jax.training import tasks
from ctdiff_jax import figures
from ctdiff_jax.training import writers
from ctdiff_jax.training import workdir as run_workdir
from ctdiff_jax.data import pipeline
from ctdiff_jax.data import transforms


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient."""


def setup_devices(config) -> parallel.DataParallel:
  """Joins the multi-host run if asked, then the data-parallel layer over all its devices.

  `config.num_devices` counts devices per process.
  """
  if config.distributed:
    parallel.initialize_distributed()
  return parallel.create(config.parallel, parallel.global_devices(config.num_devices or None))


def _pull(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  host = parallel.local_rows([m for _, m in pending])  # pmean'd: every row is the same
  return [(s, jax.tree.map(lambda x: np.asarray(x)[0], m)) for (s, _), m in zip(pending, host)]


def _sample_grid(state_r, batch, p_generate, key_data_r, num: int) -> np.ndarray:
  """Ground truth | masked input | generated, for the first `num` examples of `batch`."""
  out = p_generate(state_r, batch, key_data_r)
  host = parallel.local_rows({"image": batch["image"], "mask": batch["mask"], "out": out})
  flat = {k: np.reshape(v, (-1,) + v.shape[2:])[:num] for k, v in host.items()}
  masked = flat["image"] * (1.0 - flat["mask"])
  return figures.comparison_grid([flat["image"], masked, flat["out"]], masks=flat["mask"])


class _MetricLog:
  """Per-step metrics kept on device, pulled, checked and written every `log_every_steps`."""

  def __init__(self, task, manager, workdir: str, writer: writers.Writer, bar, step: int):
    self.collection = task.metrics_collection
    self.manager, self.workdir, self.writer, self.bar = manager, workdir, writer, bar
    self.pending: list[tuple[int, dict]] = []
    self.t_log, self.s_log = time.time(), step

  def add(self, step: int, step_metrics: dict) -> None:
    self.pending.append((step, step_metrics))

  def write(self, step: int) -> None:
    """Pulls the pending metrics; raises NonFiniteLossError at the first non-finite step."""
    metrics = None
    for s, m in _pull(self.pending):
      if not bool(m["finite"]):
        raise NonFiniteLossError(
            f"non-finite loss/gradients at step {s} (loss={float(m['loss'])}); the update was "
            f"skipped and training stopped. Last good checkpoint: step "
            f"{self.manager.latest_step()} in {checkpointing.checkpoint_dir(self.workdir)}. "
            f"Check the input data (NaN/Inf in a batch?) and the learning rate.")
      update = self.collection.single_from_model_output(
          **{k: v for k, v in m.items() if k != "finite"})
      metrics = update if metrics is None else metrics.merge(update)
    self.pending = []
    now = time.time()
    scalars = metrics.compute()
    scalars["steps_per_sec"] = (step - self.s_log) / max(now - self.t_log, 1e-9)
    self.writer.write_scalars(step, scalars)
    self.bar.set_postfix({k: f"{float(scalars[k]):.4g}" for k in ("loss", "g_l1", "d_loss")
                          if k in scalars})
    self.t_log, self.s_log = now, step


SCHEDULE_FILE = "schedule.json"


def learning_rates(task, num_train_steps: int) -> np.ndarray:
  """float32 [num_train_steps + 1]: the LR of every step (index = the state's step)."""
  steps = np.arange(num_train_steps + 1)
  return np.asarray(jax.jit(jax.vmap(task.lr))(steps), np.float32)


def check_schedule(workdir: str, num_train_steps: int, step: int, lrs: np.ndarray) -> None:
  """Logs the schedule on resume, warns if the run was trained towards another length.

  Then records this config's num_train_steps in `<workdir>/schedule.json` (process 0).
  """
  path = os.path.join(workdir, SCHEDULE_FILE)
  if step > 0:
    before = None
    if os.path.exists(path):
      with open(path) as f:
        before = json.load(f).get("num_train_steps")
    logging.info("resuming at step %d of %d: learning rate %.4g now, %.4g at the last step",
                 step, num_train_steps, lrs[min(step, num_train_steps)], lrs[-1])
    if before is not None and int(before) != int(num_train_steps):
      logging.warning(
          "the checkpoint at step %d was trained with num_train_steps=%d, the config says %d: "
          "the learning-rate schedule (warmup/decay to the last step) changes from here on",
          step, int(before), int(num_train_steps))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump({"num_train_steps": int(num_train_steps)}, f)


def _restore_or_init(task, manager, data_iter, init_key: jax.Array,
                     batch_records: int) -> tuple[Any, int]:
  """The latest checkpoint's state and step (the iterator restored too), else a fresh state.

  A checkpoint of another process count has no iterator state for this process: the data
  then continues after `step` batches of `batch_records` (each step reads one batch).
  """
  step = manager.latest_step()
  if step is None:
    return jax.jit(task.init_state)(init_key), 0
  # Restoring needs only shapes: skip compiling the initialisers.
  abstract = jax.eval_shape(task.init_state, init_key)
  own_data = checkpointing.has_data_state(manager, step)
  state, step = checkpointing.restore(manager, abstract, data_iter if own_data else None, step)
  if not own_data:
    logging.info("checkpoint %d was saved by another process count: data positioned by step",
                 step)
    pipeline.set_position(data_iter, step, batch_records)
  logging.info("resuming at step %d", step)
  return state, step


def _train(config, workdir: str, task, par: parallel.DataParallel, state, initial_step: int,
           run_key: jax.Array, batches: Iterator, data_iter, manager, writer) -> Any:
  """Steps `initial_step + 1 .. num_train_steps` with logging, checkpoints and sample grids."""
  state_r = par.replicate(jax.device_get(state))
  key_data_r = par.replicate(jax.random.key_data(run_key))
  p_train = par.map(task.train_step, donate_argnums=(0,))
  lrs = learning_rates(task, config.num_train_steps)
  p_generate = par.map(lambda s, b, k: task.generate(task.sampling_variables(s), b, k))
  hooks = writers.periodic_actions(workdir, config.num_train_steps, writer, config.profile)
  with tqdm.tqdm(total=config.num_train_steps, initial=initial_step, unit="step",
                 desc=f"train {config.model_family}", disable=jax.process_index() != 0,
                 mininterval=2.0) as bar:
    log = _MetricLog(task, manager, workdir, writer, bar, initial_step)
    for step in range(initial_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = par.shard(next(batches))
        # The state's step before this update is step - 1 (the schedule's index).
        state_r, step_metrics = p_train(state_r, batch, key_data_r, par.replicate(lrs[step - 1]))
      log.add(step, step_metrics)
      bar.update(1)
      for hook in hooks:
        hook(step)
      is_last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or is_last:
        log.write(step)
      if step % config.checkpoint_every_steps == 0 or is_last:
        checkpointing.save(manager, step, jax.device_get(parallel.unreplicate(state_r)),
                           data_iter)
      if config.sample_every_steps and (step % config.sample_every_steps == 0 or is_last):
        grid = _sample_grid(state_r, batch, p_generate, key_data_r, config.num_grid_images)
        writer.write_images(step, {"samples": grid})
  return jax.device_get(parallel.unreplicate(state_r))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       iterator_wrapper: Callable[[Iterator], Iterator] | None = None) -> Any:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

  `iterator_wrapper` (tests) wraps the batch iterator, e.g. to inject a bad batch. The config
  is checked and the workdir locked first (training/workdir.py: one run per workdir).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if config.distributed:  # before the lock: its name depends on the process index
    parallel.initialize_distributed()
  with run_workdir.claim(workdir, config, jax.process_index()):
    return _train_and_evaluate(config, workdir, iterator_wrapper)


def _train_and_evaluate(config, workdir: str, iterator_wrapper) -> Any:
  par = setup_devices(config)
  logging.info("training %s on %d %s device(s) in %d process(es), parallel=%s, workdir=%s",
               config.model_family, par.num_devices, par.devices[0].platform,
               jax.process_count(), par.mode, workdir)

  source, meta = sources.open_split(config, config.train_split)
  transforms.check_flip(transforms.ExampleConfig.from_data_config(config.data),
                        meta.get("label_names") or {})
  batch_shape = (par.num_local_devices, config.per_device_batch_size)
  loader = pipeline.create_loader(
      source, config.data, batch_shape=batch_shape, seed=config.seed,
      worker_count=config.data.worker_count,
      process=(jax.process_index(), jax.process_count()))
  data_iter = iter(loader)

  task = tasks.get_task(config)
  init_key, run_key = jax.random.split(jax.random.key(config.seed))
  manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints,
                                         async_save=config.async_checkpointing)
  state, initial_step = _restore_or_init(task, manager, data_iter, init_key,
                                         batch_shape[0] * batch_shape[1])
  check_schedule(workdir, config.num_train_steps, initial_step,
                 learning_rates(task, config.num_train_steps))
  writer = writers.Writer(workdir)
  try:
    if jax.process_index() == 0:
      for name in task.nets:
        parameter_overview.log_parameter_overview(state.nets[name].params, msg=f"{name} params")
      writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str))})
    if initial_step >= config.num_train_steps:
      logging.info("already trained to step %d >= num_train_steps", initial_step)
      return state
    batches = iterator_wrapper(data_iter) if iterator_wrapper else data_iter
    return _train(config, workdir, task, par, state, initial_step, run_key, batches, data_iter,
                  manager, writer)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
