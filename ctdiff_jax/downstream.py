"""Downstream CLI: does synthetic data help a segmenter? (+ the mask-consistency check).

  python -m ctdiff_jax.downstream --config=configs/downstream.py:smoke \
      --config.data_dir=TFDS --synthetic=organ=SYN_ORGAN,tumor=SYN_TUMOR --output_dir=OUT

Trains a small segmentation UNet per (arm, seed) with the shared trainer and scores it by
per-class Dice on the real eval split; writes OUT/downstream.{md,csv,json,png} and
OUT/consistency.{md,json}. What is measured: ctdiff_jax/evaluation/downstream.py and
consistency.py. Each SYN dir is a `generate --tfds` output_dir.
"""

from __future__ import annotations

import os
from typing import Sequence


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", "configs/downstream.py", "The downstream config (configs/downstream.py[:smoke]).")
  flags.DEFINE_list("synthetic", None, "Synthetic exports as name=dir (a `generate --tfds` "
                    "output_dir); default: config.downstream.synthetic.")
  flags.DEFINE_string("output_dir", None, "Where the tables go (default: "
                      "config.downstream.output_dir).")


def parse_synthetic(items: Sequence[str]) -> dict[str, str]:
  """['organ=dir', 'tumor=dir'] -> {'organ': 'dir', 'tumor': 'dir'}."""
  out = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise ValueError(f"--synthetic: expected name=dir, got {item!r}")
    out[name.strip()] = path.strip()
  return out


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import pipeline
  from ctdiff_jax.evaluation import consistency
  from ctdiff_jax.evaluation import downstream
  # pylint: enable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  config = fl.config
  items = fl.synthetic if fl.synthetic is not None else [
      s for s in str(config.downstream.synthetic).split(",") if s.strip()]
  synthetic = parse_synthetic(items)
  pipeline.ensure_flags_parsed()
  # Every (arm, seed) compiles the same step: share compiled programs across runs and calls.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.path.expanduser("~/.cache/ctdiff_jax/jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  output_dir = fl.output_dir or config.downstream.output_dir
  out = downstream.evaluate(config, synthetic, output_dir)
  if out["real_params"] and synthetic:  # Mask consistency: the real-only segmenters.
    out["paths"].update(consistency.evaluate(out["setup"], out["real_params"], output_dir))
  for name in ("downstream.md", "consistency.md"):
    if name in out["paths"]:
      with open(out["paths"][name], encoding="utf-8") as f:
        print("\n" + f.read())
  print("wrote " + ", ".join(out["paths"].values()))


if __name__ == "__main__":
  from ctdiff_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, "ctdiff_jax.downstream", uses_tfds=True)
