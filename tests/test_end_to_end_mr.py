"""MR end to end on the phantom's MR mode: phantom -> build (--modality=mr) -> train -> generate
-> evaluate, and the modality checks (an MR dataset with a CT config and the reverse).

The chain runs on the phantom (T1-like contrast, per-case scanner gain; its cases rewritten
as float32 so their records need a value_scale). The one real MR volume installed with a
package here, nibabel's test T1 brain (tests/data/anatomical.nii, 2 mm), goes through build
(TotalSegmentator MRI layout, a `brain` mask made by thresholding: not an expert label),
training and generation in the last test. One module fixture runs the chain at a tiny size
(32 px, 4 train steps, 2 DDIM steps).
"""

import csv
import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from configs import kidneys
from configs import kidneys_mr
from ctdiff_jax import phantom
from ctdiff_jax.data import sources
from ctdiff_jax.evaluation import table1
from ctdiff_jax.generation import export
from ctdiff_jax.generation import runner
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import modality
from ctdiff_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE, SPACING = 32, 12.0
GRID, VOXEL = (48, 48, 16), (8.0, 8.0, 12.0)


def _small(config, data_dir):
  config.data_dir = str(data_dir)
  config.image_size, config.spacing_mm = SIZE, SPACING
  config.num_train_steps, config.log_every_steps = 4, 2
  config.checkpoint_every_steps, config.sample_every_steps = 4, 0
  config.per_device_batch_size = 2
  config.sampling.num_steps = 2
  config.eval.num_samples = 6
  return config


def _as_float_scan(path):
  """Rewrites an MR case as float32 with fractional values: its records need a value_scale."""
  img = nib.load(path)
  data = img.get_fdata(dtype=np.float32) * np.float32(1.7) + np.float32(0.3)
  out = nib.Nifti1Image(data, img.affine)
  out.set_data_dtype(np.float32)
  nib.save(out, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("mr_e2e")
  for m in ("mr", "ct"):  # the same anatomy, imaged as MR and as CT
    phantom.write_cohort(root / f"raw_{m}", 4, seed=5, shape=GRID, spacing=VOXEL,
                         modality=m, progress=False)
  for path in sorted((root / "raw_mr").glob("*_mr.nii.gz")):
    _as_float_scan(path)
  build = {m: ingest_build.build("kidneys", root / f"raw_{m}", root / "tfds", image_size=SIZE,
                                 spacing_mm=SPACING, modality=m) for m in ("mr", "ct")}
  config = _small(kidneys_mr.get_config("smoke"), root / "tfds")
  trainer.train_and_evaluate(config, str(root / "run"))
  return {"root": root, "config": config, "workdir": root / "run", "build": build}


def test_mr_build_names_and_records(run):
  assert run["build"]["mr"]["dataset"] == f"ct_slices/kidneys_{SIZE}px_12mm_mr"
  assert run["build"]["ct"]["dataset"] == f"ct_slices/kidneys_{SIZE}px_12mm"
  meta = sources.metadata(run["config"])
  assert meta["modality"] == "mr" and meta["intensity_unit"] != "HU"
  source, _ = sources.open_split(run["config"], "train")
  refs = {}
  for i in range(len(source)):
    rec = source[i]
    assert rec["image"].dtype == np.int16 and 0 < float(rec["value_scale"]) < 1.0
    refs[rec["case_id"]] = tuple(rec["intensity_ref"])
  # Per-case percentiles: the phantom's per-case gain gives every case its own range.
  assert len(set(refs.values())) == len(refs) >= 2
  assert all(0 < lo < hi for lo, hi in refs.values())


def test_generate_pastes_back_into_the_source_scale(run):
  config, out = run["config"], run["root"] / "gen"
  spec = runner.GenerateSpec("organ", num_samples=4, seed=0, split="train", volumes=True)
  summary = runner.generate(config, str(run["workdir"]), spec, str(out), progress=False)
  assert summary["num_samples"] == 4
  source, _ = sources.open_split(config, "train")
  with open(out / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    rec = source[int(r["source_index"])]
    scale, (lo, hi) = float(rec["value_scale"]), rec["intensity_ref"]
    img = nib.load(out / r["ct_file"])
    # The NIfTI carries the source scale: its values are the scan's, via scl_slope.
    assert img.dataobj.slope == pytest.approx(scale) and img.get_data_dtype() == np.int16
    values = export.from_ras(img.get_fdata()[..., 0])
    mask = export.from_ras(np.asarray(nib.load(out / r["mask_file"]).dataobj)[..., 0]) > 0
    source_values = rec["image"][..., 0].astype(np.float64) * scale
    assert mask.sum() > 0
    np.testing.assert_array_equal(values[~mask], source_values[~mask])  # exactly the source
    # Inside: the model's [-1, 1] mapped to this case's p0.5 .. p99.5.
    assert lo - 1 <= values[mask].min() and values[mask].max() <= hi + 1
  scales = {r["source_case"]: float(source[int(r["source_index"])]["value_scale"]) for r in rows}
  vols = sorted((out / "volumes").glob("*_ct.nii.gz"))
  assert vols
  for v in vols:  # the per-case stacks carry their case's scale too
    case = v.name.rsplit("_r", 1)[0]
    assert nib.load(v).dataobj.slope == pytest.approx(scales[case])


def test_evaluate_reports_in_the_percentile_unit(run, fid_source):
  del fid_source  # the FID weights (skips / fails under CI when missing)
  out = run["root"] / "eval"
  row = table1.evaluate(run["config"], str(run["workdir"]), str(out), split="train",
                        progress=False)
  assert row["settings"]["modality"] == "mr"
  assert row["settings"]["intensity_unit"] == modality.UNITS["mr"]
  diffusion = row["methods"]["diffusion"]
  assert np.isfinite(diffusion["fid_whole"]["fid"]) and diffusion["fid_whole"]["n1"] == 6
  # MAE in the per-case percentile range: a fraction of it, not hundreds of HU.
  assert 0.0 < diffusion["mae_hu"]["mean"] < 1.0
  md = (out / "table1.md").read_text()
  assert "HU" not in md and "MAE (p0.5-p99.5 range)" in md
  header = (out / "table1.csv").read_text().splitlines()[0]
  assert "_hu" not in header and "diffusion_mae_prange" in header
  assert "_hu" not in (out / "per_slice.csv").read_text().splitlines()[0]
  assert json.loads((out / "table1.json").read_text())["rows"][0]["settings"]["modality"] == "mr"


def test_ct_config_refuses_mr_dataset_and_reverse(run):
  root = run["root"]
  ct = _small(kidneys.get_config("smoke"), root / "tfds")
  ct.dataset = "kidneys_mr"  # the MR dataset named explicitly
  with pytest.raises(modality.ModalityError, match=r"kidneys_32px_12mm_mr holds MR .* CT"):
    sources.open_split(ct, "train")
  mr = _small(kidneys_mr.get_config("smoke"), root / "tfds")
  mr.dataset = "kidneys"
  # The MR config reads kidneys..._mr; a CT-built dataset under that name is refused by its
  # metadata (here: the CT build's metadata with the MR config).
  meta = json.loads((root / "tfds/ct_slices/kidneys_32px_12mm/1.0.0/metadata.json").read_text())
  with pytest.raises(modality.ModalityError, match=r"holds CT slices .* for MR"):
    sources.check_modality(mr, {**meta, "dataset": "ct_slices/kidneys_32px_12mm"})
  # And through the CLI: one line, exit status 1, no traceback.
  cmd = [sys.executable, "-m", "ctdiff_jax.train", "--config=configs/kidneys.py:smoke",
         f"--workdir={root / 'ct_on_mr'}", f"--config.data_dir={root / 'tfds'}",
         "--config.dataset=kidneys_mr", f"--config.image_size={SIZE}",
         f"--config.spacing_mm={SPACING}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 1, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("ctdiff_jax.train: error:")]
  assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
  assert "kidneys_32px_12mm_mr holds MR slices" in errors[0] and "for CT" in errors[0]


def _brain_case(raw):
  """nibabel's public test T1 (anatomical.nii, 2 mm, LAS) in the TotalSegmentator MRI layout,
  with a `brain` mask made here (threshold, largest component, holes filled): not an expert
  label, but a real MR volume with a TotalSegmentator MR class name."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  img = nib.load(pathlib.Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii")
  data = np.asanyarray(img.dataobj).astype(np.float32)
  fg = ndimage.binary_opening(data > 0.2 * np.percentile(data, 99), iterations=1)
  comps, n = ndimage.label(fg)
  brain = comps == 1 + np.argmax(ndimage.sum(fg, comps, range(1, n + 1)))
  brain = ndimage.binary_fill_holes(brain).astype(np.uint8)
  (raw / "s0001" / "segmentations").mkdir(parents=True)
  nib.save(img, raw / "s0001" / "mri.nii.gz")
  nib.save(nib.Nifti1Image(brain, img.affine), raw / "s0001" / "segmentations" / "brain.nii.gz")


def test_real_mr_volume_builds_trains_and_generates(run):
  root = run["root"]
  _brain_case(root / "raw_real_mr")
  summary = ingest_build.build(["brain"], root / "raw_real_mr", root / "tfds", image_size=SIZE,
                               spacing_mm=3.0, modality="mr")
  assert summary["layout"] == "totalsegmentator" and summary["slices"]["train"] > 0
  config = _small(kidneys_mr.get_config("smoke"), root / "tfds")
  config.organs, config.spacing_mm = "brain", 3.0
  config.num_train_steps = config.checkpoint_every_steps = 2
  trainer.train_and_evaluate(config, str(root / "run_real"))
  out = root / "gen_real"
  runner.generate(config, str(root / "run_real"), runner.GenerateSpec(
      "organ", num_samples=2, seed=0, split="train"), str(out), progress=False)
  source, _ = sources.open_split(config, "train")
  with open(out / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    rec = source[int(r["source_index"])]
    values = export.from_ras(nib.load(out / r["ct_file"]).get_fdata()[..., 0])
    mask = export.from_ras(np.asarray(nib.load(out / r["mask_file"]).dataobj)[..., 0]) > 0
    assert mask.sum() > 0
    np.testing.assert_array_equal(values[~mask], rec["image"][..., 0][~mask])  # int16, scale 1
