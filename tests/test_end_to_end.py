"""End to end on the real shared CT (+ phantom lesion cases): build -> train -> generate -> table1.

The shared TotalSegmentator cases carry no tumours, so the raw dir is a CSV manifest mixing
them (their labels.json) with two phantom cases with lesions (the phantom's labels.json): one
`kidney_tumor` dataset with real kidneys and tumours to paste. A smoke model is trained for a
few steps; all three generation scenarios and the evaluation run on it; the assertions are on
the artefacts.
"""

import csv
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from configs import kidney_tumor
from configs import pix2pix_kidneys
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.evaluation import table1
from ctdiff_jax.generation import runner
from ctdiff_jax import phantom
from ctdiff_jax.training import trainer

SIZE, SPACING = 48, 8.0


@pytest.fixture(scope="module")
def run(totalseg_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  raw = root / "raw"
  phantom.write_cohort(raw / "phantom", 2, seed=3, lesions=True, progress=False)
  with open(raw / "cases.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["case_id", "image", "label", "label_map"])
    for case in ("s01", "s02"):
      w.writerow([case, totalseg_dir / f"{case}_ct.nii.gz", totalseg_dir / f"{case}_seg.nii.gz",
                  totalseg_dir / "labels.json"])
    for case in ("phantom_000", "phantom_001"):
      w.writerow([case, f"phantom/{case}_ct.nii.gz", f"phantom/{case}_seg.nii.gz",
                  "phantom/labels.json"])
  summary = ingest_build.build("kidney_tumor", raw, root / "tfds", image_size=SIZE,
                                spacing_mm=SPACING)
  config = kidney_tumor.get_config("smoke")
  config.data_dir = str(root / "tfds")
  config.image_size, config.spacing_mm = SIZE, SPACING
  config.num_train_steps, config.log_every_steps = 4, 2
  config.checkpoint_every_steps, config.sample_every_steps = 4, 0
  config.per_device_batch_size = 2
  config.sampling.num_steps = 3
  config.eval.num_samples = 6
  workdir = root / "run"
  trainer.train_and_evaluate(config, str(workdir))
  # The Pix2Pix baseline on exactly the same records and masks.
  p2p = pix2pix_kidneys.get_config("smoke")
  p2p.dataset = "kidney_tumor"
  for field in ("data_dir", "image_size", "spacing_mm", "num_train_steps", "log_every_steps",
                "checkpoint_every_steps", "sample_every_steps", "per_device_batch_size"):
    p2p[field] = config[field]
  p2p.data.mask_mode = config.data.mask_mode
  trainer.train_and_evaluate(p2p, str(root / "pix2pix"))
  return {"root": root, "config": config, "workdir": workdir, "build": summary,
          "pix2pix_config": p2p, "pix2pix_workdir": root / "pix2pix"}


def test_build_mixes_real_and_phantom_cases(run):
  build = run["build"]
  assert build["layout"] == "csv" and build["cases_found"] == 4
  assert "s02" in build["cases_without_organ"]  # No kidneys on s02's 20 slices.
  cases = {c for ids in build["cases"].values() for c in ids}
  assert {"s01", "phantom_000", "phantom_001"} <= cases
  assert build["slices"]["train"] > 0
  split_of = {c: split for split, ids in build["cases"].items() for c in ids}
  assert len(split_of) == sum(len(ids) for ids in build["cases"].values())  # One split each.


def test_training_wrote_checkpoint_and_metrics(run):
  assert (run["workdir"] / "checkpoints" / "4").is_dir()
  lines = (run["workdir"] / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(l)["step"] for l in lines if "loss" in json.loads(l)]
  assert steps == [2, 4]


@pytest.mark.parametrize("scenario", ["organ", "context", "tumor"])
def test_generate_scenario(run, scenario):
  # pylint: disable=g-import-not-at-top  (local: this function's checks only)
  from scipy import ndimage
  from ctdiff_jax.data import masks, sources, transforms
  from ctdiff_jax.generation import export
  # pylint: enable=g-import-not-at-top
  config = run["config"]
  out = run["root"] / f"gen_{scenario}"
  spec = runner.GenerateSpec(scenario, num_samples=4, seed=0, split="train")
  summary = runner.generate(config, str(run["workdir"]), spec, str(out), progress=False)
  assert summary["num_samples"] == 4 and (out / "figure4.png").exists()
  with open(out / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4 and {r["scenario"] for r in rows} == {scenario}
  assert {int(r["checkpoint_step"]) for r in rows} == {4}  # The latest checkpoint.
  source, _ = sources.open_split(config, "train")
  ecfg = transforms.ExampleConfig.from_data_config(config.data)
  lo, hi = config.data.intensity_hu[0], config.data.intensity_hu[-1]  # The model's HU range.
  lesion_id = 2  # kidney_tumor: kidney = 1, tumour = 2.
  donor_sources = [sources.open_split(config, s)[0]
                   for s, n in sources.metadata(config)["splits"].items() if n]
  for r in rows:
    rec = source[int(r["source_index"])]
    assert (rec["case_id"].decode(), int(rec["slice_index"])) == (r["source_case"],
                                                                   int(r["slice_index"]))
    src_hu, src_lab = rec["image"][..., 0], rec["labels"][..., 0]
    ct_img = nib.load(out / r["ct_file"])
    assert ct_img.shape == (SIZE, SIZE, 1) and ct_img.get_data_dtype() == np.int16
    np.testing.assert_allclose(ct_img.header.get_zooms(), rec["spacing_mm"], rtol=1e-6)
    ct, seg, mask = (export.from_ras(np.asarray(nib.load(out / r[k]).dataobj)[..., 0])
                     for k in ("ct_file", "seg_file", "mask_file"))
    m = mask > 0
    assert int(r["mask_pixels"]) == m.sum() > 0
    # Outside the mask the source slice bit for bit; inside, the model's HU in its window.
    np.testing.assert_array_equal(ct[~m], src_hu[~m])
    assert lo <= ct[m].min() and ct[m].max() <= hi
    spacing = transforms.pixel_spacing(rec, ecfg.spacing_mm)
    if scenario == "organ":
      expect = masks.organ_mask(src_lab, ecfg.mask_labels, ecfg.dilation_mm, spacing)
    elif scenario == "context":
      expect = masks.bbox_mask(src_lab, ecfg.mask_labels, ecfg.bbox_margin_mm, spacing)
    if scenario != "tumor":
      np.testing.assert_array_equal(m, expect)
      np.testing.assert_array_equal(seg, src_lab)
      continue
    # The new lesion: exactly where the manifest placed it, inside the host kidney.
    placed = (seg == lesion_id) & (src_lab != lesion_id)
    assert int(r["lesion_pixels"]) == placed.sum() > 0
    np.testing.assert_array_equal(seg[~placed], src_lab[~placed])
    assert np.all(src_lab[placed] == 1) and np.all(m[placed]) and np.all(src_lab[m] == 1)
    # Donor tumours come from any split (hosts from --split).
    donor = next(src[i] for src in donor_sources for i in range(len(src))
                 if src[i]["case_id"].decode() == r["donor_case"]
                 and int(src[i]["slice_index"]) == int(r["donor_slice"]))
    rr, cc = np.nonzero(placed)
    dy, dx = int(r["offset_dy"]), int(r["offset_dx"])
    assert np.all(donor["labels"][..., 0][rr - dy, cc - dx] == lesion_id)
    # The whole donor component moved: the same number of lesion pixels around it.
    comps, _ = ndimage.label(donor["labels"][..., 0] == lesion_id, np.ones((3, 3), bool))
    assert np.sum(comps == comps[rr[0] - dy, cc[0] - dx]) == placed.sum()


def test_evaluate_writes_table(run):
  out = run["root"] / "eval"
  row = table1.evaluate(run["config"], str(run["workdir"]), str(out), split="train",
                          pix2pix_config=run["pix2pix_config"],
                          pix2pix_workdir=str(run["pix2pix_workdir"]), progress=False)
  for name in ("table1.md", "table1.csv", "table1.json"):
    assert (out / name).exists()
  table = json.loads((out / "table1.json").read_text())
  assert [r["organ"] for r in table["rows"]] == [row["organ"]]
  methods = table["rows"][0]["methods"]
  for method in ("pix2pix", "diffusion"):
    whole = methods[method]["fid_whole"]
    assert np.isfinite(whole["fid"]) and whole["n1"] == whole["n2"] == 6
  # The neighbour column is on disjoint (slice, neighbour) pairs: fewer than the 6 slices.
  pairs = table["rows"][0]["num_neighbour_pairs"]
  whole = methods["neighbour"]["fid_whole"]
  assert 1 <= pairs < 6 and np.isfinite(whole["fid"]) and whole["n1"] == whole["n2"] == pairs
  md = (out / "table1.md").read_text()
  assert "Diffusion" in md and "Pix2Pix" in md
  for method in ("pix2pix", "diffusion"):
    assert 0.0 <= methods[method]["mae_hu"]["mean"] < 3000
  # Each generative column comes from its own checkpoint, and they differ.
  checkpoints = {m: methods[m]["checkpoint"] for m in ("pix2pix", "diffusion")}
  assert checkpoints["pix2pix"]["model_family"] == "pix2pix"
  assert checkpoints["pix2pix"]["path"].startswith(str(run["pix2pix_workdir"]))
  assert checkpoints["diffusion"]["path"].startswith(str(run["workdir"]))
  for k in ("fid_whole", "fid_crop", "mae_hu", "ssim"):
    assert methods["pix2pix"][k] != methods["diffusion"][k], k
  # Every column is over the same N slices, listed once each in per_slice.csv.
  with open(out / "per_slice.csv", newline="") as f:
    per_slice = list(csv.DictReader(f))
  assert len({(r["case_id"], r["slice_index"]) for r in per_slice}) == len(per_slice) == 6
  for method in ("pix2pix", "diffusion"):
    assert np.mean([float(r[f"{method}_mae_hu"]) for r in per_slice]) == pytest.approx(
        methods[method]["mae_hu"]["mean"], rel=1e-5)
