"""Scenario metrics on hand-made arrays: ring-mean fill, in-mask MAE, W1, tumour W1 numbers."""

import numpy as np
import pytest
from scipy import stats

from ctdiff_jax.evaluation import scenario_metrics as sm


def _slice():
  """8x8: left half 0 HU, right half 100 HU; the mask is rows 3..4 x cols 3..4."""
  img = np.zeros((8, 8))
  img[:, 4:] = 100.0
  mask = np.zeros((8, 8), bool)
  mask[3:5, 3:5] = True
  return img, mask


def test_ring_is_the_2px_band_around_the_mask():
  _, mask = _slice()
  r = sm.ring(mask)
  ref = np.zeros((8, 8), bool)
  ref[1:7, 1:7] = True
  ref[3:5, 3:5] = False
  np.testing.assert_array_equal(r, ref)
  np.testing.assert_array_equal(sm.ring(mask, 1)[2:6, 2:6].sum(), 12)


def test_ring_fill_uses_the_ring_mean_and_keeps_the_rest():
  img, mask = _slice()
  img[mask] = 1000.0  # what the mask hides never leaks into the fill
  filled = sm.ring_fill(img[None, ..., None], mask[None, ..., None])
  assert filled.shape == (1, 8, 8)
  ring = sm.ring(mask)
  np.testing.assert_array_equal(filled[0][mask], 50.0)  # the ring is half 0, half 100 HU
  assert img[ring].mean() == 50.0
  np.testing.assert_array_equal(filled[0][~mask], img[~mask])
  # A mask without a ring (the whole image) is filled with 0.
  np.testing.assert_array_equal(sm.ring_fill(img, np.ones((8, 8)))[0], 0.0)


def test_mae_and_w1_by_hand():
  img, mask = _slice()
  pred = img.copy()
  pred[mask] += np.array([10.0, -30.0, 0.0, 20.0])
  assert sm.in_mask_mae(pred, img, mask) == pytest.approx(15.0)
  assert sm.w1([0.0, 1.0], [2.0, 3.0]) == pytest.approx(2.0)
  assert sm.w1(np.arange(5), np.arange(5)) == 0.0
  with pytest.raises(ValueError, match="empty"):
    sm.in_mask_mae(pred, img, np.zeros((8, 8)))
  with pytest.raises(ValueError, match="non-empty"):
    sm.w1([], [1.0])


def test_scenario_scores_model_vs_ring_fill():
  img, mask = _slice()
  perfect = sm.scenario_scores(img, img, mask)
  assert perfect["n"] == 1 and perfect["mask_pixels"] == 4
  assert perfect["mae_model"] == perfect["w1_model"] == 0.0
  # Ring fill: 50 HU everywhere under a 0/100 mask -> 50 HU off per pixel, W1 50.
  assert perfect["mae_ring"] == pytest.approx(50.0) and perfect["w1_ring"] == pytest.approx(50.0)
  flat = img.copy()
  flat[mask] = 50.0
  worse = sm.scenario_scores(img, flat, mask)
  assert worse["mae_model"] == pytest.approx(worse["mae_ring"])
  assert worse["hu_model"] == (50.0, 50.0) and worse["hu_real"] == (0.0, 100.0)


def test_tumor_scores_are_w1_to_lesions_and_to_the_replaced_host():
  host = np.full((1, 6, 6), 80.0)
  src_lab = np.ones((1, 6, 6), np.uint8)
  src_lab[0, 0, 0] = 2  # the source's own lesion is not a new one
  lab = src_lab.copy()
  lab[0, 2:4, 2:4] = 2
  gen = host.copy()
  gen[0, 2:4, 2:4] = [[40.0, 42.0], [38.0, 40.0]]
  gen[0, 0, 0] = 500.0  # ignored: not a placed pixel
  real = np.array([35.0, 40.0, 45.0])
  got = sm.tumor_scores(host, gen, src_lab, lab, 2, real)
  placed = np.array([40.0, 42.0, 38.0, 40.0])
  assert got["lesion_pixels"] == 4
  assert got["w1_gen_lesion"] == pytest.approx(stats.wasserstein_distance(placed, real))
  assert got["w1_gen_host"] == pytest.approx(40.0)
  assert got["w1_host_lesion"] == pytest.approx(40.0)
  assert (got["mean_gen"], got["mean_lesion"], got["mean_host"]) == (40.0, 40.0, 80.0)
  with pytest.raises(ValueError, match="no new lesion"):
    sm.tumor_scores(host, gen, src_lab, src_lab, 2, real)


def test_lesion_hu_and_markdown():
  rec = {"image": np.arange(16, dtype=np.int16).reshape(4, 4, 1),
         "labels": np.zeros((4, 4, 1), np.uint8)}
  rec["labels"][1, 2, 0] = 2
  assert list(sm.lesion_hu([[rec, rec]], 2)) == [6.0, 6.0]
  with pytest.raises(ValueError, match="lesion label 3"):
    sm.lesion_hu([[rec]], 3)
  img, mask = _slice()
  row = sm.scenario_scores(img, img, mask)
  md = sm.markdown({"organ": row, "context": row},
                   {"lesion_pixels": 4, "w1_gen_lesion": 1.0, "w1_gen_host": 2.0,
                    "w1_host_lesion": 3.0, "mean_gen": 4.0, "mean_lesion": 5.0,
                    "mean_host": 6.0})
  assert "| organ | 1 | 0.0 | 50.0 | 0.0 | 50.0 | 0..100 | 0..100 |" in md
  assert "| context |" in md and "W1(generated, real lesions) = 1.0" in md
  assert "W1(generated, replaced host) = 2.0" in md
