"""Evaluate CLI: Table 1 (FID and in-mask metrics) of organ inpainting, or a merge of tables.

  python -m ctdiff_jax.evaluate --config=configs/kidneys.py --workdir=W --output=out_kidneys \
      [--pix2pix_config=configs/pix2pix_kidneys.py --pix2pix_workdir=W2] [--split=test] \
      [--data_label="TotalSegmentator CT"]
  python -m ctdiff_jax.evaluate --merge=out_kidneys/table1.json,out_liver/table1.json \
      --output=out_all

What is measured: ctdiff_jax/evaluation/table1.py. `--merge` concatenates the rows of the
given table1.json files; rows with the same organ/dataset/split/N appear once, the later
file's row winning (evaluation/tables.py).
"""

from __future__ import annotations

import os
from typing import Sequence

from ctdiff_jax.evaluation import table1


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "The diffusion model's training config (configs/<x>.py[:variant]).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The diffusion model's training workdir.")
  config_flags.DEFINE_config_file(
      "pix2pix_config", None, "The Pix2Pix baseline's training config (optional).",
      lock_config=True)
  flags.DEFINE_string("pix2pix_workdir", None, "The Pix2Pix baseline's training workdir.")
  flags.DEFINE_string("output", None, "Directory for table1.{md,csv,json}.")
  flags.DEFINE_string("split", None, "Split to evaluate (default: config.eval_split).")
  flags.DEFINE_integer("num_samples", None, "Slices (default: config.eval.num_samples; 0 = all).")
  flags.DEFINE_integer("seed", 0, "Seed of the slice subset, noise and bootstrap.")
  flags.DEFINE_string("data_label", None, "The data's name in the table's title and Data "
                      "column (default: 'phantom cohort' for a phantom dataset, else the "
                      "dataset's raw dir name).")
  flags.DEFINE_list("merge", None, "table1.json files to merge into one table (no evaluation; "
                    "one row per organ/dataset/split/N, the later file's row wins).")


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  if not fl.output:
    raise app.UsageError("--output is required")
  if fl.merge:
    rows = table1.merge_tables(fl.merge)
    paths = table1.write_tables(rows, fl.output)
  else:
    if fl.config is None or not fl.workdir:
      raise app.UsageError("pass --config and --workdir (or --merge=a/table1.json,...)")
    if (fl.pix2pix_config is None) != (fl.pix2pix_workdir is None):
      raise app.UsageError("pass both --pix2pix_config and --pix2pix_workdir, or neither")
    from ctdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.ensure_flags_parsed()
    rows = [table1.evaluate(fl.config, fl.workdir, fl.output, pix2pix_config=fl.pix2pix_config,
                            pix2pix_workdir=fl.pix2pix_workdir, split=fl.split,
                            num_samples=fl.num_samples, seed=fl.seed,
                            data_label=fl.data_label)]
    paths = {name: os.path.join(fl.output, name)
             for name in table1.TABLE_FILES + ("per_slice.csv",)}
  print(table1.markdown_table(rows))
  print("wrote " + ", ".join(map(str, paths.values())))


if __name__ == "__main__":
  from ctdiff_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, "ctdiff_jax.evaluate", uses_tfds=True)
