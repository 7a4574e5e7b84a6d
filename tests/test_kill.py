"""kill -9 loses nothing: training and generating, killed and run again with the same command.

- Training (`python -m ctdiff_jax.train`): killed once mid-run after the step-2 checkpoint,
  then once during the asynchronous save of step 4 (Orbax's commit slowed down in the child).
  The same command then resumes from step 2, the last complete checkpoint, removes the
  unfinished save and ends with the same state, bit for bit, as an uninterrupted run (CPU).
- Generating (`python -m ctdiff_jax.generate`): killed while the per-slice files of the
  second chunk are written, then while the TFDS export is written. No manifest row names a
  file that is not on disk, no half TFDS dataset sits under tfds/, and the rerun completes the
  export, equal to an uninterrupted run's. Another request into that folder is refused.
- Two trainings into one workdir: the second stops at once, naming the first.
The children run the real CLI module through runpy, with a slowdown patched in first (the
technique of tests/ingest/test_build_cli.py), so that there is a "during" to kill in.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from configs import kidneys
from ctdiff_jax import cli
from ctdiff_jax import phantom
from ctdiff_jax.data import pipeline
from ctdiff_jax.generation import runner
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.training import checkpointing
from ctdiff_jax.training import tasks
from ctdiff_jax.training import trainer
from ctdiff_jax.training import writers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE, SPACING = 32, 12.0  # 32 px x 12 mm covers the phantom's 384 mm field of view
TMP_MARK = ".orbax-checkpoint-tmp"


@pytest.fixture(name="tfds_dir", scope="module")
def _tfds_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("kill_data")
  phantom.write_cohort(root / "raw", 4, seed=0, progress=False)
  ingest_build.build("kidneys", root / "raw", root / "tfds", image_size=SIZE,
                     spacing_mm=SPACING)
  return root / "tfds"


# The tiny run of tests/training/test_train.py, as flags and as a config.
OVERRIDES = {"image_size": SIZE, "spacing_mm": SPACING, "per_device_batch_size": 2,
             "num_train_steps": 6, "log_every_steps": 1, "checkpoint_every_steps": 2,
             "sample_every_steps": 0, "async_checkpointing": True, "sampling.batch_size": 1}


def config_flags(data_dir) -> list[str]:
  return ["--config=configs/kidneys.py:smoke", f"--config.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def make_config(data_dir):
  config = kidneys.get_config("smoke")
  config.data_dir = str(data_dir)
  config.update_from_flattened_dict(OVERRIDES)
  return config


def child_env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  cache = jax.config.jax_compilation_cache_dir  # conftest's: children reuse its compiles
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


CHILD = textwrap.dedent("""
    import asyncio, runpy, sys, time
    {patch}
    sys.argv = {argv!r}
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
""")
# Training slowed to one step per `delay` s (a batch iterator that sleeps).
SLOW_STEPS = textwrap.dedent("""
    import functools
    from ctdiff_jax.training import trainer
    def slow(it):
      for batch in it:
        time.sleep({delay})
        yield batch
    trainer.train_and_evaluate = functools.partial(trainer.train_and_evaluate,
                                                   iterator_wrapper=slow)
""")
# The async save of `step` stalls before its commit (the rename of the temporary folder).
SLOW_SAVE = textwrap.dedent("""
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    finalize = cls.finalize
    async def slow_finalize(self):
      if self.get_final().name == "{step}":
        open({marker!r}, "w").close()
        await asyncio.sleep(300)
      return await finalize(self)
    cls.finalize = slow_finalize
""")


def start(module: str, argv: list[str], patch: str) -> subprocess.Popen:
  code = CHILD.format(patch=patch, argv=[module, *argv], module=module)
  return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(module: str, argv: list[str]) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT, env=child_env(),
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def kill_when(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
  """SIGKILLs `proc` as soon as `predicate()` holds."""
  end = time.time() + timeout

  def holds() -> bool:
    try:
      return bool(predicate())
    except OSError:  # a folder renamed or removed while we looked
      return False

  while not holds():
    if proc.poll() is not None:
      raise AssertionError(f"ended before {what}: {proc.communicate()[1][-3000:]}")
    if time.time() > end:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL


def steps_on_disk(workdir: pathlib.Path) -> tuple[list[int], list[str]]:
  """(complete checkpoint steps, unfinished save folders)."""
  names = [p.name for p in (workdir / "checkpoints").iterdir()] if (
      workdir / "checkpoints").is_dir() else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


# ---- training ------------------------------------------------------------------------------


def test_killed_training_resumes_to_the_same_params(tfds_dir, tmp_path):
  config = make_config(tfds_dir)
  straight = jax.device_get(trainer.train_and_evaluate(config, str(tmp_path / "straight")))
  wd = tmp_path / "killed"
  argv = [*config_flags(tfds_dir), f"--workdir={wd}"]
  # 1. Mid-run, once the step-2 checkpoint is complete (renamed from its temporary folder).
  proc = start("ctdiff_jax.train", argv, SLOW_STEPS.format(delay=1.0))
  kill_when(lambda: (wd / "checkpoints" / "2").is_dir(), proc, "the step-2 checkpoint")
  assert steps_on_disk(wd)[0] == [2]
  # 2. During the asynchronous save of step 4: only its temporary folder is on disk.
  marker = tmp_path / "saving"
  proc = start("ctdiff_jax.train", argv, SLOW_SAVE.format(step=4, marker=str(marker)))
  kill_when(marker.exists, proc, "the async save of step 4")
  complete, unfinished = steps_on_disk(wd)
  assert complete == [2] and [n.split(".")[0] for n in unfinished] == ["4"], unfinished
  # 3. The same command resumes from step 2 and cleans up.
  run_cli("ctdiff_jax.train", argv)
  complete, unfinished = steps_on_disk(wd)
  assert complete[-1] == 6 and not unfinished, (complete, unfinished)
  logged = [m["step"] for m in writers.read_metrics(str(wd)) if "loss" in m]
  assert logged.count(1) == 1 and logged.count(2) == 1, logged  # never trained again
  assert set(range(1, 7)) <= set(logged), logged
  abstract = jax.eval_shape(tasks.get_task(config).init_state, jax.random.key(0))
  resumed, step = checkpointing.restore_state_only(str(wd), abstract)
  assert step == int(straight.step) == 6
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(resumed))
  assert len(leaves) == len(jax.tree.leaves(straight))
  for (path, x), y in zip(leaves, jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_a_second_training_into_a_busy_workdir_is_refused(tfds_dir, tmp_path):
  wd = tmp_path / "busy"
  argv = [*config_flags(tfds_dir), f"--workdir={wd}"]
  first = start("ctdiff_jax.train", argv, SLOW_STEPS.format(delay=30.0))
  try:
    end = time.time() + 120
    while not (wd / ".lock").exists() or not (wd / ".lock").read_text():
      assert first.poll() is None and time.time() < end, "the first training did not start"
      time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "ctdiff_jax.train", *argv], cwd=REPO_ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=300)
  finally:
    first.kill()
    first.communicate(timeout=60)
  assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
  assert (f"ctdiff_jax.train: error: workdir {wd} is in use by another training run "
          f"(pid {first.pid} on host ") in second.stderr, second.stderr[-3000:]
  assert f"lock file {wd / '.lock'}" in second.stderr


# ---- generating ----------------------------------------------------------------------------


def write_random_checkpoint(wd: pathlib.Path, config) -> pathlib.Path:
  """A random-weight train state at step 0 (tests/generation/test_generate.py does the same)."""
  task = tasks.get_task(config, pipeline.cond_channels(config.data))
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: (rng.normal(0.0, 0.05, s.shape).astype(s.dtype)
                                  if np.issubdtype(s.dtype, np.floating)
                                  else np.zeros(s.shape, s.dtype)), abstract)
  manager = checkpointing.create_manager(str(wd), async_save=False, with_data=False)
  checkpointing.save(manager, 0, state, None)
  manager.wait_until_finished()
  manager.close()
  return wd


NUM_SAMPLES = 20  # chunks of 8 (sampling.batch_size 1 x 2 devices x CHUNK_BATCHES 4)
GEN_FLAGS = ["--scenario=organ", f"--num_samples={NUM_SAMPLES}", "--seed=3", "--steps=2",
             "--formats=nifti,png", "--tfds", "--volumes"]
# Per-slice files written slowly (so that the kill lands among them) ...
SLOW_FILES = textwrap.dedent("""
    from ctdiff_jax.generation.export import nifti
    save = nifti.save_nifti
    def slow_save(*args, **kwargs):
      time.sleep(0.1)
      return save(*args, **kwargs)
    nifti.save_nifti = slow_save
""")
# ... and TFDS records read slowly from the spool (a kill while the dataset is written).
SLOW_TFDS = textwrap.dedent("""
    from ctdiff_jax.generation.export import tfds
    examples = tfds.TfdsExporter._examples
    def slow_examples(self):
      for item in examples(self):
        time.sleep(0.3)
        yield item
    tfds.TfdsExporter._examples = slow_examples
""")


def manifest(out: pathlib.Path) -> list[dict[str, str]]:
  with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def contents(out: pathlib.Path) -> dict[str, object]:
  """Everything an export holds, as arrays / rows (gzip headers carry times: not compared)."""
  got = contents_without_tfds(out)
  from ctdiff_jax.ingest import naming  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = f"{naming.DATASET}/kidneys_{SIZE}px_{int(SPACING)}mm"
  for split, src in tfds.data_source(name, data_dir=str(out / "tfds")).items():
    got[f"tfds/{split}"] = [{k: np.asarray(v) for k, v in src[i].items()}
                            for i in range(len(src))]
  return got


def assert_same(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
  for k in a:
    if k.startswith("tfds/"):
      assert len(a[k]) == len(b[k])
      for ra, rb in zip(a[k], b[k]):
        for f in ra:
          np.testing.assert_array_equal(ra[f], rb[f], err_msg=f"{k} {f}")
    elif k == "manifest":
      assert a[k] == b[k]
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_killed_generate_resumes_to_the_same_export(tfds_dir, tmp_path):
  config = make_config(tfds_dir)
  wd = write_random_checkpoint(tmp_path / "model", config)
  out = tmp_path / "out"
  argv = [*config_flags(tfds_dir), f"--workdir={wd}", f"--output_dir={out}", *GEN_FLAGS]
  # 1. While the second chunk's files are written: rows only for files on disk.
  proc = start("ctdiff_jax.generate", argv, SLOW_FILES)
  kill_when(lambda: (out / "manifest.csv").exists() and len(manifest(out)) >= 8
            and any(out.glob("00000[8-9]_*_seg.nii.gz")), proc, "the second chunk")
  rows = manifest(out)
  assert 8 <= len(rows) < NUM_SAMPLES
  for r in rows:
    for key in ("ct_file", "seg_file", "mask_file", "png_file"):
      assert (out / r[key]).is_file(), r[key]
  assert json.loads((out / "run.json").read_text())["complete"] is False
  kept = {r[k]: (out / r[k]).stat().st_mtime_ns for r in rows
          for k in ("ct_file", "seg_file", "mask_file", "png_file")}
  # Another request into the interrupted export is refused, before any model loads.
  other = runner.GenerateSpec("organ", num_samples=NUM_SAMPLES, seed=4, steps=2, tfds=True,
                              volumes=True)
  with pytest.raises(FileExistsError, match=r"another run \(run.json differs in spec.seed"):
    runner.generate(config, str(wd), other, str(out), progress=False)
  # 2. While the TFDS dataset is written: nothing under tfds/.
  proc = start("ctdiff_jax.generate", argv, SLOW_TFDS)
  kill_when(lambda: any(out.glob("*tfds*/ct_slices/*/incomplete.*")), proc,
            "the TFDS export")  # TFDS's own temporary folder (inside ours)
  assert not (out / "tfds").exists() and len(manifest(out)) == NUM_SAMPLES
  assert json.loads((out / "run.json").read_text())["complete"] is False
  # 3. The same command completes the export; it equals an uninterrupted one.
  rerun = run_cli("ctdiff_jax.generate", argv)
  assert f"generated {NUM_SAMPLES} slices" in rerun.stdout
  assert "checkpoint_manager.py" not in rerun.stderr, rerun.stderr  # no Orbax chatter
  assert not (out / ".tfds.incomplete").exists() and not (out / ".spool").exists()
  assert json.loads((out / "run.json").read_text())["complete"] is True
  assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # written once
  straight = tmp_path / "straight"
  run_cli("ctdiff_jax.generate", [*argv[:-len(GEN_FLAGS) - 1], f"--output_dir={straight}",
                                  *GEN_FLAGS])
  assert_same(contents(out), contents(straight))
  # A finished export is not resumed: the same command is refused.
  again = subprocess.run([sys.executable, "-m", "ctdiff_jax.generate", *argv], cwd=REPO_ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 1 and "already holds an export" in again.stderr, again.stderr


def fake_chunk(indices) -> runner.Samples:
  """Random Samples with the given sample indices (to export without a model)."""
  n, rng = len(indices), np.random.default_rng(int(indices[0]))
  shape = (n, SIZE, SIZE, 1)
  hu = lambda: rng.integers(-1000, 1000, shape).astype(np.int16)
  return runner.Samples(
      index=np.asarray(indices), source_index=np.asarray(indices), round=np.zeros(n, int),
      case_id=[f"c{i % 3}" for i in indices], slice_index=np.asarray(indices, np.int32),
      spacing_mm=np.tile(np.float32([SPACING, SPACING, 5.0]), (n, 1)), image_hu=hu(),
      prev_hu=hu(), next_hu=hu(), source_labels=np.zeros(shape, np.uint8),
      labels=rng.integers(0, 3, shape).astype(np.uint8),
      mask=(rng.random(shape) < 0.3).astype(np.uint8), generated=np.zeros(shape, np.float32),
      generated_hu=hu(), info=[{} for _ in range(n)])


def test_a_resumed_export_generates_only_the_missing_chunks(tmp_path):
  """The per-slice resume without a model: the chunks an interrupted run wrote are skipped."""
  from ctdiff_jax.generation import export  # pylint: disable=g-import-not-at-top
  chunks = [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
  request = {"spec": {"seed": 1}, "config": {}}
  exporter = lambda out, **kw: export.Exporter(str(out), {"image_size": SIZE}, 20,
                                               request=request, **kw)
  straight = exporter(tmp_path / "straight")
  for c in chunks:
    straight.add(fake_chunk(c))
  straight.finish()
  out = tmp_path / "out"
  killed = exporter(out)
  for c in chunks[:2]:
    killed.add(fake_chunk(c))
  # Killed here, after one file of sample 16 (a file without a row is written again).
  (out / (export.stem(16, "c1", 16) + "_ct.nii.gz")).write_bytes(b"half")
  del killed
  with pytest.raises(FileExistsError, match="another run"):
    export.Exporter(str(out), {"image_size": SIZE}, 20, request={**request, "spec": {}})
  resumed = exporter(out)
  assert resumed.resumed == 16
  # Chunk 0 is drawn again for figure4.png only; chunk 1 is skipped.
  assert [resumed.wanted(c) for c in chunks] == [True, False, True]
  for c in (chunks[0], chunks[2]):
    resumed.add(fake_chunk(c))
  assert resumed.finish()["slice_files"] == 4 * 4
  assert_same(contents_without_tfds(out), contents_without_tfds(tmp_path / "straight"))
  with pytest.raises(FileExistsError, match="already holds an export"):
    exporter(out)


def contents_without_tfds(out: pathlib.Path) -> dict[str, object]:
  got: dict[str, object] = {"manifest": manifest(out)}
  for path in sorted(out.rglob("*")):
    if path.name.endswith(".nii.gz"):
      got[str(path.relative_to(out))] = np.asarray(nib.load(str(path)).dataobj)
    elif path.suffix == ".png":
      got[str(path.relative_to(out))] = np.asarray(Image.open(path))
  return got
