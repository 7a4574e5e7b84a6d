"""User errors of the train / generate / evaluate / quickstart CLIs, as a user meets them.

Each row of CASES runs the real CLI (`python -m ctdiff_jax.<cli>`) in a subprocess on a bad
input and asserts: exit status 1, ONE `<prog>: error: ...` line on stderr that names the file
/ field / flag at fault, and no traceback. The build CLI's table is tests/ingest/
test_build_cli.py; the shared handling (--verbose, bugs keep their traceback) tests/test_cli.py.
No case trains or loads a model: every error is found before that.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ctdiff_jax import cli
from ctdiff_jax import phantom
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.training import workdir as run_workdir

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE, SPACING = 16, 24.0  # 16 px x 24 mm covers the phantom's 384 mm field of view


@pytest.fixture(name="tfds_dir", scope="module")
def _tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny kidneys dataset (4 phantom cases), so that errors past the dataset are reached."""
  root = tmp_path_factory.mktemp("cli_errors")
  phantom.write_cohort(root / "raw", 4, shape=(24, 24, 12), spacing=(16.0, 16.0, 20.0),
                       progress=False)
  ingest_build.build("kidneys", root / "raw", root / "tfds", image_size=SIZE,
                     spacing_mm=SPACING)
  return root / "tfds"


def run_cli(module: str, *args: str, verbose: bool = False) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  return subprocess.run([sys.executable, "-m", f"ctdiff_jax.{module}", *args,
                         *(["--verbose"] if verbose else [])], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def config_args(tfds_dir: pathlib.Path) -> list[str]:
  return ["--config=configs/kidneys.py:smoke", f"--config.data_dir={tfds_dir}",
          f"--config.image_size={SIZE}", f"--config.spacing_mm={SPACING}"]


def _bad_mask(tmp: pathlib.Path) -> str:
  path = tmp / "mask.npy"
  np.save(path, np.ones((8, 8), np.uint8))  # not the dataset's 16 x 16
  return str(path)


# name -> (cli, args(tfds_dir, tmp), texts the error line must hold (formatted with tmp,
# tfds)). Each names the file / field / flag at fault and what to do.
CASES = {
    "train_missing_dataset": (
        "train", lambda d, t: [*config_args(t / "nowhere"), f"--workdir={t / 'w'}"],
        ["{tmp}/nowhere", "is not built", "python -m ctdiff_jax.build_dataset"]),
    "train_bad_config_value": (
        "train", lambda d, t: [*config_args(d), "--config.data.mask_mode=nope",
                               f"--workdir={t / 'w'}"],
        ["config.data", "mask_mode 'nope'", "--config.data"]),
    "train_bad_parallel": (
        "train", lambda d, t: [*config_args(d), "--config.parallel=mpi", f"--workdir={t / 'w'}"],
        ["config.parallel", "'mpi'", "--config.parallel"]),
    "train_busy_workdir": (  # the test holds the lock, as a running training would
        "train", lambda d, t: [*config_args(d), f"--workdir={t / 'busy'}"],
        ["{tmp}/busy is in use by another training run", f"pid {os.getpid()}",
         "{tmp}/busy/.lock", "another --workdir"]),
    "generate_missing_checkpoint": (
        "generate", lambda d, t: [*config_args(d), f"--workdir={t / 'no_run'}",
                                  f"--output_dir={t / 'out'}"],
        ["checkpoint {tmp}/no_run", "does not exist"]),
    "generate_bad_mask_file": (
        "generate", lambda d, t: [*config_args(d), f"--workdir={t / 'no_run'}",
                                  "--scenario=context", f"--mask_file={_bad_mask(t)}",
                                  f"--output_dir={t / 'out'}"],
        ["{tmp}/mask.npy has shape (8, 8)"]),
    "generate_unknown_scenario": (
        "generate", lambda d, t: [*config_args(d), f"--workdir={t / 'no_run'}",
                                  "--scenario=lungs", f"--output_dir={t / 'out'}"],
        ["--scenario=lungs", "organ|context|tumor", "--helpshort"]),
    "evaluate_missing_workdir": (
        "evaluate", lambda d, t: [*config_args(d), f"--workdir={t / 'no_run'}",
                                  f"--output={t / 'table'}"],
        ["checkpoint {tmp}/no_run", "does not exist"]),
    "evaluate_merge_missing_file": (
        "evaluate", lambda d, t: [f"--merge={t / 'a' / 'table1.json'}", f"--output={t / 'm'}"],
        ["--merge", "{tmp}/a/table1.json does not exist"]),
    "quickstart_bad_flag_value": (
        "quickstart", lambda d, t: ["--num_cases=lots", f"--output_dir={t / 'q'}"],
        ["--num_cases=lots", "--helpshort"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_line_without_traceback(tfds_dir, tmp_path, name):
  module, make_args, texts = CASES[name]
  args = make_args(tfds_dir, tmp_path)
  if name == "train_busy_workdir":
    with run_workdir.lock(str(tmp_path / "busy")):
      proc = run_cli(module, *args)
  else:
    proc = run_cli(module, *args)
  out = proc.stdout + proc.stderr
  assert proc.returncode == cli.EXIT_USER_ERROR, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert "Downloading and preparing" not in out, out[-3000:]
  prefix = f"ctdiff_jax.{module}: error: "
  errors = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
  assert len(errors) == 1, proc.stderr[-3000:]
  message = proc.stderr[proc.stderr.index(prefix):]
  for text in texts:
    assert text.format(tmp=tmp_path, tfds=tfds_dir) in message, (text, message)
  assert not (tmp_path / "out" / "manifest.csv").exists()


def test_verbose_shows_the_traceback_of_a_user_error(tfds_dir, tmp_path):
  proc = run_cli("train", *config_args(tfds_dir), "--config.data.mask_mode=nope",
                 f"--workdir={tmp_path / 'w'}", verbose=True)
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert "ValueError: config.data: unknown mask_mode 'nope'" in proc.stderr, proc.stderr[-2000:]
