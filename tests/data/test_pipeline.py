"""Input pipeline: HU windowing, example construction and the Grain loader (data/pipeline.py)."""

import gc
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import default
from ctdiff_jax.ingest import naming
from ctdiff_jax.ingest import records
from ctdiff_jax.data import pipeline, transforms

H = 16


def _record(i: int, size: int = H) -> dict:
  """A synthetic slice record following records.py; organ 1 moves with i, some slices empty."""
  rng = np.random.default_rng(1000 + i)
  lab = np.zeros((size, size, 1), np.uint8)
  if i % 4 != 3:  # every 4th slice is organ-free
    r = 3 + i % 5
    lab[r:r + 5, 4:9] = 1
    lab[r + 1:r + 4, 10:13] = 2
  return {
      records.IMAGE: rng.integers(-1200, 1200, (size, size, 1)).astype(np.int16),
      records.LABELS: lab,
      records.PREV_IMAGE: rng.integers(-1200, 1200, (size, size, 1)).astype(np.int16),
      records.NEXT_IMAGE: rng.integers(-1200, 1200, (size, size, 1)).astype(np.int16),
      records.CASE_ID: f"case_{i // 6}",
      records.SLICE_INDEX: np.int32(i),
      records.SPACING_MM: np.array([1.0, 1.0, 2.5], np.float32),
  }


def _source(n: int = 12) -> pipeline.ListSource:
  return pipeline.ListSource([_record(i) for i in range(n)])


def _cfg(**kw):
  cfg = default.get_config().data
  cfg.image_size = H
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def _take(loader, n):
  it = iter(loader)
  out = [next(it) for _ in range(n)]
  del it
  gc.collect()
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- HU window


def test_hu_window_round_trip_against_float64():
  window = (-160.0, 240.0)
  hu = np.linspace(-400, 500, 1801)
  ref = np.clip((hu - window[0]) / (window[1] - window[0]) * 2.0 - 1.0, -1.0, 1.0)
  x = transforms.hu_to_unit(hu, window)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_allclose(x, ref, rtol=0, atol=1e-6)
  ints = np.arange(-300, 300, dtype=np.int16)
  np.testing.assert_allclose(transforms.hu_to_unit(ints, window),
                             np.clip((ints - window[0]) / 400.0 * 2 - 1, -1, 1), rtol=0, atol=1e-6)
  back = transforms.unit_to_hu(x, window)
  # Inside the window the round trip is exact up to float32 rounding (~400 * 2^-24 HU).
  inside = (hu >= window[0]) & (hu <= window[1])
  np.testing.assert_allclose(back[inside], hu[inside], rtol=0, atol=1e-3)
  np.testing.assert_allclose(back[~inside], np.clip(hu[~inside], *window), rtol=0, atol=1e-3)
  assert transforms.unit_to_hu(np.float64(0.5), window).dtype == np.float64
  np.testing.assert_allclose(transforms.unit_to_hu(np.array([-1.0, 0.0, 1.0]), window),
                             [-160.0, 40.0, 240.0], rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="window"):
    transforms.hu_to_unit(hu, (100.0, 100.0))


def test_hu_window_on_jax_arrays():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  hu = np.array([-1500.0, -1000.0, 0.0, 350.0, 1000.0, 3000.0, 4000.0])
  x = transforms.hu_to_unit(jnp.asarray(hu))  # The default map: the whole CT range.
  assert isinstance(x, type(jnp.zeros(1))) and x.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x), transforms.hu_to_unit(hu), rtol=0, atol=1e-6)
  # float32 over a 4095 HU range: ~1e-3 HU.
  np.testing.assert_allclose(np.asarray(transforms.unit_to_hu(x)), np.clip(hu, -1024, 3071),
                             rtol=0, atol=5e-3)
  x = transforms.hu_to_unit(jnp.asarray(hu), (-1000.0, 1000.0))  # A (lo, hi) window.
  np.testing.assert_allclose(np.asarray(transforms.unit_to_hu(x, (-1000.0, 1000.0))),
                             np.clip(hu, -1000, 1000), rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- examples


@pytest.mark.parametrize("neighbours", [False, True])
def test_make_example_channels(neighbours):
  cfg = transforms.ExampleConfig.from_data_config(
      _cfg(neighbours=neighbours, intensity_hu=(-500.0, 500.0), intensity_unit=(-1.0, 1.0),
           mask_mode="organ"))
  rec = _record(1)
  ex = transforms.make_example(rec, cfg, np.random.default_rng(0))
  c = pipeline.cond_channels(_cfg(neighbours=neighbours))
  assert c == (6 if neighbours else 2)
  assert ex["image"].shape == (H, H, 1) and ex["image"].dtype == np.float32
  assert ex["mask"].shape == (H, H, 1) and ex["mask"].dtype == np.float32
  assert ex["cond"].shape == (H, H, c) and ex["cond"].dtype == np.float32
  assert ex["labels"].dtype == np.uint8 and ex["slice_index"].dtype == np.int32
  assert not any(v.dtype.kind in "SUO" for v in ex.values())
  ref_image = np.clip(rec[records.IMAGE].astype(np.float64) / 500.0, -1, 1)
  np.testing.assert_allclose(ex["image"], ref_image, rtol=0, atol=1e-6)
  mask = ex["mask"][..., 0]
  np.testing.assert_array_equal(mask, (rec[records.LABELS][..., 0] > 0))
  np.testing.assert_array_equal(ex["cond"][..., 1], mask)
  assert np.all(ex["cond"][..., 0][mask == 1] == 0.0)
  np.testing.assert_array_equal(ex["cond"][..., 0][mask == 0], ex["image"][..., 0][mask == 0])
  if neighbours:
    np.testing.assert_allclose(ex["cond"][..., 2:3], transforms.hu_to_unit(
        rec[records.PREV_IMAGE], (-500, 500)), atol=0)
    np.testing.assert_allclose(ex["cond"][..., 3:4], transforms.hu_to_unit(
        rec[records.NEXT_IMAGE], (-500, 500)), atol=0)
    np.testing.assert_array_equal(ex["cond"][..., 4:6], 1.0)  # Both neighbours present.


@pytest.mark.parametrize("missing", [records.PREV_IMAGE, records.NEXT_IMAGE])
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_missing_neighbour_is_zeroed_and_flagged(missing, flip):
  """At a volume end the builder repeats the slice: that must not reach `cond` unmasked."""
  rec = _record(1)
  rec[missing] = rec[records.IMAGE].copy()
  cfg = transforms.ExampleConfig.from_data_config(
      _cfg(neighbours=True, mask_mode="organ", flip_lr_prob=flip, intensity_jitter=0.1))
  mask = (rec[records.LABELS][..., 0] > 0)
  for ex in (transforms.make_example(rec, cfg, np.random.default_rng(0)),
             transforms.example_with_mask(rec, cfg, mask)):
    assert ex["mask"].sum() > 0
    channel = {records.PREV_IMAGE: 2, records.NEXT_IMAGE: 3}
    other = records.NEXT_IMAGE if missing == records.PREV_IMAGE else records.PREV_IMAGE
    np.testing.assert_array_equal(ex["cond"][..., channel[missing]], 0.0)
    np.testing.assert_array_equal(ex["cond"][..., channel[missing] + 2], 0.0)
    np.testing.assert_array_equal(ex["cond"][..., channel[other] + 2], 1.0)
    assert np.abs(ex["cond"][..., channel[other]]).max() > 0
    # Nothing in cond reveals the masked pixels of the slice.
    m = ex["mask"][..., 0] > 0
    for c in range(ex["cond"].shape[-1]):
      if c != 1:
        assert not np.array_equal(ex["cond"][..., c][m], ex["image"][..., 0][m]), c


def test_hidden_neighbours_are_unknown_inside_the_mask():
  """neighbour_hide_prob hides each neighbour inside the slice's mask, independently (the
  2.5D chain's not-yet-generated neighbour); 0 keeps examples and the rng stream as before."""
  rec = _record(1)
  base = dict(neighbours=True, mask_mode="organ", intensity_hu=(-500.0, 500.0),
              intensity_unit=(-1.0, 1.0))
  plain = transforms.make_example(rec, transforms.ExampleConfig.from_data_config(_cfg(**base)),
                                  np.random.default_rng(0))
  zero = transforms.make_example(
      rec, transforms.ExampleConfig.from_data_config(_cfg(neighbour_hide_prob=0.0, **base)),
      np.random.default_rng(0))
  for k in plain:
    np.testing.assert_array_equal(zero[k], plain[k])
  m = plain["mask"][..., 0] > 0
  assert 0 < m.sum() < m.size
  cfg = transforms.ExampleConfig.from_data_config(_cfg(neighbour_hide_prob=0.5, **base))
  seen = set()
  for s in range(40):
    ex = transforms.make_example(rec, cfg, np.random.default_rng(s))
    hid = []
    for c in (2, 3):
      known = ex["cond"][..., c + 2]
      if np.all(known == 1):
        np.testing.assert_array_equal(ex["cond"][..., c], plain["cond"][..., c])
        hid.append(False)
        continue
      np.testing.assert_array_equal(known, ~m)  # hidden exactly inside the slice's mask
      np.testing.assert_array_equal(ex["cond"][..., c][m], 0.0)
      np.testing.assert_array_equal(ex["cond"][..., c][~m], plain["cond"][..., c][~m])
      hid.append(True)
    seen.add(tuple(hid))
  assert seen == {(False, False), (False, True), (True, False), (True, True)}
  # Generation: a given hidden map (here the next neighbour's own mask, other than the slice's).
  other = np.zeros_like(m)
  other[2:6, 2:6] = True
  ex = transforms.example_with_mask(rec, cfg, m, {records.NEXT_IMAGE: other})
  np.testing.assert_array_equal(ex["cond"][..., 4], 1.0)
  np.testing.assert_array_equal(ex["cond"][..., 5], ~other)
  np.testing.assert_array_equal(ex["cond"][..., 3][other], 0.0)
  np.testing.assert_array_equal(ex["cond"][..., 3][~other], plain["cond"][..., 3][~other])
  with pytest.raises(ValueError, match="neighbour_hide_prob must be in"):
    transforms.ExampleConfig(neighbour_hide_prob=1.5)


def test_flip_is_refused_for_sided_labels():
  """A flip does not swap kidney_left/kidney_right: refuse it rather than train wrong labels."""
  sided = {"1": "kidney_left", "2": "kidney_right", "3": "liver"}
  assert transforms.sided_labels(sided) == ["kidney_left", "kidney_right"]
  assert transforms.sided_labels({"1": "Left-Lung", "2": "lung_upper_lobe_right"}) == [
      "Left-Lung", "lung_upper_lobe_right"]
  assert transforms.sided_labels({"1": "kidney", "2": "cleft", "3": "brightness"}) == []
  with pytest.raises(ValueError, match="flip_lr_prob=0.5.*kidney_left, kidney_right"):
    transforms.check_flip(transforms.ExampleConfig(flip_lr_prob=0.5), sided)
  transforms.check_flip(transforms.ExampleConfig(flip_lr_prob=0.0), sided)
  transforms.check_flip(transforms.ExampleConfig(flip_lr_prob=0.5), {"1": "kidney"})


def test_augmentations_keep_image_labels_and_mask_aligned():
  rec = _record(2)
  plain = transforms.make_example(rec, transforms.ExampleConfig(), np.random.default_rng(0))
  flip = transforms.make_example(rec, transforms.ExampleConfig(flip_lr_prob=1.0),
                                 np.random.default_rng(0))
  np.testing.assert_array_equal(flip["image"], plain["image"][:, ::-1])
  np.testing.assert_array_equal(flip["labels"], plain["labels"][:, ::-1])
  np.testing.assert_array_equal(flip["mask"], plain["mask"][:, ::-1])
  cfg = transforms.ExampleConfig(translate_px=3, intensity_jitter=0.1)
  moved = [transforms.make_example(rec, cfg, np.random.default_rng(s)) for s in range(6)]
  assert any(not np.array_equal(m["labels"], plain["labels"]) for m in moved)
  for m in moved:
    # The organ mask follows the translated labels; the organ keeps its pixel count.
    np.testing.assert_array_equal(m["mask"][..., 0], m["labels"][..., 0] > 0)
    assert m["labels"].astype(bool).sum() == plain["labels"].astype(bool).sum()
    assert m["image"].min() >= -1.0 and m["image"].max() <= 1.0


# ----------------------------------------------------------------------------- loader


def test_loader_shapes_dtypes_and_cond():
  cfg = _cfg(neighbours=True, mask_mode="mixed")
  (batch,) = _take(pipeline.create_loader(_source(), cfg, batch_shape=(2, 3), seed=0), 1)
  c = pipeline.cond_channels(cfg)
  expect = {"image": ((2, 3, H, H, 1), np.float32), "mask": ((2, 3, H, H, 1), np.float32),
            "cond": ((2, 3, H, H, c), np.float32), "labels": ((2, 3, H, H, 1), np.uint8),
            "slice_index": ((2, 3), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expect
  mask = batch["mask"][..., 0]
  assert set(np.unique(mask)) <= {0.0, 1.0} and mask.sum() > 0
  np.testing.assert_array_equal(batch["cond"][..., 0], batch["image"][..., 0] * (1 - mask))
  np.testing.assert_array_equal(batch["cond"][..., 1], mask)
  # Each example's labels/image come from the record its slice_index names.
  for idx, lab in zip(batch["slice_index"].reshape(-1), batch["labels"].reshape(-1, H, H, 1)):
    np.testing.assert_array_equal(lab, _record(int(idx))[records.LABELS])


def test_loader_determinism_and_epoch_coverage():
  src, cfg = _source(12), _cfg(mask_mode="shape")
  make = lambda seed, **kw: pipeline.create_loader(  # pylint: disable=unnecessary-lambda-assignment
      src, cfg, batch_shape=(2, 2), seed=seed, **kw)
  a, b, c = _take(make(3), 4), _take(make(3), 4), _take(make(4), 4)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x["slice_index"], y["slice_index"]) for x, y in zip(a, c))
  epoch = list(make(5, num_epochs=1))
  seen = np.concatenate([x["slice_index"].reshape(-1) for x in epoch])
  assert len(epoch) == 3 and sorted(seen.tolist()) == list(range(12))
  assert seen.tolist() != list(range(12))  # shuffled
  ordered = np.concatenate([x["slice_index"].reshape(-1)
                            for x in make(5, num_epochs=1, shuffle=False)])
  assert ordered.tolist() == list(range(12))
  two = list(pipeline.create_loader(src, cfg, batch_shape=(1, 12), seed=5, num_epochs=2,
                                    shuffle=False))
  assert len(two) == 2
  np.testing.assert_array_equal(two[0]["slice_index"], two[1]["slice_index"])
  np.testing.assert_array_equal(two[0]["image"], two[1]["image"])
  assert not np.array_equal(two[0]["mask"], two[1]["mask"])


def test_loader_pads_last_batch_without_drop_remainder():
  loader = pipeline.create_loader(_source(10), _cfg(), batch_shape=(2, 2), seed=0, num_epochs=1,
                                  drop_remainder=False, shuffle=False)
  batches = list(loader)
  assert len(batches) == 3
  assert [float(b["valid"].sum()) for b in batches] == [4.0, 4.0, 2.0]
  assert batches[-1]["valid"].shape == (2, 2)
  assert batches[-1]["slice_index"].reshape(-1)[:2].tolist() == [8, 9]


def test_iterator_state_restore_reproduces_batches():
  loader = pipeline.create_loader(_source(12), _cfg(mask_mode="mixed"), batch_shape=(1, 3),
                                  seed=11)
  it = iter(loader)
  for _ in range(3):  # crosses an epoch boundary (4 batches per epoch)
    next(it)
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  it2 = iter(pipeline.create_loader(_source(12), _cfg(mask_mode="mixed"), batch_shape=(1, 3),
                                    seed=11))
  it2.set_state(state)
  _assert_batches_equal(after, [next(it2) for _ in range(3)])
  assert json.loads(state)["last_seen_indices"]


def test_worker_process_matches_in_process():
  src, cfg = _source(8), _cfg(mask_mode="mixed", neighbours=True)
  ref = _take(pipeline.create_loader(src, cfg, batch_shape=(2, 2), seed=2), 2)
  got = _take(pipeline.create_loader(src, cfg, batch_shape=(2, 2), seed=2, worker_count=1), 2)
  _assert_batches_equal(ref, got)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="empty"):
    pipeline.create_loader(pipeline.ListSource([]), _cfg(), batch_shape=(1, 2), seed=0)
  with pytest.raises(ValueError, match="mask_mode"):
    pipeline.create_loader(_source(4), _cfg(mask_mode="blob"), batch_shape=(1, 2), seed=0)
  bad = dict(_record(0))
  del bad[records.LABELS]
  with pytest.raises(KeyError, match="labels"):
    transforms.make_example(bad, transforms.ExampleConfig(), np.random.default_rng(0))
  with pytest.raises(FileNotFoundError, match="no built dataset"):
    naming.dataset_dir("/nonexistent_dir", "kidneys")


# ----------------------------------------------------------------------------- TFDS on disk

# Runs in a fresh interpreter that cannot import TensorFlow: writes a tiny array_record TFDS
# dataset with the records.py features and reads it back through load_source + create_loader.
_TFDS_SCRIPT = textwrap.dedent("""
    import json, sys

    class _NoTF:  # hide TensorFlow from every import finder
      def __init__(self, f): self._f = f
      def __getattr__(self, k): return getattr(self._f, k)
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'tensorflow':
          return None
        return self._f.find_spec(name, path, target)
    sys.meta_path[:] = [_NoTF(f) for f in sys.meta_path]

    import numpy as np
    import tensorflow_datasets as tfds
    from ctdiff_jax.ingest import records
    from ctdiff_jax.data import pipeline
    from ctdiff_jax.data import sources
    from test_pipeline import _record, H

    class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
      name = 'ct_slices'
      VERSION = tfds.core.Version('1.0.0')
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='tinytest')]
      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=records.tfds_features(H))
      def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(6)}
      def _generate_examples(self, n):
        for i in range(n):
          yield str(i), _record(i)

    data_dir = sys.argv[1]
    Tiny(data_dir=data_dir, file_format='array_record').download_and_prepare()
    src = sources.load_source(data_dir, 'tinytest', 'train')
    by_index = {int(src[i]['slice_index']): src[i] for i in range(len(src))}
    equal = all(np.array_equal(by_index[i][k], _record(i)[k])
                for i in range(6) for k in records.IMAGE_KEYS + (records.LABELS,))
    from configs import default
    cfg = default.get_config().data
    cfg.neighbours = True
    loader = pipeline.create_loader(src, cfg, batch_shape=(2, 3), seed=0, num_epochs=1)
    batches = list(loader)
    print(json.dumps({
        'len': len(src), 'equal': bool(equal), 'num_batches': len(batches),
        'cond_shape': list(batches[0]['cond'].shape),
        'seen': sorted(int(i) for b in batches for i in b['slice_index'].reshape(-1)),
        'tf_loaded': 'tensorflow' in sys.modules}))
""")


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[2]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(repo), str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _TFDS_SCRIPT, str(tmp_path)], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == {"len": 6, "equal": True, "num_batches": 1, "cond_shape": [2, 3, H, H, 6],
                 "seen": list(range(6)), "tf_loaded": False}
  assert (tmp_path / "ct_slices" / "tinytest" / "1.0.0" / "dataset_info.json").exists()
