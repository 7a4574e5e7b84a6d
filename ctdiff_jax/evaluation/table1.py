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

Generated HU are pasted into the original int16 slice inside the mask (rounded to int16, as
the synthetic datasets store them). Metrics per method:

  fid_whole  FID over whole slices: HU -> config.eval.fid_window -> uint8 grey -> RGB, resized
             to 299 in float by the FID network (see ctdiff_jax.evaluation.fid).
  fid_crop   FID over organ crops: mask bounding box + eval.crop_margin_mm, made square
             (shifted into the slice, padded with air only when larger than it), windowed,
             resized to eval.crop_size (uint8, legacy TF bilinear), then the FID resize.
             More sensitive to the inpainted region than whole slices.
  mae_hu / psnr_db / ssim  inside the mask, per slice, mean +- std over slices (generative
             methods only; see ctdiff_jax.evaluation.image_metrics).

Every FID carries its image counts (n1 real, n2 generated) and, with eval.bootstrap > 1, a
bootstrap std. FID is biased upward at small N and unstable: the table flags N < 2048.
Outputs in --output: table1.md, table1.csv, table1.json (rows; `--merge` concatenates the
rows of several table1.json files) and per_slice.csv (metrics of every evaluated slice).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
from tqdm import auto as tqdm

from ctdiff_jax.data import sources
from ctdiff_jax.evaluation import fid
from ctdiff_jax.generation import runner
from ctdiff_jax.evaluation import image_metrics
from ctdiff_jax.ingest import records
from ctdiff_jax.data import masks as masks_lib
from ctdiff_jax.data import transforms

METHODS = ("pix2pix", "diffusion", "neighbour")
GENERATIVE = ("pix2pix", "diffusion")
METHOD_TITLES = {"pix2pix": "Pix2Pix", "diffusion": "Diffusion",
                 "neighbour": "Neighbouring slice"}
FID_KINDS = ("fid_whole", "fid_crop")
FID_TITLES = {"fid_whole": "FID (whole)", "fid_crop": "FID (crop)"}
IMAGE_METRICS = ("mae_hu", "psnr_db", "ssim")
METRIC_TITLES = {"mae_hu": "MAE (HU)", "psnr_db": "PSNR (dB)", "ssim": "SSIM"}
METRIC_FORMATS = {"mae_hu": ".1f", "psnr_db": ".2f", "ssim": ".4f"}
# FID needs thousands of images to be stable; below this the table warns (FID bias at small N).
SMALL_N = 2048
# Slices loaded, inpainted and featurised at a time (bounds host memory on large splits).
CHUNK_SLICES = 256
TABLE_FILES = ("table1.md", "table1.csv", "table1.json")


# ---------------------------------------------------------------------------- slices


def organ_name(config) -> str:
  """The Table 1 row name: the dataset config (e.g. 'kidneys') or the custom organ list."""
  return str(config.organs) if config.organs else str(config.dataset)


def _has_organ(record: Mapping[str, Any], cfg: transforms.ExampleConfig) -> bool:
  union = masks_lib.organ_union(np.asarray(record[records.LABELS]), cfg.mask_labels)
  return int(union.sum()) >= masks_lib.MIN_ORGAN_PIXELS


def select_slices(source, cfg: transforms.ExampleConfig, num_samples: int, seed: int,
                  progress: bool = True) -> tuple[np.ndarray, int]:
  """(sorted record indices with the organ, organ-free slices seen).

  num_samples = 0: every slice with the organ. Otherwise a seeded random subset of that many
  (fewer when the split has fewer), found by walking a seeded permutation.
  """
  n = len(source)
  order = np.arange(n) if num_samples <= 0 else np.random.default_rng(seed).permutation(n)
  chosen, skipped = [], 0
  for i in tqdm.tqdm(order, desc="selecting slices", unit="slice", leave=False,
                     disable=not progress):
    if _has_organ(source[int(i)], cfg):
      chosen.append(int(i))
      if 0 < num_samples <= len(chosen):
        break
    else:
      skipped += 1
  return np.sort(np.asarray(chosen, np.int64)), skipped


def organ_mask(record: Mapping[str, Any], cfg: transforms.ExampleConfig) -> np.ndarray:
  """Bool (H, W) mask of the `organ` scenario (the config's labels and dilation)."""
  mask, used = masks_lib.make_mask(
      record[records.LABELS], "organ", np.random.default_rng(0), label_ids=cfg.mask_labels,
      dilation_mm=cfg.dilation_mm,
      spacing_mm=transforms.pixel_spacing(record, cfg.spacing_mm), return_mode=True)
  if used != "organ":  # select_slices keeps organ slices only; guard against label drift.
    raise ValueError(f"slice {record.get(records.SLICE_INDEX)} of case "
                     f"{_text(record.get(records.CASE_ID))!r} has no organ pixels")
  return mask > 0.5


def neighbour_slice(record: Mapping[str, Any]) -> np.ndarray:
  """int16 (H, W): prev_image, or next_image where prev repeats the slice (volume end)."""
  image = np.asarray(record[records.IMAGE])[..., 0]
  prev = np.asarray(record[records.PREV_IMAGE])[..., 0]
  if np.array_equal(prev, image):
    return np.asarray(record[records.NEXT_IMAGE])[..., 0]
  return prev


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------- crops


def crop_box(mask: np.ndarray, spacing_mm: tuple[float, float],
             margin_mm: float) -> tuple[int, int, int]:
  """(top, left, side) of the square organ crop: bbox + margin, centred, squared.

  The square is shifted to lie inside the slice when it fits; when it is larger than the
  slice it stays centred and `crop` pads the outside.
  """
  mask = np.asarray(mask, bool)
  if not mask.any():
    raise ValueError("crop_box: empty mask")
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  mr, mc = masks_lib.margin_pixels(margin_mm, spacing_mm)
  r0, r1 = rows[0] - mr, rows[-1] + mr
  c0, c1 = cols[0] - mc, cols[-1] + mc
  h, w = r1 - r0 + 1, c1 - c0 + 1
  side = max(h, w)
  top, left = r0 - (side - h) // 2, c0 - (side - w) // 2
  if side <= mask.shape[0]:
    top = min(max(top, 0), mask.shape[0] - side)
  if side <= mask.shape[1]:
    left = min(max(left, 0), mask.shape[1] - side)
  return int(top), int(left), int(side)


def crop(image: np.ndarray, box: tuple[int, int, int], pad_value: float) -> np.ndarray:
  """The (side, side) square of `box` from an (H, W) image, `pad_value` outside it."""
  top, left, side = box
  out = np.full((side, side), pad_value, np.asarray(image).dtype)
  h, w = image.shape
  r0, r1 = max(top, 0), min(top + side, h)
  c0, c1 = max(left, 0), min(left + side, w)
  out[r0 - top:r1 - top, c0 - left:c1 - left] = image[r0:r1, c0:c1]
  return out


def fid_images(hu: np.ndarray, boxes: Sequence[tuple[int, int, int]], window,
               crop_size: int, pad_hu: float) -> tuple[np.ndarray, np.ndarray]:
  """uint8 RGB FID inputs of HU slices [N, H, W]: (whole [N, H, W, 3], crops [N, c, c, 3])."""
  whole = fid.hu_to_uint8_rgb(hu, window, size=None)
  crops = np.stack([fid.hu_to_uint8_rgb(crop(h, b, pad_hu), window, size=crop_size)
                    for h, b in zip(hu, boxes)])
  return whole, crops


def _features(named: Mapping[str, np.ndarray], batch_size: int,
              weights: str | os.PathLike | None) -> dict[str, np.ndarray]:
  """Inception features of several uint8 image sets, one network call per image size."""
  by_shape: dict[tuple, list[str]] = {}
  for name, images in named.items():
    by_shape.setdefault(images.shape[1:], []).append(name)
  out = {}
  for names in by_shape.values():
    feats = fid.features(np.concatenate([named[k] for k in names]), batch_size=batch_size,
                         weights=weights, progress=False)
    splits = np.cumsum([len(named[k]) for k in names])[:-1]
    out.update(zip(names, np.split(feats, splits)))
  return out


# ---------------------------------------------------------------------------- evaluation


def _check_fid_weights(weights) -> None:
  """Fails before any inpainting when there are neither converted weights nor a source."""
  path = pathlib.Path(weights).expanduser() if weights else fid.default_cache_path()
  if not path.is_file():
    fid.find_source()  # Raises FIDWeightsNotFoundError with install instructions.


def _fid_dict(res: fid.FIDResult) -> dict[str, Any]:
  return dataclasses.asdict(res)


def evaluate(config, workdir: str, output_dir: str | None, *, pix2pix_config=None,
             pix2pix_workdir: str | None = None, split: str | None = None,
             num_samples: int | None = None, seed: int = 0,
             fid_weights: str | os.PathLike | None = None,
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

  Returns:
    The row: organ, dataset, split, num_slices, slices_without_organ, methods
    {pix2pix|diffusion|neighbour: {fid_whole, fid_crop, [mae_hu, psnr_db, ssim]} or None},
    checkpoints, settings and warnings.
  """
  # Lazy: `--merge` and the table helpers need no model code.
  from ctdiff_jax.generation import inference  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  if (pix2pix_config is None) != (pix2pix_workdir is None):
    raise ValueError("give both pix2pix_config and pix2pix_workdir, or neither")
  split = split or config.eval_split
  num_samples = int(config.eval.num_samples if num_samples is None else num_samples)
  window = tuple(float(v) for v in config.eval.fid_window)
  crop_size = int(config.eval.crop_size)
  bootstrap = int(config.eval.bootstrap)
  _check_fid_weights(fid_weights)
  if config.model_family != "diffusion":
    logging.warning("--config has model_family=%r; its column is still labelled Diffusion",
                    config.model_family)

  source, meta = sources.open_split(config, split)
  pad_hu = float(meta.get("pad_hu", transforms.AIR_HU))
  cfg = transforms.ExampleConfig.from_data_config(config.data)
  models: dict[str, tuple[Any, transforms.ExampleConfig]] = {}
  if pix2pix_config is not None:
    want, got = sources.dataset_config_name(config), sources.dataset_config_name(pix2pix_config)
    if want != got:
      raise ValueError(f"the Pix2Pix config reads ct_slices/{got} but the diffusion config "
                       f"reads ct_slices/{want}: both must be evaluated on the same slices")
    if pix2pix_config.model_family != "pix2pix":
      logging.warning("--pix2pix_config has model_family=%r; its column is still labelled "
                      "Pix2Pix", pix2pix_config.model_family)
    models["pix2pix"] = (inference.Inpainter(pix2pix_config, pix2pix_workdir),
                         transforms.ExampleConfig.from_data_config(pix2pix_config.data))
  models["diffusion"] = (inference.Inpainter(config, workdir), cfg)

  indices, without_organ = select_slices(source, cfg, num_samples, seed, progress)
  n = len(indices)
  if n < 2:
    raise ValueError(f"split {split!r} of ct_slices/{sources.dataset_config_name(config)} has "
                     f"{n} slice(s) with the organ; FID needs at least 2")
  fid_batch = int(config.eval.fid_batch_size) * jax.local_device_count()
  sets = ("real", "neighbour") + tuple(models)
  feats: dict[tuple[str, str], list[np.ndarray]] = {(s, k): [] for s in sets for k in FID_KINDS}
  per_slice: dict[str, list] = {"index": [], "case_id": [], "slice_index": [],
                                "mask_pixels": []}
  per_slice.update({f"{m}_{k}": [] for m in models for k in IMAGE_METRICS})

  bar = tqdm.tqdm(total=n, desc=f"evaluate {organ_name(config)}", unit="slice",
                  disable=not progress)
  for c, start in enumerate(range(0, n, CHUNK_SLICES)):
    recs = [source[int(i)] for i in indices[start:start + CHUNK_SLICES]]
    real = np.stack([np.asarray(r[records.IMAGE])[..., 0] for r in recs])
    masks = np.stack([organ_mask(r, cfg) for r in recs])
    boxes = [crop_box(m, transforms.pixel_spacing(r, cfg.spacing_mm),
                      float(config.eval.crop_margin_mm)) for m, r in zip(masks, recs)]
    hu_sets = {"real": real, "neighbour": np.stack([neighbour_slice(r) for r in recs])}
    for name, (inpainter, mcfg) in models.items():
      examples = [transforms.example_with_mask(r, mcfg, m) for r, m in zip(recs, masks)]
      batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "cond")}
      generated = inpainter.inpaint(batch, runner.chunk_seed(seed, c), progress=False,
                                    desc=f"inpainting ({name})")
      hu_sets[name] = runner.paste_hu(generated[..., 0], real, masks, mcfg.hu_window)
      values = image_metrics.masked_metrics(hu_sets[name], real, masks, window)
      for k in IMAGE_METRICS:
        per_slice[f"{name}_{k}"].extend(values[k].tolist())
    images = {}
    for name, hu in hu_sets.items():
      images[(name, "fid_whole")], images[(name, "fid_crop")] = fid_images(
          hu, boxes, window, crop_size, pad_hu)
    for key, f in _features(images, fid_batch, fid_weights).items():
      feats[key].append(f)
    per_slice["index"].extend(indices[start:start + len(recs)].tolist())
    per_slice["case_id"].extend(_text(r.get(records.CASE_ID, "")) for r in recs)
    per_slice["slice_index"].extend(int(r.get(records.SLICE_INDEX, -1)) for r in recs)
    per_slice["mask_pixels"].extend(int(m.sum()) for m in masks)
    bar.update(len(recs))
  bar.close()

  feats_all = {k: np.concatenate(v) for k, v in feats.items()}
  methods: dict[str, Any] = {m: None for m in METHODS}
  for name in ("neighbour",) + tuple(models):
    entry: dict[str, Any] = {}
    for kind in FID_KINDS:
      entry[kind] = _fid_dict(fid.fid_from_features(
          feats_all[("real", kind)], feats_all[(name, kind)], bootstrap, seed))
    if name in models:
      for k in IMAGE_METRICS:
        entry[k] = image_metrics.summarize(per_slice[f"{name}_{k}"])
      inpainter = models[name][0]
      entry["checkpoint"] = {"path": inpainter.checkpoint, "step": int(inpainter.step),
                             "model_family": inpainter.config.model_family}
    methods[name] = entry

  warnings = []
  if n < SMALL_N:
    warnings.append(f"{organ_name(config)}: FID on N={n} < {SMALL_N} images per set is "
                    f"biased upward and unstable; compare FIDs only at equal N.")
  for w in warnings:
    logging.warning("%s", w)
  row = {
      "organ": organ_name(config),
      "dataset": f"ct_slices/{sources.dataset_config_name(config)}",
      "split": split,
      "num_slices": n,
      "slices_without_organ": without_organ,
      "methods": methods,
      "settings": {"fid_window": list(window), "crop_size": crop_size,
                   "crop_margin_mm": float(config.eval.crop_margin_mm),
                   "bootstrap": bootstrap, "seed": int(seed), "num_samples": num_samples,
                   "mask_labels": list(cfg.mask_labels), "dilation_mm": cfg.dilation_mm},
      "warnings": warnings,
  }
  if output_dir is not None:
    write_tables([row], output_dir)
    _write_per_slice(per_slice, pathlib.Path(output_dir) / "per_slice.csv")
  return row


def _write_per_slice(per_slice: Mapping[str, list], path: pathlib.Path) -> None:
  keys = list(per_slice)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(keys)
    for vals in zip(*(per_slice[k] for k in keys)):
      w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in vals])


# ---------------------------------------------------------------------------- tables


def _finite_or_none(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite_or_none(v) for v in x]
  return x


def csv_columns() -> list[str]:
  """Column names of table1.csv."""
  cols = ["organ", "dataset", "split", "num_slices"]
  for m in METHODS:
    for k in FID_KINDS:
      cols += [f"{m}_{k}", f"{m}_{k}_std", f"{m}_{k}_n_real", f"{m}_{k}_n_generated"]
    if m in GENERATIVE:
      for k in IMAGE_METRICS:
        cols += [f"{m}_{k}", f"{m}_{k}_std"]
  return cols


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: row.get(k, "") for k in ("organ", "dataset", "split", "num_slices")}
  for m in METHODS:
    entry = row["methods"].get(m) or {}
    for k in FID_KINDS:
      r = entry.get(k) or {}
      out[f"{m}_{k}"] = r.get("fid", "")
      out[f"{m}_{k}_std"] = r.get("std") if r.get("std") is not None else ""
      out[f"{m}_{k}_n_real"] = r.get("n1", "")
      out[f"{m}_{k}_n_generated"] = r.get("n2", "")
    if m in GENERATIVE:
      for k in IMAGE_METRICS:
        r = entry.get(k) or {}
        mean, std = r.get("mean"), r.get("std")
        out[f"{m}_{k}"] = "" if mean is None else mean
        out[f"{m}_{k}_std"] = "" if std is None else std
  return out


def _fmt_fid(r: Mapping[str, Any] | None, n: int) -> str:
  if not r:
    return "—"
  s = f"{r['fid']:.2f}"
  if r.get("std") is not None:
    s += f" ± {r['std']:.2f}"
  if r.get("n1") != n or r.get("n2") != n:
    s += f" (n={r.get('n1')}/{r.get('n2')})"
  return s


def _fmt_metric(r: Mapping[str, Any] | None, fmt: str) -> str:
  if not r or r.get("mean") is None:
    return "—" if not r else "inf"
  s = format(r["mean"], fmt)
  if r.get("std") is not None:
    s += f" ± {format(r['std'], fmt)}"
  return s


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Table 1 in Markdown: organ rows; Pix2Pix | Diffusion | Neighbouring slice columns."""
  head = ["Organ", "N"]
  for m in METHODS:
    for k in FID_KINDS:
      head.append(f"{METHOD_TITLES[m]} {FID_TITLES[k]}")
    if m in GENERATIVE:
      head += [f"{METHOD_TITLES[m]} {METRIC_TITLES[k]}" for k in IMAGE_METRICS]
  lines = ["# Table 1: organ inpainting on real CT", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    n = int(row["num_slices"])
    cells = [f"{row['organ']} ({row['split']})", str(n)]
    for m in METHODS:
      entry = row["methods"].get(m)
      for k in FID_KINDS:
        cells.append(_fmt_fid(entry.get(k) if entry else None, n))
      if m in GENERATIVE:
        cells += [_fmt_metric(entry.get(k) if entry else None, METRIC_FORMATS[k])
                  for k in IMAGE_METRICS]
    lines.append("| " + " | ".join(cells) + " |")
  settings = rows[0].get("settings", {}) if rows else {}
  lines += [
      "",
      "N: slices with the organ; every FID compares those N real slices with the N slices of "
      "the method (n=real/generated shown where different). ± is the bootstrap std "
      "(config.eval.bootstrap resamples), — means not evaluated.",
      f"FID (whole): whole slices windowed to {settings.get('fid_window')} HU. "
      f"FID (crop): organ bounding box + {settings.get('crop_margin_mm')} mm, squared, "
      f"resized to {settings.get('crop_size')} px. MAE (raw HU), PSNR and SSIM (windowed, "
      "Gaussian SSIM) inside the organ mask, mean ± std over slices.",
      "Neighbouring slice: the adjacent real slice of the same volume as the 'generated' "
      "image (how different neighbouring real slices are).",
  ]
  warnings = [w for row in rows for w in row.get("warnings", [])]
  if warnings:
    lines += ["", "**Warning:** " + " ".join(warnings)]
  return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict:
  """Writes table1.md / table1.csv / table1.json for `rows`; returns {name: path}."""
  if not rows:
    raise ValueError("write_tables: no rows")
  out = pathlib.Path(output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  rows = [_finite_or_none(dict(r)) for r in rows]
  paths = {name: out / name for name in TABLE_FILES}
  paths["table1.md"].write_text(markdown_table(rows))
  with open(paths["table1.csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=csv_columns())
    w.writeheader()
    for row in rows:
      w.writerow(_csv_row(row))
  paths["table1.json"].write_text(json.dumps({"table": "table1", "rows": rows}, indent=2,
                                             allow_nan=False) + "\n")
  return {k: str(v) for k, v in paths.items()}


def merge_tables(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
  """The rows of several table1.json files, in order (one table for several organs)."""
  rows = []
  for p in paths:
    p = pathlib.Path(p).expanduser()
    try:
      data = json.loads(p.read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"--merge: {p} does not exist") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"--merge: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
      raise ValueError(f"--merge: {p} is not a table1.json (no 'rows' list)")
    for i, row in enumerate(data["rows"]):
      if not isinstance(row, dict) or not {"organ", "num_slices", "methods"} <= set(row):
        raise ValueError(f"--merge: row {i} of {p} lacks organ/num_slices/methods")
      rows.append(row)
  if not rows:
    raise ValueError(f"--merge: no rows in {', '.join(map(str, paths))}")
  return rows
