"""Writes generated slices as a synthetic dataset: NIfTI, PNG, manifest, Figure 4, TFDS.

Layout of an export (`output_dir`):

  <i>_<case>_<slice>_ct.nii.gz    generated slice, HU int16 (outside the mask: the source HU)
  <i>_<case>_<slice>_seg.nii.gz   its label map, uint8 (the dataset's ids; tumour scenario:
                                  the placed tumour carries the lesion id)
  <i>_<case>_<slice>_mask.nii.gz  the regenerated region, uint8 0/1
  <i>_<case>_<slice>.png          preview of the generated slice (display window)
  volumes/<case>_r<k>_{ct,seg,mask}.nii.gz   (volumes=True) per-case stacks: k-th use of
                                  the case's slices; z gaps between them are filled with
                                  -1024 HU / label 0 / mask 0
  tfds/ct_slices/<config>/1.0.0/  (tfds=True) the same records as the source dataset
                                  (records.tfds_features), array_record, split = source split
  manifest.csv                    one row per slice (MANIFEST_COLUMNS)
  figure4.png                     ground truth | masked input | generated, first rows

NIfTI orientation. Records are stored in the radiological view: img[row, col] with row 0
anterior (rows run anterior -> posterior) and column 0 the patient's right (columns run
right -> left). The exported array is RAS+ canonical: `to_ras(img)` = img[::-1, ::-1].T, so
array axis 0 runs towards the patient's Right, axis 1 towards Anterior, axis 2 Superior, and
the affine is diag(sx, sy, sz) (the record's spacing_mm) plus a translation. A slice file has
shape (W, H, 1) (= (H, W, 1) for the square slices of ct_slices); `nib.aff2axcodes` gives
('R', 'A', 'S') and `from_ras` (or ctdiff_jax.generation.scenarios.load_mask_file) gives back the record
layout. Records carry no source origin, so x/y are centred on the slice centre and
z = slice_index * sz (the slice's position on the canonical source grid).

The TFDS export is named `ct_slices` like the real data, so code that reads real slices reads
these too: set `config.data_dir=<output_dir>/tfds` (and `config.train_split`/`eval_split` to
the source split) or `tfds.data_source('ct_slices/<config>', data_dir=<output_dir>/tfds)`.
Its metadata.json holds the source dataset's metadata plus `synthetic` (scenario, checkpoint,
seed, ...). Records keep their order (record i = manifest row i); case_id and slice_index are
the source slice's, prev/next_image the source slice's neighbours.

Slices stream through an on-disk spool (`.spool/`, numpy memmaps, deleted at the end) when
TFDS or volumes are asked for, so endless exports do not have to fit in memory.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

from ctdiff_jax.ingest import records
from ctdiff_jax import figures
from ctdiff_jax.training import writers
from ctdiff_jax.data import transforms

FORMATS = ("nifti", "png")
PAD_HU = -1024  # fills z gaps in stacked volumes (the builder's padding HU)
FIGURE_ROWS = 8
FIGURE_TILE_PX = 128  # figure tiles are upscaled (nearest) to at least this size
FIGURE_COLUMNS = ("ground truth", "masked input", "generated")
TFDS_VERSION = "1.0.0"
MANIFEST_COLUMNS = (
    "index", "scenario", "source_split", "source_case", "slice_index", "source_index", "round",
    "seed", "checkpoint_step", "checkpoint", "mask_pixels", "lesion_pixels", "donor_case",
    "donor_slice", "offset_dy", "offset_dx", "ct_file", "seg_file", "mask_file", "png_file")


# ---------------------------------------------------------------------------- orientation


def to_ras(img: np.ndarray) -> np.ndarray:
  """Record layout (H, W) [row anterior->posterior, col right->left] -> RAS+ array (W, H)."""
  return np.ascontiguousarray(np.asarray(img)[::-1, ::-1].T)


def from_ras(arr: np.ndarray) -> np.ndarray:
  """Inverse of `to_ras`: RAS+ (W, H) array -> record layout (H, W)."""
  return np.ascontiguousarray(np.asarray(arr).T[::-1, ::-1])


def slice_affine(spacing_mm: Sequence[float], shape_hw: tuple[int, int],
                 slice_index: int) -> np.ndarray:
  """RAS+ affine of a `to_ras` array: diag(sx, sy, sz), centred in-plane, z = index * sz."""
  sx, sy, sz = (float(v) for v in np.asarray(spacing_mm, np.float64).reshape(3))
  h, w = int(shape_hw[0]), int(shape_hw[1])
  affine = np.diag([sx, sy, sz, 1.0])
  affine[:3, 3] = (-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, int(slice_index) * sz)
  return affine


def save_nifti(path: str, slices_hw: np.ndarray, spacing_mm: Sequence[float],
               first_slice_index: int, dtype) -> None:
  """Writes record-layout slices (Z, H, W), z = first_slice_index.., as a RAS+ NIfTI."""
  arr = np.asarray(slices_hw)
  if arr.ndim != 3:
    raise ValueError(f"save_nifti: expected (Z, H, W) slices, got shape {arr.shape}")
  vol = np.stack([to_ras(s) for s in arr], axis=-1).astype(dtype)
  affine = slice_affine(spacing_mm, arr.shape[1:3], first_slice_index)
  img = nib.Nifti1Image(vol, affine)
  img.set_data_dtype(dtype)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units("mm", "sec")
  nib.save(img, path)


# ---------------------------------------------------------------------------- images


def display_unit(hu: np.ndarray, window) -> np.ndarray:
  """HU -> [-1, 1] in the display window (what figures.comparison_grid expects)."""
  return transforms.hu_to_unit(hu, window)


def _label_strip(width: int, columns: Sequence[str], col_w: int, pad: int,
                 height: int = 16) -> np.ndarray:
  strip = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for j, name in enumerate(columns):
    x = pad + j * (col_w + pad)
    tw = draw.textlength(name)
    draw.text((x + max((col_w - tw) / 2, 0), 2), name, fill=(0, 0, 0))
  return np.asarray(strip, np.float32) / 255.0


def figure4(path: str, real_hu: np.ndarray, mask: np.ndarray, generated_hu: np.ndarray,
            window, title_columns: Sequence[str] = FIGURE_COLUMNS) -> str:
  """Poster Figure 4: rows of ground truth | masked input | generated ([N, H, W, 1] HU)."""
  real = display_unit(real_hu, window)
  gen = display_unit(generated_hu, window)
  m = np.asarray(mask, np.float32).reshape(real.shape)
  masked = real * (1.0 - m)  # 0 = mid-grey in the display window, like the model's input
  h = real.shape[1]
  scale = max(1, -(-FIGURE_TILE_PX // h))
  up = lambda x: np.repeat(np.repeat(x, scale, axis=1), scale, axis=2)
  pad = 2
  grid = figures.comparison_grid([up(real), up(masked), up(gen)], masks=up(m), pad=pad)
  header = _label_strip(grid.shape[1], title_columns, h * scale, pad)
  writers.save_png(path, np.concatenate([header, grid], axis=0))
  return path


# ---------------------------------------------------------------------------- files


def safe_name(value: str) -> str:
  """A case id usable in file names."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", value) or "case"


def stem(index: int, case_id: str, slice_index: int) -> str:
  return f"{index:06d}_{safe_name(case_id)}_{int(slice_index):04d}"


class _Spool:
  """Preallocated on-disk arrays of the synthetic records (for TFDS and volumes)."""

  FIELDS = {"image": np.int16, "labels": np.uint8, "mask": np.uint8, "prev": np.int16,
            "next": np.int16}

  def __init__(self, root: str, num: int, h: int, w: int):
    self.root = root
    os.makedirs(root, exist_ok=True)
    self.arrays = {k: np.lib.format.open_memmap(os.path.join(root, f"{k}.npy"), mode="w+",
                                                dtype=dt, shape=(num, h, w, 1))
                   for k, dt in self.FIELDS.items()}
    self.meta: list[dict[str, Any]] = []

  def close(self) -> None:
    for a in self.arrays.values():
      a.flush()
    self.arrays = {}
    shutil.rmtree(self.root, ignore_errors=True)


class Exporter:
  """Streams generated chunks to files; `finish()` writes manifest, figure, volumes, TFDS.

  Args:
    output_dir: where everything goes (created).
    meta: the source dataset's metadata (read_dataset_metadata).
    num_samples: slices that will be added (sizes the spool).
    formats: subset of ('nifti', 'png') for the per-slice files.
    tfds / volumes: also write the TFDS dataset / per-case volumes.
    display_window: HU window of the PNGs and the figure.
    provenance: scenario, source_split, seed, checkpoint, checkpoint_step, ... (manifest,
      TFDS metadata).
  """

  def __init__(self, output_dir: str, meta: Mapping[str, Any], num_samples: int, *,
               formats: Sequence[str] = FORMATS, tfds: bool = False, volumes: bool = False,
               display_window=(-160.0, 240.0), provenance: Mapping[str, Any] | None = None):
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
      raise ValueError(f"unknown export format(s) {unknown}; expected some of {FORMATS}")
    self.output_dir = os.path.abspath(output_dir)
    self.meta = dict(meta)
    self.formats = tuple(formats)
    self.tfds, self.volumes = bool(tfds), bool(volumes)
    self.window = tuple(float(v) for v in display_window)
    self.provenance = dict(provenance or {})
    os.makedirs(self.output_dir, exist_ok=True)
    size = int(meta["image_size"])
    self.spool = (_Spool(os.path.join(self.output_dir, ".spool"), num_samples, size, size)
                  if (tfds or volumes) else None)
    self.rows: list[dict[str, Any]] = []
    self.figure_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self.files = 0

  def _path(self, name: str) -> str:
    return os.path.join(self.output_dir, name)

  def add(self, samples) -> None:
    """Writes one chunk (a generate.Samples) of slices."""
    for j in range(len(samples)):
      i = int(samples.index[j])
      case, z = samples.case_id[j], int(samples.slice_index[j])
      spacing = samples.spacing_mm[j]
      name = stem(i, case, z)
      files = {}
      if "nifti" in self.formats:
        files["ct_file"] = name + "_ct.nii.gz"
        files["seg_file"] = name + "_seg.nii.gz"
        files["mask_file"] = name + "_mask.nii.gz"
        for key, arr, dtype in (("ct_file", samples.generated_hu, np.int16),
                                ("seg_file", samples.labels, np.uint8),
                                ("mask_file", samples.mask, np.uint8)):
          save_nifti(self._path(files[key]), arr[j][None, ..., 0], spacing, z, dtype)
      if "png" in self.formats:
        files["png_file"] = name + ".png"
        preview = (display_unit(samples.generated_hu[j], self.window) + 1.0) / 2.0
        writers.save_png(self._path(files["png_file"]), preview)
      self.files += len(files)
      info = samples.info[j]
      off = info.get("offset", ("", ""))
      self.rows.append({
          "index": i, "scenario": self.provenance.get("scenario", ""),
          "source_split": self.provenance.get("source_split", ""), "source_case": case,
          "slice_index": z, "source_index": int(samples.source_index[j]),
          "round": int(samples.round[j]), "seed": self.provenance.get("seed", ""),
          "checkpoint_step": self.provenance.get("checkpoint_step", ""),
          "checkpoint": self.provenance.get("checkpoint", ""),
          "mask_pixels": int(samples.mask[j].sum()),
          "lesion_pixels": info.get("lesion_pixels", ""),
          "donor_case": info.get("donor_case", ""), "donor_slice": info.get("donor_slice", ""),
          "offset_dy": off[0], "offset_dx": off[1],
          "ct_file": files.get("ct_file", ""), "seg_file": files.get("seg_file", ""),
          "mask_file": files.get("mask_file", ""), "png_file": files.get("png_file", ""),
      })
      if len(self.figure_rows) < FIGURE_ROWS:
        self.figure_rows.append((samples.image_hu[j], samples.mask[j], samples.generated_hu[j]))
      if self.spool is not None:
        k = len(self.spool.meta)
        a = self.spool.arrays
        a["image"][k] = samples.generated_hu[j]
        a["labels"][k] = samples.labels[j]
        a["mask"][k] = samples.mask[j]
        a["prev"][k] = samples.prev_hu[j]
        a["next"][k] = samples.next_hu[j]
        self.spool.meta.append({"case": case, "slice": z, "round": int(samples.round[j]),
                                "spacing": np.asarray(spacing, np.float32)})

  def finish(self) -> dict[str, Any]:
    """Writes manifest, figure, volumes and TFDS; returns what was written where."""
    out: dict[str, Any] = {"output_dir": self.output_dir, "slice_files": self.files}
    manifest = self._path("manifest.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
      writer.writeheader()
      writer.writerows(self.rows)
    out["manifest"] = manifest
    if self.figure_rows:
      real, mask, gen = (np.stack(x) for x in zip(*self.figure_rows))
      out["figure"] = figure4(self._path("figure4.png"), real, mask, gen, self.window)
    try:
      if self.volumes:
        out["volumes"] = self._write_volumes()
      if self.tfds:
        out.update(self._write_tfds())
    finally:
      if self.spool is not None:
        self.spool.close()
    return out

  def _write_volumes(self) -> list[str]:
    root = self._path("volumes")
    os.makedirs(root, exist_ok=True)
    groups: dict[tuple[str, int], list[int]] = {}
    for k, m in enumerate(self.spool.meta):
      groups.setdefault((m["case"], m["round"]), []).append(k)
    a = self.spool.arrays
    written = []
    for (case, rnd), ks in sorted(groups.items()):
      zs = [self.spool.meta[k]["slice"] for k in ks]
      z0, nz = min(zs), max(zs) - min(zs) + 1
      spacing = self.spool.meta[ks[0]]["spacing"]
      h, w = a["image"].shape[1:3]
      vols = {"ct": np.full((nz, h, w), PAD_HU, np.int16), "seg": np.zeros((nz, h, w), np.uint8),
              "mask": np.zeros((nz, h, w), np.uint8)}
      for k, z in zip(ks, zs):
        vols["ct"][z - z0] = a["image"][k, ..., 0]
        vols["seg"][z - z0] = a["labels"][k, ..., 0]
        vols["mask"][z - z0] = a["mask"][k, ..., 0]
      for kind, dtype in (("ct", np.int16), ("seg", np.uint8), ("mask", np.uint8)):
        path = os.path.join(root, f"{safe_name(case)}_r{rnd}_{kind}.nii.gz")
        save_nifti(path, vols[kind], spacing, z0, dtype)
        written.append(path)
    return written

  def _write_tfds(self) -> dict[str, Any]:
    config_name = self.meta.get("config") or self.meta["dataset"].split("/")[-1]
    split = str(self.provenance.get("source_split") or "train")
    data_dir = self._path("tfds")
    spool = self.spool

    def examples():
      a = spool.arrays
      for k, m in enumerate(spool.meta):
        yield f"{k:08d}", {
            records.IMAGE: np.asarray(a["image"][k]),
            records.LABELS: np.asarray(a["labels"][k]),
            records.PREV_IMAGE: np.asarray(a["prev"][k]),
            records.NEXT_IMAGE: np.asarray(a["next"][k]),
            records.CASE_ID: m["case"],
            records.SLICE_INDEX: np.int32(m["slice"]),
            records.SPACING_MM: m["spacing"],
        }

    path = write_tfds(data_dir, config_name, split, examples,
                      {**_jsonable(self.provenance), "num_examples": len(spool.meta)})
    return {"tfds_data_dir": data_dir, "tfds_dir": path, "tfds_name": f"ct_slices/{config_name}",
            "tfds_split": split}


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, (np.integer,)):
      v = int(v)
    elif isinstance(v, (np.floating,)):
      v = float(v)
    elif isinstance(v, tuple):
      v = list(v)
    out[k] = v
  return out


# ---------------------------------------------------------------------------- TFDS


@functools.cache
def _synthetic_builder_class():
  """The ct_slices builder, fed with given records (lazy: TFDS only when exporting)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from ctdiff_jax.ingest import builder as ctb
  # pylint: enable=g-import-not-at-top

  class SyntheticBuilder(ctb.Builder, skip_registration=True):
    """`ct_slices/<config>` with synthetic records (same features and metadata + provenance)."""

    name = "ct_slices"

    def __init__(self, *, split: str, examples, provenance: Mapping[str, Any], **kwargs):
      self._synthetic = (split, examples, dict(provenance))
      super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      cfg = self.builder_config
      meta = dict(ctb.static_metadata(cfg), synthetic=self._synthetic[2])
      return tfds.core.DatasetInfo(
          builder=self,
          description=("Synthetic axial CT slices generated by ctdiff_jax.generate (conditional "
                       "diffusion inpainting); same record schema as ct_slices."),
          features=records.tfds_features(cfg.image_size),
          metadata=tfds.core.MetadataDict(meta),
          disable_shuffling=True,  # record i = manifest row i
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      split, examples, _ = self._synthetic
      return {split: examples()}

  return SyntheticBuilder


def write_tfds(data_dir: str, config_name: str, split: str, examples,
               provenance: Mapping[str, Any]) -> str:
  """Writes `examples()` ((key, record) pairs) as ct_slices/<config_name> (array_record).

  Replaces an earlier export of the same name in `data_dir`; returns the version directory.
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from ctdiff_jax.ingest import builder as ctb
  # pylint: enable=g-import-not-at-top
  target = os.path.join(data_dir, "ct_slices", config_name, TFDS_VERSION)
  if os.path.exists(target):
    shutil.rmtree(target)
  cls = _synthetic_builder_class()
  builder = cls(split=split, examples=examples, provenance=provenance,
                config=ctb.make_config(config_name), data_dir=data_dir,
                file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS),
      file_format="array_record")
  return str(builder.data_dir)
