"""conftest's missing_resource: missing shared data or FID weights skip locally, fail under CI.

Runs pytest in a subprocess on a tiny test file that uses the three resource fixtures, with
CTDIFF_SHARED_DIR and CTDIFF_FID_SOURCE pointing at nothing.
"""

import os
import pathlib
import subprocess
import sys

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
TINY = """
def test_ct(totalseg_dir):
  pass

def test_fixtures(fixtures_dir):
  pass

def test_fid(fid_source):
  pass
"""


def _pytest(tmp_path: pathlib.Path, ci: str | None) -> subprocess.CompletedProcess:
  (tmp_path / "test_tiny.py").write_text(TINY)
  env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
  env.update(CTDIFF_SHARED_DIR=str(tmp_path / "no_shared"),
             CTDIFF_FID_SOURCE=str(tmp_path / "no_fid.whl"),
             PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)]))
  if ci is not None:
    env["CI"] = ci
  # -p conftest: the real tests/conftest.py as a plugin (the tiny file lives outside tests/).
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-p",
       "no:xdist", "-q", "-rs", "test_tiny.py"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_missing_resources_skip_with_reasons_locally(tmp_path):
  proc = _pytest(tmp_path, ci=None)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "3 skipped" in proc.stdout
  shared = tmp_path / "no_shared"
  assert f"shared CT data not found at {shared / 'data' / 'totalseg_ct'}" in proc.stdout
  assert f"shared fixtures not found at {shared / 'fixtures'}" in proc.stdout
  assert "no FID weight archive" in proc.stdout and "no_fid.whl" in proc.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_resources_fail_under_ci(tmp_path, ci):
  proc = _pytest(tmp_path, ci=ci)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "3 errors" in proc.stdout and "skipped" not in proc.stdout
  assert f"[CI={ci}: missing shared data or weights is a failure]" in proc.stdout
  for what in ("shared CT data not found", "shared fixtures not found", "no FID weight archive"):
    assert what in proc.stdout, what
