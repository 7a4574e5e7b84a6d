"""The 2.5D acceptance numbers of issue #14: on the shared real CT (host s01) or the phantom.

`--cohort=s01`: the dataset is scripts/check_tumor_real_ct.py's (s01, s02 and two phantom
cases with lesions; s02 has no kidneys), split one case each: the models train on one phantom
case and the host is s01, held out. `--cohort=s01_phantoms`: s01 + the phantom cohort's 16
cases; the models train on 13 phantoms, the host s01 is held out (test). `--cohort=s01_train`:
the same cases, s01 in the train split with 12 phantoms: the models have seen real CT kidneys
and the host s01 is in-sample (as when a user makes synthetic data from their training scans;
the shared data hold no second real kidney). `--cohort=phantom`: the
quickstart's phantom cohort (16 cases with lesions, seed 0), hosts = its test split. Each is
built twice: `kidneys` for the context model (configs/context_volume.py) and `kidney_tumor`
for the neighbour-conditioned tumour model (configs/kidney_tumor_volume.py). Both are trained at
quickstart size (64 px at 6 mm) for --steps (a workdir already trained is reused); then every
host volume is generated --rounds times (new noise; new tumour placements) and twice: slice
by slice with both neighbours hidden inside the mask (independent), and in --order with
generated neighbours (2.5D), for the `context` and the `tumor` scenario, and
volume_metrics.{md,json} (2.5D FID per plane, the inter-slice |dHU| inside the mask: real,
independent, 2.5D, and the paired comparison) are written per scenario.

`tumor` places another case's tumour, so its "real" volume is the tumour-free host: a
reference without a lesion. `tumor_own` (same model) regenerates one of each held-out
host's own lesions in place (--volume_lesions=own): its real volume holds the real lesion.
s01 has no lesion (the shared cases have no tumour label), so on that cohort tumor_own's
hosts are the held-out phantom cases with lesions and s01 is a counted skip.

  python scripts/check_volume25d_real_ct.py --output_dir=/tmp/volume25d_real_ct \
      [--cohort=s01|s01_phantoms|s01_train|phantom] [--steps=3600] [--order=outward|inward] \
      [--scenarios=context,tumor,tumor_own] [--rounds=N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def _args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--output_dir", default="/tmp/volume25d_real_ct", help="Work folder.")
  p.add_argument("--shared_dir", default=os.environ.get("CTDIFF_SHARED_DIR", "../shared"),
                 help="The shared folder holding data/totalseg_ct.")
  p.add_argument("--cohort", choices=("s01", "s01_phantoms", "s01_train", "phantom"),
                 default="s01", help="s01: the shared real CT as a held-out host (models "
                 "trained on one phantom case); s01_phantoms: held out, models trained on 13 "
                 "phantom cases; s01_train: s01 in the training split (in-sample host); "
                 "phantom: the quickstart's phantom cohort.")
  p.add_argument("--steps", type=int, default=3600, help="Training steps of each model.")
  p.add_argument("--rounds", type=int, default=0, help="Volumes per host (0: 4 for the "
                 "tumour, whose placements differ, 2 for the context box, whose mask does not).")
  p.add_argument("--scenarios", default="context,tumor,tumor_own",
                 help="Comma-separated: context, tumor, tumor_own (module docstring).")
  p.add_argument("--order", default="inward", help="The 2.5D slice order (--volume_order).")
  p.add_argument("--sampling_steps", type=int, default=10, help="DDIM steps per slice.")
  p.add_argument("--seed", type=int, default=0, help="Seed.")
  return p.parse_args()


# s01's case id per cohort: with the 16 phantom cases, `s01_real` ranks into the train split
# (ingest/builder.py: assign_splits orders case ids by sha1) and `s01` into test.
S01_IDS = {"s01", "s01_real"}


def main():
  args = _args()
  # pylint: disable=g-import-not-at-top
  import check_tumor_real_ct
  from configs import context_volume, kidney_tumor_volume
  from ctdiff_jax import quickstart, xla_options
  xla_options.apply()
  from ctdiff_jax.generation import runner, volume25d
  from ctdiff_jax.ingest import build as ingest_build
  from ctdiff_jax.training import trainer
  # pylint: enable=g-import-not-at-top
  if args.order not in volume25d.ORDERS:  # before hours of training
    sys.exit(f"--order={args.order}: expected one of {volume25d.ORDERS}")
  unknown = set(args.scenarios.split(",")) - {"context", "tumor", "tumor_own"}
  if unknown:
    sys.exit(f"--scenarios: unknown {sorted(unknown)}; expected context, tumor, tumor_own")
  root = os.path.abspath(args.output_dir)
  totalseg = os.path.abspath(os.path.join(args.shared_dir, "data", "totalseg_ct"))
  if args.cohort == "s01":
    raw = check_tumor_real_ct.raw_cases(root, totalseg)
  elif args.cohort in ("s01_train", "s01_phantoms"):  # s01 + the phantom cohort's 16 cases
    s01_id = "s01_real" if args.cohort == "s01_train" else "s01"
    raw = check_tumor_real_ct.raw_cases(root, totalseg, real={s01_id: "s01"},
                                        num_phantoms=16, phantom_seed=0)
  else:
    from ctdiff_jax import phantom  # pylint: disable=g-import-not-at-top
    raw = os.path.join(root, "raw")
    if not os.path.exists(os.path.join(raw, "labels.json")):
      phantom.write_cohort(raw, 16, seed=0, lesions=True, progress=False)
  out = {}
  for name, scenario, dataset, module in (
      ("context", "context", "kidneys", context_volume),
      ("tumor", "tumor", "kidney_tumor", kidney_tumor_volume),
      ("tumor_own", "tumor", "kidney_tumor", kidney_tumor_volume)):
    if name not in args.scenarios.split(","):
      continue
    data_dir = os.path.join(root, f"tfds_{dataset}")
    summary = ingest_build.build(dataset, raw, data_dir, image_size=64, spacing_mm=6.0)
    split = ("test" if args.cohort == "phantom" else
             next(s for s, ids in summary["cases"].items() if S01_IDS & set(ids)))
    lesions = "own" if name == "tumor_own" else "donor"
    if lesions == "own":  # every held-out case with a lesion of its own is a host
      split = "+".join(s for s in sorted(summary["cases"]) if s != "train")
    hosts = [c for s in split.split("+") for c in summary["cases"][s]]
    if args.cohort != "phantom" and lesions == "donor":  # s01 alone, not its split mates
      hosts = sorted(S01_IDS & set(hosts))
    config = quickstart.smoke_config(module, data_dir=data_dir, image_size=64, spacing_mm=6.0,
                                     steps=args.steps, seed=args.seed,
                                     sampling_steps=args.sampling_steps)
    workdir = os.path.join(root, f"run_{scenario}_{args.steps}")
    trainer.train_and_evaluate(config, workdir)  # resumes; nothing to do when trained
    rounds = args.rounds or (4 if scenario == "tumor" else 2)
    spec = runner.GenerateSpec(scenario=scenario, num_samples=len(hosts) * rounds,
                               seed=args.seed, split=split, steps=args.sampling_steps,
                               overwrite=True)
    gen = volume25d.generate(config, workdir, spec,
                             os.path.join(root, f"gen_{name}_{args.steps}_{args.order}"),
                             compare=True, order=args.order, lesions=lesions, only=hosts,
                             progress=False)
    print(volume25d.format_summary(gen), flush=True)
    with open(gen["metrics_json"], encoding="utf-8") as f:
      out[name] = {"split": split, "hosts": hosts, "metrics": json.load(f),
                   "previews": gen["previews"], "skipped": gen["skipped"]}
  print(json.dumps(out, indent=1))
  path = os.path.join(root, f"volume25d_{args.steps}_{args.order}.json")
  if os.path.exists(path):  # a run of other --scenarios: keep theirs
    with open(path, encoding="utf-8") as f:
      out = {**json.load(f), **out}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
