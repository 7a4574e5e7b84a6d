"""The tumour check of the synthetic-output issue on real CT hosts (issue #12, part 1).

The shared TotalSegmentator cases carry no tumours; as in tests/test_end_to_end.py the dataset
mixes them (s01, s02) with two phantom cases with lesions, so the donors' tumours are phantom
lesions and the hosts include real kidneys. A quickstart-sized kidney_tumor model is trained on
it, new tumours are placed in the hosts of --split, and the W1 numbers of the quickstart report
are printed for all hosts and for the real (s0*) hosts alone.

  python scripts/check_tumor_real_ct.py --output_dir=/tmp/tumor_real_ct [--steps=1200]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _args():
  # argparse, not absl flags: ctdiff_jax.quickstart (imported for its smoke_config) defines
  # absl flags of the same names.
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--output_dir", default="/tmp/tumor_real_ct", help="Work folder.")
  p.add_argument("--shared_dir", default=os.environ.get("CTDIFF_SHARED_DIR", "../shared"),
                 help="The shared folder holding data/totalseg_ct.")
  p.add_argument("--steps", type=int, default=1200, help="Training steps (the quickstart's).")
  p.add_argument("--num_samples", type=int, default=16, help="Placed tumours.")
  p.add_argument("--seed", type=int, default=0, help="Seed.")
  return p.parse_args()


def raw_cases(root: str, totalseg: str, real: dict[str, str] | None = None,
              num_phantoms: int = 2, phantom_seed: int = 3) -> str:
  """The raw cases under root/raw (cases.csv); returns it. `real`: case id -> shared case
  (default s01, s02 as themselves), then `num_phantoms` phantom cases with lesions."""
  from ctdiff_jax import phantom  # pylint: disable=g-import-not-at-top
  raw = os.path.join(root, "raw")
  if not os.path.exists(os.path.join(raw, "cases.csv")):
    phantom.write_cohort(os.path.join(raw, "phantom"), num_phantoms, seed=phantom_seed,
                         lesions=True, progress=False)
    rows = [(case_id, f"{totalseg}/{shared}_ct.nii.gz", f"{totalseg}/{shared}_seg.nii.gz",
             f"{totalseg}/labels.json")
            for case_id, shared in (real or {"s01": "s01", "s02": "s02"}).items()]
    rows += [(c, f"phantom/{c}_ct.nii.gz", f"phantom/{c}_seg.nii.gz", "phantom/labels.json")
             for c in (f"phantom_{i:03d}" for i in range(num_phantoms))]
    with open(os.path.join(raw, "cases.csv"), "w", newline="", encoding="utf-8") as f:
      csv.writer(f).writerows([("case_id", "image", "label", "label_map"), *rows])
  return raw


def main():
  args = _args()
  # pylint: disable=g-import-not-at-top
  from configs import kidney_tumor
  from ctdiff_jax import quickstart, xla_options
  xla_options.apply()  # as the CLIs: -O1 kernels on a CPU-only install
  from ctdiff_jax.data import sources
  from ctdiff_jax.evaluation import scenario_metrics as sm
  from ctdiff_jax.generation import runner
  from ctdiff_jax.ingest import build as ingest_build
  from ctdiff_jax.training import trainer
  # pylint: enable=g-import-not-at-top
  root = os.path.abspath(args.output_dir)
  raw = raw_cases(root, os.path.abspath(os.path.join(args.shared_dir, "data", "totalseg_ct")))
  data_dir = os.path.join(root, "tfds")
  summary = ingest_build.build("kidney_tumor", raw, data_dir, image_size=64, spacing_mm=6.0)
  print(ingest_build.format_summary(summary), flush=True)
  split = next(s for s, ids in summary["cases"].items() if "s01" in ids)
  config = quickstart.smoke_config(kidney_tumor, data_dir, 64, 6.0, args.steps, args.seed, 25)
  trainer.train_and_evaluate(config, os.path.join(root, "run"))
  spec = runner.GenerateSpec(scenario="tumor", num_samples=args.num_samples, seed=args.seed,
                             split=split, overwrite=True)
  parts = []
  runner.generate(config, os.path.join(root, "run"), spec, os.path.join(root, "gen"),
                  on_part=parts.append)
  t = runner.Samples.concat(parts)
  meta = sources.metadata(config)
  lesion_id = int(meta["lesion_label_id"])
  real = sm.lesion_hu([sources.open_split(config, s)[0]
                       for s, n in meta["splits"].items() if n], lesion_id)
  real_host = [i for i, c in enumerate(t.case_id) if c.startswith("s0")]
  out = {"split": split, "hosts": sorted(set(t.case_id)),
         "all": sm.tumor_scores(t.image_hu, t.generated_hu, t.source_labels, t.labels,
                                lesion_id, real)}
  if real_host:
    pick = lambda x: x[real_host]
    out["real_hosts"] = sm.tumor_scores(pick(t.image_hu), pick(t.generated_hu),
                                        pick(t.source_labels), pick(t.labels), lesion_id, real)
    out["real_hosts"]["slices"] = len(real_host)
  print(json.dumps(out, indent=1))
  with open(os.path.join(root, "tumor_real_ct.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
