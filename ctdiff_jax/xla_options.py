"""XLA compiler options of CPU-only runs: compile the generated kernels at LLVM -O1.

On XLA:CPU most of a train step's compile is LLVM code generation for the element-wise
fusions (GroupNorm, the optimiser update, the parameter slices), while the step's run time
is spent in the library convolutions and matmuls, which the option does not touch. Measured
on the 2-core CPU machine (benchmarks/, BENCHMARKS.md): the `:smoke` train step compiles in
~8-9 s instead of ~11-13 s at the same step time; the `:reference` step 28-31 s instead of
32 s at 2.70 vs 2.79 s per step; the training + generation tests 363 s instead of 451 s cold.

GPU and TPU runs keep XLA's defaults: the option is added only when no accelerator plugin is
installed (or JAX_PLATFORMS=cpu), and never over an explicit `--xla_backend_optimization_level`
in XLA_FLAGS. XLA reads XLA_FLAGS when the first backend starts, so `apply()` must run before
the first jax computation (`cli.run` calls it before `main`); later it changes nothing.
This module imports no jax.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import MutableMapping

CPU_FLAGS = ("--xla_backend_optimization_level=1",)
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "jax_plugins")


def cpu_only(environ: MutableMapping[str, str] = os.environ) -> bool:
  """True when jax can only run on the CPU here (JAX_PLATFORMS=cpu, or no accelerator plugin)."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.strip().lower() == "cpu"
  if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES):
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


def with_cpu_flags(xla_flags: str) -> str:
  """`xla_flags` plus CPU_FLAGS, each unless the same option is already set there."""
  out = xla_flags.split()
  for flag in CPU_FLAGS:
    if not any(f.split("=")[0] == flag.split("=")[0] for f in out):
      out.append(flag)
  return " ".join(out)


def apply(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds CPU_FLAGS to environ["XLA_FLAGS"] on a CPU-only install; returns whether it did."""
  if not cpu_only(environ):
    return False
  environ["XLA_FLAGS"] = with_cpu_flags(environ.get("XLA_FLAGS", ""))
  return True
