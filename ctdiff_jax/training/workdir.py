"""Claiming a training workdir: the config is checked, then one run at a time holds the workdir.

`claim(workdir, config)` (a context manager, taken by trainer.train_and_evaluate before it
writes anything):
- `check_config` turns a bad config field (an unknown mask_mode, parallel mode or model
  family, a step count < 1, ...) into a ValueError that names the field and the fix, before
  any data is read or compiled;
- `<workdir>/.lock` is held with fcntl.flock for the whole run, so a second training into the
  same workdir (which would interleave checkpoints and metrics) stops at once with a message
  naming the running one (pid, host, start time from the lock file). The lock goes with the
  process, also when it is killed; the lock file stays (deleting it would race).
  In a multi-process run (one workdir shared by all hosts) process 0 holds `.lock` and
  process p > 0 `.lock.process<p>`: the run's own processes do not lock each other out, and
  a second run into the workdir is refused on every process.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from typing import Any, Iterator

from ctdiff_jax import cli

try:
  import fcntl
except ImportError:  # Windows: no flock, no lock
  fcntl = None

LOCK_NAME = ".lock"
# (config field, smallest value): counts that must be positive.
_AT_LEAST_ONE = ("num_train_steps", "per_device_batch_size", "log_every_steps",
                 "checkpoint_every_steps", "image_size")


class WorkdirBusyError(cli.UserError):
  """Another training run holds the workdir (the CLI prints it as one error line)."""


def _fix(field: str) -> str:
  return f"fix --config.{field}=... or the config file"


def check_config(config) -> None:
  """Raises ValueError naming the first bad field of a training config (see module docstring)."""
  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import transforms
  from ctdiff_jax.training import parallel
  from ctdiff_jax.training import tasks
  # pylint: enable=g-import-not-at-top
  try:
    tasks.task_class(config.model_family)
  except ValueError as e:
    raise ValueError(f"{e}: {_fix('model_family')}") from None
  if config.parallel not in parallel.MODES:
    raise ValueError(f"config.parallel: unknown mode {config.parallel!r}; expected one of "
                     f"{parallel.MODES}: {_fix('parallel')}")
  for field in _AT_LEAST_ONE:
    if field in config and int(config[field]) < 1:
      raise ValueError(f"config.{field} must be >= 1, got {config[field]}: {_fix(field)}")
  try:
    transforms.ExampleConfig.from_data_config(config.data)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.data: {e}: fix the --config.data.<field>=... override or the "
                     f"config file") from e


def _holder(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      info = json.loads(f.read() or "{}")
    return (f"pid {info['pid']} on host {info['host']}, started {info['started']}")
  except (OSError, ValueError, KeyError):
    return "another process"


def lock_name(process_index: int = 0) -> str:
  return LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.process{process_index}"


@contextlib.contextmanager
def lock(workdir: str, process_index: int = 0) -> Iterator[str]:
  """Holds `<workdir>/.lock` (process 0; see module docstring) for the block.

  Raises WorkdirBusyError if another run holds it.
  """
  path = os.path.join(workdir, lock_name(process_index))
  if fcntl is None or "://" in workdir:  # no flock on Windows / remote file systems
    yield path
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(
          f"workdir {workdir} is in use by another training run ({_holder(path)}; lock file "
          f"{path}): wait for it to finish, stop it, or pass another --workdir") from None
    try:
      f.seek(0)
      f.truncate()
      f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "started": datetime.datetime.now().isoformat(timespec="seconds")}))
      f.flush()
      yield path
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim(workdir: str, config: Any, process_index: int = 0) -> Iterator[str]:
  """check_config, then `lock`: what a training run does before it touches its workdir."""
  check_config(config)
  with lock(workdir, process_index) as path:
    yield path
