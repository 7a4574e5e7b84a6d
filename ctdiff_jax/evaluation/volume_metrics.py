"""Are generated volumes coherent in 3D? 2.5D FID per plane and the inter-slice difference.

For volumes on the model grid ((Z, S, S) HU, with the 3D mask that was regenerated), per arm
(e.g. independent slices, 2.5D) against the real volumes (the same cases):

  2.5D FID    (as in MAISI) FID over the planes of the generated region's bounding box
              (grown by MARGIN voxels): axial (z) slices, coronal (row) planes and sagittal
              (column) planes, each plane direction separately; every plane image is windowed
              and resized to 299 px like Table 1's slices (evaluation/fid). Independently
              generated slices look right axially but jump from slice to slice: that shows
              in the coronal and sagittal planes.
  inter-slice mean |HU(z+1) - HU(z)| over the in-plane pixels in the mask on slice z or
              z+1, pooled over the volumes (the real volumes' value is the target).

`compare` computes both for every arm; `markdown` / `write` give volume_metrics.{md,json}.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
# Voxels (z, rows, cols) added around the mask's bounding box for the plane images.
MARGIN = (1, 4, 4)
# Paired bootstrap resamples of the arm-vs-arm differences (n x n SVDs: cheap at these N).
DELTA_BOOTSTRAP = 200


def bounding_box(mask: np.ndarray, margin: Sequence[int] = MARGIN) -> tuple[slice, ...]:
  """Slices of the (Z, S, S) mask's bounding box grown by `margin`, clipped to the volume."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    raise ValueError("empty mask: no generated region to measure")
  out = []
  for axis, m in enumerate(margin):
    idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    out.append(slice(max(int(idx[0]) - m, 0), min(int(idx[-1]) + m, mask.shape[axis] - 1) + 1))
  return tuple(out)


def plane_images(volume: np.ndarray, box: tuple[slice, ...]) -> dict[str, list[np.ndarray]]:
  """The axial (rows x cols), coronal (z x cols) and sagittal (z x rows) planes of a crop;
  z runs superior-up in the coronal and sagittal images."""
  crop = np.asarray(volume)[box]
  return {"axial": [crop[z] for z in range(crop.shape[0])],
          "coronal": [crop[::-1, r, :] for r in range(crop.shape[1])],
          "sagittal": [crop[::-1, :, c] for c in range(crop.shape[2])]}


def interslice_pairs(volume: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per adjacent slice pair (z, z+1): (sum of |HU(z+1) - HU(z)| over the pixels in the mask
  on z or z+1, number of such pixels); pairs without such pixels are left out."""
  v, m = np.asarray(volume, np.float64), np.asarray(mask, bool)
  pair = m[1:] | m[:-1]
  sums = (np.abs(v[1:] - v[:-1]) * pair).sum(axis=(1, 2))
  counts = pair.sum(axis=(1, 2))
  keep = counts > 0
  return sums[keep], counts[keep]


def interslice_difference(volume: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
  """(sum of |HU(z+1) - HU(z)| over pixels in the mask on z or z+1, number of such pixels)."""
  sums, counts = interslice_pairs(volume, mask)
  return float(sums.sum()), int(counts.sum())


def _summary(delta: float, values: np.ndarray, n: int) -> dict[str, Any]:
  lo, hi = np.percentile(values, [2.5, 97.5])
  return {"delta": float(delta), "std": float(np.std(values, ddof=1)),
          "ci95": [float(lo), float(hi)], "closer_fraction": float(np.mean(values > 0)),
          "n": int(n), "resamples": len(values)}


def paired_comparison(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      feats: Mapping[str, Mapping[str, np.ndarray]] | None,
                      names: tuple[str, str], resamples: int = DELTA_BOOTSTRAP,
                      seed: int = 0) -> dict[str, Any]:
  """How much closer to real arm names[1] is than arm names[0], with a paired bootstrap spread.

  pairs[name]: (sums, counts) of interslice_pairs pooled over the volumes of "real" and the
  arms (the same masks: equal counts); feats[name][plane]: their plane features, or None.
  delta > 0: names[1] is closer. inter-slice: |base - real| - |arm - real| of the pooled mean
  |dHU|, resampling slice pairs (one index for real, base and arm: the same pairs). FID per
  plane: FID(real, base) - FID(real, arm), resampling plane images with one index for the
  three sets (the same planes of the same volumes). Returns per measure the point delta, the
  bootstrap std, 95% percentile interval and the fraction of resamples with delta > 0.
  """
  rng = np.random.default_rng(seed)
  sums = [pairs[k][0] for k in ("real", *names)]
  counts = pairs["real"][1]

  def gap(idx):
    r, b, a = (float(s[idx].sum()) / float(counts[idx].sum()) for s in sums)
    return abs(b - r) - abs(a - r)

  n = len(counts)
  out = {"interslice_hu": _summary(gap(np.arange(n)), np.array(
      [gap(rng.integers(0, n, n)) for _ in range(resamples)]), n)}
  if feats is not None:
    from ctdiff_jax.evaluation.fid import stats  # pylint: disable=g-import-not-at-top
    for p in PLANES:
      fr, fb, fa = feats["real"][p], feats[names[0]][p], feats[names[1]][p]

      def fid_gap(idx):
        return (stats.frechet_distance_features(fr[idx], fb[idx]) -
                stats.frechet_distance_features(fr[idx], fa[idx]))

      m = len(fr)
      out[f"fid_{p}"] = _summary(fid_gap(np.arange(m)), np.array(
          [fid_gap(rng.integers(0, m, m)) for _ in range(resamples)]), m)
  return out


def _uint8(images: Sequence[np.ndarray], window) -> np.ndarray:
  from ctdiff_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
  return np.stack([fid.hu_to_uint8_rgb(im, window) for im in images])


def compare(real: Sequence[np.ndarray], arms: Mapping[str, Sequence[np.ndarray]],
            masks: Sequence[np.ndarray], window: Sequence[float], *, fid: bool = True,
            bootstrap: int = 10, batch_size: int = 32,
            features: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
  """Inter-slice difference of real and every arm; with `fid`, FID(real, arm) per plane.

  real / arms[name] / masks: one (Z, S, S) volume per case, the same cases in the same order.
  `features`: uint8 [N, 299, 299, 3] -> [N, 2048] (default: fid.features, the TF FID net,
  `batch_size` images per device).
  """
  window = tuple(float(w) for w in window)
  groups = {"real": list(real), **{k: list(v) for k, v in arms.items()}}
  for name, vols in groups.items():
    if len(vols) != len(masks):
      raise ValueError(f"arm {name!r} has {len(vols)} volumes for {len(masks)} masks")
  boxes = [bounding_box(m) for m in masks]
  result: dict[str, Any] = {"volumes": len(masks), "window": window, "arms": {}}
  pairs = {}
  for name, vols in groups.items():
    per_volume = [interslice_pairs(v, m) for v, m in zip(vols, masks)]
    pairs[name] = tuple(np.concatenate([x[i] for x in per_volume]) for i in (0, 1))
    result["arms"][name] = {"interslice_hu": float(pairs[name][0].sum()) / max(
        int(pairs[name][1].sum()), 1)}
  if not fid:
    _compare_arms(result, pairs, None)
    return result
  if features is None:
    from ctdiff_jax.evaluation import fid as fid_lib  # pylint: disable=g-import-not-at-top
    features = lambda x: fid_lib.features(x, batch_size=batch_size, progress=False)
  from ctdiff_jax.evaluation.fid import stats  # pylint: disable=g-import-not-at-top
  feats = {}
  for name, vols in groups.items():
    imgs = {p: [] for p in PLANES}
    for v, box in zip(vols, boxes):
      for p, ims in plane_images(v, box).items():
        imgs[p].extend(ims)
    feats[name] = {p: features(_uint8(ims, window)) for p, ims in imgs.items()}
  for name in arms:
    for p in PLANES:
      r = stats.fid_from_features(feats["real"][p], feats[name][p], bootstrap=bootstrap)
      result["arms"][name][f"fid_{p}"] = {"fid": r.fid, "std": r.std, "n": r.n1}
  _compare_arms(result, pairs, feats)
  return result


def _compare_arms(result, pairs, feats) -> None:
  """result["comparisons"]["<arm> vs <first arm>"]: paired_comparison of every later arm."""
  names = [n for n in pairs if n != "real"]
  result["comparisons"] = {f"{arm} vs {names[0]}": paired_comparison(pairs, feats,
                                                                      (names[0], arm))
                           for arm in names[1:]}


def markdown(result: Mapping[str, Any]) -> str:
  """volume_metrics.md: one row per arm (real first)."""
  lines = ["# Volume coherence: 2.5D FID per plane and inter-slice difference", "",
           f"{result['volumes']} volumes; planes of the generated region's bounding box (+"
           f"{MARGIN} voxels z/rows/cols), window {result['window']} HU; FID(real, arm) "
           f"+- paired bootstrap std, N images per plane; inter-slice = mean |HU(z+1) - HU(z)| "
           f"inside the mask (closer to real is better).", ""]
  if result.get("reference"):
    lines += [f"real = {result['reference']}.", ""]
  lines += ["| arm | FID axial | FID coronal | FID sagittal | inter-slice HU |",
            "|---|---|---|---|---|"]
  for name, r in result["arms"].items():
    cells = []
    for p in PLANES:
      f = r.get(f"fid_{p}")
      cells.append("-" if f is None else (f"{f['fid']:.2f}" + (
          f" +- {f['std']:.2f}" if f["std"] is not None else "") + f" (N={f['n']})"))
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['interslice_hu']:.1f} |")
  for title, comp in result.get("comparisons", {}).items():
    arm, base = title.split(" vs ")
    lines += ["", f"How much closer to real {arm} is than {base} (delta > 0: {arm} closer; "
              f"FID(real, {base}) - FID(real, {arm}), and |{base} - real| - |{arm} - real| of "
              f"the inter-slice HU), paired bootstrap over the same planes / slice pairs:", "",
              "| measure | delta | std | 95% interval | resamples closer | N |",
              "|---|---|---|---|---|---|"]
    for key, c in comp.items():
      label = key.replace("fid_", "FID ").replace("interslice_hu", "inter-slice HU")
      lines.append(f"| {label} | {c['delta']:+.2f} | {c['std']:.2f} | [{c['ci95'][0]:+.2f}, "
                   f"{c['ci95'][1]:+.2f}] | {c['closer_fraction']:.0%} of {c['resamples']} | "
                   f"{c['n']} |")
  return "\n".join(lines) + "\n"


def write(output_dir: str, result: Mapping[str, Any]) -> dict[str, str]:
  """volume_metrics.{md,json} into output_dir; returns their paths."""
  md, js = (os.path.join(output_dir, f"volume_metrics.{e}") for e in ("md", "json"))
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown(result))
  with open(js, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  return {"metrics_md": md, "metrics_json": js}
