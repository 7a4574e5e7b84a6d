"""benchmarks/: our side of the gpu suite runs start to finish in a tiny CPU dry run.

torch is not in CI, so the peer is switched off (`--peer_python=none`) and its cells must say
so; every item of ours must produce finite, positive throughputs and the report its rows.
"""

import json
import math
import os
import subprocess
import sys
import time

import jax
import pytest

from benchmarks import report, suites
from conftest import REPO_ROOT

ITEMS = ("unet", "ddim", "fid", "records", "loader", "compile")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, totalseg_dir, fid_source):
  del fid_source  # the FID item converts the weights from it on first use
  out = tmp_path_factory.mktemp("bench")
  cmd = [sys.executable, "-m", "benchmarks.run", "--suite=gpu", "--dry_run",
         f"--output={out / 'B.md'}", f"--json={out / 'B.json'}", "--peer_python=none",
         f"--manual_dir={totalseg_dir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cache = jax.config.jax_compilation_cache_dir  # conftest's: warm reruns skip the compiles
  if cache:
    env["BENCH_JAX_CACHE"] = cache  # (the cold-compile item never uses it)
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                        env=env, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return (out / "B.md").read_text(), json.loads((out / "B.json").read_text())


def test_every_item_measured_on_our_side(dry_run):
  text, raw = dry_run
  for row in suites.rows("gpu"):
    if row.side == "peer compiled":
      continue
    runs = raw["results"][row.item]["ours"]["runs"]
    assert runs, row.item
    values = [r[row.ours] for r in runs if row.ours in r]
    if row.ours == "peak_GiB":  # only GPUs report device memory
      continue
    assert values and all(math.isfinite(v) and v > 0 for v in values), (row.item, row.ours)
  assert raw["meta"]["info"]["ours"]["jax"]
  for item in ITEMS:
    assert item in raw["results"]


def test_report_says_peer_skipped(dry_run):
  text, _ = dry_run
  assert "skipped (no torch)" in text
  assert "other processes used" in text  # the measured share, not only the load
  assert "python -m benchmarks.run --suite=gpu --dry_run" in text
  loader_rows = [l for l in text.splitlines() if "examples/s, 0 workers" in l]
  assert len(loader_rows) == 1 and "x |" in loader_rows[0]  # ratio vs the smoke step


def test_verdict_flags_a_missed_target():
  row = suites.Row("unet", "train", "a", "peer", "a", target=suites.Target("ratio", 1.0, ">= 1x"))
  assert report._verdict(row, [0.8, 1.2], [2.0]) == ("0.50x", ">= 1x: **NOT met**")
  assert report._verdict(row, [3.0], [2.0]) == ("1.50x", ">= 1x: met")
  slow = suites.Row("compile", "s", "a", "peer", "a", higher_better=False,
                    target=suites.Target("max_s", 10.0, "< 10 s"))
  assert report._verdict(slow, [12.0], [3.0]) == ("0.25x", "< 10 s: **NOT met**")


def test_busy_flag_uses_other_processes_cpu_not_the_load():
  """The end load is the benchmark's own workers: an idle run must not read as shared."""
  own_load = {"cores": 2, "load": "0.5 0.5 0.5", "load_end": "2.6 2.7 3.4"}
  assert not report._busy(dict(own_load, foreign_cpu=0.02))
  assert report._busy(dict(own_load, foreign_cpu=0.4))
  assert report._busy(dict(own_load, foreign_cpu=None))  # no /proc: the load decides


def test_own_cpu_counts_live_workers():
  """A live child's CPU is ours (so it is not counted as another job's)."""
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  before = run._own_cpu_s()  # pylint: disable=protected-access
  child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                            "while time.process_time() - t < 5: pass"])
  try:
    stat = f"/proc/{child.pid}/stat"
    while child.poll() is None:  # until the child has burnt >= 1 s of CPU (not wall time)
      fields = open(stat).read().rsplit(")", 1)[1].split()
      if run._proc_cpu_s(fields) >= 1.0:  # pylint: disable=protected-access
        break
      time.sleep(0.05)  # (a busy poll would itself be >= 1 s of our CPU)
    assert child.poll() is None, "the child should still be running"
    assert run._own_cpu_s() - before >= 1.0  # pylint: disable=protected-access
  finally:
    child.kill()
    child.wait()
