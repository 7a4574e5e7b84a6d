"""One export written by several processes: each writes a part, `merge` joins them into one.

A generate run of `--num_samples=N` over P processes (hosts.py) splits the global sample
indices into P contiguous blocks, `Shard.range`: process p generates [N*p//P, N*(p+1)//P).
Every slice depends only on (seed, its global index) (runner.iter_samples), so the parts hold
exactly the slices one process would write, each once. Process p writes a normal export of
its block into

  <output_dir>/parts/part-<p>-of-<P>/   per-slice files (global index in the name), manifest.csv,
                                        run.json (the request + `shard`), and:
      records/<first index>.npz         (--tfds / --volumes) every field of the chunk's TFDS
                                        records and volume slices, one file per chunk, written
                                        atomically (tmp + rename): a killed chunk leaves none
      figure_rows.npz                   the Figure 4 rows (global index < FIGURE_ROWS)
      part.json                         the source dataset's metadata and display window

Resuming: a part is resumed like any export (resume.py): the rows and record chunks already
on disk are kept, only the rest is generated (also with --tfds / --volumes, unlike a one-process
export whose spools start over). A part that is complete is not generated again.

`merge(output_dir)` (automatic on process 0 after a barrier under jax.distributed, or
`python -m ctdiff_jax.generate --merge --output_dir=...`) checks that the parts are complete,
of the same request and model, and hold every index 0..N-1 exactly once; moves the per-slice
files up into output_dir, writes one manifest.csv (index order), figure4.png, one TFDS dataset
and the volumes from the record chunks (in index order, so record i is sample i as in a
one-process export), run.json (complete), and removes parts/. The merged export equals a
one-process export of the same request. A killed merge can be run again (files already moved
are found in output_dir).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import shutil
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ctdiff_jax import cli
from ctdiff_jax.generation.export import base
from ctdiff_jax.generation.export import manifest
from ctdiff_jax.generation.export import png
from ctdiff_jax.generation.export import resume
from ctdiff_jax.generation.export import tfds
from ctdiff_jax.generation.export import volumes

PARTS_DIR = "parts"
RECORDS_DIR = "records"
PART_FILE = "part.json"
FIGURE_ROWS_FILE = "figure_rows.npz"
# Samples fields kept per chunk for the merged TFDS dataset and volumes (tfds.py, volumes.py).
RECORD_FIELDS = ("index", "generated_hu", "labels", "mask", "prev_hu", "next_hu", "case_id",
                 "slice_index", "round", "spacing_mm")
OPTIONAL_FIELDS = ("value_scale", "intensity_ref")  # MR / PET only (None for CT)


class MergeError(cli.UserError):
  """The parts of an export cannot be merged (missing, incomplete, of different runs)."""


@dataclasses.dataclass(frozen=True)
class Shard:
  """Process `index` of `count` writes the contiguous block `range(num_samples)` of indices.

  distributed: the processes run under jax.distributed (process 0 merges after a barrier);
  False: independent jobs, merged afterwards with `generate --merge`.
  """

  index: int = 0
  count: int = 1
  distributed: bool = False

  def __post_init__(self):
    if self.count < 1 or not 0 <= self.index < self.count:
      raise ValueError(f"process index {self.index} of {self.count}: need 0 <= index < count")

  def range(self, num_samples: int) -> tuple[int, int]:
    return num_samples * self.index // self.count, num_samples * (self.index + 1) // self.count

  @property
  def name(self) -> str:
    return f"part-{self.index:05d}-of-{self.count:05d}"

  def part_dir(self, output_dir: str) -> str:
    return os.path.join(output_dir, PARTS_DIR, self.name)

  def request(self, request: Mapping[str, Any]) -> dict[str, Any]:
    """The part's run.json request: the whole run's plus its shard."""
    return {**request, "shard": {"index": self.index, "count": self.count}}


def start(output_dir: str, request: Mapping[str, Any], shard: Shard,
          overwrite: bool) -> tuple[str, dict[str, Any] | None]:
  """(part dir, part request); the request is None when the part is complete already.

  Refuses (FileExistsError) an output_dir holding a finished export of the run (or another
  export, see resume.check_output_dir) and parts of a run over another process count. A part
  that is not resumed (new, or --overwrite) starts from an empty folder.
  """
  part_dir, part_request = shard.part_dir(output_dir), shard.request(request)
  resume.check_output_dir(output_dir, request, overwrite)  # a finished or another export
  others = [n for n in _part_names(output_dir) if not n.endswith(f"-of-{shard.count:05d}")]
  if others and not overwrite:
    raise FileExistsError(
        f"{os.path.join(output_dir, PARTS_DIR)} holds parts of a run over another number of "
        f"processes ({others[0]}); run with that many, or --overwrite to start afresh")
  for name in others if shard.index == 0 else ():  # --overwrite: process 0 removes them
    shutil.rmtree(os.path.join(output_dir, PARTS_DIR, name), ignore_errors=True)
  run = resume.read_run(part_dir)
  if (not overwrite and run and run.get("complete")
      and run.get("request") == resume.jsonable(part_request)):
    return part_dir, None
  if not resume.check_output_dir(part_dir, part_request, overwrite):
    shutil.rmtree(part_dir, ignore_errors=True)  # new or --overwrite: nothing of an old part
  return part_dir, part_request


def _part_names(output_dir: str) -> list[str]:
  root = os.path.join(output_dir, PARTS_DIR)
  return sorted(n for n in os.listdir(root) if n.startswith("part-")) if os.path.isdir(
      root) else []


def write_json(path: str, value: Any) -> None:
  """Replaces the JSON file at `path` atomically."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(resume.jsonable(value), f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


class RecordExporter(base.Exporter):
  """part.json, and (records=True) records/<first index>.npz per chunk (module docstring)."""

  def __init__(self, target: base.Target, records: bool):
    super().__init__(target)
    write_json(target.path(PART_FILE), {"meta": target.meta, "window": target.window})
    self.records = records
    self.root = target.path(RECORDS_DIR)
    self.have: set[int] = set()
    if records:
      os.makedirs(self.root, exist_ok=True)
      self.have = {i for f in _record_files(self.root) for i in _indices(f)}

  def needs(self, indices: Sequence[int]) -> bool:
    return self.records and any(int(i) not in self.have for i in indices)

  def add(self, samples) -> None:
    todo = [j for j in range(len(samples)) if int(samples.index[j]) not in self.have]
    if not self.records or not todo:
      return
    fields = RECORD_FIELDS + tuple(f for f in OPTIONAL_FIELDS
                                   if getattr(samples, f, None) is not None)
    arrays = {f: np.asarray(getattr(samples, f))[todo] for f in fields}
    arrays["modality"] = np.asarray(getattr(samples, "modality", "ct"))
    path = os.path.join(self.root, f"{int(arrays['index'][0]):09d}.npz")
    with open(path + ".tmp", "wb") as f:  # renamed once whole: a kill leaves no half chunk
      np.savez(f, **arrays)
    os.replace(path + ".tmp", path)
    self.have.update(int(i) for i in arrays["index"])


def _record_files(root: str) -> list[str]:
  return sorted(glob.glob(os.path.join(root, "*.npz")))


def _indices(path: str) -> list[int]:
  """The sample indices of a record chunk file (reads only that array)."""
  with np.load(path) as z:
    return [int(i) for i in z["index"]]


class FigureRowsExporter(png.FigureExporter):
  """A part's Figure 4 rows (global index < FIGURE_ROWS), saved as they come; drawn by `merge`.

  Saved with every chunk that has some (not in finish), so a resumed part keeps them.
  """

  def __init__(self, target: base.Target):
    super().__init__(target)
    self.path = target.path(FIGURE_ROWS_FILE)
    self.indices: list[int] = []
    if os.path.exists(self.path):  # an interrupted run's (a new part starts in an empty folder)
      with np.load(self.path) as z:
        self.indices = [int(i) for i in z["index"]]
        self.rows = list(zip(z["real"], z["mask"], z["gen"]))

  def needs(self, indices) -> bool:
    return any(int(i) < png.FIGURE_ROWS and int(i) not in self.indices for i in indices)

  def add(self, samples) -> None:
    new = [j for j in range(len(samples)) if int(samples.index[j]) < png.FIGURE_ROWS
           and int(samples.index[j]) not in self.indices]
    for j in new:
      self.rows.append((samples.image_hu[j], samples.mask[j], samples.generated_hu[j]))
      self.indices.append(int(samples.index[j]))
    if new:
      real, mask, gen = (np.stack(x) for x in zip(*self.rows))
      with open(self.path + ".tmp", "wb") as f:
        np.savez(f, index=np.asarray(self.indices), real=real, mask=mask, gen=gen)
      os.replace(self.path + ".tmp", self.path)

  def finish(self) -> dict[str, str]:
    return {}


# ---------------------------------------------------------------------------- merge


def merge(output_dir: str) -> dict[str, Any]:
  """Joins the parts in `output_dir` into one export (module docstring); returns what went where.

  Raises MergeError naming the part and the problem when they cannot be joined.
  """
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  names = _part_names(output_dir)
  if not names:
    top = resume.read_run(output_dir) or {}
    raise MergeError(f"{output_dir} holds no {PARTS_DIR}/part-* folders to merge"
                     + (" (its export is merged and complete)" if top.get("complete") else ""))
  first, request, count = _check_parts(output_dir, names)
  num_samples = int(request["spec"]["num_samples"])
  rows = _rows(output_dir, names, num_samples)
  # Written first: a merge killed midway leaves an interrupted export of the run, which the
  # same generate command (or --merge) takes up again, not "another export" it must refuse.
  resume.write_run(output_dir, {"request": request, "provenance": first.get("provenance", {}),
                                "complete": False, "merged_parts": count})
  out: dict[str, Any] = {"output_dir": output_dir, "merged_parts": count,
                         "num_samples": num_samples,
                         "slice_files": _move_files(output_dir, rows)}
  manifest.write_rows(os.path.join(output_dir, resume.MANIFEST),
                                       {i: row for i, (_, row) in rows.items()})
  out["manifest"] = os.path.join(output_dir, resume.MANIFEST)
  with open(os.path.join(output_dir, PARTS_DIR, names[0], PART_FILE), encoding="utf-8") as f:
    part = json.load(f)
  target = base.Target(output_dir, part["meta"], num_samples, tuple(part["window"]),
                       first.get("provenance", {}))
  out.update(_figure(target, names))
  out.update(_whole_dataset_exports(target, names, request["spec"]))
  resume.write_run(output_dir, {"request": request, "provenance": target.provenance,
                                "complete": True, "merged_parts": count})
  shutil.rmtree(os.path.join(output_dir, PARTS_DIR))
  return out


def _check_parts(output_dir: str, names: Sequence[str]
                 ) -> tuple[dict[str, Any], dict[str, Any], int]:
  """(part 0's run.json, the whole run's request, process count) of complete, matching parts."""
  runs = {}
  for name in names:
    run = resume.read_run(os.path.join(output_dir, PARTS_DIR, name)) or {}
    if not run.get("complete") or "shard" not in run.get("request", {}):
      raise MergeError(
          f"{os.path.join(output_dir, PARTS_DIR, name)} is not a complete part: run the same "
          f"generate command again for process {name.split('-')[1].lstrip('0') or '0'} "
          f"(it resumes), then merge")
    runs[name] = run
  first = runs[names[0]]
  count = int(first["request"]["shard"]["count"])
  missing = sorted({Shard(p, count).name for p in range(count)} - set(names))
  if missing or len(names) != count:
    raise MergeError(f"{os.path.join(output_dir, PARTS_DIR)}: a run over {count} processes "
                     f"writes {count} parts; missing {missing[:3]}, found {list(names)[:4]}")
  whole = lambda run: {k: v for k, v in run["request"].items() if k != "shard"}
  for name, run in runs.items():
    # pylint: disable-next=protected-access
    diff = (resume._differences(whole(first), whole(run))
            + resume._differences(first.get("provenance", {}), run.get("provenance", {})))
    if diff:
      raise MergeError(f"{name} and {names[0]} in {output_dir} are parts of different runs "
                       f"({'; '.join(diff[:3])}); regenerate the odd part (--overwrite)")
  return first, whole(first), count


def _rows(output_dir: str, names: Sequence[str], num_samples: int
          ) -> dict[int, tuple[str, dict[str, str]]]:
  """index -> (part, manifest row): every index 0..num_samples-1 exactly once."""
  rows: dict[int, tuple[str, dict[str, str]]] = {}
  for name in names:
    path = os.path.join(output_dir, PARTS_DIR, name, resume.MANIFEST)
    with open(path, newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        i = int(row["index"])
        if i in rows:
          raise MergeError(f"sample {i} is in two parts ({rows[i][0]} and {name}) of "
                           f"{output_dir}")
        rows[i] = (name, row)
  _check_indices(output_dir, "manifest rows", rows, num_samples)
  return rows


def _check_indices(output_dir: str, what: str, indices, num_samples: int) -> None:
  missing = sorted(set(range(num_samples)) - set(indices))
  extra = sorted(set(indices) - set(range(num_samples)))
  if missing or extra:
    raise MergeError(f"the parts in {output_dir} do not hold {what} for every sample "
                     f"0..{num_samples - 1} once: missing {missing[:5]}, unexpected "
                     f"{extra[:5]}; rerun the processes of the missing samples (they resume)")


FILE_COLUMNS = ("ct_file", "seg_file", "mask_file", "png_file")


def _move_files(output_dir: str, rows) -> int:
  """Moves the per-slice files up into output_dir (a killed merge moved some already)."""
  moved = 0
  for i in sorted(rows):
    name, row = rows[i]
    for column in FILE_COLUMNS:
      file = row.get(column)
      if not file:
        continue
      src, dst = os.path.join(output_dir, PARTS_DIR, name, file), os.path.join(output_dir, file)
      if os.path.exists(src):
        os.replace(src, dst)
      elif not os.path.exists(dst):
        raise MergeError(f"{file} (sample {i}) is missing from {name} and from {output_dir}")
      moved += 1
  return moved


def _figure(target: base.Target, names: Sequence[str]) -> dict[str, str]:
  found = [np.load(p) for p in (target.path(PARTS_DIR, n, FIGURE_ROWS_FILE) for n in names)
           if os.path.exists(p)]
  if not found:
    return {}
  rows = {k: np.concatenate([z[k] for z in found]) for k in ("index", "real", "mask", "gen")}
  order = np.argsort(rows["index"])[:png.FIGURE_ROWS]
  return {"figure": png.figure4(target.path("figure4.png"), rows["real"][order],
                                rows["mask"][order], rows["gen"][order], target.window)}


class _Chunk:
  """Record-chunk rows in the shape of runner.Samples (the fields tfds.py/volumes.py read)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.value_scale = self.intensity_ref = None
    for k, v in arrays.items():
      setattr(self, k, v)
    self.case_id = [str(c) for c in arrays["case_id"]]
    self.modality = str(arrays.get("modality", "ct"))

  def __len__(self) -> int:
    return len(self.index)  # pylint: disable=no-member


def _record_chunks(target: base.Target, names: Sequence[str]) -> Iterator[_Chunk]:
  """The parts' record chunks in global index order (each index once, checked)."""
  where = []  # (sample index, file, row in file)
  for name in names:
    for path in _record_files(target.path(PARTS_DIR, name, RECORDS_DIR)):
      where += [(i, path, k) for k, i in enumerate(_indices(path))]
  where.sort()
  indices = [i for i, _, _ in where]
  if len(set(indices)) != len(indices):
    raise MergeError(f"a sample is in two record chunks of the parts in {target.output_dir}")
  _check_indices(target.output_dir, "TFDS/volume records", indices, target.num_samples)
  start = 0
  while start < len(where):  # runs of rows from one file: one load each
    path, stop = where[start][1], start
    while stop < len(where) and where[stop][1] == path:
      stop += 1
    with np.load(path) as z:
      rows = [k for _, _, k in where[start:stop]]
      yield _Chunk({f: z[f] if f == "modality" else z[f][rows] for f in z.files})
    start = stop


def _whole_dataset_exports(target: base.Target, names: Sequence[str],
                           spec: Mapping[str, Any]) -> dict[str, Any]:
  """The TFDS dataset and volumes of the whole run, written from the record chunks."""
  exporters = ([tfds.TfdsExporter(target)] if spec.get("tfds") else []) + (
      [volumes.VolumeExporter(target)] if spec.get("volumes") else [])
  out: dict[str, Any] = {}
  try:
    if exporters:
      for chunk in _record_chunks(target, names):
        for e in exporters:
          e.add(chunk)
    for e in exporters:
      out.update(e.finish())
  finally:
    for e in exporters:
      e.close()
  return out


def format_merge(summary: Mapping[str, Any]) -> str:
  """What `generate --merge` prints."""
  lines = [f"merged {summary['merged_parts']} parts: {summary['num_samples']} slices in "
           f"{summary['output_dir']} ({summary['slice_files']} per-slice files)",
           f"  manifest    {summary['manifest']}"]
  for key, label in (("figure", "figure"), ("tfds_dir", "tfds")):
    if summary.get(key):
      lines.append(f"  {label:<11} {summary[key]}")
  if summary.get("volumes"):
    lines.append(f"  volumes     {len(summary['volumes'])} files")
  return "\n".join(lines)
