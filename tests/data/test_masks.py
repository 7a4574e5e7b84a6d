"""Mask geometry: organ/bbox/shape/lesion/mixed modes and tumour placement (data/masks.py)."""

import numpy as np
import pytest

from ctdiff_jax.data import masks


def _labels(h=32, w=32):
  """Two organs: id 1 at rows 10..19 x cols 8..13, id 2 at rows 12..17 x cols 20..24."""
  lab = np.zeros((h, w), np.uint8)
  lab[10:20, 8:14] = 1
  lab[12:18, 20:25] = 2
  return lab


def _disk(shape, center, radius):
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2


def test_organ_mask_is_label_union_and_subset():
  lab = _labels()
  rng = np.random.default_rng(0)
  m = masks.make_mask(lab, "organ", rng)
  assert m.dtype == np.float32 and m.shape == lab.shape
  np.testing.assert_array_equal(m, (lab > 0).astype(np.float32))
  only2 = masks.make_mask(lab[..., None], "organ", rng, label_ids=(2,))
  np.testing.assert_array_equal(only2, (lab == 2).astype(np.float32))
  assert only2.sum() == 6 * 5


@pytest.mark.parametrize("spacing,d", [((1.0, 1.0), 3.0), ((0.5, 1.0), 2.0), ((1.5, 1.5), 4.0)])
def test_dilation_matches_brute_force_mm_distance(spacing, d):
  lab = np.zeros((31, 31), np.uint8)
  lab[15, 15] = 1
  got = masks.organ_mask(lab, dilation_mm=d, spacing_mm=spacing)
  # Reference: every pixel whose centre is within d mm of the seed pixel (float64 loop).
  ref = np.zeros_like(got)
  for i in range(31):
    for j in range(31):
      ref[i, j] = ((i - 15) * spacing[0]) ** 2 + ((j - 15) * spacing[1]) ** 2 <= d ** 2 + 1e-9
  np.testing.assert_array_equal(got, ref)
  if spacing == (1.0, 1.0):
    assert got.sum() == 29  # lattice points in a radius-3 disk
  # A rectangle grows by exactly d / spacing pixels along each axis.
  lab2 = _labels()
  grown = masks.organ_mask(lab2, label_ids=(1,), dilation_mm=d, spacing_mm=spacing)
  rows, cols = np.flatnonzero(grown.any(1)), np.flatnonzero(grown.any(0))
  kr, kc = int(d / spacing[0]), int(d / spacing[1])
  assert (rows[0], rows[-1], cols[0], cols[-1]) == (10 - kr, 19 + kr, 8 - kc, 13 + kc)
  assert np.all(grown[lab2 == 1])


@pytest.mark.parametrize(
    "margin,spacing,extent",
    [
        (5.0, (0.5, 1.25), (0, 29, 4, 28)),  # 10 rows, 4 cols of margin
        (7.0, (0.5, 1.0), (0, 31, 1, 31)),  # clipped at the top and bottom
        (3.0, (2.0, 2.0), (8, 21, 6, 26)),  # 1.5 px rounds up to 2
        (0.0, (1.0, 1.0), (10, 19, 8, 24)),
    ])
def test_bbox_mask_extents(margin, spacing, extent):
  lab = _labels()
  m = masks.make_mask(lab, "bbox", np.random.default_rng(0), bbox_margin_mm=margin,
                      spacing_mm=spacing).astype(bool)
  r0, r1, c0, c1 = extent
  ref = np.zeros_like(m)
  ref[r0:r1 + 1, c0:c1 + 1] = True
  np.testing.assert_array_equal(m, ref)
  assert np.all(m[lab > 0])


def test_organ_free_slice_falls_back_to_shape():
  lab = _labels()
  for mode, ids in (("organ", ()), ("bbox", ()), ("organ", (3,))):
    src = np.zeros_like(lab) if not ids else lab
    m, used = masks.make_mask(src, mode, np.random.default_rng(1), label_ids=ids,
                              shape_area=(0.1, 0.2), return_mode=True)
    assert used == "shape"
    assert 0.1 <= m.mean() <= 0.2


@pytest.mark.parametrize("kinds", [("ellipse",), ("polygon",), ("brush",), masks.SHAPE_KINDS])
@pytest.mark.parametrize("area", [(0.05, 0.3), (0.2, 0.22)])
def test_shape_mask_area_bounds_and_determinism(kinds, area):
  fracs = []
  for seed in range(15):
    m = masks.shape_mask((40, 48), np.random.default_rng(seed), area, kinds)
    assert m.shape == (40, 48) and m.dtype == bool
    fracs.append(m.mean())
    assert area[0] <= m.mean() <= area[1], (seed, m.mean())
    np.testing.assert_array_equal(m, masks.shape_mask((40, 48), np.random.default_rng(seed),
                                                      area, kinds))
  # Different seeds give different masks.
  assert len({round(f, 6) for f in fracs}) > 5


def test_shape_mask_rejects_bad_config():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="area"):
    masks.shape_mask((16, 16), rng, (0.3, 0.1))
  with pytest.raises(ValueError, match="kind"):
    masks.shape_mask((16, 16), rng, kinds=("star",))
  with pytest.raises(ValueError, match="mask mode"):
    masks.make_mask(_labels(), "blob", rng)


def test_mixed_picks_modes_per_weights():
  lab = _labels(24, 24)
  weights = (0.6, 0.3, 0.1)
  rng = np.random.default_rng(123)
  organ = (lab > 0).astype(np.float32)
  bbox = masks.bbox_mask(lab, margin_mm=2.0).astype(np.float32)
  counts = {"organ": 0, "bbox": 0, "shape": 0}
  n = 600
  for _ in range(n):
    m, used = masks.make_mask(lab, "mixed", rng, mixed_weights=weights, bbox_margin_mm=2.0,
                              return_mode=True)
    counts[used] += 1
    if used == "organ":
      np.testing.assert_array_equal(m, organ)
    elif used == "bbox":
      np.testing.assert_array_equal(m, bbox)
  for mode, w in zip(masks.MIXED_MODES, weights):
    sd = np.sqrt(n * w * (1 - w))
    assert abs(counts[mode] - n * w) < 4 * sd, counts
  # A zero weight is never picked.
  for _ in range(50):
    assert masks.resolve_mode("mixed", rng, (1.0, 0.0, 1.0)) != "bbox"


def _kidney_with_tumour():
  """Kidney (1) rows 8..23 x cols 6..17 with a tumour (2) at rows 10..12 x cols 6..8 (its edge)."""
  lab = np.zeros((32, 32), np.uint8)
  lab[8:24, 6:18] = 1
  lab[10:13, 6:9] = 2
  return lab


def test_lesion_mode_is_dilated_lesion_clipped_to_organs():
  lab = _kidney_with_tumour()
  rng = np.random.default_rng(0)
  m, used = masks.make_mask(lab, "lesion", rng, lesion_label_id=2, return_mode=True)
  assert used == "lesion"
  np.testing.assert_array_equal(m, (lab == 2).astype(np.float32))
  # 1 px at 2 mm spacing = the 4-neighbours, cut where they leave the labelled organs (col 5).
  grown = masks.make_mask(lab, "lesion", rng, lesion_label_id=2, lesion_dilation_mm=2.0,
                          spacing_mm=(2.0, 2.0))
  ref = np.zeros((32, 32), bool)
  ref[9:14, 6:9] = True
  ref[10:13, 6:10] = True
  np.testing.assert_array_equal(grown > 0, ref)
  # The lesion id is the dataset's, not "organs > 0": kidney pixels alone are never the mask.
  assert grown[lab == 1].sum() == ref.sum() - 9
  with pytest.raises(ValueError, match="lesion label id"):
    masks.make_mask(lab, "lesion", rng)


def test_lesion_free_slice_falls_back_to_organ_mask():
  lab = _kidney_with_tumour()
  lab[lab == 2] = 1
  rng = np.random.default_rng(0)
  m, used = masks.make_mask(lab, "lesion", rng, lesion_label_id=2, return_mode=True)
  assert used == "organ"
  np.testing.assert_array_equal(m, (lab > 0).astype(np.float32))
  m, used = masks.make_mask(np.zeros((32, 32), np.uint8), "lesion", rng, lesion_label_id=2,
                            return_mode=True)
  assert used == "shape" and m.sum() > 0


def test_mixed_with_lesion_weight():
  lab = _kidney_with_tumour()
  rng = np.random.default_rng(5)
  counts = {mode: 0 for mode in masks.MIXED_MODES}
  n = 400
  for _ in range(n):
    m, used = masks.make_mask(lab, "mixed", rng, mixed_weights=(1.0, 0.0, 0.0, 3.0),
                              lesion_label_id=2, return_mode=True)
    counts[used] += 1
    if used == "lesion":
      np.testing.assert_array_equal(m, (lab == 2).astype(np.float32))
  assert counts["bbox"] == counts["shape"] == 0
  assert abs(counts["lesion"] - 0.75 * n) < 4 * np.sqrt(n * 0.75 * 0.25), counts
  # Three weights = a zero lesion weight, with the same draws as before lesion existed.
  a, b = np.random.default_rng(9), np.random.default_rng(9)
  for _ in range(100):
    assert masks.resolve_mode("mixed", a, (1.0, 2.0, 3.0)) == masks.resolve_mode(
        "mixed", b, (1.0, 2.0, 3.0, 0.0)) != "lesion"
  with pytest.raises(ValueError, match="3 or 4"):
    masks.resolve_mode("mixed", a, (1.0, 1.0))


def test_valid_offsets_match_brute_force():
  host = _disk((16, 16), (8, 7), 5)
  tumor = np.zeros((16, 16), bool)
  tumor[2:5, 3:5] = True
  tumor[5, 3] = True
  got = {tuple(o) for o in masks.valid_offsets(tumor, host)}
  ref = set()
  for dy in range(-16, 17):
    for dx in range(-16, 17):
      try:
        shifted = masks.shift_mask(tumor, (dy, dx), host.shape)
      except ValueError:
        continue
      if np.all(host[shifted]):
        ref.add((dy, dx))
  assert ref and got == ref


def test_place_mask_inside_host_and_deterministic():
  host = _disk((48, 48), (24, 20), 12)
  tumor = _disk((48, 48), (5, 5), 3)
  placed = masks.place_mask(tumor, host, rng=np.random.default_rng(7))
  assert placed.shape == host.shape and placed.sum() == tumor.sum()
  assert masks.fits_inside(placed, host)
  # A pure translation of the tumour.
  crop = lambda m: m[np.ix_(m.any(1), m.any(0))]  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_array_equal(crop(placed), crop(tumor))
  np.testing.assert_array_equal(placed, masks.place_mask(tumor, host,
                                                         rng=np.random.default_rng(7)))
  # A small stamp array works the same way.
  stamp = _disk((7, 7), (3, 3), 3)
  assert masks.fits_inside(masks.place_mask(stamp, host, rng=np.random.default_rng(0)), host)
  # Explicit offsets: one that fits, one that does not.
  ok = masks.place_mask(tumor, host, offset=(19, 15))
  np.testing.assert_array_equal(ok, _disk((48, 48), (24, 20), 3))
  with pytest.raises(ValueError, match="cannot fit"):
    masks.place_mask(tumor, host, offset=(0, 0))
  assert not masks.fits_inside(tumor, host)


def test_place_mask_raises_when_it_cannot_fit():
  host = _disk((32, 32), (16, 16), 4)
  with pytest.raises(ValueError, match="cannot fit"):
    masks.place_mask(_disk((32, 32), (10, 10), 6), host, rng=np.random.default_rng(0))
  # Same area budget but the wrong shape: a 1 x 12 line cannot fit in a radius-4 disk.
  line = np.zeros((32, 32), bool)
  line[3, 2:14] = True
  with pytest.raises(ValueError, match="cannot fit"):
    masks.place_mask(line, host, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="empty"):
    masks.place_mask(np.zeros((32, 32), bool), host, rng=np.random.default_rng(0))
