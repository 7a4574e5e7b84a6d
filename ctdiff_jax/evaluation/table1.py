"""Table 1: FID and in-mask image metrics of organ inpainting, per organ and method.

  python -m ctdiff_jax.evaluate --config=configs/kidneys.py --workdir=W --output=out_kidneys \
      [--pix2pix_config=configs/pix2pix_kidneys.py --pix2pix_workdir=W2] [--split=test]
  python -m ctdiff_jax.evaluate --merge=out_kidneys/table1.json,out_liver/table1.json \
      --output=out_all

On the eval split (`config.eval_split`, or --split) the real slices that contain the organ
are compared with three "generated" sets of the same slices (the poster's columns):

  pix2pix    the Pix2Pix model inpaints the organ mask (only with --pix2pix_workdir),
  diffusion  the diffusion model inpaints the organ mask (the `organ` scenario),
  neighbour  the record's neighbouring real slice (prev_image; next_image at the volume's
             lower end): how much adjacent real slices differ, a floor for any generator.
             Only on disjoint sets: the pairs whose neighbour is none of the kept slices
             (evaluators.DisjointPairs; every other slice of a run of consecutive slices),
             so its N is smaller than the other columns' (shown beside it); the generative
             methods' FIDs at those same rows (`at_neighbour_pairs`) compare with it at
             equal N.

Slices and masks come from generation's `organ` scenario (scenarios.Planner: its slice scan
and organ masks); the generated columns are generation's own samples (runner.iter_samples on
those slices): generated HU pasted into the original int16 slice inside the mask, rounded to
int16, as the synthetic datasets store them. `predict` yields each column's batches of the
same slices, masks and crop boxes; the columns' accumulators are in evaluators.py and the
table files in tables.py. Metrics per method:

  fid_whole  FID over whole slices: HU -> config.eval.fid_window -> uint8 grey -> RGB, resized
             to 299 in float by the FID network (see ctdiff_jax.evaluation.fid).
  fid_crop   FID over organ crops: mask bounding box + eval.crop_margin_mm, made square
             (shifted into the slice, padded with air only when larger than it), windowed,
             resized to eval.crop_size (uint8, legacy TF bilinear), then the FID resize.
             More sensitive to the inpainted region than whole slices.
  mae_hu / psnr_db / ssim  inside the mask, per slice, mean +- std over slices (generative
             methods only; see ctdiff_jax.evaluation.image_metrics).
  w1_hu      W1 distance (HU) between the in-mask HU of the method and the real in-mask HU,
             pooled over the slices (scenario_metrics.w1).

Every FID carries its image counts (n1 real, n2 generated) and, with eval.bootstrap > 1, a
paired bootstrap std and 95% interval (real and generated rows are the same slices: one
index vector resamples both). FID is biased upward at small N and unstable: the table flags
N < 2048 beside every such FID; compare FIDs only at equal N.
MR / PET (config.modality): every image is first taken to the modality's normalised value
(`eval_scale`: MR (value - p0.5) / (p99.5 - p0.5) of its own case, PET log(1 + SUV)), so the
FID window (configs/kidneys_mr.py: (0, 1)) is a per-volume percentile window and MAE / W1
are in that unit (`settings.intensity_unit`), not HU.
The row names its data: `data_label` (argument, else config.eval.data_label when set, else
derived from the dataset's build summary) and `phantom` (whether the slices come from the
procedural phantom cohort: its manifest.csv in the build's manual_dir; None when unknown).
Outputs in --output: table1.md, table1.csv, table1.json (rows; `--merge` concatenates the
rows of several table1.json files, one row per organ/dataset/split/N, the later file's
row winning) and per_slice.csv (metrics of every evaluated slice).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from typing import Any, Iterator, Mapping

from absl import logging
import numpy as np

from ctdiff_jax.data import sources
from ctdiff_jax.data import transforms
from ctdiff_jax.evaluation import evaluators
from ctdiff_jax.evaluation import fid
from ctdiff_jax.evaluation import tables
from ctdiff_jax.generation import scenarios
from ctdiff_jax.ingest import modality as modality_lib
from ctdiff_jax.ingest import records
# Re-exported: the table API and crops have always been reachable as table1.<name>.
# pylint: disable=unused-import
from ctdiff_jax.evaluation.evaluators import FID_KINDS, IMAGE_METRICS, Batch, crop, crop_box
from ctdiff_jax.evaluation.tables import (GENERATIVE, METHODS, SMALL_N, TABLE_FILES,
                                          csv_columns, markdown_table, merge_tables,
                                          write_tables)
# pylint: enable=unused-import


def organ_name(config) -> str:
  """The Table 1 row name: the dataset config (e.g. 'kidneys') or the custom organ list."""
  return str(config.organs) if config.organs else str(config.dataset)


def is_phantom(manual_dir: str | os.PathLike | None) -> bool | None:
  """Whether a build's raw dir is the phantom cohort (its manifest.csv); None: unknown."""
  from ctdiff_jax.phantom import cohort  # pylint: disable=g-import-not-at-top  (nibabel)
  if not manual_dir or not pathlib.Path(manual_dir).is_dir():
    return None
  manifest = pathlib.Path(manual_dir) / "manifest.csv"
  if not manifest.is_file():
    return False
  with open(manifest, newline="") as f:
    header = next(csv.reader(f), [])
  return set(cohort.MANIFEST_COLUMNS) <= set(header)


def data_info(config, meta: Mapping[str, Any], data_label: str | None = None) -> dict:
  """{data_label, phantom, manual_dir}: which data the row was computed on.

  The label is `data_label`, else config.eval.data_label when set, else 'phantom cohort',
  'CT from <raw dir name>' or the dataset name when the raw dir is gone.
  """
  manual_dir = (meta.get("build") or {}).get("manual_dir")
  phantom = is_phantom(manual_dir)
  label = data_label or config.eval.get("data_label", None)
  if not label:
    label = {True: "phantom cohort", None: meta.get("dataset") or
             f"ct_slices/{sources.dataset_config_name(config)}"}.get(
                 phantom, f"CT from {pathlib.Path(str(manual_dir)).name}")
  return {"data_label": str(label), "phantom": phantom, "manual_dir": manual_dir}


# ---------------------------------------------------------------------------- slices


def neighbour_hu(image: np.ndarray, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
  """int16 [N, H, W]: prev, or next where prev repeats the slice (the volume's lower end)."""
  image, prev, nxt = (np.asarray(a)[..., 0] if np.ndim(a) == 4 else np.asarray(a)
                      for a in (image, prev, nxt))
  at_end = (prev == image).all(axis=(1, 2))
  return np.where(at_end[:, None, None], nxt, prev).astype(np.int16)


def neighbour_slice(record: Mapping[str, Any]) -> np.ndarray:
  """int16 (H, W): the neighbouring real slice of one record (see neighbour_hu)."""
  get = lambda key: np.asarray(record[key])[None]
  return neighbour_hu(get(records.IMAGE), get(records.PREV_IMAGE), get(records.NEXT_IMAGE))[0]


class _Subset:
  """Records `indices` of a source, as a source (so the Planner plans only those)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


@dataclasses.dataclass
class Selection:
  """The evaluated slices: the organ scenario's Planner on them and their split indices."""

  planner: scenarios.Planner
  index: np.ndarray  # planner source position -> record index in the split
  without_organ: int  # slices of the split without the organ

  def __len__(self) -> int:
    return len(self.planner.usable)


def select_slices(config, split: str, num_samples: int, seed: int,
                  progress: bool = True) -> Selection:
  """The slices with the organ (the `organ` scenario's scan of the split).

  num_samples = 0: all of them. Otherwise a seeded random subset of that many (fewer when
  the split has fewer).
  """
  source, meta = sources.open_split(config, split)
  spec = scenarios.ScenarioSpec("organ", seed=seed)  # seed: also the sampling noise
  planner = scenarios.Planner(source, meta, config.data, spec, split=split, progress=progress)
  without, usable = len(planner.skipped), np.sort([i for i, _, _ in planner.usable])
  if not 0 < num_samples < len(usable):
    return Selection(planner, np.arange(len(source)), without)
  keep = np.sort(np.random.default_rng(seed).choice(usable, num_samples, replace=False))
  planner = scenarios.Planner(_Subset(source, keep), meta, config.data, spec, split=split,
                              progress=False)
  return Selection(planner, keep, without)


# ---------------------------------------------------------------------------- predict


def load_models(config, workdir: str, pix2pix_config=None,
                pix2pix_workdir: str | None = None) -> dict[str, tuple[Any, Any]]:
  """{column: (model config, Inpainter)}: 'pix2pix' (when given), then 'diffusion'."""
  from ctdiff_jax.generation import runner  # pylint: disable=g-import-not-at-top  (jax)
  if config.model_family != "diffusion":
    logging.warning("--config has model_family=%r; its column is still labelled Diffusion",
                    config.model_family)
  models = {}
  if pix2pix_config is not None:
    want, got = sources.dataset_config_name(config), sources.dataset_config_name(pix2pix_config)
    if want != got:
      raise ValueError(f"the Pix2Pix config reads ct_slices/{got} but the diffusion config "
                       f"reads ct_slices/{want}: both must be evaluated on the same slices")
    if pix2pix_config.model_family != "pix2pix":
      logging.warning("--pix2pix_config has model_family=%r; its column is still labelled "
                      "Pix2Pix", pix2pix_config.model_family)
    models["pix2pix"] = (pix2pix_config, runner.load_inpainter(pix2pix_config, pix2pix_workdir))
  models["diffusion"] = (config, runner.load_inpainter(config, workdir))
  return models


def eval_scale(images: np.ndarray, part) -> np.ndarray:
  """[N, H, W] stored images of a chunk in the metrics' scale: CT HU as they are; MR / PET
  the normalised value of each slice's own case (ingest/modality.py)."""
  images = np.asarray(images)
  if getattr(part, "modality", modality_lib.CT) == modality_lib.CT:
    return images
  scale = np.asarray(part.value_scale, np.float64)[:, None, None]
  ref = np.asarray(part.intensity_ref, np.float64)
  return modality_lib.normalise(images * scale, part.modality,
                                (ref[:, 0, None, None], ref[:, 1, None, None]))


def _batch(part, index: np.ndarray, margin_mm: float) -> Batch:
  """The real side of a chunk of generation samples (generated = real)."""
  real = eval_scale(np.asarray(part.image_hu)[..., 0], part)
  mask = np.asarray(part.mask)[..., 0] > 0
  spacing = [transforms.pixel_spacing({records.SPACING_MM: s}, 0.0) for s in part.spacing_mm]
  boxes = [crop_box(m, s, margin_mm) for m, s in zip(mask, spacing)]
  return Batch(index=index[np.asarray(part.source_index)], case_id=list(part.case_id),
               slice_index=np.asarray(part.slice_index), real=real, generated=real, mask=mask,
               boxes=boxes)


def predict(models: Mapping[str, tuple[Any, Any]], selection: Selection, *,
            margin_mm: float, progress: bool = True) -> Iterator[tuple[str, Batch]]:
  """(column, Batch) of every column: 'real', 'neighbour' and each model, same slices.

  Each model's column is generation's own samples (runner.iter_samples, organ scenario,
  noise from the planner spec's seed) on the selection's planner; 'real' and 'neighbour'
  ride along the first model's chunks.
  """
  from ctdiff_jax.generation import runner  # pylint: disable=g-import-not-at-top  (jax)
  for i, (name, (mcfg, inpainter)) in enumerate(models.items()):
    for part in runner.iter_samples(mcfg, inpainter, selection.planner, len(selection),
                                    progress=progress):
      base = _batch(part, selection.index, margin_mm)
      if i == 0:
        yield "real", base
        yield "neighbour", dataclasses.replace(
            base, generated=eval_scale(neighbour_hu(part.image_hu, part.prev_hu, part.next_hu),
                                       part))
      yield name, dataclasses.replace(
          base, generated=eval_scale(np.asarray(part.generated_hu)[..., 0], part))


# ---------------------------------------------------------------------------- evaluation


def _check_fid_weights(weights) -> None:
  """Fails before any inpainting when there are neither converted weights nor a source."""
  path = pathlib.Path(weights).expanduser() if weights else fid.default_cache_path()
  if not path.is_file():
    fid.find_source()  # Raises FIDWeightsNotFoundError with install instructions.


def _settings(config, selection: Selection, num_samples: int, seed: int) -> dict[str, Any]:
  planner = selection.planner
  modality = sources.config_modality(config)
  return {"fid_window": [float(v) for v in config.eval.fid_window],
          "modality": modality, "intensity_unit": modality_lib.UNITS[modality],
          "crop_size": int(config.eval.crop_size),
          "crop_margin_mm": float(config.eval.crop_margin_mm),
          "bootstrap": int(config.eval.bootstrap), "seed": int(seed),
          "bootstrap_paired": True,
          "num_samples": num_samples, "mask_labels": list(planner.label_ids),
          "dilation_mm": planner.ecfg.dilation_mm}


def make_columns(names, settings: Mapping[str, Any], pad_hu: float, batch_size: int,
                 weights) -> dict[str, dict[str, Any]]:
  """{column: {evaluator name: evaluator}} for 'real', 'neighbour' and the model columns."""
  window = tuple(settings["fid_window"])
  featurizer = evaluators.Featurizer(batch_size, weights)
  columns = {}
  for name in ("real", "neighbour") + tuple(names):
    columns[name] = {k: evaluators.FIDEvaluator(
        k, featurizer, window=window, crop_size=settings["crop_size"], pad_hu=pad_hu)
                     for k in FID_KINDS}
    if name in GENERATIVE:
      columns[name]["metrics"] = evaluators.ImageMetricsEvaluator(window)
    if name != "real":
      columns[name]["w1"] = evaluators.W1Evaluator()
  columns["real"]["slices"] = evaluators.SliceLog()
  return columns


def evaluate(config, workdir: str, output_dir: str | None, *, pix2pix_config=None,
             pix2pix_workdir: str | None = None, split: str | None = None,
             num_samples: int | None = None, seed: int = 0,
             fid_weights: str | os.PathLike | None = None, data_label: str | None = None,
             progress: bool = True) -> dict[str, Any]:
  """Evaluates one organ config (see the module docstring); writes tables when output_dir.

  Args:
    config: the diffusion model's training config (its dataset is the row).
    workdir: its training workdir (or checkpoints dir).
    output_dir: where table1.{md,csv,json} and per_slice.csv go (None: nothing written).
    pix2pix_config / pix2pix_workdir: the Pix2Pix baseline (both or neither); it must read
      the same dataset (name, size and spacing) and gets the same masks.
    split: default config.eval_split.
    num_samples: slices to evaluate, default config.eval.num_samples (0 = all).
    seed: slice subset, bootstrap and sampling noise.
    fid_weights: converted Inception weights (default: fid.default_cache_path()).
    data_label: the data's name in the table (default: see data_info).

  Returns:
    The row: organ, dataset, data_label, phantom, manual_dir, split, num_slices,
    slices_without_organ, methods {pix2pix|diffusion|neighbour: {fid_whole, fid_crop, w1_hu,
    [mae_hu, psnr_db, ssim]} or None}, checkpoints, settings and warnings.
  """
  import jax  # pylint: disable=g-import-not-at-top  (`--merge` needs no model code)
  if (pix2pix_config is None) != (pix2pix_workdir is None):
    raise ValueError("give both pix2pix_config and pix2pix_workdir, or neither")
  split = split or config.eval_split
  num_samples = int(config.eval.num_samples if num_samples is None else num_samples)
  _check_fid_weights(fid_weights)
  models = load_models(config, workdir, pix2pix_config, pix2pix_workdir)
  selection = select_slices(config, split, num_samples, seed, progress)
  if len(selection) < 2:
    raise ValueError(f"split {split!r} of ct_slices/{sources.dataset_config_name(config)} has "
                     f"{len(selection)} slice(s) with the organ; FID needs at least 2")
  settings = _settings(config, selection, num_samples, seed)
  pad_hu = float(selection.planner.meta.get("pad_hu", transforms.AIR_HU))
  if settings["modality"] != modality_lib.CT:
    pad_hu = 0.0  # air in the normalised scale (MR: about p0.5, PET: SUV 0)
  fid_batch = int(config.eval.fid_batch_size) * jax.local_device_count()
  columns = make_columns(models, settings, pad_hu, fid_batch, fid_weights)
  pairs = evaluators.DisjointPairs()  # the neighbour column's disjoint (slice, neighbour) pairs
  for name, batch in predict(models, selection, margin_mm=settings["crop_margin_mm"],
                             progress=progress):
    if name == "neighbour":
      batch = pairs.select(batch)
    for evaluator in columns[name].values():
      if len(batch.index):
        evaluator.update(batch)
  data = data_info(config, selection.planner.meta, data_label)
  row = _row(config, split, selection, columns, models, settings, pairs.positions, data)
  if output_dir is not None:
    write_tables([row], output_dir)
    _write_per_slice(columns, pathlib.Path(output_dir) / "per_slice.csv", settings["modality"])
  return row


def _row(config, split: str, selection: Selection, columns, models,
         settings: Mapping[str, Any], neighbour_rows: list[int],
         data: Mapping[str, Any]) -> dict[str, Any]:
  """The Table 1 row of one organ from the filled column evaluators."""
  n = len(selection)
  methods: dict[str, Any] = {m: None for m in METHODS}
  for name in ("neighbour",) + tuple(models):
    rows = neighbour_rows if name == "neighbour" else None
    entry = {k: columns[name][k].result(columns["real"][k], settings["bootstrap"],
                                        settings["seed"], rows) for k in FID_KINDS}
    entry["w1_hu"] = columns[name]["w1"].result()
    if name in models:
      entry.update(columns[name]["metrics"].result())
      # The same FIDs at the neighbour's rows: comparable with the neighbour's (equal N).
      entry["at_neighbour_pairs"] = {k: columns[name][k].result(
          columns["real"][k], settings["bootstrap"], settings["seed"], neighbour_rows,
          neighbour_rows) for k in FID_KINDS}
      inpainter = models[name][1]
      entry["checkpoint"] = {"path": inpainter.checkpoint, "step": int(inpainter.step),
                             "model_family": inpainter.config.model_family}
    methods[name] = entry
  warnings = []
  if n < SMALL_N:
    warnings.append(f"{organ_name(config)}: FID on N={n} < {SMALL_N} images per set is "
                    f"biased upward and unstable; compare FIDs only at equal N.")
  n_nb = len(neighbour_rows)
  if n_nb != n:
    warnings.append(f"{organ_name(config)}: the neighbouring-slice FID uses N={n_nb} "
                    f"disjoint (slice, neighbour) pairs, not the N={n} of the other columns: "
                    f"compare it with their FIDs at those pairs (at_neighbour_pairs).")
  for w in warnings:
    logging.warning("%s", w)
  return {
      "organ": organ_name(config),
      "dataset": f"ct_slices/{sources.dataset_config_name(config)}",
      **data,
      "split": split,
      "num_slices": n,
      "num_neighbour_pairs": n_nb,
      "slices_without_organ": selection.without_organ,
      "methods": methods,
      "settings": dict(settings),
      "warnings": warnings,
  }


def _write_per_slice(columns, path: pathlib.Path, modality: str = "ct") -> None:
  """per_slice.csv: one line per slice (every column holds the slices in the same order)."""
  per_slice = dict(columns["real"]["slices"].values)
  for name, cols in columns.items():
    if "metrics" in cols:  # mae_hu is named in the modality's unit (tables.unit_name)
      per_slice.update({tables.unit_name(f"{name}_{k}", modality): v
                        for k, v in cols["metrics"].values.items()})
  keys = list(per_slice)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(keys)
    for vals in zip(*(per_slice[k] for k in keys)):
      w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in vals])
