"""What the exporters of one export share: the target, the exporter interface, file names, spool.

Every exporter takes the `Target` and gets each generated chunk (a runner.Samples) through
`add(samples)`; `finish()` writes what it still has to and returns what it wrote where (merged
into the run's summary); `close()` removes its temporary files, also after an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Target:
  """Where an export goes and what every exporter needs to know about it.

  meta: the source dataset's metadata; num_samples: slices that will be added (sizes the
  spools); window: HU display window of the PNGs and the figure; provenance: scenario,
  source_split, seed, checkpoint, checkpoint_step, ... (manifest, TFDS metadata); done: the
  sample indices an interrupted run of the same export already wrote (resume.py).
  """

  output_dir: str
  meta: Mapping[str, Any]
  num_samples: int
  window: tuple[float, float]
  provenance: Mapping[str, Any]
  done: frozenset[int] = frozenset()

  def path(self, *names: str) -> str:
    return os.path.join(self.output_dir, *names)


class Exporter:
  """One output of an export (a file format, the manifest, the volumes, the TFDS dataset)."""

  # Per-slice exporters: manifest column -> file name suffix (after the sample's stem).
  files: Mapping[str, str] = {}

  def __init__(self, target: Target):
    self.target = target
    self.slice_files = 0  # per-slice files written so far

  def add(self, samples) -> None:
    raise NotImplementedError

  def needs(self, indices: Sequence[int]) -> bool:
    """Whether a chunk of these sample indices must be generated for this exporter (resume)."""
    return any(int(i) not in self.target.done for i in indices)

  def todo(self, samples) -> list[int]:
    """Positions in a chunk of the samples not written by an interrupted earlier run."""
    return [j for j in range(len(samples)) if int(samples.index[j]) not in self.target.done]

  def finish(self) -> dict[str, Any]:
    return {}

  def close(self) -> None:
    """Removes temporary files (called after finish, or after an error)."""


def safe_name(value: str) -> str:
  """A case id usable in file names."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", value) or "case"


def stem(index: int, case_id: str, slice_index: int) -> str:
  return f"{index:06d}_{safe_name(case_id)}_{int(slice_index):04d}"


def sample_stem(samples, j: int) -> str:
  """The file name stem of sample j of a chunk."""
  return stem(int(samples.index[j]), samples.case_id[j], int(samples.slice_index[j]))


def replace_dir(tmp: str, final: str) -> None:
  """Moves a finished temporary folder to its final name (replacing an older one there)."""
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(tmp, final)


class Spool:
  """Preallocated on-disk arrays (numpy memmaps) of some Samples fields, plus per-row meta.

  Lets the exporters that need every slice at the end (volumes, TFDS) stream endless runs
  without holding them in memory; `close()` deletes the files. Those exporters see every
  slice, also on resume (their `needs` is always true): their output never mixes two runs.
  """

  def __init__(self, root: str, num: int, size: int, fields: Mapping[str, Any]):
    self.root = root
    os.makedirs(root, exist_ok=True)
    self.arrays = {k: np.lib.format.open_memmap(os.path.join(root, f"{k}.npy"), mode="w+",
                                                dtype=dt, shape=(num, size, size, 1))
                   for k, dt in fields.items()}
    self.meta: list[dict[str, Any]] = []

  def add(self, samples) -> None:
    """Appends every sample of a chunk (the Samples fields named like the arrays)."""
    for j in range(len(samples)):
      k = len(self.meta)
      for name, arr in self.arrays.items():
        arr[k] = getattr(samples, name)[j]
      self.meta.append({"case": samples.case_id[j], "slice": int(samples.slice_index[j]),
                        "round": int(samples.round[j]),
                        "spacing": np.asarray(samples.spacing_mm[j], np.float32)})
      if getattr(samples, "value_scale", None) is not None:  # MR / PET: the source scale
        self.meta[-1].update(value_scale=np.float32(samples.value_scale[j]),
                             intensity_ref=np.asarray(samples.intensity_ref[j], np.float32))

  def close(self) -> None:
    for a in self.arrays.values():
      a.flush()
    self.arrays = {}
    shutil.rmtree(self.root, ignore_errors=True)
    try:  # the shared parent (.spool/), once its last spool is gone
      os.rmdir(os.path.dirname(self.root))
    except OSError:
      pass
