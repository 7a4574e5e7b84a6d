"""Generate CLI: synthetic CT slices from a trained inpainting model, exported as a dataset.

  python -m ctdiff_jax.generate --config=configs/kidneys.py:smoke --workdir=runs/kidneys \
      --scenario=organ --output_dir=synthetic --num_samples=64 [--seed=0 --split=test \
      --steps=50 --sampler=ddim --labels=1,2 --margin_mm=10 --mask_file=M.npy \
      --offset=dy,dx --donor_split=train --formats=nifti,png --tfds --volumes \
      --checkpoint_step=N --overwrite] [--volume_mode=2.5d --manual_dir=RAW --volume_metrics
      --volume_order=inward --volume_lesions=donor|own --volume_cases=ID,...]
      [--distributed | --num_processes=P --process_id=p]
  python -m ctdiff_jax.generate --merge --output_dir=synthetic   (joins the parts of P processes)

The work is done by ctdiff_jax/generation (runner, scenarios, export).
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from ctdiff_jax import cli
from ctdiff_jax.diffusion import sampling
from ctdiff_jax.generation import export
from ctdiff_jax.generation import hosts
from ctdiff_jax.generation import runner
from ctdiff_jax.generation import scenarios
from ctdiff_jax.generation import volume25d


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
  # Several hosts (generation/hosts.py, export/parts.py): each writes its block of indices.
  flags.DEFINE_bool("distributed", False, "jax.distributed.initialize(), then write this "
                    "process's part; process 0 merges the parts after a barrier.")
  flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0 "
                      "(default: env JAX_COORDINATOR_ADDRESS or the detected cluster).")
  flags.DEFINE_integer("num_processes", None, "Processes sharing the run (--distributed: "
                       "default from the cluster; without it: independent jobs, then --merge).")
  flags.DEFINE_integer("process_id", None, "This process, 0 .. num_processes-1.")
  flags.DEFINE_bool("merge", False, "Only merge <output_dir>/parts/ into one export (needs "
                    "no --config).")
  flags.DEFINE_enum("volume_mode", "", ("",) + volume25d.VOLUME_MODES, "2.5d: whole source "
                    "volumes, slice by slice conditioned on the generated neighbours "
                    "(generation/volume25d.py); --num_samples counts volumes.")
  flags.DEFINE_enum("volume_order", volume25d.DEFAULT_ORDER, volume25d.ORDERS, "Volume mode: "
                    "the order of the slices: inward from both ends of the mask in z, outward "
                    "from the largest mask slice, or interleaved (every other slice, then the "
                    "rest).")
  flags.DEFINE_enum("volume_lesions", "donor", volume25d.LESION_SOURCES, "Volume mode, "
                    "--scenario=tumor: donor places a 3D tumour of another case in the host "
                    "organ; own regenerates one of the host's own lesions in place (a real-lesion "
                    "reference for --volume_metrics).")
  flags.DEFINE_list("volume_cases", None, "Volume mode: only these case ids of --split are "
                    "hosts (default: every case of it).")
  flags.DEFINE_string("manual_dir", None, "Volume mode: the raw cases (default: "
                      "config.manual_dir, else the dataset build's).")
  flags.DEFINE_bool("volume_metrics", False, "Volume mode: also generate the volumes slice by "
                    "slice and write volume_metrics.{md,json} (2.5D FID per plane, "
                    "inter-slice difference: real, independent, 2.5D).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  if fl.merge:
    if not fl.output_dir:
      raise app.UsageError("--merge needs --output_dir (the folder holding parts/)")
    print(export.parts.format_merge(export.merge(fl.output_dir)))
    return
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
  if fl.volume_cases and not fl.volume_mode:
    raise app.UsageError("--volume_cases chooses the hosts of --volume_mode=2.5d: add it, or "
                         "drop --volume_cases")
  if fl.volume_lesions != "donor" and not (fl.volume_mode and fl.scenario == "tumor"):
    raise app.UsageError("--volume_lesions is a volume-mode option of the tumor scenario: add "
                         "--volume_mode=2.5d --scenario=tumor, or drop it")
  if fl.volume_mode:  # whole volumes (generation/volume25d.py)
    if fl.distributed or fl.num_processes is not None or fl.tfds or fl.volumes:
      raise app.UsageError("--volume_mode=2.5d runs in one process and writes NIfTI volumes: "
                           "drop --distributed/--num_processes/--tfds/--volumes")
    summary = volume25d.generate(fl.config, checkpoint, spec, fl.output_dir,
                                 manual_dir=fl.manual_dir, compare=fl.volume_metrics,
                                 order=fl.volume_order, lesions=fl.volume_lesions,
                                 only=fl.volume_cases)
    print(volume25d.format_summary(summary))
    return
  summary = runner.generate(fl.config, checkpoint, spec, fl.output_dir, shard=_shard(fl))
  print(runner.format_summary(summary))


def _shard(fl) -> export.Shard | None:
  """This process's share of the run (None: of jax.distributed, one process without it)."""
  if fl.process_id is not None and fl.num_processes is None:
    raise app.UsageError("--process_id needs --num_processes")
  if fl.distributed:
    hosts.initialize(fl.coordinator_address, fl.num_processes, fl.process_id)
    return None
  if fl.num_processes:  # independent jobs, merged later
    return export.Shard(fl.process_id or 0, fl.num_processes)
  return None


if __name__ == "__main__":
  _define_flags()
  # Bad input (scenario, dataset, mask, checkpoint, output_dir) is one error line.
  cli.run(main, "ctdiff_jax.generate", uses_tfds=True)
