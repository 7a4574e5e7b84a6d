"""FID statistics in float64: mean/covariance, streaming accumulation, Frechet distance, bootstrap.

numpy/scipy only (no jax), so evaluation scripts can compare saved statistics cheaply.
Every FID is reported together with the image counts it came from (FIDResult).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings

import numpy as np
import scipy.linalg


@dataclasses.dataclass(frozen=True)
class FIDResult:
  """An FID value with the number of images per set and an optional bootstrap spread."""
  fid: float
  n1: int
  n2: int
  std: float | None = None
  n_bootstrap: int | None = None
  ci: tuple[float, float] | None = None  # 2.5 / 97.5 percentiles of the bootstrap FIDs
  paired: bool | None = None  # whether the bootstrap resampled both sets with one index

  def __str__(self) -> str:
    spread = ""
    if self.std is not None:
      kind = "paired " if self.paired else ""
      spread = f" +- {self.std:.3f} ({kind}bootstrap x{self.n_bootstrap})"
    return f"FID {self.fid:.3f}{spread} [n1={self.n1}, n2={self.n2}]"


def _check_features(features: np.ndarray, what: str = "features") -> np.ndarray:
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"{what}: need a [N >= 2, D] array, got shape {f.shape}")
  if not np.isfinite(f).all():
    raise ValueError(f"{what}: contains NaN or inf")
  return f


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (ddof=1), both float64."""
  f = _check_features(features)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), as in the TTUR / pytorch-fid code.

  If sqrtm is not finite (singular product), eps * I is added to both covariances; tiny
  imaginary parts from rounding are dropped, large ones raise.
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  d = mu1.shape[0]
  if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, "
                     f"sigma2 {s2.shape}")
  diff = mu1 - mu2
  with warnings.catch_warnings():
    # scipy warns about singular products; the finiteness check below handles them.
    warnings.simplefilter("ignore", RuntimeWarning)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
      offset = np.eye(d) * eps
      covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm has a large imaginary component "
                       f"{np.max(np.abs(covmean.imag)):.3g}: covariances are not PSD")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


class FeatureStats:
  """Streaming float64 mean/covariance (Chan et al. pairwise merge of batch moments).

  Holds only n, the mean [D] and the centred sum of outer products [D, D], so sets of
  any size can be accumulated batch by batch.
  """

  def __init__(self, dim: int | None = None):
    self.n = 0
    self.dim = dim
    self._mean = None if dim is None else np.zeros(dim)
    self._m2 = None if dim is None else np.zeros((dim, dim))

  def update(self, features: np.ndarray) -> "FeatureStats":
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or (self.dim is not None and f.shape[1] != self.dim):
      raise ValueError(f"expected features [N, {self.dim or 'D'}], got {f.shape}")
    if not np.isfinite(f).all():
      raise ValueError("features contain NaN or inf")
    nb = f.shape[0]
    if nb == 0:
      return self
    if self.dim is None:
      self.dim = f.shape[1]
      self._mean, self._m2 = np.zeros(self.dim), np.zeros((self.dim, self.dim))
    mean_b = f.mean(axis=0)
    centred = f - mean_b
    self._merge(nb, mean_b, centred.T @ centred)
    return self

  def _merge(self, nb: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
    n = self.n + nb
    delta = mean_b - self._mean
    self._m2 += m2_b + np.outer(delta, delta) * (self.n * nb / n)
    self._mean += delta * (nb / n)
    self.n = n

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds another accumulator's samples (e.g. from another host or shard)."""
    if other.n == 0:
      return self
    if self.dim is not None and other.dim != self.dim:
      raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
    if self.dim is None:
      self.dim, self._mean, self._m2 = other.dim, np.zeros(other.dim), np.zeros((other.dim,) * 2)
    self._merge(other.n, other._mean, other._m2)
    return self

  @property
  def mean(self) -> np.ndarray:
    self._require(1)
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    self._require(2)
    return self._m2 / (self.n - 1)

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    return self.mean, self.cov

  def _require(self, k: int) -> None:
    if self.n < k:
      raise ValueError(f"need at least {k} samples, have {self.n}")

  def save(self, path: str | os.PathLike) -> None:
    np.savez(path, n=self.n, mu=self.mean, sigma=self.cov)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FeatureStats":
    path = pathlib.Path(path)
    try:
      with np.load(path) as z:
        n, mu, sigma = int(z["n"]), z["mu"], z["sigma"]
    except (OSError, KeyError, ValueError) as e:
      raise ValueError(f"{path}: not a FeatureStats file (needs n, mu, sigma): {e}") from e
    out = cls(mu.shape[0])
    out.n, out._mean, out._m2 = n, mu.astype(np.float64), sigma.astype(np.float64) * (n - 1)
    return out


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
  """FID of two feature sets, exact, without scipy's D x D sqrtm (frechet_distance's value).

  tr sqrtm(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2. With A the
  centred features, those are the squared singular values of M = A1 A2^T / sqrt((n1-1)(n2-1))
  (n1 x n2), so the trace is M's nuclear norm: cheap when a set is smaller than D, as on test
  splits (scipy's Schur sqrtm of a singular 2048 x 2048 product takes minutes on a CPU).
  Larger sets use eigh of S1^1/2 S2 S1^1/2 (symmetric PSD, D x D) instead.
  """
  f1 = np.asarray(feats1, np.float64)
  f2 = np.asarray(feats2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
    raise ValueError(f"need features [N >= 2, D] of one D, got {f1.shape} and {f2.shape}")
  if not (np.isfinite(f1).all() and np.isfinite(f2).all()):
    raise ValueError("features contain NaN or inf")
  (n1, d), n2 = f1.shape, len(f2)
  mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
  a1, a2 = f1 - mu1, f2 - mu2
  tr1, tr2 = (a1 * a1).sum() / (n1 - 1), (a2 * a2).sum() / (n2 - 1)
  if min(n1, n2) <= d:
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
  else:
    s1, s2 = a1.T @ a1 / (n1 - 1), a2.T @ a2 / (n2 - 1)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + tr1 + tr2 - 2.0 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> FIDResult:
  return FIDResult(frechet_distance(a.mean, a.cov, b.mean, b.cov), a.n, b.n)


def bootstrap_indices(n1: int, n2: int, n: int, rng: np.random.Generator | int | None = 0,
                      paired: bool | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
  """`n` (rows of set 1, rows of set 2) resamples with replacement.

  Paired (the default when n1 == n2): ONE index vector for both sets, so row i of set 1 and
  row i of set 2 (the same slice, real and generated) stay together. Resampling paired sets
  independently adds the between-slice variance twice and inflates FID, its spread most of
  all. For two independent sets of equal size the paired draw is just as valid (it pairs
  rows arbitrarily); sets of different sizes can only be resampled independently.
  """
  if n < 2:
    raise ValueError(f"bootstrap needs n >= 2 resamples, got {n}")
  if paired is None:
    paired = n1 == n2
  if paired and n1 != n2:
    raise ValueError(f"a paired bootstrap needs sets of equal size, got {n1} and {n2}")
  rng = np.random.default_rng(rng)
  out = []
  for _ in range(n):
    i1 = rng.integers(0, n1, n1)
    out.append((i1, i1 if paired else rng.integers(0, n2, n2)))
  return out


def bootstrap_values(feats1: np.ndarray, feats2: np.ndarray, n: int = 10,
                     rng: np.random.Generator | int | None = 0,
                     paired: bool | None = None) -> np.ndarray:
  """FID of each of `n` resamples (see bootstrap_indices)."""
  f1, f2 = _check_features(feats1, "feats1"), _check_features(feats2, "feats2")
  return np.array([frechet_distance_features(f1[i1], f2[i2])
                   for i1, i2 in bootstrap_indices(len(f1), len(f2), n, rng, paired)])


def fid_bootstrap(feats1: np.ndarray, feats2: np.ndarray, n: int = 10,
                  rng: np.random.Generator | int | None = 0,
                  paired: bool | None = None) -> tuple[float, float]:
  """Mean and std (ddof=1) of FID over `n` resamples (paired when the sizes are equal)."""
  vals = bootstrap_values(feats1, feats2, n, rng, paired)
  return float(np.mean(vals)), float(np.std(vals, ddof=1))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray, bootstrap: int = 0,
                      rng: np.random.Generator | int | None = 0,
                      paired: bool | None = None) -> FIDResult:
  """FID of two feature sets; with bootstrap > 1 also its bootstrap std and 95% interval.

  paired: resample one index vector for both sets (rows are the same items); None: paired
  when the sets have equal size (see bootstrap_indices).
  """
  f1, f2 = _check_features(feats1, "feats1"), _check_features(feats2, "feats2")
  fid = frechet_distance_features(f1, f2)
  if bootstrap > 1:
    if paired is None:
      paired = len(f1) == len(f2)
    vals = bootstrap_values(f1, f2, bootstrap, rng, paired)
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return FIDResult(fid, len(f1), len(f2), float(np.std(vals, ddof=1)), bootstrap,
                     (float(lo), float(hi)), paired)
  return FIDResult(fid, len(f1), len(f2))
