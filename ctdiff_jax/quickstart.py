"""The main job on the embedded default: phantom cohort -> datasets -> models -> synthetic data -> report.

  python -m ctdiff_jax.quickstart --output_dir=quickstart_out [--num_cases=16 --steps=400]

Stages (each prints its timing; everything lands under --output_dir):
  1. a procedural phantom CT cohort with kidney/liver lesions       raw/
  2. the `kidneys` and `kidney_tumor` TFDS slice datasets           tfds/
  3. the smoke models: kidneys (organ masks, organ scenario),       runs/diffusion_kidneys/
     kidney_tumor (lesion masks, tumour scenario), context (boxes   runs/diffusion_kidney_tumor/
     + margin and free shapes, context scenario), Pix2Pix on        runs/diffusion_context/
     kidneys, kidney_tumor_volume (+ neighbours, 1/3 steps)         runs/pix2pix_kidneys/, ...
  4. the three generation scenarios (organ, context, tumor)         synthetic/<scenario>/
  5. one 2.5D tumour volume (+ the same volume slice by slice)      synthetic/tumor_volume/
  6. Table 1 on the phantom cohort (Pix2Pix, Diffusion, neighbour)  report/table1.md
  7. downstream segmentation (real vs + synthetic, 3 seeds) and     report/downstream.md,
     mask consistency (slices generated from the train split)       report/consistency.md
  8. report/: figure4*.png, scenarios.md (each scenario vs the ring-mean fill, the tumour's
     W1 to real lesions vs to the replaced host), volume25d.{png,md} (three planes; 2.5D FID
     and inter-slice HU: real, independent slices, 2.5D), training_loss.png, paths.

Defaults fit in 20 minutes on 2 CPU cores, setup included (see README); on a GPU/TPU raise
--steps, --image_size and use the non-smoke configs directly
(`python -m ctdiff_jax.train --config=configs/kidneys.py`).
Re-running resumes: datasets and checkpoints that exist are reused.
"""

from __future__ import annotations

import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging
import jax

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "quickstart_out", "Where everything is written.")
flags.DEFINE_integer("num_cases", 16, "Phantom cases to generate.")
flags.DEFINE_integer("seed", 0, "Seed of the cohort, training and sampling.")
flags.DEFINE_integer("steps", 1200, "Training steps of each smoke model.")
flags.DEFINE_integer("image_size", 64, "Slice size in pixels.")
flags.DEFINE_float("spacing_mm", 6.0, "In-plane spacing in mm (64 px x 6 mm covers the body).")
flags.DEFINE_integer("num_samples", 16, "Synthetic slices per scenario.")
flags.DEFINE_integer("sampling_steps", 25, "DDIM steps when generating.")


def _stage(name: str):
  print(f"\n=== {name}", flush=True)
  return time.time()


def _done(t0: float) -> None:
  print(f"    done in {time.time() - t0:.1f} s", flush=True)


def smoke_config(module, data_dir: str, image_size: int, spacing_mm: float, steps: int,
                 seed: int, sampling_steps: int):
  config = module.get_config("smoke")
  config.data_dir = data_dir
  config.image_size = image_size
  config.spacing_mm = spacing_mm
  config.num_train_steps = steps
  config.seed = seed
  config.log_every_steps = max(steps // 20, 1)
  config.checkpoint_every_steps = steps
  config.sample_every_steps = steps
  config.sampling.num_steps = sampling_steps
  config.eval_split = "test"
  return config


def plot_losses(runs: dict[str, str], path: str) -> None:
  """Training-loss curves (JSONL metrics) of the runs, one panel per model family."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.training import writers  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, workdir in runs.items():
    rows = writers.read_metrics(workdir)
    if "pix2pix" in name:
      for key, ax in (("g_l1", axes[1]),):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
          ax.plot(*zip(*pts), label=f"{name}: L1 (masked)")
    else:
      pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
      if pts:
        axes[0].plot(*zip(*pts), label=name)
  axes[0].set(title="Diffusion: denoising MSE", xlabel="step", ylabel="loss", yscale="log")
  axes[1].set(title="Pix2Pix: L1 inside the mask", xlabel="step")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _datasets(raw: str, data_dir: str, *, num_cases: int, seed: int, image_size: int,
              spacing_mm: float) -> None:
  """Stages 1-2: the phantom cohort (kept when it exists) and the two TFDS datasets."""
  from ctdiff_jax import phantom  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.ingest import build as ingest_build  # pylint: disable=g-import-not-at-top
  t0 = _stage(f"1/8 phantom cohort: {num_cases} cases with lesions")
  if not os.path.exists(os.path.join(raw, "labels.json")):
    phantom.write_cohort(raw, num_cases, seed=seed, lesions=True)
  _done(t0)
  t0 = _stage("2/8 TFDS slice datasets: kidneys, kidney_tumor")
  for name in ("kidneys", "kidney_tumor"):
    summary = ingest_build.build(name, raw, data_dir, image_size=image_size,
                                 spacing_mm=spacing_mm)
    print(ingest_build.format_summary(summary), flush=True)
  _done(t0)


def _train(configs: dict, runs: dict[str, str]) -> None:
  """Stage 3: trains (or resumes) every model."""
  from ctdiff_jax.training import trainer  # pylint: disable=g-import-not-at-top
  for i, (name, config) in enumerate(configs.items()):
    t0 = _stage(f"3/8 training {name} ({i + 1}/{len(configs)}, {config.num_train_steps} "
                f"steps)")
    trainer.train_and_evaluate(config, runs[name])
    _done(t0)


# Each scenario's model: the organ, context and tumour scenarios need their own mask training.
SCENARIO_MODELS = (("organ", "diffusion_kidneys"), ("context", "diffusion_context"),
                   ("tumor", "diffusion_kidney_tumor"))


def _generate(out: str, configs: dict, runs: dict[str, str], *, num_samples: int,
              seed: int) -> tuple[dict[str, str], dict]:
  """Stage 4: the three scenarios; returns ({scenario: synthetic dataset dir},
  {scenario: the same samples in memory, for the report's scenario metrics})."""
  from ctdiff_jax.generation import runner  # pylint: disable=g-import-not-at-top
  synthetic, samples = {}, {}
  for scenario, name in SCENARIO_MODELS:
    t0 = _stage(f"4/8 generating {num_samples} slices: scenario {scenario}")
    dest = os.path.join(out, "synthetic", scenario)
    spec = runner.GenerateSpec(scenario=scenario, num_samples=num_samples, seed=seed,
                               tfds=True, overwrite=True)
    inpainter = runner.load_inpainter(configs[name], runs[name])
    parts = []  # the exported chunks, kept in memory for the report's scenario metrics
    summary = runner.generate(configs[name], inpainter, spec, dest, on_part=parts.append)
    print(runner.format_summary(summary), flush=True)
    samples[scenario] = runner.Samples.concat(parts)
    synthetic[scenario] = dest
    _done(t0)
  return synthetic, samples


def _scenario_metrics(report: str, tumor_config, samples: dict) -> str:
  """report/scenarios.md: each scenario vs the ring-mean fill; the tumour's W1 numbers."""
  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import sources
  from ctdiff_jax.evaluation import scenario_metrics as sm
  # pylint: enable=g-import-not-at-top
  rows = {s: sm.scenario_scores(x.image_hu, x.generated_hu, x.mask) for s, x in samples.items()}
  meta = sources.metadata(tumor_config)
  lesion_id = int(meta["lesion_label_id"])
  # Real lesions of every split: the donors' own tissue (the test split may have none).
  real = sm.lesion_hu([sources.open_split(tumor_config, s)[0]
                       for s, n in meta["splits"].items() if n], lesion_id)
  t = samples["tumor"]
  tumor = sm.tumor_scores(t.image_hu, t.generated_hu, t.source_labels, t.labels, lesion_id,
                          real)
  path = os.path.join(report, "scenarios.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(sm.markdown(rows, tumor))
  return path


# DDIM steps of the 2.5D volume: its slices are generated one step of the chain at a time.
VOLUME_STEPS = 10


def volume_config(module, **kwargs):
  """The 2.5D tumour model (neighbour-conditioned): a third of the steps, to keep the budget."""
  config = smoke_config(module, **kwargs)
  for field in ("num_train_steps", "checkpoint_every_steps", "sample_every_steps"):
    config[field] = max(kwargs["steps"] // 3, 1)
  return config


def _volume25d(out: str, report: str, config, workdir: str, *, seed: int) -> dict[str, str]:
  """One 2.5D tumour volume of the test split (and the same volume slice by slice) ->
  report/volume25d.png (three planes), report/volume25d.md (2.5D FID, inter-slice HU)."""
  from ctdiff_jax.generation import runner, volume25d  # pylint: disable=g-import-not-at-top
  t0 = _stage("5/8 2.5D: one tumour volume, each slice conditioned on its generated neighbours")
  spec = runner.GenerateSpec(scenario="tumor", num_samples=1, seed=seed, steps=VOLUME_STEPS,
                             overwrite=True)
  summary = volume25d.generate(config, workdir, spec,
                               os.path.join(out, "synthetic", "tumor_volume"), compare=True,
                               progress=False)
  print(volume25d.format_summary(summary), flush=True)
  paths = {"2.5D volume (three planes)": os.path.join(report, "volume25d.png"),
           "2.5D FID, inter-slice": os.path.join(report, "volume25d.md")}
  shutil.copyfile(summary["previews"][0], paths["2.5D volume (three planes)"])
  shutil.copyfile(summary["metrics_md"], paths["2.5D FID, inter-slice"])
  _done(t0)
  return paths


def _downstream(out: str, report: str, configs: dict, runs: dict[str, str], *,
                num_samples: int, seed: int, steps: int) -> dict[str, str]:
  """Downstream segmentation (real vs + synthetic, 3 seeds) and mask consistency -> report/.

  Its synthetic slices are made from the train split (stage 4's come from the test split the
  segmenters are scored on): organ from the kidneys model, tumour from the kidney_tumor one.
  """
  # pylint: disable=g-import-not-at-top
  from configs import downstream as downstream_config
  from ctdiff_jax.evaluation import consistency, downstream
  from ctdiff_jax.generation import runner
  # pylint: enable=g-import-not-at-top
  t0 = _stage("7/8 downstream: segmentation on real +- synthetic slices, mask consistency")
  synthetic = {}
  for scenario, name in (("organ", "diffusion_kidneys"), ("tumor", "diffusion_kidney_tumor")):
    dest = os.path.join(out, "synthetic_train", scenario)
    spec = runner.GenerateSpec(scenario=scenario, num_samples=num_samples, seed=seed,
                               split="train", tfds=True, formats=("png",), overwrite=True)
    runner.generate(configs[name], runner.load_inpainter(configs[name], runs[name]), spec,
                    dest, progress=False)
    synthetic[scenario] = dest
  config = downstream_config.get_config("smoke")
  for field in ("data_dir", "image_size", "spacing_mm"):
    config[field] = configs["diffusion_kidney_tumor"][field]
  config.downstream.seeds = tuple(seed + k for k in range(3))
  config.num_train_steps = min(config.num_train_steps, steps)  # --steps=4: a tiny run.
  result = downstream.evaluate(config, synthetic, report,
                               runs_dir=os.path.join(out, "runs", "downstream"))
  result["paths"].update(consistency.evaluate(result["setup"], result["real_params"], report))
  _done(t0)
  return {"downstream (Dice)": result["paths"]["downstream.md"],
          "downstream bar plot": result["paths"]["downstream.png"],
          "mask consistency": result["paths"]["consistency.md"]}


def _report(out: str, report: str, data_dir: str, runs: dict[str, str],
            synthetic: dict[str, str]) -> dict[str, str]:
  """Stage 6: figures and loss curves into report/; returns the paths of the artefacts."""
  t0 = _stage("8/8 report")
  shutil.copyfile(os.path.join(synthetic["organ"], "figure4.png"),
                  os.path.join(report, "figure4.png"))
  for scenario in ("context", "tumor"):
    shutil.copyfile(os.path.join(synthetic[scenario], "figure4.png"),
                    os.path.join(report, f"figure4_{scenario}.png"))
  plot_losses(runs, os.path.join(report, "training_loss.png"))
  _done(t0)
  return {
      "figure 4 (organ scenario)": os.path.join(report, "figure4.png"),
      "figure 4 (context, tumour)": os.path.join(report, "figure4_{context,tumor}.png"),
      "Table 1": os.path.join(report, "table1.md"),
      "scenarios vs ring fill": os.path.join(report, "scenarios.md"),
      "training loss": os.path.join(report, "training_loss.png"),
      **{f"synthetic dataset ({s})": p for s, p in synthetic.items()},
      "TFDS datasets (real)": data_dir,
      "training runs": os.path.join(out, "runs"),
  }


def run(output_dir: str, *, num_cases: int, seed: int, steps: int, image_size: int,
        spacing_mm: float, num_samples: int, sampling_steps: int) -> dict[str, str]:
  """Runs every stage; returns the paths of the report's artefacts."""
  # pylint: disable=g-import-not-at-top
  from configs import context, kidney_tumor, kidney_tumor_volume, kidneys, pix2pix_kidneys
  from ctdiff_jax.evaluation import table1
  # pylint: enable=g-import-not-at-top

  out = os.path.abspath(os.path.expanduser(output_dir))
  raw, data_dir = os.path.join(out, "raw"), os.path.join(out, "tfds")
  report = os.path.join(out, "report")
  os.makedirs(report, exist_ok=True)
  t_all = time.time()
  print(f"ctdiff-jax quickstart -> {out} ({jax.device_count()} {jax.devices()[0].platform} "
        f"device(s))", flush=True)
  _datasets(raw, data_dir, num_cases=num_cases, seed=seed, image_size=image_size,
            spacing_mm=spacing_mm)

  args = dict(data_dir=data_dir, image_size=image_size, spacing_mm=spacing_mm, steps=steps,
              seed=seed, sampling_steps=sampling_steps)
  configs = {"diffusion_kidneys": smoke_config(kidneys, **args),
             "diffusion_kidney_tumor": smoke_config(kidney_tumor, **args),
             "diffusion_context": smoke_config(context, **args),
             "pix2pix_kidneys": smoke_config(pix2pix_kidneys, **args),
             "diffusion_kidney_tumor_volume": volume_config(kidney_tumor_volume, **args)}
  runs = {name: os.path.join(out, "runs", name) for name in configs}
  _train(configs, runs)
  synthetic, samples = _generate(out, configs, runs, num_samples=num_samples, seed=seed)
  _scenario_metrics(report, configs["diffusion_kidney_tumor"], samples)
  volume_paths = _volume25d(out, report, configs["diffusion_kidney_tumor_volume"],
                            runs["diffusion_kidney_tumor_volume"], seed=seed)

  t0 = _stage("6/8 evaluation: Table 1 on the phantom cohort's kidneys test split")
  table1.evaluate(configs["diffusion_kidneys"], runs["diffusion_kidneys"], report,
                  pix2pix_config=configs["pix2pix_kidneys"],
                  pix2pix_workdir=runs["pix2pix_kidneys"], seed=seed,
                  data_label="phantom cohort")
  _done(t0)

  downstream_paths = _downstream(out, report, configs, runs, num_samples=2 * num_samples,
                                 seed=seed, steps=steps)
  paths = {**_report(out, report, data_dir, runs, synthetic), **volume_paths,
           **downstream_paths}
  print(f"\nquickstart finished in {(time.time() - t_all) / 60:.1f} min. Results:")
  for k, v in paths.items():
    print(f"  {k:28s} {v}")
  for name in ("table1.md", "scenarios.md", "volume25d.md", "downstream.md", "consistency.md"):
    with open(os.path.join(report, name), encoding="utf-8") as f:
      print("\n" + f.read())
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Stage lines and progress bars tell the story.
  # Re-runs (and the three smoke models' shared sampler shapes) reuse compiled XLA programs.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.expanduser("~/.cache/ctdiff_jax/jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  run(FLAGS.output_dir, num_cases=FLAGS.num_cases, seed=FLAGS.seed, steps=FLAGS.steps,
      image_size=FLAGS.image_size, spacing_mm=FLAGS.spacing_mm, num_samples=FLAGS.num_samples,
      sampling_steps=FLAGS.sampling_steps)


if __name__ == "__main__":
  from ctdiff_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, "ctdiff_jax.quickstart", uses_tfds=True)
