"""Bad raw input for the ct_slices builder: each problem is a clear error naming the case and
file, or (with skip_bad_cases) a logged and counted skip; config-level problems (unknown
organ, duplicate case ids) are errors always. A failed build leaves no dataset behind.
"""

from __future__ import annotations

import gzip
import pathlib
import re

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import naming
from ctdiff_jax.ingest import layouts
from ctdiff_jax.ingest import organs as organs_lib
from ctdiff_jax.ingest import volumes
import test_volumes_layouts as synth

OPTS = {"image_size": 16, "spacing_mm": 4.0}
NAME = naming.config_name("liver", **OPTS)  # liver_16px_4mm
GOOD = {1: [1, 2]}  # the good case: liver on z 1 and 2


def _raw(tmp_path: pathlib.Path, **extra_cases) -> pathlib.Path:
  cases = {"good": GOOD, "bad": GOOD, **extra_cases}
  return synth.write_flat(tmp_path / "raw", cases, {1: "liver", 2: "spleen"})


def _corrupt(root: pathlib.Path):
  (root / "bad_ct.nii.gz").write_bytes(np.random.default_rng(0).bytes(2000))


def _truncated(root: pathlib.Path):
  path = root / "bad_ct.nii.gz"
  hu, _ = synth.make_volume(GOOD)
  noisy = hu + np.random.default_rng(0).integers(0, 300, hu.shape, dtype=np.int16)
  synth.save_nii(path, noisy, synth.ras_affine())  # noise: the gzip stream stays long
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _truncated_las(root: pathlib.Path):
  """Truncated, and stored LAS: reorientation to RAS+ is what first reads the data."""
  hu, lab = synth.make_volume(GOOD)
  noisy = hu + np.random.default_rng(0).integers(0, 300, hu.shape, dtype=np.int16)
  las = synth.ras_affine()
  las[0, 0] = -las[0, 0]
  path = synth.save_nii(root / "bad_ct.nii.gz", noisy, las)
  synth.save_nii(root / "bad_seg.nii.gz", lab, las)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _four_d(root: pathlib.Path):
  hu, _ = synth.make_volume(GOOD)
  synth.save_nii(root / "bad_ct.nii.gz", np.stack([hu, hu], axis=-1), synth.ras_affine())


def _two_d(root: pathlib.Path):
  hu, _ = synth.make_volume(GOOD)
  synth.save_nii(root / "bad_ct.nii.gz", hu[:, :, 1], synth.ras_affine())


def _nan(root: pathlib.Path):
  hu, _ = synth.make_volume(GOOD)
  hu = hu.astype(np.float32)
  hu[3, 4, 2] = np.nan
  hu[5, 6, 0] = np.inf
  synth.save_nii(root / "bad_ct.nii.gz", hu, synth.ras_affine(), dtype=np.float32)


def _shape_mismatch(root: pathlib.Path):
  _, lab = synth.make_volume(GOOD)
  synth.save_nii(root / "bad_seg.nii.gz", lab[:, :, :5], synth.ras_affine())


def _affine_mismatch(root: pathlib.Path):
  _, lab = synth.make_volume(GOOD)
  aff = synth.ras_affine()
  aff[0, 3] += 2.0  # one voxel to the right
  synth.save_nii(root / "bad_seg.nii.gz", lab, aff)


def _missing_label(root: pathlib.Path):
  (root / "bad_seg.nii.gz").unlink()


def _missing_image(root: pathlib.Path):
  (root / "bad_ct.nii.gz").unlink()


def _fractional_labels(root: pathlib.Path):
  _, lab = synth.make_volume(GOOD)
  synth.save_nii(root / "bad_seg.nii.gz", lab.astype(np.float32) * 0.5, synth.ras_affine(),
                 dtype=np.float32)


def _pixdim(pixdim):
  """A bad image whose header spacing is `pixdim`, with neither a qform nor an sform."""

  def make(root: pathlib.Path):
    hu, _ = synth.make_volume(GOOD)
    img = nib.Nifti1Image(hu, None)  # qform_code = sform_code = 0: the affine is pixdim's
    img.header["pixdim"][1:4] = pixdim
    nib.save(img, root / "bad_ct.nii.gz")
    raw = nib.Nifti1Header.from_fileobj(gzip.open(root / "bad_ct.nii.gz"), check=False)
    assert np.array_equal(raw["pixdim"][1:4], pixdim, equal_nan=True)  # as stored
  return make


def _singular_affine(root: pathlib.Path):
  hu, _ = synth.make_volume(GOOD)
  aff = synth.ras_affine()
  aff[:3, 2] = aff[:3, 0]  # z axis along x: a plane, not a volume
  synth.save_nii(root / "bad_ct.nii.gz", hu, aff)


def _zero_axis_sform(root: pathlib.Path):
  _, lab = synth.make_volume(GOOD)
  aff = synth.ras_affine()
  aff[:3, 2] = 0.0  # slices of no thickness
  hdr = nib.Nifti1Header()
  hdr.set_sform(aff, code=2)  # set on the header: nibabel cannot derive a qform from it
  nib.save(nib.Nifti1Image(lab, None, hdr), root / "bad_seg.nii.gz")


_SPACING = r"image has invalid voxel spacing pixdim\[1:4\] = \(%s\) in its header"
# kind -> (make it bad, file named in the error, problem text)
BAD = {
    "corrupt": (_corrupt, "bad_ct.nii.gz", "cannot read image as NIfTI"),
    "truncated": (_truncated, "bad_ct.nii.gz", "cannot read image voxel data, truncated"),
    "truncated_las": (_truncated_las, "bad_ct.nii.gz",
                      "cannot read image voxel data, truncated or corrupt file"),
    "4d": (_four_d, "bad_ct.nii.gz", r"image is 4D with shape \(32, 32, 6, 2\); expected a 3D"),
    "2d": (_two_d, "bad_ct.nii.gz", r"image is 2D with shape \(32, 32\); expected a 3D"),
    "nan_inf": (_nan, "bad_ct.nii.gz", "image contains 2 NaN/Inf voxels"),
    "shape_mismatch": (_shape_mismatch, "bad_seg.nii.gz",
                       r"grid mismatch: label shape \(32, 32, 5\) != image shape \(32, 32, 6\)"),
    "affine_mismatch": (_affine_mismatch, "bad_seg.nii.gz",
                        "grid mismatch: label affine differs .* by up to 2 mm"),
    "missing_label": (_missing_label, "bad_seg.nii.gz", "label file is missing"),
    "missing_image": (_missing_image, "bad_ct.nii.gz", "image file is missing"),
    "fractional_labels": (_fractional_labels, "bad_seg.nii.gz",
                          "label map holds non-integer values"),
    # Never nibabel's silent 1 mm fallback (0 -> 1, -2 -> 2).
    "zero_spacing": (_pixdim([0.0, 0.0, 0.0]), "bad_ct.nii.gz", _SPACING % "0.0, 0.0, 0.0"),
    "zero_z_spacing": (_pixdim([2.0, 2.0, 0.0]), "bad_ct.nii.gz", _SPACING % "2.0, 2.0, 0.0"),
    "negative_spacing": (_pixdim([-2.0, 2.0, 3.0]), "bad_ct.nii.gz",
                         _SPACING % "-2.0, 2.0, 3.0"),
    "nan_spacing": (_pixdim([np.nan, 2.0, 3.0]), "bad_ct.nii.gz", _SPACING % "nan, 2.0, 3.0"),
    "no_affine": (_pixdim([2.0, 2.0, 3.0]), "bad_ct.nii.gz",
                  r"image has no affine \(qform_code and sform_code are both 0\)"),
    "singular_affine": (_singular_affine, "bad_ct.nii.gz",
                        r"image has a singular affine \(voxel axes of length \(2.0, 2.0, 2.0\)"),
    "zero_axis_sform": (_zero_axis_sform, "bad_seg.nii.gz",
                        r"label has a singular affine \(voxel axes of length \(2.0, 2.0, 0.0\)"
                        r".*sform_code 2"),
}


def _no_dataset_left(out: pathlib.Path):
  cfg_dir = out / "ct_slices" / NAME
  left = sorted(p.name for p in cfg_dir.iterdir()) if cfg_dir.exists() else []
  assert left == [], left  # neither a final nor an incomplete.* version folder


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_case_is_a_clear_error(tmp_path, kind):
  make_bad, filename, problem = BAD[kind]
  root = _raw(tmp_path)
  make_bad(root)
  with pytest.raises(volumes.VolumeError, match=f"case 'bad': .*{filename}: {problem}"):
    ingest_build.build("liver", root, tmp_path / "out", **OPTS)
  _no_dataset_left(tmp_path / "out")


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_case_is_skipped_and_counted(tmp_path, kind):
  make_bad, filename, problem = BAD[kind]
  root = _raw(tmp_path, empty={})
  make_bad(root)
  summary = ingest_build.build("liver", root, tmp_path / "out", skip_bad_cases=True, **OPTS)
  assert list(summary["cases_skipped"]) == ["bad"]
  reason = summary["cases_skipped"]["bad"]
  assert filename in reason and re.search(problem, reason), reason
  assert summary["cases_found"] == 3 and summary["cases_read"] == 2
  assert summary["cases_without_organ"] == ["empty"]  # valid, just no liver: not skipped
  assert summary["total_slices"] == 2  # the good case's z 1 and 2
  text = ingest_build.format_summary(summary)
  assert "cases skipped as bad input: 1" in text and "bad: case 'bad'" in text
  meta = naming.read_dataset_metadata(tmp_path / "out", NAME)
  assert meta["build"]["cases_skipped"] == summary["cases_skipped"]
  assert sum(meta["splits"].values()) == 2


def test_truncated_label_file(tmp_path):
  root = _raw(tmp_path)
  path = root / "bad_seg.nii.gz"
  _, lab = synth.make_volume(GOOD)
  noise = np.random.default_rng(1).integers(0, 117, lab.shape, dtype=np.uint8)
  synth.save_nii(path, noise, synth.ras_affine())
  path.write_bytes(path.read_bytes()[:-200])
  with pytest.raises(volumes.VolumeError,
                     match="case 'bad': .*bad_seg.nii.gz: cannot read label voxel data"):
    ingest_build.build("liver", root, tmp_path / "out", **OPTS)


def test_bad_totalsegmentator_mask_names_the_mask(tmp_path):
  root = synth.write_totalseg(tmp_path / "raw", {"good": GOOD, "bad": GOOD},
                              {1: "liver", 2: "spleen"})
  _, lab = synth.make_volume(GOOD)
  synth.save_nii(root / "bad" / "segmentations" / "liver.nii.gz", lab[:20],
                 synth.ras_affine())
  with pytest.raises(volumes.VolumeError, match=r"case 'bad': .*liver.nii.gz: grid mismatch"):
    ingest_build.build("liver", root, tmp_path / "out", **OPTS)
  summary = ingest_build.build("liver", root, tmp_path / "out", skip_bad_cases=True, **OPTS)
  assert list(summary["cases_skipped"]) == ["bad"] and summary["total_slices"] == 2


@pytest.mark.parametrize("skip", [False, True])
def test_unknown_organ_is_always_an_error(tmp_path, skip):
  root = _raw(tmp_path)
  with pytest.raises(organs_lib.UnknownOrganError,
                     match=r"unknown organ 'pancreas'.*raw dataset .*raw, layout flat"):
    ingest_build.build(["liver", "pancreas"], root, tmp_path / "out", skip_bad_cases=skip,
                        **OPTS)
  with pytest.raises(organs_lib.UnknownOrganError, match="unknown organ 'kidney'"):
    ingest_build.build("kidneys", root, tmp_path / "out", skip_bad_cases=skip, **OPTS)
  assert not (tmp_path / "out" / "ct_slices" / "liver+pancreas_16px_4mm" / "1.0.0").exists()


@pytest.mark.parametrize("skip", [False, True])
def test_duplicate_case_ids_are_always_an_error(tmp_path, skip):
  root = _raw(tmp_path)
  hu, _ = synth.make_volume(GOOD)
  synth.save_nii(root / "good_ct.nii", hu, synth.ras_affine())  # also good_ct.nii.gz
  with pytest.raises(layouts.LayoutError,
                     match=r"duplicate case id 'good' in .*raw: .*good_ct.nii and "
                     r".*good_ct.nii.gz: one id per case: rename or remove one of them"):
    ingest_build.build("liver", root, tmp_path / "out", skip_bad_cases=skip, **OPTS)


def test_duplicate_case_ids_in_manifest_and_msd(tmp_path):
  root = synth.write_csv(tmp_path / "csv", {"a": GOOD, "b": GOOD}, {1: "liver"})
  with open(root / "cases.csv", "a") as f:
    f.write("a,data/b-img.nii.gz,data/b-lab.nii.gz\n")
  with pytest.raises(layouts.LayoutError, match=r"duplicate case id 'a' in .*cases.csv"):
    ingest_build.build("liver", root, tmp_path / "out", skip_bad_cases=True, **OPTS)
  msd = synth.write_msd(tmp_path / "msd", {"x": GOOD})
  (msd / "dataset.json").write_text(
      (msd / "dataset.json").read_text().replace('"training": [', '"training": [{"image": '
                                                 '"./imagesTr/x.nii.gz", "label": '
                                                 '"./labelsTr/x.nii.gz"}, '))
  with pytest.raises(layouts.LayoutError, match=r"duplicate case id 'x' in .*dataset.json"):
    layouts.read_layout(msd)


def test_all_cases_bad_or_empty(tmp_path):
  root = synth.write_flat(tmp_path / "raw", {"bad": GOOD, "empty": {}}, {1: "liver"})
  _missing_label(root)
  with pytest.raises(ValueError, match=r"no slices to write: none of the 1 readable cases .*"
                     r"\['liver'\] on a slice \(min_organ_area 0; cases skipped as bad: 1\)"):
    ingest_build.build("liver", root, tmp_path / "out", skip_bad_cases=True, **OPTS)
  _no_dataset_left(tmp_path / "out")


_TODO = ("put the raw CT cases there or point manual_dir at them (--manual_dir=RAW for "
         "`python -m ctdiff_jax.build_dataset` and `tfds build`), in one of the layouts "
         "flat, totalsegmentator, kits, msd, lits, csv (see ctdiff_jax/ingest/layouts.py)")


def test_missing_manual_dir(tmp_path):
  raw = tmp_path / "nope"
  with pytest.raises(FileNotFoundError) as e:
    ingest_build.build("liver", raw, tmp_path / "out", **OPTS)
  assert str(e.value) == f"manual_dir {raw} does not exist: {_TODO}"
  assert not (tmp_path / "out").exists()  # checked before TFDS creates any folder


def test_empty_manual_dir(tmp_path):
  raw = tmp_path / "empty"
  raw.mkdir()
  with pytest.raises(ValueError) as e:
    ingest_build.build("liver", raw, tmp_path / "out", **OPTS)
  assert str(e.value) == f"manual_dir {raw} is empty: {_TODO}"
  assert not (tmp_path / "out").exists()


def test_default_manual_dir_of_plain_tfds_use(tmp_path):
  # Without manual_dir TFDS reads <data_dir>/downloads/manual: named, nothing written.
  from ctdiff_jax.ingest import builder as ctb  # pylint: disable=g-import-not-at-top
  b = ctb.Builder(config=NAME, data_dir=str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError) as e:
    b.download_and_prepare()
  assert str(e.value) == (f"manual_dir {tmp_path / 'out' / 'downloads' / 'manual'} does not "
                          f"exist: {_TODO}")
  assert not (tmp_path / "out").exists()


def test_unreadable_layout_files(tmp_path):
  root = _raw(tmp_path)
  (root / "labels.json").write_text("{not json")
  with pytest.raises(layouts.LayoutError, match=r"labels.json: cannot read label map JSON"):
    ingest_build.build("liver", root, tmp_path / "out", **OPTS)
  msd = tmp_path / "msd"
  msd.mkdir()
  (msd / "dataset.json").write_text('{"name": "Liver", "labels": {"1": "liver"}}')
  with pytest.raises(layouts.LayoutError, match="not a readable MSD dataset.json"):
    ingest_build.build("liver", msd, tmp_path / "out", **OPTS)


def test_gzip_error_is_not_swallowed_for_good_files(tmp_path):
  # Control for the corrupt/truncated cases: the untouched files of _raw() build fine.
  root = _raw(tmp_path)
  with gzip.open(root / "good_ct.nii.gz") as f:
    assert len(f.read()) > 352
  assert nib.load(root / "bad_ct.nii.gz").shape == (32, 32, 6)
  summary = ingest_build.build("liver", root, tmp_path / "out", **OPTS)
  assert summary["total_slices"] == 4 and summary["cases_skipped"] == {}
  assert tfds.data_source(f"ct_slices/{NAME}", data_dir=str(tmp_path / "out"))


def test_files_changed_between_scan_and_write(tmp_path, monkeypatch):
  root = _raw(tmp_path)
  calls = []
  select = volumes.select_slices

  def changing(organ_map, *args):
    calls.append(1)
    kept, n = select(organ_map, *args)
    return (kept + [5] if len(calls) > 2 else kept), n  # the write pass sees other slices

  monkeypatch.setattr(volumes, "select_slices", changing)
  with pytest.raises(volumes.VolumeError, match=r"case '(good|bad)': .*_ct.nii.gz, .*_seg.nii.gz: "
                     "files changed during the build"):
    ingest_build.build("liver", root, tmp_path / "out", **OPTS)
  _no_dataset_left(tmp_path / "out")
