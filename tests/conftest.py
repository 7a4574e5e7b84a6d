"""Shared pytest setup: two simulated CPU devices and paths to the read-only shared data."""

import os
import pathlib

# Must happen before jax is imported anywhere: tests compare 1- and 2-device steps.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


@pytest.fixture(scope="session")
def totalseg_dir() -> pathlib.Path:
  if not (TOTALSEG_DIR / "labels.json").exists():
    pytest.skip(f"shared CT data not found at {TOTALSEG_DIR}")
  return TOTALSEG_DIR


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES_DIR.exists():
    pytest.skip(f"shared fixtures not found at {FIXTURES_DIR}")
  return FIXTURES_DIR
