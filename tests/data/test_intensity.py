"""The HU <-> model-unit intensity map (data/transforms.py IntensityMap, hu_to_unit, unit_to_hu).

The model's map must reach the whole CT range, so bone and gas generated inside a context or
shape mask are not capped by a soft-tissue window, and be exactly invertible on that range.
"""

import importlib
import pathlib

import numpy as np
import pytest

from configs import default
from ctdiff_jax.data import transforms
from ctdiff_jax.generation import runner
from ctdiff_jax.ingest import records

CT_RANGE = (-1024.0, 3071.0)
OLD_ABDOMEN_WINDOW = (-250.0, 350.0)  # The soft-tissue window the map replaced.


def _config_map(name: str) -> transforms.IntensityMap:
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  return transforms.ExampleConfig.from_data_config(config.data).intensity


def test_map_is_float64_interp_and_exactly_invertible_on_the_ct_range():
  imap = _config_map("kidneys")
  hu = np.concatenate([np.linspace(-1500.0, 4000.0, 11001), np.asarray(imap.hu)])
  ref = np.interp(hu, imap.hu, imap.unit)  # float64 reference
  x = transforms.hu_to_unit(hu, imap)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, ref, rtol=0, atol=1e-6)
  # float64 in, float64 out: the inverse is exact (to float64 rounding) inside the range.
  back64 = transforms.unit_to_hu(ref, imap)
  assert back64.dtype == np.float64
  np.testing.assert_allclose(back64, np.clip(hu, *CT_RANGE), rtol=0, atol=1e-9)
  # Through float32 units: steepest piece ~13.6k HU per unit x 2^-24 -> < 2e-3 HU.
  np.testing.assert_allclose(transforms.unit_to_hu(x, imap), np.clip(hu, *CT_RANGE),
                             rtol=0, atol=2e-3)
  # The knots land on their units exactly; outside the range, values clip to +-1.
  np.testing.assert_array_equal(transforms.hu_to_unit(np.asarray(imap.hu), imap),
                                np.float32(imap.unit))
  assert transforms.hu_to_unit(-3000.0, imap) == -1.0 and transforms.hu_to_unit(5000, imap) == 1.0


def test_jax_map_matches_numpy():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  imap = _config_map("kidneys")
  hu = np.linspace(-1100.0, 3100.0, 4001)
  x = transforms.hu_to_unit(jnp.asarray(hu), imap)
  np.testing.assert_allclose(np.asarray(x), transforms.hu_to_unit(hu, imap), rtol=0, atol=1e-6)
  u = np.linspace(-1.0, 1.0, 2001)
  np.testing.assert_allclose(np.asarray(transforms.unit_to_hu(jnp.asarray(u), imap)),
                             np.interp(u, imap.unit, imap.hu), rtol=0, atol=5e-3)


def test_model_output_beyond_the_soft_tissue_window_is_representable():
  """A fake model output of +-1 (and the tails) pastes back as bone and gas HU, not clipped."""
  imap = _config_map("kidneys")
  generated = np.array([[-1.0, -0.95, -0.8, 0.0], [0.8, 0.85, 0.95, 1.0]], np.float32)
  source = np.full(generated.shape, 40, np.int16)
  hu = runner.paste_hu(generated, source, np.ones(generated.shape), imap)
  assert hu.dtype == np.int16
  assert hu.max() == 3071 and hu.min() == -1024
  assert (hu > OLD_ABDOMEN_WINDOW[1]).sum() == 3 and (hu < OLD_ABDOMEN_WINDOW[0]).sum() == 2
  # Outside the mask the source HU stays bit for bit.
  mask = np.zeros(generated.shape)
  np.testing.assert_array_equal(runner.paste_hu(generated, source, mask, imap), source)


def test_example_keeps_vertebra_and_gas_inside_the_mask():
  """A slice with bone (700 HU) and gas (-950 HU) keeps them through make_example and back."""
  image = np.full((16, 16, 1), 40, np.int16)
  image[2:6, 2:6] = 700
  image[10:14, 10:14] = -950
  labels = np.zeros((16, 16, 1), np.uint8)
  labels[4:12, 4:12] = 1
  record = {records.IMAGE: image, records.LABELS: labels, records.SLICE_INDEX: 3}
  cfg = transforms.ExampleConfig(mask_mode="bbox", bbox_margin_mm=20.0, spacing_mm=6.0)
  ex = transforms.make_example(record, cfg, np.random.default_rng(0))
  assert ex["mask"][2:6, 2:6].all() and ex["mask"][10:14, 10:14].all()
  assert -1.0 < ex["image"].min() < -0.8 and 0.8 < ex["image"].max() < 1.0
  back = np.rint(transforms.unit_to_hu(ex["image"], cfg.intensity)).astype(np.int16)
  np.testing.assert_array_equal(back, image)


CONFIGS = sorted(p.stem for p in pathlib.Path(default.__file__).parent.glob("*.py")
                 if p.stem not in ("__init__", "default"))
# The CT configs (MR/PET knots act on normalised values: tests/data/test_intensity_modality.py).
CT_CONFIGS = [n for n in CONFIGS
              if importlib.import_module(f"configs.{n}").get_config("smoke").modality == "ct"]


@pytest.mark.parametrize("name", CT_CONFIGS)
def test_config_maps_cover_the_ct_range_and_keep_soft_tissue_resolution(name):
  imap = _config_map(name)
  assert (imap.hu[0], imap.hu[-1]) == CT_RANGE and (imap.unit[0], imap.unit[-1]) == (-1, 1)
  if name != "lungs":
    # Soft tissue keeps >= 80% of the old window's units per HU.
    lo, hi = OLD_ABDOMEN_WINDOW
    slope = np.diff(transforms.hu_to_unit(np.array([lo, hi]), imap))[0] / (hi - lo)
    assert slope >= 0.8 * 2.0 / (hi - lo)


def test_default_map_is_the_abdominal_map():
  data = default.get_config().data
  assert tuple(data.intensity_hu) == transforms.DEFAULT_INTENSITY_HU
  assert tuple(data.intensity_unit) == transforms.DEFAULT_INTENSITY_UNIT


@pytest.mark.parametrize("hu, unit, match", [
    ((0.0,), (-1.0,), "2 knots"),
    ((0.0, 1.0, 2.0), (-1.0, 1.0), "as many"),
    ((0.0, 0.0), (-1.0, 1.0), "increase"),
    ((0.0, 1.0, 2.0), (-1.0, 0.5, 0.2), "increase"),
    ((0.0, 1.0), (-0.5, 1.0), "from -1 to 1"),
])
def test_bad_knots_are_refused(hu, unit, match):
  with pytest.raises(ValueError, match=match):
    transforms.IntensityMap(hu, unit)
  with pytest.raises(ValueError, match=match):
    transforms.ExampleConfig(intensity_hu=hu, intensity_unit=unit)
