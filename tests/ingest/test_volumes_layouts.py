"""Tests for NIfTI loading / reorientation / resampling (volumes.py) and raw layouts (layouts.py).

Also holds the tiny synthetic-dataset writers (one per raw layout) that test_builder.py and
test_builder_bad_input.py import.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pytest

from ctdiff_jax.ingest import layouts
from ctdiff_jax.ingest import records
from ctdiff_jax.ingest import volumes

SHAPE = (32, 32, 6)
SPACING = (2.0, 2.0, 3.0)

# ---- synthetic raw datasets ------------------------------------------------------------------


def ras_affine(spacing: Sequence[float] = SPACING, origin=(-31.0, -40.0, 10.0)) -> np.ndarray:
  aff = np.diag([*spacing, 1.0])
  aff[:3, 3] = origin
  return aff


def organ_box(label: int) -> tuple[slice, slice]:
  """Label k occupies an off-centre box (so any flip of x or y moves it)."""
  x0 = 3 + 7 * (label - 1)
  return slice(x0, x0 + 6), slice(5, 12)


def make_volume(organ_slices: Mapping[int, Sequence[int]], shape=SHAPE
                ) -> tuple[np.ndarray, np.ndarray]:
  """(HU int16, labels uint8) on a RAS grid: label k is a box on the listed z with HU 100+20k.

  Background HU is a ramp along x so that the image itself is asymmetric too.
  """
  hu = np.broadcast_to(np.arange(shape[0], dtype=np.int16)[:, None, None] - 20,
                       shape).copy()
  lab = np.zeros(shape, np.uint8)
  for k, zs in organ_slices.items():
    bx, by = organ_box(k)
    for z in zs:
      lab[bx, by, z] = k
      hu[bx, by, z] = 100 + 20 * k
  return hu, lab


def save_nii(path: pathlib.Path, arr: np.ndarray, affine: np.ndarray, dtype=None) -> pathlib.Path:
  img = nib.Nifti1Image(arr, affine)
  if dtype is not None:
    img.set_data_dtype(dtype)
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(img, str(path))
  return path


def write_flat(root: pathlib.Path, cases: Mapping[str, Mapping[int, Sequence[int]]],
               names: Mapping[int, str]) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  (root / "labels.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
  for cid, organ_slices in cases.items():
    hu, lab = make_volume(organ_slices)
    save_nii(root / f"{cid}_ct.nii.gz", hu, ras_affine())
    save_nii(root / f"{cid}_seg.nii.gz", lab, ras_affine())
  return root


def write_kits(root: pathlib.Path, cases, unlabelled: Sequence[str] = ()) -> pathlib.Path:
  for cid, organ_slices in cases.items():
    hu, lab = make_volume(organ_slices)
    save_nii(root / cid / "imaging.nii.gz", hu, ras_affine())
    save_nii(root / cid / "segmentation.nii.gz", lab, ras_affine())
  for cid in unlabelled:
    save_nii(root / cid / "imaging.nii.gz", make_volume({})[0], ras_affine())
  return root


def write_lits(root: pathlib.Path, cases) -> pathlib.Path:
  for n, organ_slices in cases.items():  # keys are ints N
    hu, lab = make_volume(organ_slices)
    save_nii(root / f"volume-{n}.nii", hu, ras_affine())
    save_nii(root / f"segmentation-{n}.nii", lab, ras_affine())
  return root


def write_msd(root: pathlib.Path, cases, task: str = "Liver",
              labels: Mapping[str, str] | None = None) -> pathlib.Path:
  labels = labels or {"0": "background", "1": "liver", "2": "cancer"}
  training = []
  for cid, organ_slices in cases.items():
    hu, lab = make_volume(organ_slices)
    save_nii(root / "imagesTr" / f"{cid}.nii.gz", hu, ras_affine())
    save_nii(root / "labelsTr" / f"{cid}.nii.gz", lab, ras_affine())
    training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
  meta = {"name": task, "labels": labels, "numTraining": len(training), "training": training,
          "test": ["./imagesTs/x.nii.gz"]}
  (root / "dataset.json").write_text(json.dumps(meta))
  return root


def write_totalseg(root: pathlib.Path, cases, names: Mapping[int, str]) -> pathlib.Path:
  """TotalSegmentator layout: one binary mask per name (all names, even if empty)."""
  for cid, organ_slices in cases.items():
    hu, lab = make_volume(organ_slices)
    save_nii(root / cid / "ct.nii.gz", hu, ras_affine())
    for k, name in names.items():
      save_nii(root / cid / "segmentations" / f"{name}.nii.gz",
               (lab == k).astype(np.uint8), ras_affine())
  return root


def write_csv(root: pathlib.Path, cases, names: Mapping[int, str],
              per_row_map: bool = False) -> pathlib.Path:
  """CSV manifest in root pointing at files in root/data; labels.json beside it or per row."""
  rows = []
  for cid, organ_slices in cases.items():
    hu, lab = make_volume(organ_slices)
    save_nii(root / "data" / f"{cid}-img.nii.gz", hu, ras_affine())
    save_nii(root / "data" / f"{cid}-lab.nii.gz", lab, ras_affine())
    row = {"case_id": cid, "image": f"data/{cid}-img.nii.gz", "label": f"data/{cid}-lab.nii.gz"}
    if per_row_map:
      (root / "maps").mkdir(parents=True, exist_ok=True)
      # name -> id form on purpose: both forms are accepted.
      (root / "maps" / f"{cid}.json").write_text(json.dumps({v: k for k, v in names.items()}))
      row["label_map"] = f"maps/{cid}.json"
    rows.append(row)
  if not per_row_map:
    (root / "labels.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
  with open(root / "cases.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return root


# ---- volumes: reorientation --------------------------------------------------------------


def _reoriented_copy(arr: np.ndarray, affine: np.ndarray, flip=(True, True, False),
                     perm=(0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
  """The same world-space volume stored with flipped / permuted axes (float64 reference)."""
  out, aff = arr, affine.copy()
  for axis, f in enumerate(flip):
    if f:
      out = np.flip(out, axis)
      # voxel i' = n-1-i: world = A[:, axis] * (n-1-i') + t
      aff[:3, 3] = aff[:3, 3] + aff[:3, axis] * (arr.shape[axis] - 1)
      aff[:3, axis] = -aff[:3, axis]
  out = np.transpose(out, perm)
  aff[:3, :3] = aff[:3, list(perm)]
  return np.ascontiguousarray(out), aff


@pytest.mark.parametrize("flip,perm", [((True, False, False), (0, 1, 2)),
                                       ((True, True, False), (0, 1, 2)),
                                       ((False, True, True), (1, 0, 2)),
                                       ((False, False, False), (2, 0, 1))])
def test_load_case_reorients_to_ras(tmp_path, flip, perm):
  hu, lab = make_volume({1: [1, 2], 2: [2, 4]})
  aff = ras_affine()
  hu2, aff2 = _reoriented_copy(hu, aff, flip, perm)
  lab2, _ = _reoriented_copy(lab, aff, flip, perm)
  assert not np.array_equal(hu2.shape, hu.shape) or not np.array_equal(hu2, hu)
  case = volumes.Case("c", save_nii(tmp_path / "i.nii.gz", hu2, aff2),
                      save_nii(tmp_path / "l.nii.gz", lab2, aff2), {1: "liver", 2: "spleen"})
  loaded = volumes.load_case(case, ["spleen", "liver"])
  np.testing.assert_array_equal(loaded.image, hu)
  # organ map: config order (spleen=1, liver=2), not source ids
  np.testing.assert_array_equal(loaded.organ_map, np.select([lab == 2, lab == 1], [1, 2], 0))
  np.testing.assert_allclose(loaded.spacing, SPACING)
  np.testing.assert_allclose(loaded.affine, aff, atol=1e-5)


def test_organ_ids_follow_config_order(tmp_path):
  hu, lab = make_volume({1: [1]})
  lab[5:7, 6:8, 1] = 2  # a "tumour" inside the organ box
  case = volumes.Case("c", save_nii(tmp_path / "i.nii.gz", hu, ras_affine()),
                      save_nii(tmp_path / "l.nii.gz", lab, ras_affine()),
                      {1: "liver", 2: "liver_tumor"})
  both = volumes.load_case(case, ["liver", "liver_tumor"]).organ_map
  assert (both == 2).sum() == 4 and (both == 1).sum() == (lab == 1).sum() == 38
  reverse = volumes.load_case(case, ["liver_tumor", "liver"]).organ_map
  assert (reverse == 1).sum() == 4 and (reverse == 2).sum() == 38


def test_later_organ_overwrites_earlier_with_overlapping_masks(tmp_path):
  hu, lab = make_volume({1: [1]})
  tumour = np.zeros_like(lab)
  tumour[5:7, 6:8, 1] = 1
  assert (lab[tumour > 0] == 1).all()  # the liver mask covers the tumour
  masks = {"liver": save_nii(tmp_path / "liver.nii.gz", lab, ras_affine()),
           "liver_tumor": save_nii(tmp_path / "liver_tumor.nii.gz", tumour, ras_affine())}
  case = volumes.Case("c", save_nii(tmp_path / "i.nii.gz", hu, ras_affine()), None,
                      {1: "liver", 2: "liver_tumor"}, masks=masks)
  both = volumes.load_case(case, ["liver", "liver_tumor"]).organ_map
  assert (both == 2).sum() == 4 and (both == 1).sum() == 38
  reverse = volumes.load_case(case, ["liver_tumor", "liver"]).organ_map
  assert (reverse == 2).sum() == 42 and (reverse == 1).sum() == 0


def test_organ_groups_merge_source_labels(tmp_path):
  hu, lab = make_volume({1: [0], 2: [1, 2], 3: [5]})
  case = volumes.Case("c", save_nii(tmp_path / "i.nii.gz", hu, ras_affine()),
                      save_nii(tmp_path / "l.nii.gz", lab, ras_affine()),
                      {1: "kidney_right", 2: "kidney_left", 3: "liver"})
  organ_map = volumes.load_case(case, ["kidney"]).organ_map
  np.testing.assert_array_equal(organ_map, ((lab == 1) | (lab == 2)).astype(np.uint8))


# ---- volumes: slice selection ------------------------------------------------------------


def test_select_slices_thresholds_on_source_area():
  organ_map = np.zeros((20, 20, 7), np.uint8)
  areas = [0, 5, 50, 0, 200, 0, 0]
  for z, a in enumerate(areas):
    organ_map.reshape(-1, 7)[:a, z] = 1
  assert [int(np.count_nonzero(organ_map[..., z])) for z in range(7)] == areas
  assert volumes.select_slices(organ_map) == ([1, 2, 4], 3)
  assert volumes.select_slices(organ_map, min_organ_area=5) == ([2, 4], 2)
  assert volumes.select_slices(organ_map, min_organ_area=50) == ([4], 1)
  assert volumes.select_slices(organ_map, min_organ_area=200) == ([], 0)


def test_select_slices_empty_fraction_is_deterministic():
  organ_map = np.zeros((4, 4, 12), np.uint8)
  organ_map[:, :, 5] = 1
  kept, n = volumes.select_slices(organ_map, 0, 0.5, "case-a")
  empty_kept = [z for z in kept if z != 5]
  assert n == 1 and 5 in kept and len(empty_kept) == round(0.5 * 11)
  assert volumes.select_slices(organ_map, 0, 0.5, "case-a") == (kept, n)
  others = {tuple(volumes.select_slices(organ_map, 0, 0.5, f"case-{i}")[0]) for i in range(8)}
  assert len(others) > 1  # the draw depends on the case id
  assert volumes.select_slices(organ_map, 0, 1.0, "x")[0] == list(range(12))


# ---- volumes: resampling -----------------------------------------------------------------


def test_resample_identity_is_radiological_view():
  rng = np.random.default_rng(0)
  a = rng.integers(-1000, 1000, size=(10, 14)).astype(np.int16)
  lab = rng.integers(0, 3, size=(10, 14)).astype(np.uint8)
  # Same spacing, output 2 px larger than each side's extent: a pure flip + transpose + pad.
  out = volumes.resample_slice(a, (1.5, 1.5), 18, 1.5, order=1, cval=-1024)
  out_lab = volumes.resample_slice(lab, (1.5, 1.5), 18, 1.5, order=0, cval=0)
  view = a[::-1, ::-1].T  # rows: y descending (anterior first), cols: x descending
  np.testing.assert_allclose(out[2:16, 4:14], view, atol=1e-9)
  np.testing.assert_array_equal(out_lab[2:16, 4:14], lab[::-1, ::-1].T)
  pad = np.ones((18, 18), bool)
  pad[2:16, 4:14] = False
  assert (out[pad] == -1024).all() and (out_lab[pad] == 0).all()
  assert out_lab.dtype == np.uint8


def test_resample_linear_ramp_matches_float64_reference():
  nx, ny, sx, sy = 40, 30, 0.8, 1.2
  xs, ys = np.arange(nx) * sx, np.arange(ny) * sy
  ramp = 3.0 * xs[:, None] - 2.0 * ys[None, :] + 7.0  # linear: interpolation is exact
  size, sp = 24, 1.5
  out = volumes.resample_slice(ramp, (sx, sy), size, sp, order=1, cval=-1024)
  # Reference: pixel (r, c) lies at (c - (S-1)/2, r - (S-1)/2) * sp from the FOV centre,
  # columns towards -x, rows towards -y.
  off = (np.arange(size) - (size - 1) / 2) * sp
  x_mm = xs.mean() - off[None, :]
  y_mm = ys.mean() - off[:, None]
  expected = 3.0 * x_mm - 2.0 * y_mm + 7.0
  inside = (x_mm >= 0) & (x_mm <= xs[-1]) & (y_mm >= 0) & (y_mm <= ys[-1])
  assert inside.sum() > 300
  np.testing.assert_allclose(out[inside], np.broadcast_to(expected, out.shape)[inside],
                             atol=1e-9)
  outside = ((x_mm < -sx / 2) | (x_mm > xs[-1] + sx / 2) | (y_mm < -sy / 2)
             | (y_mm > ys[-1] + sy / 2))
  outside = np.broadcast_to(outside, out.shape)
  assert outside.any() and (out[outside] == -1024).all()


@pytest.mark.parametrize("shape,spacing,size,mm", [
    ((40, 30), (0.8, 1.2), 24, 1.5),  # fractional positions, partly outside the FOV
    ((10, 14), (1.5, 1.5), 18, 1.5),  # integer positions (a flip + pad)
    ((9, 7), (1.0, 1.0), 16, 0.5),  # exact half-voxel ties (nearest rounds them up)
    ((33, 47), (0.7, 0.7), 40, 1.0)])
def test_resample_matches_scipy_map_coordinates(shape, spacing, size, mm):
  """The separable resampler gives scipy's map_coordinates(mode="nearest") values (the
  builder's resampler before it): bit for bit, so records do not change."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(size)
  hu = rng.integers(-1024, 3000, size=shape).astype(np.int16)
  lab = rng.integers(0, 5, size=shape).astype(np.uint8)
  grid = volumes._sample_grid(shape, spacing, size, mm)  # pylint: disable=protected-access
  cx, ry = np.meshgrid(grid.xs, grid.ys)
  for src, order, cval in ((hu, 1, -1024), (lab, 0, 0)):
    ref = ndimage.map_coordinates(src.astype(np.float64) if order else src, np.stack([cx, ry]),
                                  order=order, mode="nearest")
    ref[~grid.inside] = cval
    out = volumes.resample_slice(src, spacing, size, mm, order=order, cval=cval)
    assert out.dtype == ref.dtype and out.shape == (size, size)
    if order:
      np.testing.assert_array_equal(out, ref)  # the same float64 sums, so the same int16
    else:
      np.testing.assert_array_equal(out, ref)
  assert grid.inside.any()


def test_slice_records_schema_and_neighbours(tmp_path):
  hu, lab = make_volume({1: [0, 3, 5]})
  case = volumes.Case("c1", save_nii(tmp_path / "i.nii.gz", hu, ras_affine()),
                      save_nii(tmp_path / "l.nii.gz", lab, ras_affine()), {1: "liver"})
  loaded = volumes.load_case(case, ["liver"])
  kept, _ = volumes.select_slices(loaded.organ_map)
  recs = list(volumes.slice_records(loaded, kept, 16, 4.0))
  assert [int(r[records.SLICE_INDEX]) for r in recs] == [0, 3, 5]
  for r in recs:
    for key in records.IMAGE_KEYS:
      assert r[key].shape == (16, 16, 1) and r[key].dtype == np.int16
    assert r[records.LABELS].shape == (16, 16, 1) and r[records.LABELS].dtype == np.uint8
    np.testing.assert_array_equal(r[records.SPACING_MM], np.float32([4.0, 4.0, 3.0]))
    assert r[records.SPACING_MM].dtype == np.float32 and r[records.CASE_ID] == "c1"
    assert set(np.unique(r[records.LABELS])) == {0, 1}
  by_z = {int(r[records.SLICE_INDEX]): r for r in recs}
  # neighbours are the z-1 / z+1 slices of the volume; the edge slice repeats at the ends
  whole = {z: next(volumes.slice_records(loaded, [z], 16, 4.0))[records.IMAGE] for z in range(6)}
  np.testing.assert_array_equal(by_z[0][records.PREV_IMAGE], whole[0])
  np.testing.assert_array_equal(by_z[0][records.NEXT_IMAGE], whole[1])
  np.testing.assert_array_equal(by_z[3][records.PREV_IMAGE], whole[2])
  np.testing.assert_array_equal(by_z[3][records.NEXT_IMAGE], whole[4])
  np.testing.assert_array_equal(by_z[5][records.NEXT_IMAGE], whole[5])
  assert not np.array_equal(whole[2], whole[3])  # organ slices differ from their neighbours


# ---- layouts -----------------------------------------------------------------------------

CASES = {"c1": {1: [1, 2]}, "c2": {2: [3]}}
NAMES = {1: "liver", 2: "spleen"}


def _writers():
  return {
      "flat": lambda r: write_flat(r, CASES, NAMES),
      "kits": lambda r: write_kits(r, {"case_00000": {1: [1]}, "case_00001": {2: [2]}}),
      "lits": lambda r: write_lits(r, {0: {1: [1]}, 1: {2: [2]}}),
      "msd": lambda r: write_msd(r, CASES),
      "totalsegmentator": lambda r: write_totalseg(r, CASES, NAMES),
      "csv": lambda r: write_csv(r, CASES, NAMES),
  }


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_detect_and_read_each_layout(tmp_path, layout):
  root = _writers()[layout](tmp_path / layout)
  assert layouts.detect_layout(root) == layout
  ds = layouts.read_layout(root)
  assert ds.layout == layout and len(ds.cases) == 2
  for case in ds.cases:
    assert case.image.exists()
    assert all(p.exists() for p in case.files())
  expected_vocab = {
      "flat": {"liver", "spleen"}, "csv": {"liver", "spleen"},
      "totalsegmentator": {"liver", "spleen"}, "msd": {"liver", "liver_tumor"},
      "kits": {"kidney", "kidney_tumor", "kidney_cyst"}, "lits": {"liver", "liver_tumor"},
  }[layout]
  assert set(ds.vocabulary().values()) == expected_vocab


def test_case_ids_per_layout(tmp_path):
  w = _writers()
  ids = {name: [c.case_id for c in layouts.read_layout(w[name](tmp_path / name)).cases]
         for name in layouts.LAYOUTS}
  assert ids["flat"] == ids["msd"] == ids["csv"] == ids["totalsegmentator"] == ["c1", "c2"]
  assert ids["kits"] == ["case_00000", "case_00001"]
  assert ids["lits"] == ["volume-0", "volume-1"]


def test_layout_detection_errors(tmp_path):
  with pytest.raises(layouts.LayoutError, match="does not exist"):
    layouts.detect_layout(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(layouts.LayoutError, match="no known raw layout"):
    layouts.detect_layout(tmp_path / "empty")
  both = tmp_path / "both"
  write_flat(both, CASES, NAMES)
  write_kits(both, {"case_00000": {1: [1]}})
  with pytest.raises(layouts.LayoutError, match=r"ambiguous.*'flat', 'kits'"):
    layouts.detect_layout(both)
  assert layouts.read_layout(both, "kits").layout == "kits"
  with pytest.raises(layouts.LayoutError, match="unknown layout 'nifti'"):
    layouts.read_layout(both, "nifti")


def test_manifest_beside_flat_files_is_an_index(tmp_path):
  root = write_flat(tmp_path, CASES, NAMES)
  with open(root / "manifest.csv", "w") as f:
    f.write("case_id,image,label,num_slices\n")
    for cid in CASES:
      f.write(f"{cid},{cid}_ct.nii.gz,{cid}_seg.nii.gz,6\n")
  assert layouts.detect_layout(root) == "flat"
  forced = layouts.read_layout(root, "csv")
  assert forced.layout == "csv" and [c.case_id for c in forced.cases] == ["c1", "c2"]
  assert forced.cases[0].label_names == {1: "liver", 2: "spleen"}


def test_csv_per_row_label_map_and_manifest_file(tmp_path):
  root = write_csv(tmp_path, CASES, NAMES, per_row_map=True)
  ds = layouts.read_layout(root / "cases.csv")  # a manifest path works as manual_dir too
  assert ds.layout == "csv"
  assert [dict(c.label_names) for c in ds.cases] == [{1: "liver", 2: "spleen"}] * 2


def test_csv_without_label_map_is_an_error(tmp_path):
  root = write_csv(tmp_path, CASES, NAMES)
  (root / "labels.json").unlink()
  with pytest.raises(layouts.LayoutError, match=r"cases.csv: line 2 \(case 'c1'\).*labels.json"):
    layouts.read_layout(root)


@pytest.mark.parametrize("task,labels,expected", [
    ("Liver", {"0": "background", "1": "liver", "2": "cancer"}, {1: "liver", 2: "liver_tumor"}),
    ("Lung", {"0": "background", "1": "cancer"}, {1: "lung_tumor"}),
    ("Pancreas", {"0": "background", "1": "pancreas", "2": "cancer"},
     {1: "pancreas", 2: "pancreas_tumor"}),
    ("HepaticVessel", {"0": "background", "1": "Vessel", "2": "Tumour"},
     {1: "hepatic_vessel", 2: "liver_tumor"}),
    ("Spleen", {"0": "background", "1": "spleen"}, {1: "spleen"}),
    ("Task10_Colon", {"0": "background", "1": "colon cancer primaries"}, {1: "colon_tumor"}),
    ("Kidney", {"0": "background", "1": "Kidney", "2": "Tumor"},
     {1: "kidney", 2: "kidney_tumor"}),
])
def test_msd_label_names(task, labels, expected):
  assert layouts.msd_label_names({"name": task, "labels": labels}) == expected


def test_lits_batch_subfolders(tmp_path):
  write_lits(tmp_path / "Training Batch 1", {0: {1: [1]}, 1: {2: [2]}})
  write_lits(tmp_path / "Training Batch 2", {2: {1: [3]}})
  ds = layouts.read_layout(tmp_path)
  assert ds.layout == "lits"
  assert [c.case_id for c in ds.cases] == ["volume-0", "volume-1", "volume-2"]
  assert ds.cases[2].label == tmp_path / "Training Batch 2" / "segmentation-2.nii"
  write_lits(tmp_path / "copy", {1: {1: [1]}})
  with pytest.raises(layouts.LayoutError, match="duplicate case id 'volume-1'"):
    layouts.read_layout(tmp_path)


def test_kits_unlabelled_cases_are_listed_not_read(tmp_path):
  root = write_kits(tmp_path, {"case_00000": {1: [1]}}, unlabelled=["case_00210"])
  ds = layouts.read_layout(root)
  assert [c.case_id for c in ds.cases] == ["case_00000"]
  assert ds.unlabelled == ["case_00210"]


def test_label_map_formats(tmp_path):
  (tmp_path / "a.json").write_text('{"0": "background", "1": "Liver", "2": "spleen"}')
  (tmp_path / "b.json").write_text('{"liver": 1, "spleen": 2}')
  (tmp_path / "c.json").write_text('[1, 2]')
  assert layouts.read_label_map(tmp_path / "a.json") == {1: "liver", 2: "spleen"}
  assert layouts.read_label_map(tmp_path / "b.json") == {1: "liver", 2: "spleen"}
  with pytest.raises(layouts.LayoutError, match="c.json: expected a JSON object"):
    layouts.read_label_map(tmp_path / "c.json")


@pytest.mark.parametrize("top", [40, 1 << 21])  # lookup table, and isin above its size limit
def test_organ_label_map_matches_isin_with_later_organs_winning(top):
  rng = np.random.default_rng(1)
  arr = rng.integers(0, 40, size=(20, 20, 5)).astype(np.int64)
  arr[0, 0, 0] = top
  ids = [[1, 2, 3], [3, 4], [], [39, 99], [top]]  # 3 in two organs: the later one wins
  expected = np.zeros(arr.shape, np.uint8)
  for k, organ_ids in enumerate(ids, start=1):
    if organ_ids:
      expected[np.isin(arr, organ_ids)] = k
  out = volumes.organ_label_map(arr, ids)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  assert (out == 2).any() and (out == 5).sum() == 1
