"""The build CLI as a user meets it: `python -m ctdiff_jax.build_dataset` in a subprocess.

- Every broken input of a raw folder (the table BROKEN) ends with exit status 1 and ONE
  `ctdiff_jax.build_dataset: error: ...` line naming the case and file, no traceback, no TFDS
  banner; --verbose / CTDIFF_VERBOSE=1 show the traceback.
- SIGKILL during a build leaves no dataset under its final name; the rerun removes the
  leftover and equals a clean build.
- Two builds of one dataset into one data_dir at once take turns (a lock file): the second
  reuses the first's dataset, and both equal a clean build.
The kill and lock tests slow the write pass down (a sleep per record, patched in before the
CLI module runs as __main__) so that there is a "during" to act in.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import tensorflow_datasets as tfds

from ctdiff_jax import cli
from ctdiff_jax import phantom
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import naming
import test_builder_bad_input as bad_input
import test_volumes_layouts as synth

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROG = "ctdiff_jax.build_dataset"
ERROR = f"{PROG}: error: "


def cli_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  return {**env, **extra}


def build_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", PROG, *args], cwd=REPO_ROOT,
                        env=env or cli_env(), capture_output=True, text=True, timeout=300,
                        check=False)


# ---- broken inputs ---------------------------------------------------------------------------

LIVER = ["--config=liver", "--image_size=16", "--spacing_mm=4"]


def _bad_labels_json(root):
  (root / "labels.json").write_text('{"1": "liver", 2: spleen}')


def _no_organ(root):
  for case in ("good", "bad"):  # both cases valid, neither has a liver voxel
    hu, lab = synth.make_volume({2: [1]})
    synth.save_nii(root / f"{case}_seg.nii.gz", lab, synth.ras_affine())


def _duplicate_flat(root):
  hu, _ = synth.make_volume(bad_input.GOOD)
  synth.save_nii(root / "good_ct.nii", hu, synth.ras_affine())  # beside good_ct.nii.gz


def _kinds(*kinds):
  return {k: (bad_input.BAD[k][0], [], bad_input.BAD[k][1]) for k in kinds}


# name -> (break the good/bad flat folder, extra flags, text the error must hold after
# "case 'bad'" / the raw folder). The library-level messages are pinned in
# test_builder_bad_input.py; here: the CLI shows them as one error line.
BROKEN = {
    **_kinds("corrupt", "truncated", "4d", "2d", "nan_inf", "shape_mismatch",
             "affine_mismatch", "missing_label", "fractional_labels", "zero_spacing",
             "singular_affine"),
    "bad_labels_json": (_bad_labels_json, [], "labels.json: cannot read label map JSON"),
    "no_organ": (_no_organ, [], "no slices to write: none of the 2 readable cases in"),
    "unknown_organ": (None, ["--organs=liver,pancreas"], "unknown organ 'pancreas'"),
    "duplicate_ids": (_duplicate_flat, [], "duplicate case id 'good' in"),
    "missing_manual_dir": (lambda root: os.rename(root, root.with_name("moved")), [],
                           "does not exist: put the raw CT cases there"),
    "bad_option": (None, ["--image_size=4"], "image_size must be in [8, 4096], got 4"),
}


def _expected_names(name: str, root: pathlib.Path) -> list[str]:
  """What the error line must name: the case and its file, else the folder / field."""
  if name in bad_input.BAD:  # ... and what to do
    return ["case 'bad'", str(root / BROKEN[name][2]), "(--skip_bad_cases) to skip and count"]
  return {"bad_labels_json": [str(root / "labels.json")],
          "no_organ": [str(root), "or lower min_organ_area"],
          "unknown_organ": [str(root)],
          "duplicate_ids": [f"{root / 'good_ct.nii'} and {root / 'good_ct.nii.gz'}: one id per "
                            "case: rename or remove one of them"],
          "missing_manual_dir": [str(root)],
          "bad_option": ["image_size"]}[name]


def run_broken(tmp_path: pathlib.Path, name: str, *flags: str, **env: str
               ) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  """The raw folder of row `name` of BROKEN and the CLI's run on it."""
  make_bad, row_flags, _ = BROKEN[name]
  root = bad_input._raw(tmp_path)  # pylint: disable=protected-access
  if make_bad is not None:
    make_bad(root)
  args = [*LIVER, f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}", *row_flags, *flags]
  return root, build_cli(*args, env=cli_env(**env))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_input_is_one_error_line(tmp_path, name):
  root, proc = run_broken(tmp_path, name)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert "Downloading and preparing" not in out and "Using custom data config" not in out, out
  errors = [line for line in proc.stderr.splitlines() if line.startswith(ERROR)]
  assert len(errors) == 1, proc.stderr
  assert BROKEN[name][2] in errors[0], errors[0]
  for what in _expected_names(name, root):
    assert what in errors[0], (what, errors[0])
  assert ERROR not in proc.stdout
  # Nothing under the dataset's name (no version folder, finished or not).
  cfg_dirs = list((root.parent / "out" / naming.DATASET).glob("liver*/*"))
  assert not cfg_dirs, cfg_dirs


@pytest.mark.parametrize("flags,env", [(["--verbose"], {}), ([], {cli.VERBOSE_ENV: "1"})])
def test_verbose_shows_the_traceback(tmp_path, flags, env):
  _, proc = run_broken(tmp_path, "corrupt", *flags, **env)
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert "VolumeError: case 'bad'" in proc.stderr, proc.stderr[-2000:]


def test_skip_bad_cases_counts_a_zero_spacing_case(tmp_path):
  root = bad_input._raw(tmp_path)  # pylint: disable=protected-access
  bad_input.BAD["zero_spacing"][0](root)
  proc = build_cli(*LIVER, f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}",
                   "--skip_bad_cases")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cases skipped as bad input: 1" in proc.stdout
  assert f"{root / 'bad_ct.nii.gz'}: image has invalid voxel spacing" in proc.stdout
  assert "Downloading and preparing" not in proc.stdout
  assert "Using custom data config" not in proc.stderr and "Traceback" not in proc.stderr
  meta = naming.read_dataset_metadata(tmp_path / "out", "liver_16px_4mm")
  assert list(meta["build"]["cases_skipped"]) == ["bad"]


def test_lits_duplicate_ids_across_subfolders_name_both_paths(tmp_path):
  root = tmp_path / "lits"
  synth.write_lits(root / "Training Batch 1", {0: bad_input.GOOD, 1: bad_input.GOOD})
  synth.write_lits(root / "Training Batch 2", {1: bad_input.GOOD})
  proc = build_cli(*LIVER, f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}",
                   "--skip_bad_cases")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert (f"{ERROR}duplicate case id 'volume-1' in {root}: "
          f"{root / 'Training Batch 1' / 'volume-1.nii'} and "
          f"{root / 'Training Batch 2' / 'volume-1.nii'}") in proc.stderr, proc.stderr


# ---- a killed build, two builds at once -------------------------------------------------------

CONFIG = "kidneys_16px_24mm"  # 16 px x 24 mm covers the phantom's 384 mm field of view
SLOW_BUILD = textwrap.dedent("""
    import runpy, sys, time
    from ctdiff_jax.ingest import volumes
    slice_records = volumes.slice_records
    def slow(*args, **kwargs):
      for record in slice_records(*args, **kwargs):
        time.sleep({delay})
        yield record
    volumes.slice_records = slow
    sys.argv = {argv!r}
    runpy.run_module("ctdiff_jax.build_dataset", run_name="__main__", alter_sys=True)
""")


@pytest.fixture(name="cohort", scope="module")
def _cohort(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """8 tiny phantom cases and the records of a clean build of them."""
  tmp = tmp_path_factory.mktemp("cohort")
  raw = tmp / "raw"
  phantom.write_cohort(raw, 8, shape=(24, 24, 12), spacing=(16.0, 16.0, 20.0), progress=False)
  ingest_build.build(CONFIG, raw, tmp / "clean")
  return raw, records_of(tmp / "clean")


def records_of(data_dir: pathlib.Path) -> dict[str, list[tuple]]:
  out = {}
  for split, src in tfds.data_source(f"ct_slices/{CONFIG}", data_dir=str(data_dir)).items():
    out[split] = sorted(
        (r["case_id"], int(r["slice_index"]), *(r[k].tobytes() for k in
         ("image", "labels", "prev_image", "next_image", "spacing_mm")))
        for r in (src[i] for i in range(len(src))))
  return out


def slow_build(raw: pathlib.Path, data_dir: pathlib.Path, *flags: str, delay: float = 0.1
               ) -> subprocess.Popen:
  argv = [PROG, f"--config={CONFIG}", f"--manual_dir={raw}", f"--data_dir={data_dir}", *flags]
  return subprocess.Popen([sys.executable, "-c", SLOW_BUILD.format(delay=delay, argv=argv)],
                          cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
  end = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"build ended before {what}: {proc.communicate()}")
    if time.time() > end:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def incomplete_dirs(data_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted((data_dir / naming.DATASET / CONFIG).glob("incomplete.*"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_sigkill_mid_write_leaves_no_dataset_and_the_rerun_equals_a_clean_build(
    cohort, tmp_path, overwrite):
  raw, clean = cohort
  out = tmp_path / "out"
  flags = ["--overwrite"] if overwrite else []
  if overwrite:  # killed while replacing an older build (of 4 of the 8 cases): no mix either
    old = tmp_path / "old"
    old.mkdir()
    for path in [raw / "labels.json", *sorted(raw.glob("*.nii.gz"))[:8]]:
      shutil.copy(path, old)
    assert ingest_build.build(CONFIG, old, out)["cases_found"] == 4
  proc = slow_build(raw, out, *flags)
  # Killed once the first split's shard is on disk, while the next split is generated.
  wait_for(lambda: any(p.glob("*.array_record*") for p in incomplete_dirs(out)), proc,
           "the first shard")
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  left = incomplete_dirs(out)
  assert len(left) == 1, left  # TFDS's temp folder, never renamed
  assert [p.name for p in (out / naming.DATASET / CONFIG).iterdir()] == [left[0].name]
  with pytest.raises(FileNotFoundError, match="no built dataset"):
    naming.dataset_dir(out, CONFIG)
  rerun = build_cli(f"--config={CONFIG}", f"--manual_dir={raw}", f"--data_dir={out}", *flags)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "already built" not in rerun.stdout
  assert f"removing {left[0]}, left behind by an interrupted build" in rerun.stderr
  assert incomplete_dirs(out) == []
  assert records_of(out) == clean
  if overwrite:  # and a plain --overwrite of a finished build replaces it
    again = build_cli(f"--config={CONFIG}", f"--manual_dir={old}", f"--data_dir={out}", *flags)
    assert again.returncode == 0 and "cases found 4, read 4" in again.stdout, again.stderr
    assert [p.name for p in (out / naming.DATASET / CONFIG).iterdir()] == ["1.0.0"]
    assert records_of(out) != clean


def test_two_builds_at_once_take_turns(cohort, tmp_path):
  raw, clean = cohort
  out = tmp_path / "out"
  first = slow_build(raw, out, delay=0.05)
  wait_for(lambda: incomplete_dirs(out), first, "the first build to start writing")
  second = slow_build(raw, out, delay=0.0)  # waits for the lock
  outs = [p.communicate(timeout=120) for p in (first, second)]
  assert [first.returncode, second.returncode] == [0, 0], outs
  assert "already built" not in outs[0][0] and "(already built, reused)" in outs[1][0], outs
  assert (f"another build of ct_slices/{CONFIG} is running (lock "
          f"{out / naming.DATASET / CONFIG}.lock): waiting") in outs[1][1], outs[1][1]
  assert [p.name for p in (out / naming.DATASET / CONFIG).iterdir()] == ["1.0.0"]
  assert records_of(out) == clean
