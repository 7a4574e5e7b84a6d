"""Shared pytest setup: two simulated CPU devices and paths to the read-only shared data."""

import os
import pathlib

# Must happen before jax is imported anywhere: tests compare 1- and 2-device steps.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top

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
