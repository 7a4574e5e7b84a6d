"""Downstream test: does adding synthetic slices help a segmenter? Arms, Dice, tables, plot.

    python -m ctdiff_jax.downstream --config=configs/downstream.py:smoke \
        --config.data_dir=TFDS --synthetic=organ=SYN/organ,tumor=SYN/tumor --output_dir=OUT

One small segmentation UNet (models/segmentation.py, task `segmentation`) is trained by the
shared trainer once per (arm, seed) and scored by per-class Dice on the real `eval_split`.

Arms are '+'-joined sources (configs/downstream.py `downstream.arms`):
  real       the real train split, cut to the first `real_cases` cases (by case id) that hold a
             lesion: the scarce setting (a few real tumour cases);
  <name>     a synthetic export (`generate --tfds` output_dir, `downstream.synthetic`), its
             label ids mapped to the real dataset's ids by label name (unknown names -> 0).
Mixing is concatenation (`ConcatSource`); the loader shuffles over the union. Every arm has
the same model, steps, batch and seeds, so arms differ only in their data.

Dice is pooled over the evaluation set (2|P & G| / (|P| + |G|) over all its pixels, per class);
a class absent from both prediction and ground truth has no Dice (NaN, shown as n/a).
Outputs in `output_dir`: downstream.md/csv/json and downstream.png (mean +- std over seeds).
`evaluate` returns the real-only models for the mask-consistency check (consistency.py).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import glob
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import grain.python as grain
import numpy as np

REAL = "real"
TABLE_FILES = ("downstream.md", "downstream.csv", "downstream.json", "downstream.png")


# --- data ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Part:
  """Records `indices` of `source`; `lut` (uint8[256]) maps their label ids, None = as is."""

  name: str
  source: Any
  indices: np.ndarray
  lut: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.indices)

  def record(self, j: int) -> dict[str, Any]:
    rec = self.source[int(self.indices[j])]
    if self.lut is None:
      return rec
    return dict(rec, labels=self.lut[np.asarray(rec["labels"])])


class ConcatSource(grain.RandomAccessDataSource):
  """The parts one after another, as one Grain random-access source (an arm's training set)."""

  def __init__(self, parts: Sequence[Part]):
    self.parts = [p for p in parts if len(p)]
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

  def __len__(self) -> int:
    return self.offsets[-1]

  def __getitem__(self, index: int):
    k = bisect.bisect_right(self.offsets, int(index)) - 1
    return self.parts[k].record(int(index) - self.offsets[k])

  def counts(self) -> dict[str, int]:
    return {p.name: len(p) for p in self.parts}

  def __repr__(self) -> str:
    return f"ConcatSource({self.counts()})"


def parse_arm(arm: str, available: Sequence[str]) -> tuple[str, ...]:
  """'real+tumor' -> ('real', 'tumor'); every name must be `real` or a synthetic export."""
  names = tuple(n.strip() for n in arm.split("+") if n.strip())
  unknown = [n for n in names if n not in available]
  if not names or unknown:
    raise ValueError(f"arm {arm!r}: unknown source(s) {unknown or [arm]}; sources are "
                     f"{sorted(available)} (synthetic ones come from --synthetic=name=dir)")
  return names


def arm_source(arm: str, parts: Mapping[str, Part]) -> ConcatSource:
  return ConcatSource([parts[n] for n in parse_arm(arm, list(parts))])


def case_ids(source) -> list[str]:
  ids = []
  for i in range(len(source)):
    c = source[i]["case_id"]
    ids.append(c.decode() if isinstance(c, bytes) else str(c))
  return ids


def select_real(source, num_cases: int, lesion_id: int) -> tuple[np.ndarray, list[str]]:
  """Indices of the first `num_cases` cases (sorted ids) with a lesion; 0 = all records."""
  ids = case_ids(source)
  if num_cases <= 0:
    return np.arange(len(ids)), sorted(set(ids))
  lesion_cases = sorted({c for i, c in enumerate(ids)
                         if lesion_id and (np.asarray(source[i]["labels"]) == lesion_id).any()})
  if not lesion_cases:
    raise ValueError(f"no train case holds a lesion (label {lesion_id}): use "
                     f"--config.downstream.real_cases=0 (all cases) or a lesion dataset")
  chosen = lesion_cases[:num_cases]
  return np.asarray([i for i, c in enumerate(ids) if c in chosen], np.int64), chosen


def label_lut(names_from: Mapping[str, str], names_to: Mapping[str, str]) -> np.ndarray:
  """uint8[256]: label id of `names_from` -> the id of the same name in `names_to` (else 0)."""
  to_id = {name: int(i) for i, name in names_to.items()}
  lut = np.zeros(256, np.uint8)
  for i, name in names_from.items():
    lut[int(i)] = to_id.get(name, 0)
  return lut


def open_synthetic(output_dir: str, real_meta: Mapping[str, Any]) -> tuple[Any, dict, np.ndarray]:
  """(source, metadata, label LUT to the real ids) of a `generate --tfds` export."""
  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import sources
  from ctdiff_jax.ingest import naming
  # pylint: enable=g-import-not-at-top
  data_dir = os.path.join(os.path.expanduser(output_dir), "tfds")
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(data_dir, "ct_slices", "*")))
  if len(names) != 1:
    raise FileNotFoundError(f"{data_dir}: expected one ct_slices dataset (a `generate --tfds` "
                            f"export), found {names or 'none'}")
  meta = naming.read_dataset_metadata(data_dir, names[0])
  split = [s for s, n in meta["splits"].items() if n]
  if len(split) != 1:
    raise ValueError(f"{meta['path']}: expected one non-empty split, got {meta['splits']}")
  source = sources.load_source(data_dir, names[0], split[0])
  return source, meta, label_lut(meta["label_names"], real_meta["label_names"])


def load_slices(part: Part, intensity) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, H, W, 1] in model units, labels uint8 [N, H, W]) of a part."""
  from ctdiff_jax.data import transforms  # pylint: disable=g-import-not-at-top
  images, labels = [], []
  for j in range(len(part)):
    rec = part.record(j)
    images.append(transforms.hu_to_unit(np.asarray(rec["image"]), intensity))
    labels.append(np.asarray(rec["labels"])[..., 0])
  return np.stack(images).astype(np.float32), np.stack(labels).astype(np.uint8)


# --- Dice ----------------------------------------------------------------------------------
def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
  """float64 [num_classes - 1]: pooled Dice of classes 1.. (NaN: absent from both)."""
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ")
  out = np.full(num_classes - 1, np.nan)
  for c in range(1, num_classes):
    p, t = pred == c, truth == c
    total = int(p.sum()) + int(t.sum())
    if total:
      out[c - 1] = 2.0 * int((p & t).sum()) / total
  return out


def predict_labels(task, params, images: np.ndarray, batch_size: int) -> np.ndarray:
  """uint8 [N, H, W]: argmax labels, in fixed-size batches (the last one padded)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  fn = jax.jit(lambda p, x: jnp.argmax(task.predict({"params": p}, x), axis=-1))
  n, out = len(images), []
  bs = max(1, min(int(batch_size), n))
  for s in range(0, n, bs):
    chunk = images[s:s + bs]
    pad = bs - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, chunk))[:bs - pad])
  return np.concatenate(out).astype(np.uint8)


# --- training one arm ----------------------------------------------------------------------
def arm_config(config, seed: int):
  """The training config of one run: `config` at `seed`."""
  cfg = copy.deepcopy(config)
  cfg.seed = int(seed)
  return cfg


def train_arm(config, source: ConcatSource, seed: int, workdir: str):
  """Trains the segmenter on `source` from scratch into `workdir`; returns its params.

  The shared trainer runs it (`model_family="segmentation"`); its batches come from this
  arm's loader (the trainer's `iterator_wrapper` hook), seeded by `seed`. The workdir is
  emptied first: a run is always complete and deterministic, never a resume.
  """
  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import pipeline
  from ctdiff_jax.training import parallel
  from ctdiff_jax.training import trainer
  from ctdiff_jax.training.tasks import segmentation
  # pylint: enable=g-import-not-at-top
  cfg = arm_config(config, seed)
  devices = len(parallel.local_devices(cfg.num_devices or None))
  loader = pipeline.create_loader(source, cfg.data, seed=cfg.seed, shard_by_process=False,
                                  batch_shape=(devices, cfg.per_device_batch_size))
  shutil.rmtree(workdir, ignore_errors=True)
  state = trainer.train_and_evaluate(cfg, workdir, iterator_wrapper=lambda _: iter(loader))
  return state.nets[segmentation.NET].params


# --- the experiment ------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything the arms share: config, task, class names, data parts, the real test set."""

  config: Any
  task: Any
  class_names: list[str]
  parts: dict[str, Part]
  test: tuple[np.ndarray, np.ndarray]
  real_cases: list[str]
  intensity: Any
  dataset: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.class_names) + 1


def class_names_of(meta: Mapping[str, Any]) -> list[str]:
  """Names of label ids 1..K of a dataset's metadata."""
  names = meta["label_names"]
  return [names[str(i)] for i in range(1, max(int(k) for k in names) + 1)]


def setup(config, synthetic: Mapping[str, str]) -> Setup:
  """Opens the real train/test splits and the synthetic exports; sets num_classes."""
  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import sources
  from ctdiff_jax.data import transforms
  from ctdiff_jax.training import tasks
  # pylint: enable=g-import-not-at-top
  dcfg = config.downstream
  source, meta = sources.open_split(config, config.train_split)
  names = class_names_of(meta)
  if config.segmentation.num_classes not in (0, len(names) + 1):
    raise ValueError(f"segmentation.num_classes={config.segmentation.num_classes} but "
                     f"{meta['dataset']} has {len(names)} labels + background")
  config.segmentation.num_classes = len(names) + 1
  if REAL in synthetic:
    raise ValueError(f"{REAL!r} names the real data; call the synthetic export otherwise")
  indices, cases = select_real(source, int(dcfg.real_cases), int(meta.get("lesion_label_id") or 0))
  parts = {REAL: Part(REAL, source, indices)}
  test_source, _ = sources.open_split(config, config.eval_split)
  test_cases = set(case_ids(test_source))
  for name, path in synthetic.items():
    src, _, lut = open_synthetic(path, meta)
    n = len(src) if not dcfg.max_synthetic else min(len(src), int(dcfg.max_synthetic))
    parts[name] = Part(name, src, np.arange(n), lut)
    check_no_leak(name, path, parts[name], test_cases, config.eval_split)
  intensity = transforms.ExampleConfig.from_data_config(config.data).intensity
  test = load_slices(Part("test", test_source, np.arange(len(test_source))), intensity)
  return Setup(config, tasks.get_task(config), names, parts, test, cases, intensity,
               meta["dataset"])


def check_no_leak(name: str, path: str, part: Part, test_cases: set[str], split: str) -> None:
  """Synthetic slices keep their source slice outside the mask: none may come from a case
  the arms are scored on (generate them from the train split: `generate --split=train`)."""
  leaked = sorted(set(case_ids(part.source)) & test_cases)
  if leaked:
    raise ValueError(f"synthetic export {name!r} ({path}) was made from {split!r} cases "
                     f"{leaked[:5]}, the split the segmenters are scored on; regenerate it "
                     f"from the train split (generate --split=train)")


def run_arms(s: Setup, runs_dir: str) -> tuple[dict[str, Any], dict[int, Any]]:
  """Trains and scores every (arm, seed) -> ({arm: counts + Dice per seed}, real params/seed)."""
  dcfg = s.config.downstream
  results, real_params = {}, {}
  for arm in dcfg.arms:
    source = arm_source(arm, s.parts)
    results[arm] = {"counts": source.counts(), "dice": {}}
    for seed in dcfg.seeds:
      print(f"  arm {arm} ({len(source)} slices) seed {seed}", flush=True)
      params = train_arm(s.config, source, seed, os.path.join(runs_dir, f"{arm}_seed{seed}"))
      pred = predict_labels(s.task, params, s.test[0], dcfg.batch_size)
      results[arm]["dice"][int(seed)] = dice_per_class(pred, s.test[1], s.num_classes).tolist()
      if arm == REAL:
        real_params[int(seed)] = params
  return results, real_params


def mean_std(values: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
  """Per column over rows, NaN ignored (NaN where a column is all NaN); std with ddof=0."""
  a = np.asarray(values, np.float64)
  ok = ~np.isnan(a)
  n = ok.sum(axis=0)
  mean = np.where(n > 0, np.nansum(a, axis=0) / np.maximum(n, 1), np.nan)
  var = np.where(n > 0, np.nansum((a - mean) ** 2, axis=0) / np.maximum(n, 1), np.nan)
  return mean, np.sqrt(var)


def fmt(mean: float, std: float | None = None) -> str:
  if np.isnan(mean):
    return "n/a"
  return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def summary_rows(results: Mapping[str, Any], class_names: Sequence[str]) -> list[dict]:
  """One row per arm: counts, per-class and mean-foreground Dice mean/std over seeds."""
  rows = []
  for arm, r in results.items():
    per_seed = [r["dice"][k] for k in sorted(r["dice"])]
    fg = [[np.nan if np.all(np.isnan(d)) else np.nanmean(d)] for d in per_seed]
    mean, std = mean_std(per_seed)
    fg_mean, fg_std = mean_std(fg)
    rows.append({"arm": arm, "counts": dict(r["counts"]), "seeds": sorted(r["dice"]),
                 "dice_mean": dict(zip(class_names, mean.tolist())),
                 "dice_std": dict(zip(class_names, std.tolist())),
                 "mean_fg": float(fg_mean[0]), "mean_fg_std": float(fg_std[0])})
  return rows


def markdown(rows: Sequence[dict], class_names: Sequence[str], info: Mapping[str, Any]) -> str:
  """The downstream table: per arm, slices per source and Dice mean ± std over seeds."""
  base = next((r for r in rows if r["arm"] == REAL), None)
  head = ["arm", "slices (per source)"] + [f"Dice {c}" for c in class_names]
  head += ["mean fg Dice", "vs real"]
  lines = [f"Downstream segmentation on {info['eval']} ({info['test_slices']} slices; "
           f"ground-truth pixels per class {info['test_pixels']}). Real train cases: "
           f"{', '.join(info['real_cases'])}. Mean ± std over seeds {info['seeds']}.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
    cells = [r["arm"], counts] + [fmt(r["dice_mean"][c], r["dice_std"][c]) for c in class_names]
    cells.append(fmt(r["mean_fg"], r["mean_fg_std"]))
    cells.append(verdict(r, base))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def verdict(row: Mapping[str, Any], base: Mapping[str, Any] | None) -> str:
  """The mean-foreground Dice difference to the real-only arm, and whether it exceeds noise.

  'gain'/'loss' only when |difference| > the larger of the two arms' seed stds; else 'no
  clear difference' (a few seeds cannot show more).
  """
  if base is None or row is base:
    return "-"
  diff = row["mean_fg"] - base["mean_fg"]
  if np.isnan(diff):
    return "n/a"
  noise = max(row["mean_fg_std"], base["mean_fg_std"])
  word = ("gain" if diff > 0 else "loss") if abs(diff) > noise else "no clear difference"
  return f"{diff:+.3f} ({word})"


def bar_plot(rows: Sequence[dict], class_names: Sequence[str], path: str) -> None:
  """Grouped bars: Dice per class and arm, error bars = std over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  x = np.arange(len(rows))
  width = 0.8 / max(len(class_names), 1)
  fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.6))
  for k, c in enumerate(class_names):
    mean = np.nan_to_num([r["dice_mean"][c] for r in rows])
    std = np.nan_to_num([r["dice_std"][c] for r in rows])
    ax.bar(x + (k - (len(class_names) - 1) / 2) * width, mean, width, yerr=std, capsize=3,
           label=c)
  ax.set_xticks(x, [r["arm"] for r in rows], rotation=15)
  ax.set(ylabel="Dice (real test)", ylim=(0, 1), title="Downstream segmentation")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_tables(results: Mapping[str, Any], class_names: Sequence[str],
                 info: Mapping[str, Any], output_dir: str) -> dict[str, str]:
  """downstream.{md,csv,json,png} in `output_dir`; returns their paths."""
  import csv  # pylint: disable=g-import-not-at-top
  os.makedirs(output_dir, exist_ok=True)
  paths = {name: os.path.join(output_dir, name) for name in TABLE_FILES}
  rows = summary_rows(results, class_names)
  with open(paths["downstream.md"], "w", encoding="utf-8") as f:
    f.write(markdown(rows, class_names, info))
  with open(paths["downstream.csv"], "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["arm", "seed", "class", "dice"] + [f"slices_{k}" for k in ("real", "synthetic")])
    for arm, r in results.items():
      n_real = r["counts"].get(REAL, 0)
      n_syn = sum(v for k, v in r["counts"].items() if k != REAL)
      for seed, dice in sorted(r["dice"].items()):
        for c, d in zip(class_names, dice):
          w.writerow([arm, seed, c, "" if np.isnan(d) else f"{d:.6f}", n_real, n_syn])
  with open(paths["downstream.json"], "w", encoding="utf-8") as f:
    json.dump(jsonable({"info": dict(info), "classes": list(class_names), "summary": rows,
                        "results": results}), f, indent=1)
  bar_plot(rows, class_names, paths["downstream.png"])
  return paths


def jsonable(x):
  """`x` with NaN floats as None and int keys as strings (strict JSON)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, float) and np.isnan(x):
    return None
  return x


def evaluate(config, synthetic: Mapping[str, str], output_dir: str,
             runs_dir: str | None = None) -> dict[str, Any]:
  """The whole downstream test; writes the tables (the runs' workdirs: `runs_dir`, default
  `<output_dir>/runs`).

  Returns {paths, summary, info, setup, real_params}: the last two feed the mask-consistency
  check (`consistency.evaluate(setup, real_params, output_dir)`).
  """
  s = setup(config, synthetic)
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  results, real_params = run_arms(s, runs_dir or os.path.join(output_dir, "runs"))
  test_pixels = {c: int((s.test[1] == i + 1).sum()) for i, c in enumerate(s.class_names)}
  info = {"dataset": s.dataset, "eval": config.eval_split,
          "test_slices": int(len(s.test[1])), "test_pixels": test_pixels,
          "real_cases": s.real_cases, "seeds": [int(x) for x in config.downstream.seeds],
          "num_train_steps": int(config.num_train_steps), "synthetic": dict(synthetic)}
  paths = write_tables(results, s.class_names, info, output_dir)
  return {"paths": paths, "summary": summary_rows(results, s.class_names), "info": info,
          "setup": s, "real_params": real_params}
