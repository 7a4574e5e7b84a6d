"""Generate synthetic CT slices with a trained inpainting model and export them as a dataset.

  python -m ctdiff_jax.generate --config=configs/kidneys.py:smoke --workdir=runs/kidneys \
      --scenario=organ --output_dir=synthetic --num_samples=64 [--seed=0 --split=test \
      --steps=50 --sampler=ddim --labels=1,2 --margin_mm=10 --mask_file=M.npy \
      --offset=dy,dx --formats=nifti,png --tfds --volumes --checkpoint_step=N --overwrite]

Scenarios (ctdiff_jax/generation/scenarios.py): `organ` regenerates the organ mask, `context`
the organs' bounding box + margin (or a mask file), `tumor` pastes a tumour mask from another
case into the host organ and generates a new tumour there. `--num_samples` may exceed the
number of source slices: the source slices are cycled, each sample with its own randomness.

Per sample i: the mask and tumour placement come from (seed, i) (scenarios.Planner), the
diffusion noise from (seed, chunk, batch, position in batch), i.e. from (seed, i) for a
given per-device batch size and device count. The generated HU are
rint(unit_to_hu(model output)) inside the mask and the source record's int16 HU outside it,
bit for bit. MR / PET (config.data.modality): the same in the records' stored int16 of the
source scan's scale (transforms.unit_to_stored with the record's value_scale and intensity
reference), carried per sample in Samples.value_scale / intensity_ref for the exporters.

Export layout, NIfTI orientation and the TFDS export: see ctdiff_jax/generation/export/.

Python API: every option is one frozen `GenerateSpec` (checked when built; the CLI builds it
from its flags). `generate(config, checkpoint, spec, output_dir)` (files + summary dict),
`generate_samples(config, checkpoint, spec)` (everything in memory),
`iter_samples(config, inpainter, planner, num_samples)` (chunks, for streaming; evaluate).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import auto as tqdm

from ctdiff_jax.data import sources
from ctdiff_jax.data import transforms
from ctdiff_jax.diffusion import sampling
from ctdiff_jax.generation import export
from ctdiff_jax.generation import hosts
from ctdiff_jax.generation import inference
from ctdiff_jax.generation import scenarios
from ctdiff_jax.ingest import records

# Batches per inpaint call: the unit of progress updates and of streaming to the exporter.
CHUNK_BATCHES = 4


class CheckpointError(ValueError):
  """The model checkpoint is missing or does not match the config."""


@dataclasses.dataclass(frozen=True)
class GenerateSpec(scenarios.ScenarioSpec):
  """Everything a generate run is asked for (the generate CLI's flags), checked once.

  The scenario fields (scenario, seed, labels, margin_mm, mask_file, offset, blend_px) are
  scenarios.ScenarioSpec's; steps, sampler, checkpoint_step choose the model (None: the
  config's / the latest checkpoint); formats .. overwrite the export (export/).
  """

  num_samples: int = 16
  split: str | None = None  # None: config.eval_split
  steps: int | None = None
  sampler: str | None = None
  checkpoint_step: int | None = None
  formats: tuple[str, ...] = export.FORMATS
  tfds: bool = False
  volumes: bool = False
  overwrite: bool = False

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "formats", tuple(self.formats))
    scenarios.check_at_least(self, (("num_samples", 1), ("steps", 1)))
    if self.sampler is not None and self.sampler not in sampling.SAMPLERS:
      raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {sampling.SAMPLERS}")
    unknown = [f for f in self.formats if f not in export.FORMATS]
    if unknown:
      raise ValueError(f"unknown format(s) {unknown}; expected some of {export.FORMATS}")


@dataclasses.dataclass
class Samples:
  """Generated slices with everything needed to export or evaluate them ([N, H, W, 1] arrays)."""

  index: np.ndarray  # [N] sample index
  source_index: np.ndarray  # [N] record index in the split
  round: np.ndarray  # [N] earlier uses of the same source slice in this run
  case_id: list[str]
  slice_index: np.ndarray  # [N] int32
  spacing_mm: np.ndarray  # [N, 3] float32 (x, y, z)
  image_hu: np.ndarray  # int16 source slice
  prev_hu: np.ndarray  # int16 source neighbours
  next_hu: np.ndarray
  source_labels: np.ndarray  # uint8 source label map
  labels: np.ndarray  # uint8 label map of the synthetic slice
  mask: np.ndarray  # uint8 0/1 region that was regenerated
  generated: np.ndarray  # float32 model output in [-1, 1] (the model's intensity map)
  generated_hu: np.ndarray  # int16: generated inside the mask, source HU outside
  info: list[dict[str, Any]]  # per sample scenario details (tumour donor, offset, ...)
  run: dict[str, Any] = dataclasses.field(default_factory=dict)  # checkpoint, skipped, ...
  # MR / PET: source value = stored int16 * value_scale [N]; the case's (lo, hi) [N, 2].
  value_scale: np.ndarray | None = None
  intensity_ref: np.ndarray | None = None
  modality: str = "ct"  # of the source records (ctdiff_jax/ingest/modality.py)

  def __len__(self) -> int:
    return len(self.index)

  @classmethod
  def concat(cls, parts: Sequence["Samples"]) -> "Samples":
    if not parts:
      raise ValueError("no samples to concatenate")
    kw = {}
    for f in dataclasses.fields(cls):
      values = [getattr(p, f.name) for p in parts]
      if f.name == "run":
        kw[f.name] = dict(parts[-1].run)
      elif values[0] is None or isinstance(values[0], str):
        kw[f.name] = values[0]
      elif isinstance(values[0], list):
        kw[f.name] = list(itertools.chain.from_iterable(values))
      else:
        kw[f.name] = np.concatenate(values, axis=0)
    return cls(**kw)


def paste_hu(generated: np.ndarray, image_hu: np.ndarray, mask: np.ndarray,
             intensity) -> np.ndarray:
  """int16 HU: rint(unit_to_hu(generated)) where mask > 0, else `image_hu` unchanged.

  `intensity` is the model's map (ExampleConfig.intensity): it reaches the whole CT range, so
  bone and gas generated inside a context/shape mask are not clipped to a soft-tissue window.
  """
  hu = np.rint(transforms.unit_to_hu(np.asarray(generated, np.float64), intensity))
  hu = np.clip(hu, -32768, 32767).astype(np.int16)
  return np.where(np.asarray(mask) > 0, hu, np.asarray(image_hu, np.int16))


def load_inpainter(config, checkpoint: str,
                   spec: GenerateSpec | None = None) -> inference.Inpainter:
  """The Inpainter of `checkpoint` (a workdir or its checkpoints dir), with clear errors.

  `spec` gives the checkpoint step and the sampler settings (default: latest, config's).
  """
  spec = spec or GenerateSpec()
  if not checkpoint:
    raise CheckpointError("no checkpoint given: pass --workdir=<training workdir> or "
                          "--checkpoint=<workdir or its checkpoints dir>")
  try:
    return inference.Inpainter(config, checkpoint, step=spec.checkpoint_step,
                               num_steps=spec.steps, sampler=spec.sampler)
  except (FileNotFoundError, ValueError) as e:
    raise CheckpointError(
        f"cannot restore a {config.model_family} model ({config.dataset}, "
        f"{config.image_size}px) from checkpoint {checkpoint}: {e}") from e


def make_planner(config, spec: GenerateSpec, *, progress: bool = True
                 ) -> tuple[scenarios.Planner, dict[str, Any], str]:
  """(planner, dataset metadata, split) of `spec`'s scenario on `config`'s dataset."""
  split = spec.split or config.eval_split
  source, meta = sources.open_split(config, split)
  planner = scenarios.Planner(source, meta, config.data, spec, split=split, progress=progress,
                              open_split=lambda s: sources.open_split(config, s)[0])
  return planner, meta, split


def _pasted(jobs: list[scenarios.Job], generated: np.ndarray, image: np.ndarray,
            mask: np.ndarray, ecfg: transforms.ExampleConfig) -> dict[str, Any]:
  """generated_hu (+ value_scale, intensity_ref for MR / PET) of a chunk."""
  if ecfg.modality == "ct":
    return {"generated_hu": paste_hu(generated, image, mask, ecfg.intensity)}
  params = [transforms.intensity_params(j.record, ecfg.modality) for j in jobs]
  stored = np.stack([transforms.unit_to_stored(g, scale, ref, ecfg)
                     for g, (scale, ref) in zip(generated, params)])
  return {"generated_hu": np.where(np.asarray(mask) > 0, stored, image),
          "value_scale": np.array([p[0] for p in params], np.float32),
          "intensity_ref": np.array([p[1] for p in params], np.float32),
          "modality": ecfg.modality}


def _samples(jobs: list[scenarios.Job], generated: np.ndarray,
             ecfg: transforms.ExampleConfig) -> Samples:
  stack = lambda key: np.stack([np.asarray(j.record[key]).reshape(generated.shape[1:])
                                for j in jobs])
  image_hu = stack(records.IMAGE).astype(np.int16)
  mask = np.stack([j.mask for j in jobs]).astype(np.uint8)[..., None]
  return Samples(
      index=np.array([j.index for j in jobs], np.int64),
      source_index=np.array([j.source_index for j in jobs], np.int64),
      round=np.array([j.round for j in jobs], np.int64),
      case_id=[j.case_id for j in jobs],
      slice_index=np.array([j.slice_index for j in jobs], np.int32),
      spacing_mm=np.stack([np.asarray(j.record[records.SPACING_MM], np.float32).reshape(3)
                           for j in jobs]),
      image_hu=image_hu,
      prev_hu=stack(records.PREV_IMAGE).astype(np.int16),
      next_hu=stack(records.NEXT_IMAGE).astype(np.int16),
      source_labels=stack(records.LABELS).astype(np.uint8),
      labels=np.stack([j.labels for j in jobs]).astype(np.uint8)[..., None],
      mask=mask,
      generated=np.asarray(generated, np.float32),
      info=[dict(j.info) for j in jobs],
      **_pasted(jobs, generated, image_hu, mask, ecfg),
  )


def iter_samples(config, inpainter: inference.Inpainter, planner: scenarios.Planner,
                 num_samples: int, *, progress: bool = True,
                 wanted=None, first: int = 0) -> Iterator[Samples]:
  """Generates slices first..num_samples-1 of the planner's jobs in chunks of CHUNK_BATCHES
  batches (first > 0: one process's share, export/parts.py; the jobs before it are planned,
  not generated, so sample i is the same job as in a whole run).

  Sample i's noise comes from (planner.spec.seed, i) alone, not from the chunk, batch size
  or device count (Inpainter.inpaint). A chunk whose sample
  indices `wanted(indices)` declines (an export resumed) is skipped, not generated.
  """
  ecfg = transforms.ExampleConfig.from_data_config(config.data)
  spec = planner.spec
  chunk = inpainter.batch_size * CHUNK_BATCHES
  jobs = itertools.islice(planner.jobs(num_samples), first, None) if num_samples > first else (
      iter(()))
  bar = tqdm.tqdm(total=max(num_samples - first, 0), desc=f"generating ({spec.scenario})",
                  unit="slice", disable=not progress)
  t0, done = time.time(), 0
  try:
    for _ in itertools.count():
      part = list(itertools.islice(jobs, chunk))
      if not part:
        break
      if wanted is not None and not wanted([j.index for j in part]):
        bar.update(len(part))
        continue
      examples = [transforms.example_with_mask(j.record, ecfg, j.mask) for j in part]
      batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "cond")}
      generated = inpainter.inpaint(batch, spec.seed, indices=[j.index for j in part],
                                    progress=False)
      done += len(part)
      bar.update(len(part))
      bar.set_postfix(slices_per_s=f"{done / max(time.time() - t0, 1e-9):.2f}")
      yield _samples(part, generated, ecfg)
  finally:
    bar.close()


def _inpainter(config, checkpoint, spec: GenerateSpec) -> inference.Inpainter:
  if isinstance(checkpoint, inference.Inpainter):
    if (spec.steps, spec.sampler, spec.checkpoint_step) != (None, None, None):
      raise ValueError("steps/sampler/checkpoint_step are set when the Inpainter is built")
    return checkpoint
  return load_inpainter(config, checkpoint, spec)


def generate_samples(config, checkpoint, spec: GenerateSpec, *,
                     progress: bool = True) -> Samples:
  """All `spec.num_samples` generated slices in memory (no files); `.run` is the provenance.

  `checkpoint` is a training workdir / checkpoints dir, or an inference.Inpainter to reuse.
  """
  planner, meta, split = make_planner(config, spec, progress=progress)
  inpainter = _inpainter(config, checkpoint, spec)
  out = Samples.concat(list(iter_samples(config, inpainter, planner, spec.num_samples,
                                         progress=progress)))
  out.run = _run_info(config, inpainter, planner, meta, split)
  return out


def _run_info(config, inpainter, planner, meta, split):
  spec = planner.spec
  return {
      "scenario": spec.scenario, "source_dataset": meta.get("dataset"), "source_split": split,
      "seed": int(spec.seed), "checkpoint": inpainter.checkpoint,
      "checkpoint_step": int(inpainter.step), "model_family": config.model_family,
      **inpainter.task.sampler_info(spec.steps, spec.sampler),  # None for pix2pix
      "label_ids": list(planner.label_ids), "usable_slices": len(planner.usable),
      "skipped": dict(planner.skipped),
  }


def display_window(config, source=None) -> tuple[float, float]:
  """The HU window of the previews and Figure 4 (the FID window when the config has one).

  MR / PET (whose FID window is in normalised units): the first record of `source`'s intensity
  reference in stored units (one window for the export; cases differ in scale).
  """
  modality = sources.config_modality(config)
  if modality != "ct" and source is not None and len(source):
    scale, (lo, hi) = transforms.intensity_params(source[0], modality)
    return (lo / scale, hi / scale)
  if "eval" in config:
    return tuple(config.eval.fid_window)
  return (float(config.data.intensity_hu[0]), float(config.data.intensity_hu[-1]))


def generate(config, checkpoint, spec: GenerateSpec, output_dir: str, *,
             progress: bool = True, on_part=None,
             shard: export.Shard | None = None) -> dict[str, Any]:
  """Generates `spec.num_samples` slices into `output_dir` (see export/); returns a summary.

  Checks the scenario, dataset and mask before loading the model, so bad input fails fast.
  `on_part(samples)`, if given, also sees every generated chunk (e.g. to score it in memory
  without generating it a second time). `shard` (default: this process of a jax.distributed
  run, hosts.current()): with several processes, this one writes its block of the sample
  indices into output_dir/parts/ and, under jax.distributed, process 0 merges the parts into
  output_dir after a barrier (export/parts.py; independent jobs: `generate --merge`).
  """
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  request = export.request_of(spec, config)  # an interrupted run of it is resumed (export/)
  shard = hosts.current() if shard is None else shard
  if shard.count == 1:
    return _export(config, checkpoint, spec, output_dir, request, progress=progress,
                   on_part=on_part)
  part_dir, part_request = export.parts.start(output_dir, request, shard, spec.overwrite)
  summary: dict[str, Any] = {"output_dir": part_dir, "num_samples": 0}  # complete already
  if part_request is not None:
    summary = _export(config, checkpoint, spec, part_dir, part_request, shard=shard,
                      progress=progress, on_part=on_part)
  summary.update(part=shard.name, distributed=shard.distributed)
  if shard.distributed:  # process 0 merges once every part is written; all wait for it
    hosts.barrier(f"ctdiff_jax.generate parts written: {output_dir}")
    try:
      if shard.index == 0:
        summary["merged"] = export.merge(output_dir)
    finally:  # (jax.distributed's shutdown waits for every process, a few minutes at most)
      hosts.barrier(f"ctdiff_jax.generate merged: {output_dir}")
  return summary


def _export(config, checkpoint, spec: GenerateSpec, output_dir: str, request, *,
            shard: export.Shard | None = None, progress: bool = True, on_part=None
            ) -> dict[str, Any]:
  """generate's export of the whole run, or (shard) of one process's part."""
  t0 = time.time()
  first, stop = shard.range(spec.num_samples) if shard else (0, spec.num_samples)
  export.check_output_dir(output_dir, request, spec.overwrite)
  planner, meta, split = make_planner(config, spec, progress=progress)
  inpainter = _inpainter(config, checkpoint, spec)
  run = _run_info(config, inpainter, planner, meta, split)
  exporter = export.Exporter(
      output_dir, meta, stop - first, formats=spec.formats, tfds=spec.tfds,
      volumes=spec.volumes, display_window=display_window(config, planner.source),
      provenance={k: v for k, v in run.items() if k != "skipped"}, request=request,
      overwrite=spec.overwrite, part=shard is not None)
  t_gen = time.time()
  for part in iter_samples(config, inpainter, planner, stop, progress=progress,
                           wanted=exporter.wanted, first=first):
    exporter.add(part)
    if on_part is not None:
      on_part(part)
  gen_seconds = time.time() - t_gen
  written = exporter.finish()
  run["skipped"] = dict(planner.skipped)
  return {**run, **written, "num_samples": stop - first, "dataset": meta.get("dataset"),
          "skipped_count": len(run["skipped"]), "seconds": round(time.time() - t0, 2),
          "slices_per_s": round((stop - first) / max(gen_seconds, 1e-9), 3)}


def format_summary(summary: dict[str, Any]) -> str:
  """The human-readable end-of-run summary printed by the CLI."""
  if "part" in summary:
    return _format_part(summary)
  lines = [
      f"generated {summary['num_samples']} slices ({summary['scenario']}) from "
      f"{summary['dataset']} split {summary['source_split']!r} with checkpoint step "
      f"{summary['checkpoint_step']} ({summary['checkpoint']})",
      f"  {summary['slices_per_s']:.2f} slices/s, {summary['seconds']:.1f} s in all",
      f"  output      {summary['output_dir']} ({summary['slice_files']} per-slice files)",
      f"  manifest    {summary['manifest']}",
  ]
  if summary.get("figure"):
    lines.append(f"  figure      {summary['figure']}")
  if summary.get("volumes"):
    lines.append(f"  volumes     {len(summary['volumes'])} files in "
                 f"{os.path.dirname(summary['volumes'][0])}")
  if summary.get("tfds_dir"):
    lines.append(f"  tfds        {summary['tfds_name']} split {summary['tfds_split']!r} in "
                 f"{summary['tfds_data_dir']} (tfds.data_source or --config.data_dir=...)")
  skipped = summary.get("skipped", {})
  if skipped:
    lines.append(f"  skipped     {len(skipped)} source slices (empty mask / nothing fits), e.g. "
                 + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]))
  return "\n".join(lines)


def _format_part(summary: dict[str, Any]) -> str:
  """format_summary of one process's part (and of the merge process 0 did)."""
  rest = {k: v for k, v in summary.items() if k not in ("part", "merged", "distributed")}
  lines = [format_summary(rest) if "scenario" in rest else
           f"{summary['part']} was complete already ({summary['output_dir']})"]
  if summary.get("merged"):
    lines.append(export.parts.format_merge(summary["merged"]))
  elif summary.get("distributed"):
    lines.append("  merge       by process 0, into the parts' parent folder")
  else:
    top = os.path.dirname(os.path.dirname(summary["output_dir"]))
    lines.append(f"  merge       once every part is written: python -m ctdiff_jax.generate "
                 f"--merge --output_dir={top}")
  return "\n".join(lines)
