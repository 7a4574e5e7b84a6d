"""Tests for the procedural phantom CT cohort (ctdiff_jax/phantom/)."""

import csv
import hashlib
import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ctdiff_jax.ingest import organs
from ctdiff_jax import phantom

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# A coarse grid keeps the CLI run fast; the anatomy is in mm so it is the same body.
SMALL_GRID = (64, 64, 24)
SMALL_SPACING = (6.0, 6.0, 10.0)
LUNG_IDS = [phantom.LABEL_IDS[n] for n in organs.LUNG_LOBES]
KIDNEY_IDS = [phantom.LABEL_IDS["kidney_right"], phantom.LABEL_IDS["kidney_left"]]
VERTEBRA_IDS = [i for i, n in phantom.LABELS.items() if n.startswith("vertebrae_")]
CUBE = np.ones((3, 3, 3), bool)
# sha256 of ct.tobytes() and seg.tobytes() of generate_case(case_rng(3, 2), SMALL_GRID,
# SMALL_SPACING, lesions=True): pins the output of commit cabddf5 (the generator before it
# was split into canvas.py / anatomy.py / cohort.py, computed from that code). Any change of
# the anatomy, of the painters' order or of the draws from the case generator changes it;
# update it only when the anatomy is meant to change (or numpy/scipy change their numerics).
PINNED_SHA256 = {
    "ct": "757795e808531366f1f85ce3c8565fbb60bc97142bb4efd7e9ec27ab8e272954",
    "seg": "b73e0660fdf475b2eeae260d4730219b5f79faa5a1da25c9bdfca682fac0321f",
}


@pytest.fixture(scope="module")
def cli_cohort(tmp_path_factory):
  """Two lesion cases written through the command line, on the small grid."""
  out = tmp_path_factory.mktemp("phantom_cli")
  cmd = [sys.executable, "-m", "ctdiff_jax.phantom", f"--output_dir={out}", "--num_cases=2",
         "--seed=3", "--lesions", "--grid=" + ",".join(map(str, SMALL_GRID)),
         "--spacing=" + ",".join(map(str, SMALL_SPACING))]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return out


@pytest.fixture(scope="module")
def lesion_case():
  """One default-grid case with lesions and its tissue map."""
  return phantom.generate_case(11, lesions=True, return_tissues=True)


def _centroid_z(seg, ids):
  z = np.nonzero(np.isin(seg, ids))[2]
  assert z.size, f"labels {ids} absent"
  return z.mean(), z.min(), z.max()


def test_cli_writes_flat_layout(cli_cohort, totalseg_dir):
  files = sorted(p.name for p in cli_cohort.iterdir())
  assert files == ["labels.json", "manifest.csv", "phantom_000_ct.nii.gz",
                   "phantom_000_seg.nii.gz", "phantom_001_ct.nii.gz", "phantom_001_seg.nii.gz"]
  labels = json.loads((cli_cohort / "labels.json").read_text())
  names = set(labels.values())
  required = {"spleen", "kidney_right", "kidney_left", "liver", *organs.LUNG_LOBES,
              "kidney_tumor", "liver_tumor"}
  assert required <= names
  assert all(0 < int(k) < 256 for k in labels)
  # Same ids as TotalSegmentator for every shared name, so phantom and real data mix.
  ts = {v: int(k) for k, v in json.loads((totalseg_dir / "labels.json").read_text()).items()}
  shared = [n for n in names if n in ts]
  assert len(shared) >= 20
  for k, v in labels.items():
    if v in ts:
      assert ts[v] == int(k), v
  # The organ groups the dataset configs use resolve against this vocabulary.
  ids = organs.resolve_label_ids(["liver", "spleen", "kidney", "lung", "kidney_tumor",
                                  "liver_tumor"], {int(k): v for k, v in labels.items()})
  assert sorted(ids[2]) == [2, 3]
  assert sorted(ids[3]) == [10, 11, 12, 13, 14]

  with open(cli_cohort / "manifest.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["case_id"] for r in rows] == ["phantom_000", "phantom_001"]
  for r in rows:
    ct_img = nib.load(cli_cohort / r["image"])
    seg_img = nib.load(cli_cohort / r["label"])
    assert ct_img.get_data_dtype() == np.int16
    assert seg_img.get_data_dtype() == np.uint8
    assert ct_img.shape == seg_img.shape == SMALL_GRID
    np.testing.assert_array_equal(ct_img.affine, seg_img.affine)
    np.testing.assert_allclose(np.diag(ct_img.affine)[:3], SMALL_SPACING)
    assert nib.aff2axcodes(ct_img.affine) == ("R", "A", "S")
    assert int(r["num_slices"]) == SMALL_GRID[2]
    assert (float(r["spacing_x"]), float(r["spacing_y"]), float(r["spacing_z"])) == SMALL_SPACING
    seg = np.asarray(seg_img.dataobj)
    assert r["has_lesions"] == "1"
    assert int(r["num_liver_lesions"]) >= 1 and int(r["num_kidney_lesions"]) >= 1
    assert (seg == phantom.LIVER_TUMOR).any() and (seg == phantom.KIDNEY_TUMOR).any()
    assert set(np.unique(seg).tolist()) <= {int(k) for k in labels} | {0}


def test_files_match_api(cli_cohort):
  """Case i of a cohort is generate_case(case_rng(seed, i)): the CLI and API agree exactly."""
  ct, seg, affine = phantom.generate_case(phantom.case_rng(3, 1), SMALL_GRID, SMALL_SPACING,
                                          lesions=True)
  ct_img = nib.load(cli_cohort / "phantom_001_ct.nii.gz")
  np.testing.assert_array_equal(np.asarray(ct_img.dataobj), ct)
  np.testing.assert_array_equal(np.asarray(nib.load(cli_cohort / "phantom_001_seg.nii.gz").dataobj),
                                seg)
  np.testing.assert_allclose(ct_img.affine, affine)


def test_deterministic_and_seed_dependent():
  a = phantom.generate_case(5, SMALL_GRID, SMALL_SPACING)
  b = phantom.generate_case(np.random.default_rng(5), SMALL_GRID, SMALL_SPACING)
  c = phantom.generate_case(6, SMALL_GRID, SMALL_SPACING)
  assert a[0].dtype == np.int16 and a[1].dtype == np.uint8
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert (a[0] != c[0]).mean() > 0.1
  assert (a[1] != c[1]).mean() > 0.01
  # Independent streams per case index.
  d = phantom.generate_case(phantom.case_rng(0, 0), SMALL_GRID, SMALL_SPACING)
  e = phantom.generate_case(phantom.case_rng(0, 1), SMALL_GRID, SMALL_SPACING)
  assert (d[1] != e[1]).mean() > 0.01


def test_output_is_pinned():
  """Every case is bit-identical to what cabddf5 generated (this one has both tumour kinds)."""
  ct, seg, _ = phantom.generate_case(phantom.case_rng(3, 2), SMALL_GRID, SMALL_SPACING,
                                     lesions=True)
  assert (seg == phantom.LIVER_TUMOR).any() and (seg == phantom.KIDNEY_TUMOR).any()
  got = {"ct": hashlib.sha256(ct.tobytes()).hexdigest(),
         "seg": hashlib.sha256(seg.tobytes()).hexdigest()}
  assert got == PINNED_SHA256


def test_no_lesions_without_flag(tmp_path):
  ids = phantom.write_cohort(tmp_path, 1, seed=4, shape=SMALL_GRID, spacing=SMALL_SPACING,
                             progress=False)
  assert ids == ["phantom_000"]
  seg = np.asarray(nib.load(tmp_path / "phantom_000_seg.nii.gz").dataobj)
  assert not np.isin(seg, [phantom.LIVER_TUMOR, phantom.KIDNEY_TUMOR]).any()
  assert np.isin(seg, KIDNEY_IDS).any() and (seg == phantom.LABEL_IDS["liver"]).any()
  with open(tmp_path / "manifest.csv") as f:
    (row,) = list(csv.DictReader(f))
  assert row["has_lesions"] == "0"


def test_tissue_hu_ranges(lesion_case):
  ct, seg, _, tissues = lesion_case
  ct = ct.astype(np.float64)

  def mean_hu(mask, erode=True):
    if erode:  # skip the partial-volume rim
      mask = ndimage.binary_erosion(mask, CUBE)
    assert mask.sum() > 20
    return ct[mask].mean()

  t = phantom.TISSUE_IDS
  assert 40 <= mean_hu(seg == phantom.LABEL_IDS["liver"]) <= 80
  assert 30 <= mean_hu(seg == phantom.LABEL_IDS["spleen"]) <= 70
  assert mean_hu(np.isin(seg, LUNG_IDS)) < -700
  assert mean_hu(tissues == t["subcutaneous_fat"]) < -50
  assert mean_hu(np.isin(seg, VERTEBRA_IDS), erode=False) > 200
  assert mean_hu(tissues == t["cortical_bone"], erode=False) > 400
  cortex = mean_hu(tissues == t["kidney_cortex"], erode=False)
  medulla = mean_hu(tissues == t["kidney_medulla"], erode=False)
  assert cortex > medulla + 40, (cortex, medulla)
  assert mean_hu(tissues == t["renal_sinus_fat"], erode=False) < medulla
  assert mean_hu(tissues == t["muscle"]) == pytest.approx(50, abs=20)
  assert mean_hu(seg == phantom.LABEL_IDS["aorta"]) > 150
  assert mean_hu(tissues == t["air"]) < -950
  # Noise is present and CT-like (not a flat cartoon, not snow).
  liver = ndimage.binary_erosion(seg == phantom.LABEL_IDS["liver"], CUBE, iterations=2)
  assert 5 < ct[liver].std() < 40


def test_cranio_caudal_layout(lesion_case, cli_cohort):
  cases = [lesion_case[1]] + [np.asarray(nib.load(p).dataobj)
                              for p in sorted(cli_cohort.glob("*_seg.nii.gz"))]
  for seg in cases:
    lung_c, lung_lo, lung_hi = _centroid_z(seg, LUNG_IDS)
    liver_c, _, _ = _centroid_z(seg, [phantom.LABEL_IDS["liver"]])
    kid_c, kid_lo, kid_hi = _centroid_z(seg, KIDNEY_IDS)
    assert lung_c > liver_c > kid_c
    assert lung_hi > kid_hi and kid_lo < lung_lo
    # Lungs are cranial: absent from the caudal third of the volume.
    assert lung_lo > seg.shape[2] // 3
    # Organs span a realistic subset of slices, so slice filtering by organ is meaningful.
    for ids in (LUNG_IDS, KIDNEY_IDS, [phantom.LABEL_IDS["liver"]]):
      present = np.isin(seg, ids).any(axis=(0, 1))
      assert 0.15 < present.mean() < 0.9
  # RAS+ (nibabel): voxel axis 0 increases towards the patient's right, as in the shared s01
  # case (kidney_right at x~83, kidney_left at x~33): liver and right kidney at higher x.
  seg = lesion_case[1]
  assert nib.aff2axcodes(lesion_case[2]) == ("R", "A", "S")
  x_of = lambda i: np.nonzero(seg == i)[0].mean()
  mid = (seg.shape[0] - 1) / 2
  assert x_of(phantom.LABEL_IDS["liver"]) > mid > x_of(phantom.LABEL_IDS["spleen"])
  assert x_of(phantom.LABEL_IDS["kidney_right"]) > mid > x_of(phantom.LABEL_IDS["kidney_left"])


@pytest.mark.parametrize("lesion,hosts", [
    (phantom.LIVER_TUMOR, ([phantom.LABEL_IDS["liver"]],)),
    (phantom.KIDNEY_TUMOR, ([phantom.LABEL_IDS["kidney_right"]],
                            [phantom.LABEL_IDS["kidney_left"]])),
])
def test_lesions_strictly_inside_host(lesion_case, cli_cohort, lesion, hosts):
  cases = [lesion_case[1]] + [np.asarray(nib.load(p).dataobj)
                              for p in sorted(cli_cohort.glob("*_seg.nii.gz"))]
  n_components = 0
  for seg in cases:
    comps, n = ndimage.label(seg == lesion, CUBE)
    n_components += n
    for i in range(1, n + 1):
      comp = comps == i
      ring = ndimage.binary_dilation(comp, CUBE) & ~comp
      around = set(np.unique(seg[ring]).tolist()) - {lesion}
      assert any(around <= set(h) for h in hosts), (lesion, around)
  assert n_components >= len(cases)


def test_bad_input_errors(tmp_path):
  with pytest.raises(ValueError, match="num_cases"):
    phantom.write_cohort(tmp_path, 0)
  with pytest.raises(ValueError, match="spacing"):
    phantom.generate_case(0, SMALL_GRID, (3.0, -1.0, 5.0))
  with pytest.raises(ValueError, match="grid"):
    phantom.generate_case(0, (64, 64))
  with pytest.raises(TypeError, match="seed"):
    phantom.generate_case("abc")


def test_mr_mode_is_t1_like_on_the_same_anatomy():
  """--modality=mr: the CT case's anatomy, T1 contrast (fat bright, fluid dark), no HU."""
  ct, seg_ct, _ = phantom.generate_case(phantom.case_rng(3, 2), SMALL_GRID, SMALL_SPACING)
  mr, seg, aff, tissues = phantom.generate_case(phantom.case_rng(3, 2), SMALL_GRID,
                                                SMALL_SPACING, modality="mr",
                                                return_tissues=True)
  np.testing.assert_array_equal(seg, seg_ct)  # same draws up to the image: same anatomy
  assert mr.dtype == np.int16 and mr.min() >= 0  # magnitude, arbitrary units
  core = ndimage.binary_erosion(np.ones_like(tissues, bool), CUBE)  # away from the blur edge
  mean = {t: float(mr[(tissues == phantom.TISSUE_IDS[t]) & core].mean())
          for t in ("subcutaneous_fat", "liver", "kidney_cortex", "spleen", "muscle", "air")}
  assert mean["subcutaneous_fat"] > mean["liver"] > mean["spleen"] > mean["air"]
  assert mean["liver"] > mean["kidney_cortex"] > mean["air"] and mean["muscle"] < mean["liver"]
  assert not np.array_equal(mr, ct)
  with pytest.raises(ValueError, match="modality"):
    phantom.generate_case(0, SMALL_GRID, SMALL_SPACING, modality="pet")
