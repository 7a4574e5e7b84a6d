"""Modalities at ingest: per-case intensity reference and scale, MR layouts, names, refusals."""

import json

import nibabel as nib
import numpy as np
import pytest

from ctdiff_jax.ingest import layouts
from ctdiff_jax.ingest import modality
from ctdiff_jax.ingest import naming
from ctdiff_jax.ingest import volumes


def _save(path, arr, dtype=np.int16):
  img = nib.Nifti1Image(np.asarray(arr).astype(dtype), np.diag([2.0, 2.0, 3.0, 1.0]))
  img.set_data_dtype(dtype)
  nib.save(img, str(path))


def test_names_carry_the_modality_and_parse_back():
  assert naming.config_name("kidneys", 64, 6.0) == "kidneys_64px_6mm"  # CT names unchanged
  assert naming.config_name("kidneys", 64, 6.0, modality="mr") == "kidneys_64px_6mm_mr"
  assert naming.parse_config_name("kidney_tumor_pet").modality == "pet"
  spec = naming.parse_config_name("liver+liver_tumor_128px_nolesion_mr")
  assert (spec.organs, spec.image_size, spec.lesion, spec.modality) == (
      ("liver", "liver_tumor"), 128, None, "mr")
  with pytest.raises(ValueError, match="modality"):
    naming.slice_spec("kidneys", modality="xray")


def test_mr_reference_is_robust_body_percentiles():
  rng = np.random.default_rng(0)
  vol = rng.uniform(0, 20, (40, 40, 10)).astype(np.float32)  # noisy air around the body
  vol[5:35, 5:35] = rng.uniform(200, 1100, (30, 30, 10))  # the body
  vol[20, 20, 5] = 30000  # one hot voxel: a percentile ignores it, a max would not
  lo, hi = modality.reference(vol, "mr")
  assert 200 <= lo < 210 and 1090 < hi <= 1100  # p0.5 / p99.5 of the body, not of the air
  n = modality.normalise(vol.astype(np.float64), "mr", (lo, hi))
  np.testing.assert_allclose(modality.denormalise(n, "mr", (lo, hi)), vol, rtol=1e-9, atol=1e-9)
  # PET: log(1 + SUV), SUV >= 0 on the way back.
  suv = np.array([0.0, 1.0, 24.0])
  np.testing.assert_allclose(modality.denormalise(modality.normalise(suv, "pet"), "pet"), suv)


def test_value_scale_keeps_integers_and_rescales_floats():
  assert modality.value_scale(np.array([0, 4095], np.uint16)) == 1.0
  assert modality.value_scale(np.array([0.0, 812.0])) == 1.0  # whole floats: as they are
  suv = np.array([0.0, 0.37, 18.25])
  scale = modality.value_scale(suv)
  assert scale == pytest.approx(18.25 / 32000, rel=1e-6)
  back = modality.to_stored(suv, scale).astype(np.float64) * scale
  np.testing.assert_allclose(back, suv, atol=scale / 2 + 1e-9)
  big = np.array([0, 60000], np.uint16)  # uint16 MR above int16: rescaled, not wrapped
  assert modality.to_stored(big, modality.value_scale(big)).max() == 32000


def test_slice_records_of_an_mr_case(tmp_path):
  vol = np.zeros((16, 16, 4), np.float32)
  vol[2:14, 2:14] = np.linspace(50.5, 900.25, 12)[None, :, None]  # not whole: rescaled
  seg = np.zeros((16, 16, 4), np.uint8)
  seg[6:10, 6:10] = 1
  _save(tmp_path / "c_mr.nii.gz", vol, np.float32)
  _save(tmp_path / "c_seg.nii.gz", seg, np.uint8)
  case = volumes.Case("c", tmp_path / "c_mr.nii.gz", tmp_path / "c_seg.nii.gz", {1: "liver"})
  loaded = volumes.load_case(case, ["liver"])
  recs = list(volumes.slice_records(loaded, [1, 2], 16, 2.0, "mr"))
  scale = modality.value_scale(loaded.image)
  assert scale != 1.0
  for r in recs:
    assert r["value_scale"] == np.float32(scale)
    np.testing.assert_allclose(r["intensity_ref"], modality.reference(loaded.image, "mr",
                                                                      loaded.organ_map))
    # Stored int16 * scale = the source values (same grid: no interpolation in-plane).
    src = volumes.resample_slice(loaded.image[:, :, r["slice_index"]], (2.0, 2.0), 16, 2.0,
                                 order=1, cval=0)
    np.testing.assert_allclose(r["image"][..., 0] * scale, src, atol=scale / 2 + 1e-6)
  ct = list(volumes.slice_records(loaded, [1], 16, 2.0))[0]
  assert "value_scale" not in ct and "intensity_ref" not in ct  # CT records unchanged


def test_totalsegmentator_mr_release_and_flat_mr_layouts(tmp_path):
  vol, mask = np.ones((4, 4, 2)), np.zeros((4, 4, 2))
  ts = tmp_path / "ts"
  (ts / "s0001" / "segmentations").mkdir(parents=True)
  _save(ts / "s0001" / "mri.nii.gz", vol)
  for organ in ("kidney_left", "liver"):
    _save(ts / "s0001" / "segmentations" / f"{organ}.nii.gz", mask, np.uint8)
  raw = layouts.read_layout(ts)
  assert raw.layout == "totalsegmentator" and raw.cases[0].image.name == "mri.nii.gz"
  assert set(raw.cases[0].label_names.values()) == {"kidney_left", "liver"}
  layouts.check_modality(raw, "mr")
  with pytest.raises(modality.ModalityError, match=r"'s0001'.*mri.nii.gz.*says MR.*--modality=mr"):
    layouts.check_modality(raw, "ct")
  flat = tmp_path / "flat"
  flat.mkdir()
  (flat / "labels.json").write_text(json.dumps({"1": "liver"}))
  _save(flat / "a_mr.nii.gz", vol)
  _save(flat / "a_seg.nii.gz", mask, np.uint8)
  raw = layouts.read_layout(flat)
  assert raw.layout == "flat" and raw.cases[0].image.name == "a_mr.nii.gz"
  # CSV names no modality in its file names: --modality decides (no refusal either way).
  (flat / "cases.csv").write_text("case_id,image,label\nb,scan.nii.gz,a_seg.nii.gz\n")
  raw = layouts.read_layout(flat / "cases.csv", "csv")
  layouts.check_modality(raw, "ct")
  layouts.check_modality(raw, "mr")
