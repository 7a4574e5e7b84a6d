"""Orbax checkpoints of the train state and the Grain iterator state.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. The state is saved unreplicated (one copy,
no device axis), so a run restores onto any device count; `data` is the Grain iterator state
(per process), so a resumed run continues the exact batch sequence.

Multi-process runs: every process calls `save`/`restore` (Orbax synchronises them); the
state, the same on every process, is written once by process 0, the iterator state once per
process (`data/process_<p>-of-<n>.json`). A run with another process count finds no iterator
state of its own (`has_data_state`) and restores the state only (trainer.py positions the
data by step).

A save is written into `<step>.orbax-checkpoint-tmp-*` and renamed to `<step>` once complete
(Orbax's atomic rename), so a run killed mid-save (async saves run in a background thread)
leaves only a temporary folder: the next run resumes from the last complete step and the
manager removes the leftover (the trainer holds the workdir lock, so no other run is saving).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import grain.python as grain
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                   with_data: bool = True) -> ocp.CheckpointManager:
  handlers = {"state": ocp.StandardCheckpointHandler()}
  if with_data:
    handlers["data"] = grain.PyGrainCheckpointHandler()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)  # unfinished saves of a killed run (module docstring)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any | None) -> None:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.PyGrainCheckpointSave(data_iter)
  manager.save(int(step), args=ocp.args.Composite(**items))


def has_data_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` holds this process's Grain iterator state (saved with this process count)."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return os.path.exists(os.path.join(str(manager.directory), str(int(step)), "data", name))


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None = None,
            step: int | None = None) -> tuple[Any, int]:
  """Restores `step` (default: latest) onto `abstract_state`'s structure; returns (state, step)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.PyGrainCheckpointRestore(data_iter)
  restored = manager.restore(int(step), args=ocp.args.Composite(**items))
  logging.info("restored checkpoint step %d from %s", step, manager.directory)
  return restored["state"], int(step)


def restore_state_only(path_or_workdir: str, abstract_state: Any,
                       step: int | None = None) -> tuple[Any, int]:
  """Restores just the train state from a workdir or a `checkpoints` dir (for generate/evaluate).

  Raises a clear FileNotFoundError / ValueError for a missing or incompatible checkpoint.
  """
  path = os.path.abspath(path_or_workdir)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path_or_workdir}")
  # Not read_only=True: Orbax then logs two warnings per restore; this manager never saves.
  manager = ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {path} (train first, or pass --checkpoint)")
  try:
    restored = manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"checkpoint {path}/{step} does not match this config's model (was it trained with "
        f"another config?): {e}") from e
  finally:
    manager.close()
  return restored["state"], int(step)


def abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
