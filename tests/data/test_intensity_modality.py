"""Per-modality intensities in the model examples (data/transforms.py + ingest/modality.py)."""

import importlib

import numpy as np
import pytest

from configs import default
from ctdiff_jax.data import transforms
from ctdiff_jax.ingest import modality

MR = transforms.ExampleConfig(intensity_hu=default.MR_INTENSITY,
                              intensity_unit=default.MR_INTENSITY_UNIT, modality="mr")


def _mr_record(gain: float, scale: float = 1.0):
  img = (np.linspace(0, 1, 16 * 16).reshape(16, 16, 1) * gain / scale).astype(np.int16)
  labels = np.zeros((16, 16, 1), np.uint8)
  labels[4:12, 4:12] = 1
  return {"image": img, "labels": labels, "case_id": b"c", "slice_index": np.int32(3),
          "spacing_mm": np.float32([2, 2, 3]), "value_scale": np.float32(scale),
          "intensity_ref": np.float32([0.1 * gain, 0.9 * gain])}


def test_mr_units_follow_each_case_percentiles():
  """Two scans of different gain give the same model units; back to each scan's own scale."""
  units = []
  for gain, scale in ((1000.0, 1.0), (30000.0, 2.0)):
    rec = _mr_record(gain, scale)
    ex = transforms.make_example(rec, MR, np.random.default_rng(0))
    units.append(ex["image"])
    # p10 of the ramp -> -1, p90 -> +1 (clipped outside).
    assert ex["image"].min() == -1.0 and ex["image"].max() == 1.0
    scale_, ref = transforms.intensity_params(rec, "mr")
    back = transforms.unit_to_stored(ex["image"], scale_, ref, MR)
    inside = (rec["image"] * scale >= ref[0]) & (rec["image"] * scale <= ref[1])
    np.testing.assert_array_equal(back[inside], rec["image"][inside])  # exact in the range
  np.testing.assert_allclose(units[0], units[1], atol=5e-3)  # int16 quantisation of gain 1000


def test_modality_mismatch_is_refused_per_record():
  ct_record = {k: v for k, v in _mr_record(1000.0).items()
               if k not in ("value_scale", "intensity_ref")}
  with pytest.raises(modality.ModalityError, match=r"case 'c' is CT .* modality is 'mr'"):
    transforms.make_example(ct_record, MR, np.random.default_rng(0))
  with pytest.raises(modality.ModalityError, match=r"case 'c' is MR/PET .* modality is 'ct'"):
    transforms.make_example(_mr_record(1000.0), transforms.ExampleConfig(),
                            np.random.default_rng(0))


def test_mr_translation_shifts_in_air_not_minus_1024():
  cfg = transforms.ExampleConfig(intensity_hu=(-0.2, 1.0), intensity_unit=(-1.0, 1.0),
                                 modality="mr", translate_px=6)
  rec = _mr_record(1000.0)
  rec["image"] = np.full_like(rec["image"], 500)
  body, air = transforms.to_unit(np.array([500, 0], np.int16), rec, cfg)
  assert -1.0 < air < body  # stored 0 is normalised -0.125: inside the knots, not clipped
  seen = set()
  for seed in range(5):
    ex = transforms.make_example(rec, cfg, np.random.default_rng(seed))
    seen |= set(np.unique(ex["image"]).tolist())
  assert seen == {float(air), float(body)}


def test_mr_config_reads_the_mr_dataset_name():
  from ctdiff_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.kidneys_mr").get_config("smoke")
  assert config.data.modality == "mr"
  assert sources.dataset_config_name(config) == "kidneys_64px_6mm_mr"
  config.dataset = "kidneys_mr"  # the suffix may be given too
  assert sources.dataset_config_name(config) == "kidneys_64px_6mm_mr"
  config.dataset = "kidneys_pet"
  with pytest.raises(modality.ModalityError, match="holds PET slices but the config is for MR"):
    sources.dataset_config_name(config)
