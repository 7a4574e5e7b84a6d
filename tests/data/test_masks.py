"""Mask geometry: organ/bbox/shape/mixed modes and tumour placement (data/masks.py)."""

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
