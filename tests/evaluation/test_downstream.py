"""Downstream test + mask consistency: Dice, the arms' data mixing, determinism, the CLI.

The integration tests build a tiny phantom `kidney_tumor` dataset (kidney = 1, tumour = 2) and
a stand-in synthetic export: the real train records written as a `kidneys` dataset (kidney = 1
only, tumours relabelled kidney) with the generate exporter's `write_tfds`, so the label-name
mapping and the export reader are exercised without training a diffusion model.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import downstream as downstream_config
from ctdiff_jax import phantom
from ctdiff_jax.data import pipeline
from ctdiff_jax.data import sources
from ctdiff_jax.evaluation import consistency
from ctdiff_jax.evaluation import downstream
from ctdiff_jax.generation.export import tfds as export_tfds
from ctdiff_jax.ingest import build as ingest_build

SIZE, SPACING = 32, 12.0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- Dice and summaries on hand-made arrays --------------------------------------------------
def test_dice_known_answer():
  truth = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [2, 2, 0, 0]])
  pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 0, 0, 0]])
  # Class 1: |P| = 4, |G| = 4, overlap 3 -> 6/8. Class 2: |P| = 1, |G| = 2, overlap 1 -> 2/3.
  # Class 3: absent from both -> NaN (no Dice), not 0 or 1.
  got = downstream.dice_per_class(pred, truth, 4)
  np.testing.assert_allclose(got[:2], [0.75, 2 / 3])
  assert np.isnan(got[2])
  np.testing.assert_array_equal(downstream.dice_per_class(truth, truth, 3), [1.0, 1.0])
  # Predicted but not labelled (the consistency check's 'labelled but not there' reversed): 0.
  assert downstream.dice_per_class(np.ones((2, 2)), np.zeros((2, 2)), 2)[0] == 0.0


def test_found_fraction_and_summary():
  truth = np.zeros((4, 4, 4), np.uint8)
  truth[:3, 1, 1] = 2  # A tumour labelled on three of four slices ...
  pred = np.zeros_like(truth)
  pred[0, 1, 1] = 2  # ... found on one (and predicted where none is labelled: no 'found').
  pred[3, 1, 1] = 2
  np.testing.assert_allclose(consistency.found_fraction(pred, truth, 3)[1], 1 / 3)
  assert np.isnan(consistency.found_fraction(pred, truth, 3)[0])  # No kidney labelled.
  results = {"real": {"counts": {"real": 10}, "dice": {0: [0.8, 0.2], 1: [0.6, np.nan]}},
             "real+tumor": {"counts": {"real": 10, "tumor": 5},
                            "dice": {0: [0.9, 0.6], 1: [0.9, 0.6]}}}
  rows = downstream.summary_rows(results, ["kidney", "tumor"])
  assert rows[0]["dice_mean"] == {"kidney": pytest.approx(0.7), "tumor": pytest.approx(0.2)}
  assert rows[0]["dice_std"]["kidney"] == pytest.approx(0.1)
  assert rows[0]["mean_fg"] == pytest.approx((0.5 + 0.6) / 2)  # Seed means: 0.5, 0.6.
  assert downstream.verdict(rows[1], rows[0]).endswith("(gain)")
  assert "no clear difference" in downstream.verdict(dict(rows[1], mean_fg=0.56), rows[0])


# --- the arms' data mixing -----------------------------------------------------------------
def fake_records(cases: dict[str, tuple[int, bool]]) -> list[dict]:
  """Per case: n slices of 8x8, the first one with a tumour (label 2) if asked."""
  recs = []
  for case, (n, lesion) in cases.items():
    for k in range(n):
      labels = np.zeros((8, 8, 1), np.uint8)
      labels[2:5, 2:5] = 1
      if lesion and k == 0:
        labels[3, 3] = 2
      recs.append({"case_id": case.encode(), "slice_index": np.int32(k), "labels": labels,
                   "image": np.full((8, 8, 1), 40 * k, np.int16)})
  return recs


def test_select_real_takes_the_first_lesion_cases():
  src = pipeline.ListSource(fake_records({"c": (2, True), "a": (3, False), "b": (4, True),
                                          "d": (1, True)}))
  idx, cases = downstream.select_real(src, 2, lesion_id=2)
  assert cases == ["b", "c"]  # Sorted ids, lesion cases only ('a' has none).
  assert sorted(idx.tolist()) == [0, 1, 5, 6, 7, 8]
  idx, cases = downstream.select_real(src, 0, lesion_id=2)
  assert len(idx) == 10 and cases == ["a", "b", "c", "d"]
  with pytest.raises(ValueError, match="no train case holds a lesion"):
    downstream.select_real(pipeline.ListSource(fake_records({"a": (2, False)})), 1, 2)


def test_arms_mix_counts_order_and_labels():
  real = downstream.Part("real", pipeline.ListSource(fake_records({"r": (6, True)})),
                         np.arange(4))
  lut = downstream.label_lut({"1": "kidney", "2": "cyst"}, {"1": "kidney", "2": "kidney_tumor"})
  np.testing.assert_array_equal(lut[:3], [0, 1, 0])  # 'cyst' is no class here -> background.
  organ = downstream.Part("organ", pipeline.ListSource(fake_records({"o": (5, True)})),
                          np.arange(5), lut)
  tumor = downstream.Part("tumor", pipeline.ListSource(fake_records({"t": (3, True)})),
                          np.arange(3))
  parts = {"real": real, "organ": organ, "tumor": tumor}
  expected = {"real": {"real": 4}, "real+organ": {"real": 4, "organ": 5},
              "real+tumor": {"real": 4, "tumor": 3}, "organ+tumor": {"organ": 5, "tumor": 3},
              "real+organ+tumor": {"real": 4, "organ": 5, "tumor": 3}}
  for arm, counts in expected.items():
    src = downstream.arm_source(arm, parts)
    assert src.counts() == counts and len(src) == sum(counts.values())
  src = downstream.arm_source("real+organ", parts)
  cases = [src[i]["case_id"] for i in range(len(src))]
  assert cases == [b"r"] * 4 + [b"o"] * 5  # Concatenation, in arm order.
  assert np.asarray(src[4]["labels"]).max() == 1  # The organ export's label 2 -> 0 via the LUT.
  assert np.asarray(src[0]["labels"]).max() == 2  # Real records untouched.
  with pytest.raises(ValueError, match="unknown source"):
    downstream.arm_source("real+context", parts)


# --- integration: a tiny phantom dataset, training, determinism, the CLI -------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("downstream")
  phantom.write_cohort(root / "raw", 3, seed=3, lesions=True, progress=False)
  ingest_build.build("kidney_tumor", root / "raw", root / "tfds", image_size=SIZE,
                     spacing_mm=SPACING)
  config = small_config(root)
  source, _ = sources.open_split(config, "train")
  # Stand-in synthetic exports: the train records as a `kidneys` dataset (tumour -> kidney),
  # under new case ids ('syn') or their own ('leaky': the cases the test scores on).
  def examples(prefix):
    for i in range(len(source)):
      rec = dict(source[i])
      rec["labels"] = np.minimum(np.asarray(rec["labels"]), 1).astype(np.uint8)
      rec["case_id"] = prefix.encode() + rec["case_id"]
      yield f"{i:08d}", rec
  for name, prefix in (("syn", "syn_"), ("leaky", "")):
    export_tfds.write_tfds(str(root / name / "tfds"), f"kidneys_{SIZE}px_12mm", "train",
                           lambda p=prefix: examples(p), {"scenario": "organ"})
  return root


def small_config(root):
  config = downstream_config.get_config("smoke")
  config.data_dir = str(root / "tfds")
  config.image_size, config.spacing_mm = SIZE, SPACING
  # Three cases: the train split is the one that surely exists (scored on it: mechanics only).
  config.eval_split = "train"
  config.segmentation.channels = (8, 16)
  config.num_train_steps, config.per_device_batch_size = 6, 2
  config.downstream.real_cases = 1
  config.downstream.seeds = (0,)
  config.downstream.arms = ("real", "real+organ")
  return config


def test_same_seed_same_dice_and_synthetic_labels_mapped(data):
  config = small_config(data)
  s = downstream.setup(config, {"organ": str(data / "syn")})
  assert s.class_names == ["kidney", "kidney_tumor"] and config.segmentation.num_classes == 3
  assert len(s.real_cases) == 1
  labels = np.stack([np.asarray(s.parts["organ"].record(j)["labels"])
                     for j in range(len(s.parts["organ"]))])
  assert labels.max() == 1  # The `kidneys` export's kidney is the real dataset's kidney (1).
  src = downstream.arm_source("real+organ", s.parts)
  dice, params = [], []
  for run, seed in (("a", 0), ("b", 0), ("c", 1)):
    params.append(downstream.train_arm(config, src, seed, str(data / "runs" / run)))
    pred = downstream.predict_labels(s.task, params[-1], s.test[0], 16)
    dice.append(downstream.dice_per_class(pred, s.test[1], 3))
  np.testing.assert_array_equal(dice[0], dice[1])  # Same seed twice -> identical Dice ...
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_array_equal(a, b)  # ... from identical weights,
  assert any(not np.array_equal(a, b)  # which another seed does change.
             for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[2])))


def test_synthetic_from_the_scored_cases_is_refused(data):
  with pytest.raises(ValueError, match="made from 'train' cases .* scored on"):
    downstream.setup(small_config(data), {"organ": str(data / "leaky")})


def test_cli_writes_tables_and_consistency(data):
  out = data / "out"
  cmd = [sys.executable, "-m", "ctdiff_jax.downstream", "--config=configs/downstream.py:smoke",
         f"--config.data_dir={data / 'tfds'}", f"--config.image_size={SIZE}",
         f"--config.spacing_mm={SPACING}", "--config.eval_split=train",
         "--config.segmentation.channels=(8,16)", "--config.num_train_steps=4",
         "--config.per_device_batch_size=2", "--config.downstream.real_cases=1",
         "--config.downstream.seeds=(0,1)", "--config.downstream.arms=('real','real+organ')",
         f"--synthetic=organ={data / 'syn'}", f"--output_dir={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in downstream.TABLE_FILES + consistency.FILES:
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "downstream.json").read_text())
  assert [r["arm"] for r in result["summary"]] == ["real", "real+organ"]
  assert set(result["results"]["real+organ"]["counts"]) == {"real", "organ"}
  assert len(result["results"]["real"]["dice"]) == 2  # Two seeds.
  cons = json.loads((out / "consistency.json").read_text())
  assert set(cons["scenarios"]) == {consistency.REFERENCE, "organ"}
  assert cons["scenarios"]["organ"]["label_pixels"]["kidney_tumor"] == 0
  assert "| real+organ |" in proc.stdout and "Mask consistency" in proc.stdout
  bad = subprocess.run(cmd[:-2] + ["--synthetic=organ"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, check=False)
  assert bad.returncode == 1 and "expected name=dir" in bad.stderr
  assert "Traceback" not in bad.stderr
