"""Generate CLI: synthetic CT slices from a trained inpainting model, exported as a dataset.

  python -m ctdiff_jax.generate --config=configs/kidneys.py:smoke --workdir=runs/kidneys \
      --scenario=organ --output_dir=synthetic --num_samples=64 [--seed=0 --split=test \
      --steps=50 --sampler=ddim --labels=1,2 --margin_mm=10 --mask_file=M.npy \
      --offset=dy,dx --donor_split=train --formats=nifti,png --tfds --volumes \
      --checkpoint_step=N --overwrite]

The work is done by ctdiff_jax/generation (runner, scenarios, export).
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from ctdiff_jax import cli
from ctdiff_jax.diffusion import sampling
from ctdiff_jax.generation import export
from ctdiff_jax.generation import runner
from ctdiff_jax.generation import scenarios


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "The model's training config (configs/<x>.py[:variant]).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_string("checkpoint", None, "Checkpoint path (workdir or its checkpoints dir); "
                      "overrides --workdir.")
  flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_enum("scenario", "organ", list(scenarios.SCENARIOS), "What to regenerate.")
  flags.DEFINE_string("output_dir", None, "Where to write the synthetic dataset.")
  flags.DEFINE_integer("num_samples", 16, "Slices to generate (cycles over the source slices).")
  flags.DEFINE_integer("seed", 0, "Seed of masks, tumour placement and noise.")
  flags.DEFINE_string("split", None, "Source split (default: config.eval_split).")
  flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sampling.num_steps).")
  flags.DEFINE_enum("sampler", None, list(sampling.SAMPLERS), "Sampler (default: config's).")
  flags.DEFINE_list("labels", None, "Label ids of the mask (organ/context) or host organ "
                    "(tumor); default: all organs (tumor: all but the lesion).")
  flags.DEFINE_float("margin_mm", None, "context: bbox margin (default "
                     "config.data.bbox_margin_mm).")
  flags.DEFINE_string("mask_file", None, "context: fixed (H, W) mask (.npy/.png/.nii.gz).")
  flags.DEFINE_string("offset", None, "tumor: 'dy,dx' translation of the donor tumour "
                      "(default: a random position that fits).")
  flags.DEFINE_integer("blend_px", scenarios.BLEND_PX, "tumor: rim (px) regenerated around "
                       "the placed tumour, inside the host organ.")
  flags.DEFINE_string("donor_split", None, "tumor: split the donor tumour masks come from "
                      "(default: every split; hosts come from --split).")
  flags.DEFINE_list("formats", list(export.FORMATS), "Per-slice files: nifti, png.")
  flags.DEFINE_bool("tfds", False, "Also write a TFDS dataset (ct_slices features).")
  flags.DEFINE_bool("volumes", False, "Also write per-case stacked NIfTI volumes.")
  flags.DEFINE_bool("overwrite", False, "Write into an output_dir that holds an export.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  if fl.config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/kidneys.py:smoke)")
  if not fl.output_dir:
    raise app.UsageError("--output_dir is required")
  checkpoint = fl.checkpoint or fl.workdir
  if not checkpoint:
    raise app.UsageError("pass --workdir=<training workdir> or --checkpoint=<path>")
  try:
    labels = [int(v) for v in fl.labels] if fl.labels else None
  except ValueError:
    raise app.UsageError(f"--labels must be integer ids, got {fl.labels}") from None
  spec = runner.GenerateSpec(
      scenario=fl.scenario, num_samples=fl.num_samples, seed=fl.seed, split=fl.split,
      steps=fl.steps, sampler=fl.sampler, checkpoint_step=fl.checkpoint_step, labels=labels,
      margin_mm=fl.margin_mm, mask_file=fl.mask_file, offset=fl.offset,
      blend_px=fl.blend_px, donor_split=fl.donor_split, formats=fl.formats, tfds=fl.tfds,
      volumes=fl.volumes, overwrite=fl.overwrite)
  summary = runner.generate(fl.config, checkpoint, spec, fl.output_dir)
  print(runner.format_summary(summary))


if __name__ == "__main__":
  _define_flags()
  # Bad input (scenario, dataset, mask, checkpoint, output_dir) is one error line.
  cli.run(main, "ctdiff_jax.generate", uses_tfds=True)
