"""Apache Beam runs of the `ct_slices` build: its scan and write passes, one case per element.

ctdiff_jax/ingest/builder.py switches to these when a build is given Beam options
(`DownloadConfig(beam_options=..., beam_runner=...)`, `tfds build --beam_pipeline_options=...`
or `python -m ctdiff_jax.build_dataset --beam_pipeline_options=...`). This module only
distributes the builder's own per-case functions (`builder.scan_case`, `builder.case_records`):

- scan: a pipeline of its own, Create(cases) | Map(scan_case) | WriteToText(one JSON line per
  case) into the build's incomplete folder. The driver reads the outcomes back (a few bytes per
  case) and decides splits, errors and skips exactly as the local build does, in case order.
  Two pipelines, because the split of a case depends on which cases turn out to have slices.
- write: per split, Create((case, kept slices)) | FlatMap(case_records); TFDS's BeamWriter
  encodes and writes the records (the same keys and features as the local writer).

apache_beam is imported lazily: only Beam builds need it (the optional `beam` extra).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterable, Sequence

from etils import epath

from ctdiff_jax import cli

_SCAN_DIR = "beam_scan"  # under the build's incomplete folder; removed once read


def import_beam():
  """apache_beam, or a clear error saying how to install it."""
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise cli.UserError(  # one line from the CLIs, not a traceback
        "a Beam build needs apache_beam: install the `beam` extra in a venv of its own "
        "(`bash scripts/setup_beam.sh`, see the README, Building datasets with Apache Beam)"
    ) from e
  return apache_beam


def pipeline_options(flags: str | Sequence[str]):
  """PipelineOptions from 'runner=DirectRunner,direct_num_workers=2' (as `tfds build` takes)."""
  beam = import_beam()
  if isinstance(flags, str):
    flags = [f for f in flags.split(",") if f.strip()]
  return beam.options.pipeline_options.PipelineOptions(
      flags=[f if f.startswith("--") else f"--{f.strip()}" for f in flags])


def _scan_line(indexed: tuple[int, Any], scan_fn: Callable) -> str:
  index, case = indexed
  kept, n_organ, error = scan_fn(case)
  return json.dumps({"index": index, "kept": [int(z) for z in kept], "n_organ": int(n_organ),
                     "error": None if error is None else str(error)})


def scan(cases: Sequence[Any], scan_fn: Callable, *, work_dir: epath.PathLike, runner=None,
         options=None) -> list[tuple[list[int], int, str | None]]:
  """scan_fn(case) -> (kept, n_organ, error or None) for every case, run on Beam, in case order.

  Errors are returned as their messages (the driver raises or skips them in case order).
  """
  beam = import_beam()
  out = epath.Path(work_dir) / _SCAN_DIR
  out.rmtree(missing_ok=True)  # epath: also a gs:// data_dir
  with beam.Pipeline(runner=runner, options=options) as pipeline:
    _ = (pipeline
         | "Cases" >> beam.Create(list(enumerate(cases)))
         | "ScanCase" >> beam.Map(_scan_line, scan_fn=scan_fn)
         | "WriteOutcomes" >> beam.io.WriteToText(str(out / "outcomes"), file_name_suffix=".jsonl"))
  outcomes: dict[int, tuple[list[int], int, str | None]] = {}
  for path in sorted(out.glob("outcomes*.jsonl")):
    for line in path.read_text().splitlines():
      row = json.loads(line)
      outcomes[row["index"]] = (row["kept"], row["n_organ"], row["error"])
  out.rmtree(missing_ok=True)
  if sorted(outcomes) != list(range(len(cases))):
    raise RuntimeError(f"Beam scan returned {len(outcomes)} outcomes for {len(cases)} cases")
  return [outcomes[i] for i in range(len(cases))]


def _records_of(item: tuple[Any, list[int]], records_fn: Callable) -> Iterable[tuple[str, dict]]:
  case, kept = item
  return records_fn(case, kept)


def write_split(items: Sequence[tuple[Any, list[int]]], records_fn: Callable):
  """The PTransform TFDS writes one split from: one element per (case, kept slices)."""
  beam = import_beam()

  @beam.ptransform_fn
  def _cases_to_records(pipeline):
    return (pipeline
            | "Cases" >> beam.Create(list(items))
            | "CaseRecords" >> beam.FlatMap(functools.partial(_records_of, records_fn=records_fn)))

  return _cases_to_records()  # pylint: disable=no-value-for-parameter
