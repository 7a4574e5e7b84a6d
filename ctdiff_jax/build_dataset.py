"""Build CLI: raw NIfTI cases -> the `ct_slices` TFDS dataset (TF-free).

  python -m ctdiff_jax.build_dataset --config=kidneys --manual_dir=RAW --data_dir=OUT \
      [--image_size=256 --spacing_mm=1.5 --organs=liver,spleen --layout=auto \
       --min_organ_area=0 --empty_slice_fraction=0 --split_ratios=0.8,0.1,0.1 \
       --modality=ct --skip_bad_cases --overwrite \
       --beam_pipeline_options=runner=DirectRunner,direct_num_workers=4]

--beam_pipeline_options builds on Apache Beam (the `beam` extra; README, Building datasets
with Apache Beam): one case per element, records identical to the local build's.

Dataset naming: ctdiff_jax/ingest/naming.py; the build: ctdiff_jax/ingest/build.py.
Bad input ends with `ctdiff_jax.build_dataset: error: <case, file, problem>` and exit status 1
(--verbose or CTDIFF_VERBOSE=1 for the traceback; see ctdiff_jax/cli.py). Two builds of one
dataset into one data_dir take turns (a lock file); a killed build leaves no dataset under its
final name and the next build starts over.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ctdiff_jax import cli
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import naming
from ctdiff_jax.ingest import organs as organs_lib


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("config", "kidneys",
                      f"Named config ({', '.join(organs_lib.DATASET_CONFIGS)}) or a full "
                      "config name such as kidneys_64px_6mm.")
  flags.DEFINE_string("manual_dir", None, "Directory with the raw cases.", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write.", required=True)
  flags.DEFINE_list("organs", None, "Custom organ list (defines a custom config).")
  flags.DEFINE_string("lesion", None, "Lesion organ group of a custom list ('none': none).")
  flags.DEFINE_integer("image_size", None, f"Output size (default {naming.DEFAULT_IMAGE_SIZE}).")
  flags.DEFINE_float("spacing_mm", None, f"In-plane spacing (default {naming.DEFAULT_SPACING_MM}).")
  flags.DEFINE_string("layout", "auto", "Raw layout: auto, " + ", ".join(
      ("flat", "totalsegmentator", "kits", "msd", "lits", "csv")))
  flags.DEFINE_integer("min_organ_area", None, "Keep slices with more organ voxels (0).")
  flags.DEFINE_float("empty_slice_fraction", None, "Fraction of organ-free slices to keep.")
  flags.DEFINE_list("split_ratios", None, "train,validation,test ratios (0.8,0.1,0.1).")
  flags.DEFINE_enum("modality", None, ["ct", "mr", "pet"],
                    "Image modality (default ct; mr/pet add '_mr'/'_pet' to the dataset name "
                    "and store per-case intensity references, ctdiff_jax/ingest/modality.py).")
  flags.DEFINE_bool("skip_bad_cases", False, "Skip (and count) unreadable cases.")
  flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset exists.")
  flags.DEFINE_string("beam_pipeline_options", None,
                      "Build on Apache Beam with these comma-separated pipeline options, as "
                      "`tfds build` takes them (runner=DirectRunner,direct_num_workers=4).")
  return flags.FLAGS


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  fl = flags.FLAGS
  logging.getLogger().setLevel(logging.INFO)  # our per-case notes; TFDS's are quieted by cli
  options: dict[str, Any] = {"layout": fl.layout, "skip_bad_cases": fl.skip_bad_cases}
  for key in ("image_size", "spacing_mm", "min_organ_area", "empty_slice_fraction",
              "split_ratios", "modality"):
    if fl[key].value is not None:
      options[key] = fl[key].value
  if fl.lesion is not None:
    options["lesion"] = None if fl.lesion.lower() == "none" else fl.lesion
  config = fl.organs if fl.organs else fl.config
  summary = ingest_build.build(config, fl.manual_dir, fl.data_dir, overwrite=fl.overwrite,
                               beam_options=fl.beam_pipeline_options, **options)
  print(ingest_build.format_summary(summary))


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "ctdiff_jax.build_dataset", uses_tfds=True)  # our own bars are per case
