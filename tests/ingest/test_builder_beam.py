"""The ct_slices builder on Apache Beam (DirectRunner) writes the local build's records.

Cohort: the shared CT (2 cases) + 16 phantom cases, in one csv-layout manifest (symlinks, no
copy), and the same plus one corrupt case. apache-beam cannot live in .venv (pyproject.toml,
the beam extra), so the Beam builds and `tfds build` run in the Beam venv
(`bash scripts/setup_beam.sh`, or env CTDIFF_BEAM_PYTHON) as subprocesses (beam_side.py),
once for the module; the local builds run here. Without the Beam venv the tests skip, and
fail under CI=true (conftest.missing_resource).
"""

from __future__ import annotations

import csv
import fcntl
import importlib.util
import json
import os
import pathlib
import subprocess
import tempfile

from array_record.python import array_record_module
import pytest
import tensorflow_datasets as tfds

from conftest import REPO_ROOT, missing_resource
from ctdiff_jax import cli
from ctdiff_jax import phantom
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import volumes

CONFIG = "kidneys_16px_24mm"  # 16 px * 24 mm: the whole 384 mm phantom field of view
BAD = "broken"  # the corrupt case of the bad cohort
BEAM_PYTHON = pathlib.Path(os.environ.get("CTDIFF_BEAM_PYTHON",
                                          REPO_ROOT / ".venv-beam" / "bin" / "python"))
DIRECT = "runner=DirectRunner"
# Two worker processes: cases and per-case functions are pickled to another process.
DIRECT_2 = "runner=DirectRunner,direct_running_mode=multi_processing,direct_num_workers=2"


def _write_cohort(root: pathlib.Path, totalseg_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  phantom.write_cohort(root / "phantom", 16, shape=(32, 32, 16), spacing=(12.0, 12.0, 15.0),
                       progress=False)
  rows = [(c, f"{totalseg_dir}/{c}_ct.nii.gz", f"{totalseg_dir}/{c}_seg.nii.gz",
           f"{totalseg_dir}/labels.json") for c in ("s01", "s02")]
  rows += [(f"phantom_{i:03d}", f"../phantom/phantom_{i:03d}_ct.nii.gz",
            f"../phantom/phantom_{i:03d}_seg.nii.gz", "../phantom/labels.json")
           for i in range(16)]
  (root / f"{BAD}_ct.nii.gz").write_bytes(b"not a NIfTI file" * 100)
  bad_row = (BAD, f"../{BAD}_ct.nii.gz", "../phantom/phantom_000_seg.nii.gz",
             "../phantom/labels.json")
  out = {}
  # The bad case sorts in the middle: a Beam build must scan past it as the local one does.
  for name, cohort_rows in (("good", rows), ("bad", rows[:9] + [bad_row] + rows[9:])):
    (root / name).mkdir()
    with open(root / name / "cases.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["case_id", "image", "label", "label_map"])
      writer.writerows(cohort_rows)
    out[name] = root / name
  return out


def _beam_builds(specs: list[dict]) -> list[dict]:
  proc = subprocess.run([str(BEAM_PYTHON), str(pathlib.Path(__file__).with_name("beam_side.py")),
                         json.dumps(specs)], capture_output=True, text=True, timeout=900,
                        check=False, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _tfds_build(manual_dir: pathlib.Path, data_dir: pathlib.Path, *extra: str):
  tfds_cli = BEAM_PYTHON.parent / "tfds"
  return subprocess.run(
      [str(tfds_cli), "build", str(REPO_ROOT / "data_builders" / "ct_slices"),
       f"--manual_dir={manual_dir}", f"--config={CONFIG}", f"--data_dir={data_dir}", *extra],
      capture_output=True, text=True, timeout=900, check=False, cwd=data_dir.parent)


def _run_all(root: pathlib.Path, totalseg_dir: pathlib.Path) -> dict:
  """All builds (JSON-able results): Beam ones in the Beam venv, local ones here."""
  raw = _write_cohort(root, totalseg_dir)
  skip = {"skip_bad_cases": True}
  specs = [
      dict(config=CONFIG, manual_dir=str(raw["bad"]), data_dir=str(root / "beam_skip"),
           options=skip, beam_options=DIRECT_2),
      dict(config=CONFIG, manual_dir=str(raw["bad"]), data_dir=str(root / "beam_error"),
           options={}, beam_options=DIRECT),
  ]
  beam_skip, beam_error = _beam_builds(specs)
  cli = {"beam": _tfds_build(raw["good"], root / "cli_beam", f"--beam_pipeline_options={DIRECT}"),
         "local": _tfds_build(raw["good"], root / "cli_local")}
  cli = {mode: [proc.returncode, proc.stderr[-3000:]] for mode, proc in cli.items()}
  local_skip = ingest_build.build(CONFIG, raw["bad"], root / "local_skip", **skip)
  local_good = ingest_build.build(CONFIG, raw["good"], root / "local_good")
  with pytest.raises(volumes.VolumeError) as local_error:
    ingest_build.build(CONFIG, raw["bad"], root / "local_error")
  return dict(root=str(root), beam_skip=beam_skip, beam_error=beam_error, cli=cli,
              local_skip=local_skip, local_good=local_good, local_error=str(local_error.value))


@pytest.fixture(name="runs", scope="module")
def _runs(tmp_path_factory, totalseg_dir) -> dict:
  """_run_all once per test session, also when pytest-xdist runs this module's tests on
  several workers: the first one builds, the others wait for and read its results."""
  if not BEAM_PYTHON.exists():
    missing_resource(f"no Beam venv python at {BEAM_PYTHON}: run `bash scripts/setup_beam.sh` "
                     "(or set CTDIFF_BEAM_PYTHON)")
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    runs = _run_all(tmp_path_factory.mktemp("beam"), totalseg_dir)
  else:
    shared = tmp_path_factory.getbasetemp().parent / "beam_builds"  # this session's, all workers'
    shared.mkdir(exist_ok=True)
    with open(shared.with_suffix(".lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      done = shared / "runs.json"
      if not done.exists():
        attempt = pathlib.Path(tempfile.mkdtemp(dir=shared))  # a failed one's files stay apart
        done.write_text(json.dumps(_run_all(attempt, totalseg_dir)))
      runs = json.loads(done.read_text())
  return dict(runs, root=pathlib.Path(runs["root"]))


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, i
    shift += 7


def _fields(buf: bytes) -> list[tuple[int, bytes]]:
  """(field number, bytes) of a protobuf message whose fields are all length-delimited."""
  out, i = [], 0
  while i < len(buf):
    tag, i = _varint(buf, i)
    assert tag & 7 == 2, f"wire type {tag & 7}"
    size, i = _varint(buf, i)
    out.append((tag >> 3, buf[i: i + size]))
    i += size
  return out


def canonical(serialized: bytes) -> bytes:
  """A serialized tf.train.Example with its feature-map entries in sorted order.

  Protobuf leaves the order of map entries unspecified, and it differs between any two
  processes (two local builds of the same cases in two processes differ in it, not in one
  entry): every entry (feature name + encoded value) must be byte-identical, not their order.
  """
  (number, features), = _fields(serialized)  # Example.features = 1
  entries = _fields(features)  # Features.feature = 1: map<string, Feature> entries
  assert number == 1 and {n for n, _ in entries} == {1}
  return b"".join(sorted(e for _, e in entries))


def _records(data_dir: pathlib.Path) -> dict[str, list[tuple[str, int, bytes]]]:
  """split -> (case id, slice index, canonical serialized record) of every record, sorted."""
  info = tfds.builder(f"ct_slices/{CONFIG}", data_dir=str(data_dir)).info
  out = {}
  for split, split_info in info.splits.items():
    rows = []
    for path in split_info.filepaths:
      reader = array_record_module.ArrayRecordReader(os.fspath(path))
      for raw in reader.read_all():
        ex = info.features.deserialize_example_np(raw)
        assert len(_fields(_fields(raw)[0][1])) == len(info.features)  # every feature
        rows.append((ex["case_id"].decode(), int(ex["slice_index"]), canonical(raw)))
      reader.close()
    out[split] = sorted(rows)
  return out


def _comparable(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if k not in ("seconds", "data_dir")}


def test_beam_build_writes_the_local_records_and_counts_skips(runs):
  beam = runs["beam_skip"]["summary"]
  local = runs["local_skip"]
  assert _comparable(beam) == _comparable(local)
  assert list(beam["cases_skipped"]) == [BAD] and beam["cases_read"] == 18
  got, want = _records(runs["root"] / "beam_skip"), _records(runs["root"] / "local_skip")
  assert {s: len(r) for s, r in got.items()} == {s: len(r) for s, r in want.items()}
  assert {s: len(r) for s, r in got.items()} == {s: n for s, n in local["slices"].items() if n}
  assert got == want  # byte-identical serialized records (up to the feature-map order)
  cases = {c for rows in got.values() for c, _, _ in rows}
  assert "s01" in cases and sum(c.startswith("phantom_") for c in cases) >= 12


def test_beam_build_stops_at_a_bad_case_like_the_local_build(runs):
  kind, message = runs["beam_error"]["error"]
  assert kind == "VolumeError"
  assert message == runs["local_error"]
  assert message.startswith(f"case {BAD!r}") and "--skip_bad_cases" in message
  # Nothing left under the final name: the failed build wrote no dataset.
  assert not list((runs["root"] / "beam_error").glob("ct_slices/*/1.0.0"))


@pytest.mark.parametrize("mode", ["local", "beam"])
def test_tfds_build_cli(runs, mode):
  """`tfds build data_builders/ct_slices` ([tf,beam] venv), with and without Beam options."""
  returncode, stderr = runs["cli"][mode]
  assert returncode == 0, stderr
  assert _records(runs["root"] / f"cli_{mode}") == _records(runs["root"] / "local_good")
  assert sum(runs["local_good"]["slices"].values()) > 0


@pytest.mark.skipif(importlib.util.find_spec("apache_beam") is not None,
                    reason="apache_beam is installed in this venv")
def test_beam_options_without_apache_beam_is_one_clear_error(tmp_path):
  with pytest.raises(cli.UserError, match="scripts/setup_beam.sh"):
    ingest_build.build(CONFIG, tmp_path / "raw", tmp_path / "out", beam_options=DIRECT)
  assert not (tmp_path / "out").exists()
