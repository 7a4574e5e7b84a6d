"""Phantom CLI: `python -m ctdiff_jax.phantom --output_dir=DIR --num_cases=8 [--lesions]
[--modality=mr]`.

Bad flags end with `ctdiff_jax.phantom: error: ...` and exit status 1 (ctdiff_jax/cli.py).
"""

from __future__ import annotations

from typing import Sequence

from ctdiff_jax import cli
from ctdiff_jax.phantom import cohort


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS

  def parse(values: list[str], cast, name):
    try:
      return tuple(cast(v) for v in values)
    except ValueError:
      raise app.UsageError(f"--{name}: expected 3 numbers, got {values}") from None

  ids = cohort.write_cohort(f.output_dir, f.num_cases, seed=f.seed, lesions=f.lesions,
                     shape=parse(f.grid, int, "grid"), spacing=parse(f.spacing, float, "spacing"),
                     modality=f.modality)
  print(f"wrote {len(ids)} phantom cases to {f.output_dir}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("output_dir", None, "Where to write the cohort (created if missing).")
  flags.DEFINE_integer("num_cases", 8, "Number of cases.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Cohort seed; case i is determined by (seed, i).", lower_bound=0)
  flags.DEFINE_bool("lesions", False, "Add liver and kidney tumours.")
  flags.DEFINE_enum("modality", "ct", list(cohort.MODALITIES),
                    "ct: HU; mr: T1-like MR of the same anatomy (<case>_mr.nii.gz, no HU).")
  flags.DEFINE_list("grid", [str(v) for v in cohort.DEFAULT_SHAPE], "Grid size x,y,z in voxels.")
  flags.DEFINE_list("spacing", [str(v) for v in cohort.DEFAULT_SPACING], "Voxel size x,y,z in mm.")
  flags.mark_flag_as_required("output_dir")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "ctdiff_jax.phantom")
