"""Mask consistency (MAISI's check): does a segmenter find on synthetic slices what they are labelled?

The real-only segmenters of the downstream test (one per seed, evaluation/downstream.py)
segment every slice of each synthetic export; each prediction is scored against the label map
the slice was generated for (organ scenario: the conditioning labels; tumour scenario: the
host's labels with the placed tumour written in). Reported per scenario and class:

  Dice      pooled over the export's pixels, mean ± std over the segmenter seeds;
  found     of the slices labelled with the class, the fraction where the prediction overlaps
            it (a new tumour that is labelled but not visibly there is 'not found').

The same segmenters on the real test split give the reference row: synthetic Dice far below
it means the synthetic images do not show what their labels say (or the segmenter does not
transfer). Writes consistency.md and consistency.json.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ctdiff_jax.evaluation import downstream

FILES = ("consistency.md", "consistency.json")
REFERENCE = "real test (reference)"


def found_fraction(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
  """float64 [num_classes - 1]: per class, the labelled slices whose prediction overlaps it."""
  out = np.full(num_classes - 1, np.nan)
  for c in range(1, num_classes):
    has = (truth == c).any(axis=(1, 2))
    if has.any():
      hit = ((pred == c) & (truth == c)).any(axis=(1, 2))
      out[c - 1] = float(hit[has].mean())
  return out


def score(s, real_params: Mapping[int, Any], images: np.ndarray,
          labels: np.ndarray) -> dict[str, Any]:
  """Dice and found fraction of every seed's segmenter on one set of slices."""
  dice, found = {}, {}
  for seed, params in sorted(real_params.items()):
    pred = downstream.predict_labels(s.task, params, images, s.config.downstream.batch_size)
    dice[seed] = downstream.dice_per_class(pred, labels, s.num_classes).tolist()
    found[seed] = found_fraction(pred, labels, s.num_classes).tolist()
  pixels = {c: int((labels == i + 1).sum()) for i, c in enumerate(s.class_names)}
  return {"slices": int(len(labels)), "label_pixels": pixels, "dice": dice, "found": found}


def markdown(rows: Mapping[str, Any], class_names) -> str:
  head = ["slices", "scenario"] + [f"Dice {c}" for c in class_names]
  head += [f"found {c}" for c in class_names]
  lines = ["Mask consistency: the real-only segmenters (one per seed) on each synthetic "
           "export vs the label map it was generated for; mean ± std over seeds.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in rows.items():
    dice_m, dice_s = downstream.mean_std([r["dice"][k] for k in sorted(r["dice"])])
    found_m, _ = downstream.mean_std([r["found"][k] for k in sorted(r["found"])])
    cells = [str(r["slices"]), name] + [downstream.fmt(m, sd) for m, sd in zip(dice_m, dice_s)]
    cells += [downstream.fmt(m) for m in found_m]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def evaluate(s, real_params: Mapping[int, Any], output_dir: str) -> dict[str, str]:
  """Scores every synthetic part of setup `s` (and the real test split); writes the files."""
  rows = {REFERENCE: score(s, real_params, *s.test)}
  for name, part in s.parts.items():
    if name != downstream.REAL:
      rows[name] = score(s, real_params, *downstream.load_slices(part, s.intensity))
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  paths = {name: os.path.join(output_dir, name) for name in FILES}
  with open(paths["consistency.md"], "w", encoding="utf-8") as f:
    f.write(markdown(rows, s.class_names))
  with open(paths["consistency.json"], "w", encoding="utf-8") as f:
    json.dump(downstream.jsonable({"classes": s.class_names, "scenarios": rows}), f, indent=1)
  return paths
