"""2.5D volume generation: coherent 3D volumes from the 2D neighbour-conditioned model.

  python -m ctdiff_jax.generate --config=configs/kidney_tumor.py --workdir=runs/kidney_tumor \
      --scenario=tumor --volume_mode=2.5d --output_dir=synthetic/tumor_volumes --num_samples=4

One sample is one whole source VOLUME (a case of `--split`, read from the raw cases the dataset
was built from: `--manual_dir`, else config.manual_dir, else the build's own manual_dir):

1. The case is loaded on its canonical grid (ingest/volumes.py) and every axial slice is
   resampled in-plane exactly as the dataset builder does: the model's grid (S x S pixels at
   config.spacing_mm, z = the source slices).
2. The scenario's mask is 3D on that grid: `organ` the organ voxels (grown in-plane by
   data.dilation_mm), `context` the organs' 3D bounding box + margin_mm (in-plane pixels and
   z slices), `tumor` one connected 3D tumour of another case (its whole 3D lesion component
   on its own grid, resampled in z to the host's slice spacing) placed at a random offset
   where it lies fully inside the host organ in 3D, plus an in-plane `blend_px` rim clipped
   to the host organ.
3. Slices holding mask voxels are generated one step at a time (VolumePlan.order: inward
   from both ends of the mask in z, the default; outward from the slice with the largest mask
   area, both directions at once; interleaved): each slice is conditioned on its neighbours
   as they are at that moment. A generated neighbour is known everywhere; a neighbour not
   generated yet is hidden inside its own slice of the 3D mask (its real content there is
   what the volume replaces: copying it would leak the source) and known outside it. The
   first slices see no generated neighbour. `independent=True` instead generates every slice
   at once, each with both neighbours hidden: stacking independently generated slices (the
   comparison arm). The model is trained with hidden neighbours (data.neighbour_hide_prob).
4. The generated region is resampled back to the SOURCE grid (linear HU, nearest mask) and
   pasted into the source array in its stored orientation: outside the exported mask every
   voxel equals the source, bit for bit; shape, affine and header are the source's.

Output (output_dir): volumes/<case>_r<k>_{ct,seg,mask}.nii.gz (seg: the dataset's label ids,
0 background, 1..K the organs; the placed tumour = the lesion id), previews/<case>_r<k>.png
(axial, coronal, sagittal through the mask centre: source row, generated row with the mask
outline), manifest.csv (one row per volume). Noise of slice z of volume i comes from
(seed, (i * MAX_PASSES + pass) * Z_STRIDE + z) (Inpainter.inpaint), the tumour choice and
placement from np.random.default_rng((seed, i)): the same seed gives the same volumes
whatever the batching.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Sequence

import nibabel as nib
from nibabel import orientations
import numpy as np
from scipy import ndimage
from scipy import signal
from tqdm import auto as tqdm

from ctdiff_jax.data import masks
from ctdiff_jax.data import transforms
from ctdiff_jax.generation import scenarios
from ctdiff_jax.ingest import layouts
from ctdiff_jax.ingest import records
from ctdiff_jax.ingest import volumes

# --volume_mode values ("" = the per-slice export).
VOLUME_MODES = ("2.5d",)
# VolumePlan.order kinds; inward by default: its first slices read the real slices beyond the
# mask, and it measured like outward or better (README, 2.5D).
ORDERS = ("outward", "inward", "interleaved")
DEFAULT_ORDER = "inward"
# Noise index of slice z of volume i in pass p: (i * MAX_PASSES + p) * Z_STRIDE + z (volumes
# have fewer slices than Z_STRIDE).
Z_STRIDE = 4096
MAX_PASSES = 2  # generate_grids: the ordered pass, then optionally one more over every slice
# Donor tumours tried per host volume before it counts as "nothing fits".
MAX_TUMOR_TRIES = 20
# Where the tumour scenario's 3D tumours come from: `donor` one of another case, placed in
# the host organ (new data); `own` one of the host's own lesions, regenerated where it is
# (labels unchanged: the real volume is a reference with a real lesion, for volume metrics).
LESION_SOURCES = ("donor", "own")
# What the "real" arm of volume_metrics is, per (scenario, lesions).
REFERENCES = {
    None: "the source volumes",
    ("tumor", "donor"): ("the tumour-free hosts: a placed tumour has no real counterpart, and "
                         "any lesion moves every measure away from them (--volume_lesions=own "
                         "measures against real lesions)"),
    ("tumor", "own"): "the source volumes, each with the real lesion that was regenerated"}
MANIFEST_COLUMNS = (
    "index", "scenario", "source_case", "source_split", "round", "seed", "checkpoint_step",
    "mode", "order", "lesions", "source_image", "mask_voxels", "slices_generated", "z_first",
    "z_last", "seed_slice", "donor_case", "donor_slices", "tumour_slices", "offset", "ct_file",
    "seg_file", "mask_file", "preview")


class VolumeModeError(ValueError):
  """A volume-mode request that cannot run (the message names the case / file and why)."""


@dataclasses.dataclass
class SourceVolume:
  """A source case: its stored array and header, and the model's grid of it."""

  case_id: str
  image_path: str
  nifti: Any  # the source nib image (stored orientation): affine and header of the output
  stored: np.ndarray  # the source array as stored (X, Y, Z)
  to_canonical: np.ndarray  # nibabel ornt: stored -> canonical RAS+
  organ_map: np.ndarray  # canonical (X, Y, Z) uint8, dataset label ids
  spacing: tuple[float, float, float]  # canonical voxel size (mm)
  grid_hu: np.ndarray  # (Z, S, S) int16: the dataset's slices of every z
  grid_labels: np.ndarray  # (Z, S, S) uint8
  grid_mm: float  # in-plane spacing of the model grid

  @property
  def canonical(self) -> np.ndarray:
    return orientations.apply_orientation(self.stored, self.to_canonical)

  def to_stored(self, canonical: np.ndarray) -> np.ndarray:
    back = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")),
                                       self.to_canonical)
    return np.ascontiguousarray(orientations.apply_orientation(canonical, back))


def load_volume(case: volumes.Case, organs: Sequence[str], image_size: int,
                spacing_mm: float) -> SourceVolume:
  """Loads a raw case (validated like the builder does) with its model-grid slices."""
  loaded = volumes.load_case(case, organs)
  img = nib.load(str(case.image))
  stored = volumes.read_array(img, case.image, case.case_id, "image")
  if stored.ndim > 3:
    stored = stored.reshape(stored.shape[:3])
  ornt = orientations.io_orientation(img.affine)
  nx, ny, nz = loaded.image.shape
  sx, sy, _ = loaded.spacing
  hu = np.empty((nz, image_size, image_size), np.int16)
  lab = np.empty((nz, image_size, image_size), np.uint8)
  for z in range(nz):  # exactly the builder's resampling (volumes.slice_records)
    hu[z] = volumes.to_int16(volumes.resample_slice(
        loaded.image[:, :, z], (sx, sy), image_size, spacing_mm, order=1, cval=volumes.PAD_HU))
    lab[z] = volumes.resample_slice(loaded.organ_map[:, :, z], (sx, sy), image_size,
                                    spacing_mm, order=0, cval=0).astype(np.uint8)
  return SourceVolume(case.case_id, str(case.image), img, np.asarray(stored), ornt,
                      loaded.organ_map, loaded.spacing, hu, lab, float(spacing_mm))


def source_coords(shape_xy: tuple[int, int], spacing_xy: tuple[float, float], image_size: int,
                  spacing_mm: float) -> np.ndarray:
  """(2, X, Y): the model-grid (row, col) of every canonical source voxel (inverse of the
  builder's in-plane resampling, volumes._sample_grid)."""
  nx, ny = shape_xy
  c = (image_size - 1) / 2 + ((nx - 1) / 2 - np.arange(nx)) * spacing_xy[0] / spacing_mm
  r = (image_size - 1) / 2 + ((ny - 1) / 2 - np.arange(ny)) * spacing_xy[1] / spacing_mm
  cc, rr = np.meshgrid(c, r, indexing="ij")  # (X, Y)
  return np.stack([rr, cc])


def to_source(vol: SourceVolume, grid: np.ndarray, *, order: int) -> np.ndarray:
  """A (Z, S, S) model-grid volume on the canonical source grid (X, Y, Z)."""
  nx, ny, nz = vol.organ_map.shape
  coords = source_coords((nx, ny), vol.spacing[:2], grid.shape[1], vol.grid_mm)
  out = np.empty((nx, ny, nz), np.float64 if order else grid.dtype)
  for z in range(nz):
    src = grid[z].astype(np.float64) if order else grid[z]
    out[:, :, z] = ndimage.map_coordinates(src, coords, order=order,
                                           mode="nearest" if order else "constant", cval=0)
  return out


@dataclasses.dataclass
class VolumePlan:
  """One volume to generate: the host, its 3D mask and label map on the model grid."""

  index: int
  round: int
  host: SourceVolume
  mask: np.ndarray  # (Z, S, S) bool
  labels: np.ndarray  # (Z, S, S) uint8, the synthetic label map
  info: dict[str, Any]

  def order(self, kind: str = DEFAULT_ORDER) -> list[list[int]]:
    """Generation steps of the mask slices. outward: [[seed z], [seed+1, seed-1],
    [seed+2, seed-2], ...]; inward: from both ends of the mask in z towards the middle,
    [[first, last], [first+1, last-1], ...] (the end slices read the real slices beyond the
    mask); interleaved: [every other mask slice, the ones between]."""
    area = self.mask.sum(axis=(1, 2))
    zs = np.flatnonzero(area)
    if kind == "interleaved":
      return [s for s in ([int(z) for z in zs[::2]], [int(z) for z in zs[1::2]]) if s]
    if kind == "inward":
      half = (len(zs) + 1) // 2
      return [sorted({int(zs[k]), int(zs[-1 - k])}) for k in range(half)]
    # The largest mask area; among equal ones (a box) the most central: shortest chains.
    ties = zs[area[zs] == area[zs].max()]
    seed = int(ties[np.argmin(np.abs(ties - (zs[0] + zs[-1]) / 2))])
    up, down = [int(z) for z in zs if z > seed], [int(z) for z in zs[::-1] if z < seed]
    steps = [[seed]]
    for k in range(max(len(up), len(down))):
      steps.append(([up[k]] if k < len(up) else []) + ([down[k]] if k < len(down) else []))
    return steps


def organ_mask_3d(labels: np.ndarray, label_ids: Sequence[int], dilation_mm: float,
                  grid_mm: float) -> np.ndarray:
  """(Z, S, S) bool: the organ voxels of `label_ids`, grown in-plane by `dilation_mm`."""
  return np.stack([masks.organ_mask(s, label_ids, dilation_mm, (grid_mm, grid_mm))
                   for s in labels])


def bbox_mask_3d(labels: np.ndarray, label_ids: Sequence[int], margin_mm: float,
                 grid_mm: float, slice_mm: float) -> np.ndarray:
  """(Z, S, S) bool: the organs' 3D bounding box + `margin_mm` (in-plane and in z), clipped."""
  union = np.stack([masks.organ_union(s, label_ids) for s in labels])
  out = np.zeros(union.shape, bool)
  if not union.any():
    return out
  mr, mc = masks.margin_pixels(margin_mm, (grid_mm, grid_mm))
  mz = int(np.ceil(margin_mm / slice_mm - 1e-6))
  lo, hi = [], []
  for axis, m in zip(range(3), (mz, mr, mc)):
    idx = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
    lo.append(max(int(idx[0]) - m, 0))
    hi.append(min(int(idx[-1]) + m, union.shape[axis] - 1) + 1)
  out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
  return out


def tumour_stamps(labels: np.ndarray, lesion_id: int, donor_mm: float,
                  host_mm: float) -> list[np.ndarray]:
  """The 26-connected 3D lesion components of a (Z, S, S) label volume, cropped, each
  resampled in z (nearest) from the donor's slice spacing to the host's."""
  comps, _ = ndimage.label(labels == lesion_id, structure=np.ones((3, 3, 3), bool))
  out = []
  for c, box in enumerate(ndimage.find_objects(comps), start=1):
    if box is None:
      continue
    stamp = comps[box] == c
    n = stamp.shape[0]
    m = max(int(round(n * donor_mm / host_mm)), 1)
    stamp = stamp[np.minimum(((np.arange(m) + 0.5) * n / m).astype(int), n - 1)]
    out.append(stamp)
  return out


def place_3d(stamp: np.ndarray, host: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, tuple[int, int, int]] | None:
  """`stamp` (z, h, w) at a random offset where it lies fully inside `host` (Z, S, S), or None."""
  if any(a > b for a, b in zip(stamp.shape, host.shape)):
    return None
  outside = signal.correlate((~host).astype(np.float32), stamp.astype(np.float32),
                             mode="valid", method="fft")
  valid = np.argwhere(outside < 0.5)
  if not len(valid):
    return None
  off = tuple(int(v) for v in valid[int(rng.integers(len(valid)))])
  placed = np.zeros(host.shape, bool)
  placed[off[0]:off[0] + stamp.shape[0], off[1]:off[1] + stamp.shape[1],
         off[2]:off[2] + stamp.shape[2]] = stamp
  return placed, off


class VolumePlanner:
  """Source volumes of a split -> VolumePlans of one scenario (see the module docstring).

  Args:
    meta: the dataset metadata (organs, lesion_label_id, build: cases per split, manual_dir).
    data_config: the run's config.data (mask labels, dilation, bbox margin).
    spec: the run's scenarios.ScenarioSpec (runner.GenerateSpec).
    cases: case id -> ingest.volumes.Case of the raw cases.
    hosts: the case ids generated (cycled); donors: the case ids tumours come from.
    image_size, spacing_mm: the model grid.
  """

  def __init__(self, meta, data_config, spec, cases: dict[str, volumes.Case],
               hosts: Sequence[str], donors: Sequence[str], image_size: int,
               spacing_mm: float, where: str = "", lesions: str = "donor"):
    if lesions not in LESION_SOURCES:
      raise VolumeModeError(f"unknown lesion source {lesions!r}; expected one of "
                            f"{LESION_SOURCES}")
    if lesions != "donor" and spec.scenario != "tumor":
      raise VolumeModeError(f"lesions={lesions!r} is a tumor-scenario option, not "
                            f"{spec.scenario!r}'s")
    self.lesions = lesions
    self.scenario = scenarios.SCENARIOS[spec.scenario](meta, data_config, spec, where)
    self.spec, self.meta, self.cases = spec, meta, cases
    self.hosts, self.donors = list(hosts), list(donors)
    self.image_size, self.spacing_mm = int(image_size), float(spacing_mm)
    self.organs = list(meta["organs"])
    self.skipped: dict[str, str] = {}
    self._donor_stamps: dict[tuple[str, float], list[np.ndarray]] = {}

  def load(self, case_id: str) -> SourceVolume:
    return load_volume(self.cases[case_id], self.organs, self.image_size, self.spacing_mm)

  def mask(self, vol: SourceVolume, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mask, synthetic labels, info) of one host volume on the model grid."""
    sc, labels = self.scenario, vol.grid_labels
    if sc.name == "organ":
      return (organ_mask_3d(labels, sc.label_ids, sc.ecfg.dilation_mm, vol.grid_mm),
              labels.copy(), {})
    if sc.name == "context":
      return (bbox_mask_3d(labels, sc.label_ids, sc.margin_mm, vol.grid_mm, vol.spacing[2]),
              labels.copy(), {})
    if self.lesions == "own":
      return self._own_tumour(vol, rng)
    return self._tumour(vol, rng)

  def _stamps(self, case_id: str, host_mm: float) -> list[np.ndarray]:
    key = (case_id, host_mm)
    if key not in self._donor_stamps:
      donor = self.load(case_id)
      self._donor_stamps[key] = tumour_stamps(donor.grid_labels, self.scenario.lesion_id,
                                              donor.spacing[2], host_mm)
    return self._donor_stamps[key]

  def _rim(self, lesion: np.ndarray, host: np.ndarray) -> np.ndarray:
    """The regenerated region of a 3D lesion: grown in-plane by blend_px, within host."""
    grown = np.stack([masks.dilate_mm(p, float(self.scenario.blend_px), (1.0, 1.0))
                      for p in lesion])
    return grown & host

  def _own_tumour(self, vol: SourceVolume, rng: np.random.Generator):
    """One of the host's own 3D lesions (26-connected, touching the host organ), in place."""
    sc = self.scenario
    organ = np.isin(vol.grid_labels, sc.label_ids)
    lesion = vol.grid_labels == sc.lesion_id
    comps, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), bool))
    near = ndimage.binary_dilation(organ, np.ones((3, 3, 3), bool))
    ids = [c for c in range(1, n + 1) if (near & (comps == c)).any()]
    if not ids:
      raise scenarios.NothingFits(f"no lesion (label {sc.lesion_id}) of its own in the host "
                                  f"organ {list(sc.label_ids)}")
    placed = comps == ids[int(rng.integers(len(ids)))]
    zs, rows, cols = (np.flatnonzero(placed.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    return self._rim(placed, organ | lesion), vol.grid_labels.copy(), {
        "donor_case": vol.case_id, "donor_slices": int(len(zs)),
        "tumour_slices": int(len(zs)), "offset": (int(zs[0]), int(rows[0]), int(cols[0])),
        "lesion_voxels": int(placed.sum())}

  def _tumour(self, vol: SourceVolume, rng: np.random.Generator):
    sc = self.scenario
    host = np.isin(vol.grid_labels, sc.label_ids)
    others = [c for c in self.donors if c != vol.case_id]
    tried = 0
    for case_id in [others[j] for j in rng.permutation(len(others))]:
      stamps = self._stamps(case_id, vol.spacing[2])
      for j in rng.permutation(len(stamps)):
        tried += 1
        got = place_3d(stamps[j], host, rng)
        if got is not None:
          placed, off = got
          labels = vol.grid_labels.copy()
          labels[placed] = sc.lesion_id
          return self._rim(placed, host), labels, {
              "donor_case": case_id, "donor_slices": int(stamps[j].shape[0]),
              "tumour_slices": int(placed.any(axis=(1, 2)).sum()), "offset": off,
              "lesion_voxels": int(placed.sum())}
        if tried >= MAX_TUMOR_TRIES:
          raise scenarios.NothingFits(f"none of {tried} 3D tumours of other cases fits inside "
                                      f"the host organ ({int(host.sum())} voxels)")
    raise scenarios.NothingFits(f"no 3D tumour of another case fits inside the host organ "
                                f"({int(host.sum())} voxels; {tried} tried)")

  def plans(self, num_volumes: int, seed: int):
    """VolumePlan i for i < num_volumes, cycling over the usable hosts (skips counted)."""
    usable, cursor, uses = list(self.hosts), 0, {}
    for i in range(num_volumes):
      rng = np.random.default_rng((seed, i))
      while True:
        if not usable:
          raise VolumeModeError(f"no source volume can be used for the {self.scenario.name} "
                                f"scenario: " + "; ".join(f"{k}: {v}"
                                                          for k, v in self.skipped.items()))
        case_id = usable[cursor % len(usable)]
        vol = self.load(case_id)
        try:
          mask, labels, info = self.mask(vol, rng)
          if mask.sum() < masks.MIN_ORGAN_PIXELS:
            raise scenarios.NothingFits(f"no {self.scenario.region_name} "
                                        f"{list(self.scenario.label_ids)}: empty mask")
          cursor += 1
          break
        except scenarios.NothingFits as e:
          self.skipped[case_id] = str(e)
          usable.pop(cursor % len(usable))
      rnd = uses.get(case_id, 0)
      uses[case_id] = rnd + 1
      yield VolumePlan(i, rnd, vol, mask, labels, info)


def _record(cur: np.ndarray, plan: VolumePlan, z: int) -> dict[str, Any]:
  """The slice record of z as the volume is now (generated slices in place of real ones).

  A neighbour past the volume end repeats the slice (the builder's convention), which the
  model's input marks as missing (data/transforms.py).
  """
  nz = cur.shape[0]
  sp = np.array([plan.host.grid_mm, plan.host.grid_mm, plan.host.spacing[2]], np.float32)
  return {records.IMAGE: cur[z][..., None], records.PREV_IMAGE: cur[max(z - 1, 0)][..., None],
          records.NEXT_IMAGE: cur[min(z + 1, nz - 1)][..., None],
          records.LABELS: plan.labels[z][..., None], records.SLICE_INDEX: np.int32(z),
          records.SPACING_MM: sp}


def _hidden(plan: VolumePlan, done: np.ndarray, z: int) -> dict[str, np.ndarray]:
  """The neighbours of slice z not generated yet, each hidden inside its slice of the mask."""
  out = {}
  for key, zn in ((records.PREV_IMAGE, z - 1), (records.NEXT_IMAGE, z + 1)):
    if 0 <= zn < len(done) and not done[zn]:
      out[key] = plan.mask[zn]
  return out


def generate_grids(inpainter, ecfg: transforms.ExampleConfig, plans: Sequence[VolumePlan],
                   seed: int, *, independent: bool = False, passes: int = 1,
                   order: str = DEFAULT_ORDER, progress: bool = True) -> list[np.ndarray]:
  """The generated (Z, S, S) int16 HU volume of every plan (source HU outside its mask).

  2.5D (default): the steps of VolumePlan.order, every volume's step k in one batch; each
  step reads the neighbours as generated so far (one not generated yet is hidden inside its
  mask); `passes=2` then regenerates every slice in the same order, now with both neighbours
  generated. independent: all mask slices in one pass, every neighbour hidden inside its mask.
  """
  if not 1 <= passes <= MAX_PASSES:
    raise VolumeModeError(f"passes must be 1..{MAX_PASSES}, got {passes}")
  cur = [p.host.grid_hu.copy() for p in plans]
  orders = [p.order(order) for p in plans]
  if independent:
    orders, passes = [[sorted(z for step in o for z in step)] for o in orders], 1
  total = passes * sum(len(s) for o in orders for s in o)
  bar = tqdm.tqdm(total=total, desc="generating volumes (independent slices)" if independent
                  else "generating volumes (2.5D)", unit="slice", disable=not progress)
  done = [np.zeros(len(p.mask), bool) for p in plans]  # slices generated so far
  for p, k in [(p, k) for p in range(passes) for k in range(max(len(o) for o in orders))]:
    jobs = [(j, z) for j, o in enumerate(orders) if k < len(o) for z in o[k]]
    examples = [transforms.example_with_mask(_record(cur[j], plans[j], z), ecfg,
                                             plans[j].mask[z], _hidden(plans[j], done[j], z))
                for j, z in jobs]
    batch = {key: np.stack([e[key] for e in examples]) for key in ("image", "mask", "cond")}
    out = inpainter.inpaint(batch, seed, progress=False,
                            indices=[(plans[j].index * MAX_PASSES + p) * Z_STRIDE + z
                                     for j, z in jobs])
    hu = np.rint(transforms.unit_to_hu(np.asarray(out[..., 0], np.float64), ecfg.intensity))
    hu = np.clip(hu, -32768, 32767).astype(np.int16)
    for (j, z), h in zip(jobs, hu):
      cur[j][z] = np.where(plans[j].mask[z], h, cur[j][z])
      done[j][z] = True
    bar.update(len(jobs))
  bar.close()
  return cur


def paste_source(plan: VolumePlan, generated: np.ndarray, host_ids: Sequence[int] | None
                 ) -> dict[str, np.ndarray]:
  """The generated grid volume pasted into the source: canonical ct / seg / mask arrays.

  mask: the model-grid mask resampled (nearest) to the source grid (clipped to the host organ
  `host_ids` when given: the tumour scenario). ct: the source's canonical array with the
  generated HU (linear resampling, rounded) inside the mask. seg: the source's organ map
  with the voxels whose synthetic label changed (the placed tumour) relabelled.
  """
  vol = plan.host
  mask = to_source(vol, plan.mask.astype(np.uint8), order=0) > 0
  changed = to_source(vol, (plan.labels != vol.grid_labels).astype(np.uint8), order=0) > 0
  new_labels = to_source(vol, plan.labels, order=0)
  if host_ids is not None:
    host = np.isin(vol.organ_map, host_ids)
    changed &= host
    mask &= host | changed
  seg = vol.organ_map.copy()
  seg[changed] = new_labels[changed]
  ct = vol.canonical.copy()
  hu = np.rint(to_source(vol, generated, order=1)[mask])
  if ct.dtype.kind in "iu":
    info = np.iinfo(ct.dtype)
    hu = np.clip(hu, info.min, info.max)
  ct[mask] = hu.astype(ct.dtype)
  return {"ct": ct, "seg": seg, "mask": mask.astype(np.uint8)}


def save_like(path: str, stored: np.ndarray, source) -> None:
  """Writes `stored` (the source's stored orientation) with the source's affine and header."""
  header = source.header.copy()
  img = nib.Nifti1Image(stored, source.affine, header)
  img.set_data_dtype(stored.dtype)
  img.header.set_slope_inter(1.0, 0.0)  # values as given: no rescaling, bit-exact
  img.set_qform(source.get_qform(), code=int(source.header["qform_code"]))
  img.set_sform(source.get_sform(), code=int(source.header["sform_code"]))
  nib.save(img, path)


PREVIEW_MM_PER_PX = 1.0  # previews are drawn at this many mm per pixel (at least 128 px tall)


def planes(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
  """Axial, coronal, sagittal planes of a canonical (X, Y, Z) volume through `centre`, each
  in display orientation (axial: radiological view; coronal/sagittal: superior up, patient
  right / anterior on the left)."""
  x, y, z = (int(v) for v in centre)
  return [np.asarray(vol[::-1, ::-1, z]).T, np.asarray(vol[::-1, y, ::-1]).T,
          np.asarray(vol[x, ::-1, ::-1]).T]


def _tile(img: np.ndarray, spacing_rc: tuple[float, float], scale: float, order: int):
  return ndimage.zoom(np.asarray(img, np.float64),
                      (spacing_rc[0] / scale, spacing_rc[1] / scale), order=order)


def three_plane_png(path: str, rows: dict[str, np.ndarray], mask: np.ndarray,
                    spacing: Sequence[float], window: Sequence[float]) -> str:
  """PNG: one row per named canonical volume (e.g. source, generated), columns axial |
  coronal | sagittal through the mask centre, physical aspect, the mask outline in red."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  centre = np.round(ndimage.center_of_mass(mask)).astype(int)
  sx, sy, sz = (float(v) for v in spacing)
  plane_mm = [(sy, sx), (sz, sx), (sz, sy)]
  extent = max(a * n for a, n in zip((sx, sy, sz), mask.shape))
  scale = max(extent / 256.0, PREVIEW_MM_PER_PX * 0.25)
  lo, hi = float(window[0]), float(window[1])
  mask_tiles = [_tile(p, mm, scale, 0) > 0.5 for p, mm in zip(planes(mask, centre), plane_mm)]
  width = sum(t.shape[1] for t in mask_tiles) + 2 * len(mask_tiles) + 90
  height = max(t.shape[0] for t in mask_tiles)
  canvas = Image.new("RGB", (width, (height + 2) * len(rows) + 14), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  x = 90
  for name, t in zip(("axial", "coronal", "sagittal"), mask_tiles):
    draw.text((x + 2, 1), name, fill=(0, 0, 0))
    x += t.shape[1] + 2
  for r, (name, vol) in enumerate(rows.items()):
    top = 14 + r * (height + 2)
    draw.text((2, top + height // 2), name, fill=(0, 0, 0))
    x = 90
    for p, mm, m in zip(planes(vol, centre), plane_mm, mask_tiles):
      g = np.clip((_tile(p, mm, scale, 1) - lo) / (hi - lo), 0, 1) * 255
      rgb = np.repeat(g[..., None], 3, axis=-1).astype(np.uint8)
      if r > 0:  # the generated rows: outline of the regenerated region
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = (255, 0, 0)
      canvas.paste(Image.fromarray(rgb), (x, top))
      x += rgb.shape[1] + 2
  canvas.save(path)
  return path


def check_request(config, spec) -> None:
  """Refuses what volume mode cannot do, before anything is loaded."""
  if not bool(config.data.get("neighbours", False)):
    raise VolumeModeError(
        f"--volume_mode=2.5d conditions every slice on its (generated) neighbours, but this "
        f"model ({config.dataset}, mask_mode {config.data.mask_mode}) was trained without them "
        f"(data.neighbours=False): use a neighbour-conditioned model (configs/context_volume.py, "
        f"configs/kidney_tumor_volume.py, or train with --config.data.neighbours=True)")
  if not float(config.data.get("neighbour_hide_prob", 0.0)) > 0:
    raise VolumeModeError(
        f"--volume_mode=2.5d hides a neighbour not generated yet inside its mask, but this "
        f"model ({config.dataset}) was trained without hidden neighbours "
        f"(data.neighbour_hide_prob=0) and never saw one: use configs/context_volume.py or "
        f"configs/kidney_tumor_volume.py, or train with --config.data.neighbour_hide_prob=0.5")
  for name, why in (("mask_file", "a 2D mask"), ("offset", "a 2D offset")):
    if getattr(spec, name) is not None:
      raise VolumeModeError(f"--{name} is {why}: not used with --volume_mode=2.5d (the "
                            f"volume's mask is 3D)")


def open_cases(meta, split: str, manual_dir: str | None, donor_split: str | None):
  """(cases by id, host ids of `split`, donor ids) from the dataset's build record."""
  build = meta.get("build", {})
  by_split = build.get("cases", {})
  root = manual_dir or build.get("manual_dir")
  if not root:
    raise VolumeModeError(f"{meta.get('dataset')}: the raw volumes are unknown; pass "
                          f"--manual_dir=<the raw cases the dataset was built from>")
  hosts = []
  for part in split.split("+"):  # "validation+test": the union, as TFDS writes it
    if part not in by_split or not by_split[part]:
      raise VolumeModeError(f"split {part!r} of {meta.get('dataset')} has no case (cases per "
                            f"split: { {k: len(v) for k, v in by_split.items()} })")
    hosts.extend(by_split[part])
  raw = layouts.read_layout(root, build.get("layout", "auto"))
  cases = {c.case_id: c for c in raw.cases}
  missing = sorted(set(hosts) - set(cases))
  if missing:
    raise VolumeModeError(f"{root}: cases {missing[:5]} of split {split!r} are not among the "
                          f"raw cases there (is it the manual_dir the dataset was built from?)")
  donor_splits = [donor_split] if donor_split else sorted(by_split)
  donors = sorted(c for s in donor_splits for c in by_split.get(s, []) if c in cases)
  return cases, sorted(set(hosts)), donors


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
  if os.path.exists(os.path.join(output_dir, "manifest.csv")) and not overwrite:
    raise VolumeModeError(f"{output_dir} already holds an export (manifest.csv); pass "
                          f"--overwrite or another --output_dir")
  for sub in ("volumes", "previews"):
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)


def write_volume(output_dir: str, plan: VolumePlan, arms: dict[str, np.ndarray],
                 host_ids, window, run: dict[str, Any]) -> dict[str, Any]:
  """Writes the 2.5D arm of one plan (ct/seg/mask NIfTI, preview); returns its manifest row.

  `arms`: arm name -> generated grid volume; the last one is exported, every one is drawn.
  """
  vol = plan.host
  stem = f"{plan.host.case_id}_r{plan.round}"
  pasted = {name: paste_source(plan, g, host_ids) for name, g in arms.items()}
  out = list(pasted.values())[-1]
  files = {}
  for kind in ("ct", "seg", "mask"):
    files[kind] = os.path.join("volumes", f"{stem}_{kind}.nii.gz")
    save_like(os.path.join(output_dir, files[kind]), vol.to_stored(out[kind]), vol.nifti)
  preview = os.path.join("previews", f"{stem}.png")
  rows = {"source": vol.canonical, **{n: p["ct"] for n, p in pasted.items()}}
  three_plane_png(os.path.join(output_dir, preview), rows, out["mask"], vol.spacing, window)
  zs = np.flatnonzero(plan.mask.any(axis=(1, 2)))
  order = plan.order(run.get("order", DEFAULT_ORDER))
  return {**run, "index": plan.index, "source_case": vol.case_id, "round": plan.round,
          "source_image": vol.image_path, "mask_voxels": int(out["mask"].sum()),
          "slices_generated": int(len(zs)), "z_first": int(zs[0]), "z_last": int(zs[-1]),
          "seed_slice": " ".join(str(z) for z in order[0]),  # inward: both ends
          "donor_case": plan.info.get("donor_case", ""),
          "donor_slices": plan.info.get("donor_slices", ""),
          "tumour_slices": plan.info.get("tumour_slices", ""),
          "offset": " ".join(str(v) for v in plan.info.get("offset", ())),
          "ct_file": files["ct"], "seg_file": files["seg"], "mask_file": files["mask"],
          "preview": preview}


def _inpainter(config, checkpoint, spec):
  from ctdiff_jax.generation import inference, runner  # pylint: disable=g-import-not-at-top
  if isinstance(checkpoint, inference.Inpainter):
    return checkpoint
  return runner.load_inpainter(config, checkpoint, spec)


def generate(config, checkpoint, spec, output_dir: str, *, manual_dir: str | None = None,
             compare: bool = False, order: str = DEFAULT_ORDER, lesions: str = "donor",
             only: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
  """`spec.num_samples` 2.5D volumes of `spec`'s scenario into `output_dir` (module docstring).

  `checkpoint`: a workdir / checkpoints dir or an inference.Inpainter. With `compare`, the
  same volumes are also generated slice by slice (independent arm) and volume_metrics.{md,json}
  (2.5D FID per plane, inter-slice difference: real, independent, 2.5D) are written.
  `order`: the slice order of the 2.5D arm (VolumePlan.order). `lesions` (tumor scenario):
  `donor` places another case's tumour; `own` regenerates one of the host's own lesions in
  place, so the real volume is a reference that holds a real lesion (LESION_SOURCES).
  `only`: these case ids of the split are the hosts (default: all of them).
  """
  from ctdiff_jax.data import sources  # pylint: disable=g-import-not-at-top
  from ctdiff_jax.generation import runner  # pylint: disable=g-import-not-at-top
  check_request(config, spec)
  if order not in ORDERS:
    raise VolumeModeError(f"unknown volume order {order!r}; expected one of {ORDERS}")
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  _check_output_dir(output_dir, spec.overwrite)
  meta = sources.metadata(config)
  split = spec.split or config.eval_split
  cases, hosts, donors = open_cases(meta, split, manual_dir or config.get("manual_dir"),
                                    spec.donor_split)
  if only:
    missing = sorted(set(only) - set(hosts))
    if missing:
      raise VolumeModeError(f"cases {missing} are not in split {split!r} of "
                            f"{meta.get('dataset')} (its cases: {hosts[:8]})")
    hosts = [c for c in hosts if c in only]
  planner = VolumePlanner(meta, config.data, spec, cases, hosts, donors, config.image_size,
                          config.spacing_mm, where=f"split {split!r} of {meta.get('dataset')}",
                          lesions=lesions)
  plans = list(planner.plans(spec.num_samples, spec.seed))
  inpainter = _inpainter(config, checkpoint, spec)
  ecfg = transforms.ExampleConfig.from_data_config(config.data)
  arms = {}
  if compare:
    arms["independent"] = generate_grids(inpainter, ecfg, plans, spec.seed, independent=True,
                                         progress=progress)
  arms["2.5D"] = generate_grids(inpainter, ecfg, plans, spec.seed, order=order,
                                progress=progress)
  host_ids = None
  if spec.scenario == "tumor":  # the paste stays inside the host organ (and its own lesion)
    host_ids = tuple(planner.scenario.label_ids) + (
        (planner.scenario.lesion_id,) if lesions == "own" else ())
  run = {"scenario": spec.scenario, "source_split": split, "seed": spec.seed, "mode": "2.5d",
         "order": order, "lesions": lesions if spec.scenario == "tumor" else "",
         "checkpoint_step": int(inpainter.step)}
  window = runner.display_window(config)
  rows = [write_volume(output_dir, p, {k: v[j] for k, v in arms.items()}, host_ids, window,
                       run) for j, p in enumerate(plans)]
  manifest = os.path.join(output_dir, "manifest.csv")
  with open(manifest, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  summary = {**run, "num_volumes": len(plans), "output_dir": output_dir, "manifest": manifest,
             "volumes": [os.path.join(output_dir, r["ct_file"]) for r in rows],
             "previews": [os.path.join(output_dir, r["preview"]) for r in rows],
             "skipped": dict(planner.skipped), "rows": rows}
  if compare:
    from ctdiff_jax.evaluation import volume_metrics  # pylint: disable=g-import-not-at-top
    ev = config.get("eval", {})
    result = volume_metrics.compare(
        [p.host.grid_hu for p in plans], arms, [p.mask for p in plans],
        window=tuple(ev.get("fid_window", window)), bootstrap=min(int(ev.get("bootstrap", 10)), 10),
        batch_size=int(ev.get("fid_batch_size", 32)))
    result["reference"] = REFERENCES.get((spec.scenario, lesions), REFERENCES[None])
    summary.update(volume_metrics.write(output_dir, result))
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The generate CLI's end-of-run lines for volume mode."""
  lines = [f"generated {summary['num_volumes']} 2.5D volumes ({summary['scenario']}) from "
           f"split {summary['source_split']!r} with checkpoint step {summary['checkpoint_step']}",
           f"  volumes     {os.path.dirname(summary['volumes'][0])} (ct, seg, mask per volume)",
           f"  previews    {os.path.dirname(summary['previews'][0])} (axial, coronal, sagittal)",
           f"  manifest    {summary['manifest']}"]
  if summary.get("metrics_md"):
    lines.append(f"  metrics     {summary['metrics_md']}")
  if summary["skipped"]:
    lines.append(f"  skipped     {len(summary['skipped'])} volumes: " + "; ".join(
        f"{k}: {v}" for k, v in list(summary["skipped"].items())[:3]))
  return "\n".join(lines)
