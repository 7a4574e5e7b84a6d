"""NIfTI CT volumes -> 2D slice records: load, validate, reorient, select slices, resample.

The pure-numpy half of the `ct_slices` TFDS builder (no TFDS or TensorFlow here), so the
processing of one case can be used and tested on its own:

  loaded = load_case(case, organs)            # canonical RAS+ arrays + organ label map
  kept = select_slices(loaded.organ_map, ...)  # decided on the SOURCE grid
  for record in slice_records(loaded, kept, image_size, spacing_mm): ...

Conventions of a written slice (see ctdiff_jax/ingest/records.py for the schema):
- volumes are reoriented to the closest canonical RAS+ orientation (nib.as_closest_canonical),
  so z runs inferior -> superior and `slice_index` is z on that grid;
- a slice is shown in the radiological convention: row 0 is anterior, column 0 is the
  patient's right (a 2D array `img[row, col]` = canonical `vol[X-1-col, Y-1-row, z]`);
- in-plane resampling to `spacing_mm` keeps the centre of the field of view at the centre of
  the `image_size` x `image_size` output (centre crop / pad in one step); outside the source
  field of view HU are padded with -1024 and labels with 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np

from ctdiff_jax.ingest import modality as modality_lib
from ctdiff_jax.ingest import organs as organs_lib
from ctdiff_jax.ingest import records

PAD_HU = -1024
# Image and label grids must agree to this (mm, on every affine entry).
AFFINE_ATOL_MM = 1e-3
ORIENTATION = "RAS+ canonical; rows anterior->posterior, columns patient right->left"


class VolumeError(ValueError):
  """A case whose files cannot be turned into slices (names the case, the file and why)."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One raw case: a CT image and its labels, as found by ctdiff_jax.ingest.layouts.

  Labels are either one label-map file (`label`, ids described by `label_names`) or, for the
  TotalSegmentator layout, one binary mask file per label name (`masks`).
  """

  case_id: str
  image: pathlib.Path
  label: pathlib.Path | None = None
  label_names: Mapping[int, str] = dataclasses.field(default_factory=dict)
  masks: Mapping[str, pathlib.Path] | None = None

  def files(self) -> list[pathlib.Path]:
    out = [self.image]
    if self.label is not None:
      out.append(self.label)
    out.extend((self.masks or {}).values())
    return out


@dataclasses.dataclass
class LoadedCase:
  """A case on its canonical source grid."""

  case_id: str
  image: np.ndarray  # (X, Y, Z), HU, int or float as stored (after NIfTI scaling)
  organ_map: np.ndarray  # (X, Y, Z) uint8, 0 background, 1..K the selected organs
  spacing: tuple[float, float, float]  # mm along x, y, z of the canonical grid
  affine: np.ndarray


def _fail(case_id: str, path: pathlib.Path | str, problem: str) -> VolumeError:
  return VolumeError(f"case {case_id!r}: {path}: {problem}")


def load_canonical(path: pathlib.Path, case_id: str, what: str) -> nib.Nifti1Image:
  """Opens a 3D NIfTI volume and reorients it to the closest canonical RAS+ orientation.

  Trailing singleton dimensions (x, y, z, 1) are dropped; anything else that is not 3D is an
  error. Data stays lazy until read.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise _fail(case_id, path, f"{what} file is missing")
  try:
    img = nib.load(str(path))
  except Exception as e:  # nibabel raises several types for unreadable files
    raise _fail(case_id, path, f"cannot read {what} as NIfTI ({type(e).__name__}: {e})") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise _fail(case_id, path, f"{what} is a {type(img).__name__}, expected NIfTI")
  pixdim = raw_pixdim(img)  # before squeeze_image, which makes an image without a file
  if len(img.shape) > 3:
    img = nib.funcs.squeeze_image(img)
  if len(img.shape) != 3:
    raise _fail(case_id, path,
                f"{what} is {len(img.shape)}D with shape {tuple(img.shape)}; expected a 3D volume")
  if min(img.shape) < 1:
    raise _fail(case_id, path, f"{what} is empty (shape {tuple(img.shape)})")
  check_geometry(img, pixdim, path, case_id, what)
  try:  # reorienting a non-canonical volume reads its voxel data
    return nib.as_closest_canonical(img)
  except Exception as e:
    raise _fail(case_id, path,
                f"cannot read {what} voxel data, truncated or corrupt file? "
                f"(while reorienting to RAS+: {type(e).__name__}: {e})") from e


def raw_pixdim(img: nib.Nifti1Image) -> np.ndarray:
  """pixdim[1:4] as stored: nibabel's load silently turns 0 into 1 and negatives into abs."""
  holder = img.file_map["header" if "header" in img.file_map else "image"]
  with holder.get_prepare_fileobj(mode="rb") as f:
    raw = type(img.header).from_fileobj(f, check=False)
  return np.asarray(raw["pixdim"][1:4], np.float64)


def check_geometry(img: nib.Nifti1Image, pixdim: np.ndarray, path: pathlib.Path, case_id: str,
                   what: str) -> None:
  """Refuses voxel spacings / affines that would need a guess (VolumeError naming the file).

  A zero, negative or non-finite header pixdim[1:4] is refused even where nibabel would
  default it to 1 mm; so is a missing affine (neither qform nor sform set: nibabel would make
  one up from pixdim) and an affine that is not finite, has a zero-length axis or is singular:
  every later mm and the left/right of the view are derived from it.
  """
  todo = "fix the header (voxel size in mm) with the tool that wrote it; no spacing is guessed"
  if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
    raise _fail(case_id, path, f"{what} has invalid voxel spacing pixdim[1:4] = "
                f"{tuple(float(v) for v in pixdim)} in its header (zero, negative or not "
                f"finite): {todo}")
  hdr = img.header
  if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
    raise _fail(case_id, path, f"{what} has no affine (qform_code and sform_code are both 0): "
                "its orientation and position are unknown, not guessed; set the qform or sform "
                "with the tool that wrote it")
  affine = np.asarray(img.affine, np.float64)
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  codes = f"qform_code {int(hdr['qform_code'])}, sform_code {int(hdr['sform_code'])}"
  if not np.isfinite(affine).all():
    raise _fail(case_id, path, f"{what} has a non-finite affine ({codes}): {todo}")
  det = abs(float(np.linalg.det(affine[:3, :3])))
  if spacing.min() <= 1e-6 or det <= 1e-6 * float(np.prod(spacing)):
    raise _fail(case_id, path, f"{what} has a singular affine (voxel axes of length "
                f"{tuple(round(float(v), 6) for v in spacing)} mm, |det| {det:.3g}; {codes}): "
                f"{todo}")


def read_array(img: nib.Nifti1Image, path: pathlib.Path, case_id: str, what: str) -> np.ndarray:
  """Reads the voxel data; truncated / corrupt compressed data becomes a VolumeError."""
  try:
    return np.asanyarray(img.dataobj)
  except Exception as e:  # EOFError, zlib.error, OSError, ValueError ...
    raise _fail(case_id, path,
                f"cannot read {what} voxel data, truncated or corrupt file? "
                f"({type(e).__name__}: {e})") from e


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size (mm) along each array axis of an affine."""
  return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def check_same_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, path: pathlib.Path,
                    ref_path: pathlib.Path, case_id: str) -> None:
  """Raises VolumeError unless `img` (a label) lies on the grid of `ref` (the image)."""
  if tuple(img.shape) != tuple(ref.shape):
    raise _fail(case_id, path,
                f"grid mismatch: label shape {tuple(img.shape)} != image shape "
                f"{tuple(ref.shape)} of {ref_path} (after reorientation to RAS+)")
  if not np.allclose(img.affine, ref.affine, rtol=0, atol=AFFINE_ATOL_MM):
    diff = float(np.abs(np.asarray(img.affine) - np.asarray(ref.affine)).max())
    raise _fail(case_id, path,
                f"grid mismatch: label affine differs from the affine of {ref_path} by up to "
                f"{diff:.4g} mm (tolerance {AFFINE_ATOL_MM} mm)\nlabel affine:\n{img.affine}\n"
                f"image affine:\n{ref.affine}")


def _as_label_ids(arr: np.ndarray, path: pathlib.Path, case_id: str) -> np.ndarray:
  """Label voxels as non-negative integers (float label maps must hold whole numbers)."""
  if arr.dtype.kind == "f":
    if not np.isfinite(arr).all():
      raise _fail(case_id, path, "label map contains NaN/Inf")
    rounded = np.rint(arr)
    if np.abs(arr - rounded).max(initial=0.0) > 1e-3:
      raise _fail(case_id, path, "label map holds non-integer values")
    arr = rounded.astype(np.int64)
  elif arr.dtype.kind not in "iub":
    raise _fail(case_id, path, f"label map has unsupported dtype {arr.dtype}")
  if arr.size and arr.min() < 0:
    raise _fail(case_id, path, f"label map holds negative ids (min {arr.min()})")
  return arr


def organ_ids_for_case(organs: Sequence[str], label_names: Mapping[int, str]) -> list[list[int]]:
  """Like organs.resolve_label_ids, but an organ this case lacks gets [] instead of an error.

  (Whether an organ exists at all is checked once per dataset, on the union vocabulary.)
  """
  by_name: dict[str, list[int]] = {}
  for i, n in label_names.items():
    by_name.setdefault(str(n).lower(), []).append(int(i))
  return [sorted(i for n in organs_lib.source_names(o) for i in by_name.get(n, []))
          for o in organs]


def organ_label_map(label_ids: np.ndarray, ids: Sequence[Sequence[int]]) -> np.ndarray:
  """uint8 map: k where label_ids is one of ids[k-1] (later organs overwrite earlier ones)."""
  top = int(label_ids.max(initial=0))
  if top < (1 << 20):  # one lookup instead of one isin pass per organ
    lut = np.zeros(top + 1, np.uint8)
    for k, organ_ids in enumerate(ids, start=1):
      lut[[i for i in organ_ids if i <= top]] = k
    return lut[label_ids]
  out = np.zeros(label_ids.shape, np.uint8)
  for k, organ_ids in enumerate(ids, start=1):
    if organ_ids:
      out[np.isin(label_ids, organ_ids)] = k
  return out


def load_case(case: Case, organs: Sequence[str]) -> LoadedCase:
  """Loads one case on its canonical grid with an organ label map of `organs` (ids 1..K).

  Raises VolumeError for unreadable / non-3D files, zero / negative / non-finite voxel spacing,
  a missing or singular affine, NaN or Inf in the image, label grids that differ from the image grid
  and malformed label maps.
  """
  img = load_canonical(case.image, case.case_id, "image")
  if case.label is None and case.masks is None:
    raise _fail(case.case_id, case.image, "no label file for this image")
  ids = organ_ids_for_case(organs, case.label_names)
  # Validate the label file (grid, readability) before the big image read.
  organ_map = np.zeros(img.shape, np.uint8)
  if case.label is not None:
    lab = load_canonical(case.label, case.case_id, "label")
    check_same_grid(lab, img, case.label, case.image, case.case_id)
    arr = _as_label_ids(read_array(lab, case.label, case.case_id, "label"), case.label,
                        case.case_id)
    organ_map = organ_label_map(arr, ids)
    del arr
  else:
    id_to_name = {int(i): str(n) for i, n in case.label_names.items()}
    for k, organ_ids in enumerate(ids, start=1):
      for i in organ_ids:
        path = case.masks[id_to_name[i]]
        lab = load_canonical(path, case.case_id, "label mask")
        check_same_grid(lab, img, path, case.image, case.case_id)
        arr = _as_label_ids(read_array(lab, path, case.case_id, "label mask"), path,
                            case.case_id)
        organ_map[arr > 0] = k
  image = read_array(img, case.image, case.case_id, "image")
  if image.dtype.kind == "f":
    bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    if bad:
      raise _fail(case.case_id, case.image, f"image contains {bad} NaN/Inf voxels")
  elif image.dtype.kind not in "iu":
    raise _fail(case.case_id, case.image, f"image has unsupported dtype {image.dtype}")
  return LoadedCase(case_id=case.case_id, image=image, organ_map=organ_map,
                    spacing=voxel_spacing(img.affine), affine=np.asarray(img.affine))


def case_seed(case_id: str) -> int:
  """A stable 64-bit seed derived from the case id (same on every machine and run)."""
  return int(hashlib.sha1(case_id.encode("utf-8")).hexdigest()[:16], 16)


def select_slices(organ_map: np.ndarray, min_organ_area: int = 0,
                  empty_slice_fraction: float = 0.0, case_id: str = "") -> tuple[list[int], int]:
  """Slices to keep: organ area on the SOURCE grid > min_organ_area, plus empty extras.

  Returns (sorted kept z indices, number of organ slices). With empty_slice_fraction f > 0,
  round(f * n_organ_free) organ-free slices (area 0) are added, drawn without replacement by
  an RNG seeded from the case id (deterministic). Slices with 0 < area <= min_organ_area are
  neither organ nor organ-free slices and are never kept.
  """
  area = np.count_nonzero(organ_map, axis=(0, 1))
  organ_z = np.flatnonzero(area > min_organ_area)
  kept = set(int(z) for z in organ_z)
  if empty_slice_fraction > 0:
    empty_z = np.flatnonzero(area == 0)
    n = int(round(empty_slice_fraction * len(empty_z)))
    if n:
      rng = np.random.default_rng(case_seed(case_id))
      kept.update(int(z) for z in rng.choice(empty_z, size=n, replace=False))
  return sorted(kept), int(len(organ_z))


@dataclasses.dataclass(frozen=True)
class SliceGrid:
  """The in-plane sampling of one source grid: output column c reads source x = xs[c], row r
  reads source y = ys[r] (the grid is axis-aligned, so bilinear sampling is separable).

  Output pixel (r, c) sits at (c - (S-1)/2, r - (S-1)/2) * spacing_mm from the FOV centre,
  with columns running towards -x and rows towards -y (radiological view of RAS+). `inside`
  (rows, cols) marks the pixels within the source field of view (half a voxel past the edge
  centres, as map_coordinates' "nearest" mode reads them).
  """

  xs: np.ndarray  # (S,) source x (voxel units) of each output column
  ys: np.ndarray  # (S,) source y of each output row
  inside: np.ndarray  # (S, S) bool


def _sample_grid(shape_xy: tuple[int, int], spacing_xy: tuple[float, float], image_size: int,
                 spacing_mm: float) -> SliceGrid:
  s = image_size
  offs = (np.arange(s, dtype=np.float64) - (s - 1) / 2) * spacing_mm
  nx, ny = shape_xy
  xs = (nx - 1) / 2 - offs / spacing_xy[0]  # per column
  ys = (ny - 1) / 2 - offs / spacing_xy[1]  # per row
  inside = (((ys >= -0.5) & (ys <= ny - 0.5))[:, None]
            & ((xs >= -0.5) & (xs <= nx - 0.5))[None, :])
  return SliceGrid(xs, ys, inside)


def _linear_taps(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Indices (edge-clamped) and weight of the upper tap of linear interpolation at coords."""
  lo = np.floor(coords)
  clamp = lambda i: np.clip(i, 0, n - 1).astype(np.intp)
  return clamp(lo), clamp(lo + 1), coords - lo


def _nearest_tap(coords: np.ndarray, n: int) -> np.ndarray:
  """Nearest index (ties round up, edge-clamped), as map_coordinates(order=0) picks it."""
  return np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.intp)


def resample_slice(slice_xy: np.ndarray, spacing_xy: tuple[float, float], image_size: int,
                   spacing_mm: float, *, order: int, cval: float,
                   grid: SliceGrid | None = None) -> np.ndarray:
  """One canonical (X, Y) slice -> (S, S) image at `spacing_mm`, centred, radiological view.

  order=1 (linear) for HU, order=0 (nearest) for labels: the values of scipy's
  map_coordinates(mode="nearest") at the grid's points, bit for bit on the shared CT (tests/
  ingest/test_volumes_layouts.py compares them), from separable taps (~5x faster). Output dtype = input dtype for
  labels; HU come back as float64 (round with `to_int16`).
  """
  nx, ny = slice_xy.shape
  grid = grid if grid is not None else _sample_grid((nx, ny), spacing_xy, image_size, spacing_mm)
  if order == 0:
    out = slice_xy[_nearest_tap(grid.xs, nx)][:, _nearest_tap(grid.ys, ny)].T.copy()
  elif order == 1:
    x0, x1, wx = _linear_taps(grid.xs, nx)
    y0, y1, wy = _linear_taps(grid.ys, ny)
    src = slice_xy.astype(np.float64, copy=False)
    lo, hi = src[x0] * (1.0 - wx)[:, None], src[x1] * wx[:, None]  # (S cols, Y)
    # scipy's terms in scipy's order (value * wx * wy, corners x0y0, x0y1, x1y0, x1y1): the
    # same float64 sums, so the rounded HU match the resampler before this one bit for bit.
    out = (lo[:, y0] * (1.0 - wy) + lo[:, y1] * wy + hi[:, y0] * (1.0 - wy)
           + hi[:, y1] * wy).T  # (S rows, S cols)
  else:
    raise ValueError(f"order must be 0 or 1, got {order}")
  out[~grid.inside] = cval
  return out


def to_int16(hu: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def slice_records(loaded: LoadedCase, kept: Sequence[int], image_size: int,
                  spacing_mm: float, modality: str = modality_lib.CT) -> Iterator[dict]:
  """Records (records.py schema) for the kept z indices, in increasing z.

  MR / PET: values stored as int16 with the case's value_scale, padded with the modality's
  air value, and every record carries value_scale and the case's intensity reference
  (ctdiff_jax/ingest/modality.py), computed once per case on the source grid.
  """
  nx, ny, nz = loaded.image.shape
  sx, sy, sz = loaded.spacing
  grid = _sample_grid((nx, ny), (sx, sy), image_size, spacing_mm)
  cache: dict[int, np.ndarray] = {}
  extra, scale = {}, 1.0
  if modality != modality_lib.CT:
    scale = modality_lib.value_scale(loaded.image)
    ref = modality_lib.reference(loaded.image, modality, loaded.organ_map)
    extra = {records.VALUE_SCALE: np.float32(scale),
             records.INTENSITY_REF: np.asarray(ref, np.float32)}
  pad = PAD_HU if modality == modality_lib.CT else modality_lib.AIR[modality]

  def hu(z: int) -> np.ndarray:
    z = min(max(z, 0), nz - 1)  # the edge slice repeats at the volume ends
    if z not in cache:
      out = resample_slice(loaded.image[:, :, z], (sx, sy), image_size, spacing_mm, order=1,
                           cval=pad, grid=grid)
      cache[z] = (to_int16(out) if scale == 1.0 else modality_lib.to_stored(out, scale))[..., None]
    return cache[z]

  spacing = np.array([spacing_mm, spacing_mm, sz], np.float32)
  for z in sorted(kept):
    for old in [k for k in cache if k < z - 1]:  # neighbours only: bounded memory
      del cache[old]
    labels = resample_slice(loaded.organ_map[:, :, z], (sx, sy), image_size, spacing_mm,
                            order=0, cval=0, grid=grid)
    yield {
        records.IMAGE: hu(z),
        records.LABELS: labels.astype(np.uint8)[..., None],
        records.PREV_IMAGE: hu(z - 1),
        records.NEXT_IMAGE: hu(z + 1),
        records.CASE_ID: loaded.case_id,
        records.SLICE_INDEX: np.int32(z),
        records.SPACING_MM: spacing,
        **extra,
    }
