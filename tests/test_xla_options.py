"""xla_options: LLVM -O1 on CPU-only runs, never over the user's own XLA_FLAGS or on a GPU/TPU."""

import subprocess
import sys

from conftest import REPO_ROOT
from ctdiff_jax import xla_options


def test_cpu_platform_gets_the_flag_once():
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_options.apply(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      "--xla_backend_optimization_level=1"]
  assert xla_options.apply(env)  # idempotent
  assert env["XLA_FLAGS"].count("xla_backend_optimization_level") == 1


def test_explicit_level_wins():
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=3"}
  xla_options.apply(env)
  assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=3"


def test_accelerator_platforms_keep_xla_defaults():
  for platforms in ("cuda", "tpu", "cuda,cpu"):
    env = {"JAX_PLATFORMS": platforms}
    assert not xla_options.apply(env) and "XLA_FLAGS" not in env, platforms


def test_cli_applies_it_before_jax_starts():
  """A CLI process sees the flag in XLA_FLAGS when its backend starts (here: CPU)."""
  code = ("import os, sys; from ctdiff_jax import cli\n"
          "def main(argv):\n"
          "  import jax; jax.devices(); print(os.environ['XLA_FLAGS'])\n"
          "sys.argv = ['prog']; cli.run(main, 'prog')\n")
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout
  assert out.split() == ["--xla_backend_optimization_level=1"]
