"""Builds a `ct_slices` TFDS dataset from raw volumes and formats the build summary.

The build entry point: the only library module that imports the TFDS builder
(ctdiff_jax/ingest/builder.py). Reading a built dataset needs none of this
(ctdiff_jax/data/sources.py).
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

from ctdiff_jax.ingest import naming

def build(config: Any, manual_dir: str | pathlib.Path, data_dir: str | pathlib.Path, *,
          overwrite: bool = False, beam_options: Any = None, **options) -> dict[str, Any]:
  """Builds ct_slices/<config> into data_dir from the raw cases in manual_dir.

  `config` is a config name ('kidneys', 'kidneys_64px'), an organ list or a CtSlicesConfig;
  `options` are make_config's (image_size, spacing_mm, lesion, min_organ_area,
  empty_slice_fraction, split_ratios, layout, skip_bad_cases). An existing complete build of
  the same config is reused unless `overwrite`. `beam_options` (Beam PipelineOptions, or
  flags as `tfds build --beam_pipeline_options` takes them: 'runner=DirectRunner,...') build
  on Apache Beam instead of in this process (ctdiff_jax/ingest/beam_build.py).
  Returns the build summary: dataset, layout, cases_found, cases_read, cases_without_organ,
  cases_skipped {case: reason}, cases_unlabelled, cases {split: ids}, slices {split: n},
  total_slices, data_dir, already_built, seconds.
  """
  # Lazy: importing this module must stay cheap and free of TFDS for training code.
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from ctdiff_jax.ingest import builder as ctb
  # pylint: enable=g-import-not-at-top

  t0 = time.time()
  if isinstance(config, ctb.CtSlicesConfig):
    if options:
      raise TypeError("give options either in the CtSlicesConfig or as keywords, not both")
    cfg = config
  else:
    cfg = ctb.make_config(config, **options)
  # REUSE_CACHE_IF_EXISTS regenerates the dataset (there is nothing to download anyway).
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  if isinstance(beam_options, (str, list, tuple)):
    from ctdiff_jax.ingest import beam_build  # pylint: disable=g-import-not-at-top
    beam_options = beam_build.pipeline_options(beam_options) if beam_options else None
  builder = ctb.Builder(config=cfg, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir),
                                                   download_mode=mode, beam_options=beam_options),
      file_format="array_record")
  if builder.build_summary is not None:
    summary = dict(builder.build_summary, already_built=False)
  else:
    summary = dict(naming.read_dataset_metadata(data_dir, cfg.name).get("build", {}),
                   already_built=True)
  summary["total_slices"] = sum(summary.get("slices", {}).values())
  summary["data_dir"] = str(data_dir)
  summary["seconds"] = round(time.time() - t0, 2)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """Human-readable build summary (printed by the CLI)."""
  lines = [f"{summary.get('dataset')} in {summary.get('data_dir')}"
           + (" (already built, reused)" if summary.get("already_built") else "")]
  lines.append(f"  layout {summary.get('layout')}, cases found {summary.get('cases_found')}, "
               f"read {summary.get('cases_read')}")
  for split in naming.SPLITS:
    n = summary.get("slices", {}).get(split, 0)
    cases = summary.get("cases", {}).get(split, [])
    lines.append(f"  {split:<10} {n:6d} slices from {len(cases)} cases")
  lines.append(f"  total      {summary.get('total_slices', 0):6d} slices")
  without = summary.get("cases_without_organ", [])
  if without:
    lines.append(f"  cases without the organ(s): {len(without)} ({', '.join(without[:10])}"
                 f"{', ...' if len(without) > 10 else ''})")
  skipped = summary.get("cases_skipped", {})
  if skipped:
    lines.append(f"  cases skipped as bad input: {len(skipped)}")
    lines.extend(f"    {cid}: {reason}" for cid, reason in skipped.items())
  unlabelled = summary.get("cases_unlabelled", [])
  if unlabelled:
    lines.append(f"  cases without a label file (ignored): {len(unlabelled)}")
  if "seconds" in summary:
    lines.append(f"  took {summary['seconds']:.1f} s")
  return "\n".join(lines)
