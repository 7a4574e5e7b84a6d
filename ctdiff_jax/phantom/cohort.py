"""Procedural phantom CT cohort: the project's embedded default dataset.

Writes abdominal CT volumes with organ label maps in the same flat layout as the shared
TotalSegmentator examples (`<case>_ct.nii.gz` int16 HU, `<case>_seg.nii.gz` uint8 labels,
`labels.json` id -> name), plus a `manifest.csv`, so every downstream tool can run (and be
tested end to end) without downloading real data:

  python -m ctdiff_jax.phantom --output_dir=/tmp/phantom --num_cases=8 [--seed=0] [--lesions]

Anatomy (all sizes in mm, so a different grid or spacing shows the same body): elliptical
body with subcutaneous fat and an abdominal wall, vertebrae (cortical shell, cancellous core,
discs, posterior elements, spinal canal), paraspinal and psoas muscles, ribs, aorta and IVC,
a domed diaphragm with lungs (five lobes) and heart above it and liver, gallbladder, spleen,
stomach, kidneys (cortex, medulla, sinus fat) and bowel loops below it. With `--lesions`,
hypo-/hyperdense tumours are placed strictly inside liver and kidneys. Every case is
different (random sizes, positions, rotations, a smooth global warp, wobbly organ surfaces)
but fully determined by (seed, case index).

Orientation is RAS+ as nibabel reads it: array axis 0 runs towards the patient's right, axis 1
anterior, axis 2 cranial (like the shared TotalSegmentator cases); the affine is diagonal
(spacing) with the volume centred on the origin.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

DEFAULT_SHAPE = (128, 128, 48)
DEFAULT_SPACING = (3.0, 3.0, 5.0)

# Label ids: TotalSegmentator ("total" task, v2) ids for the organs it shares, so the phantom
# and real data can be mixed; tumours get ids above TotalSegmentator's range.
LIVER_TUMOR = 201
KIDNEY_TUMOR = 200
_VERTEBRA_L1 = 31  # TotalSegmentator numbers vertebrae upwards from S1 (26): L5=27 .. T7=37.
_VERTEBRA_NAMES = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7")
LABELS: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
    18: "small_bowel",
    **{27 + i: f"vertebrae_{n}" for i, n in enumerate(_VERTEBRA_NAMES)},
    51: "heart",
    52: "aorta",
    63: "inferior_vena_cava",
    79: "spinal_cord",
    86: "autochthon_left",
    87: "autochthon_right",
    88: "iliopsoas_left",
    89: "iliopsoas_right",
    KIDNEY_TUMOR: "kidney_tumor",
    LIVER_TUMOR: "liver_tumor",
}
LABEL_IDS = {name: i for i, name in LABELS.items()}  # name -> id
ID = LABEL_IDS

# Tissue classes: what the intensity model paints (finer than labels: a kidney is cortex,
# medulla and sinus fat). Returned by `generate_case(..., return_tissues=True)` for checks.
TISSUES = (
    "air", "subcutaneous_fat", "visceral_fat", "muscle", "cortical_bone", "cancellous_bone",
    "disc", "spinal_cord", "lung", "lung_vessel", "liver", "spleen", "kidney_cortex",
    "kidney_medulla", "renal_sinus_fat", "aorta", "ivc", "heart", "stomach_wall", "fluid", "gas",
    "bowel", "gallbladder", "liver_lesion", "kidney_lesion", "rib", "table",
)
TISSUE_IDS = {name: i for i, name in enumerate(TISSUES)}
T = TISSUE_IDS

# Mean HU per tissue and the +- range a case draws its own value from (contrast timing,
# scanner calibration): a late-arterial / corticomedullary phase abdomen.
_TISSUE_HU = {
    "air": (-1000, 0), "subcutaneous_fat": (-100, 8), "visceral_fat": (-92, 8),
    "muscle": (50, 6), "cortical_bone": (700, 80), "cancellous_bone": (250, 40),
    "disc": (85, 10), "spinal_cord": (30, 5), "lung": (-855, 25), "lung_vessel": (40, 10),
    "liver": (60, 6), "spleen": (50, 6), "kidney_cortex": (150, 25), "kidney_medulla": (40, 8),
    "renal_sinus_fat": (-80, 10), "aorta": (260, 50), "ivc": (90, 20), "heart": (120, 25),
    "stomach_wall": (45, 8), "fluid": (10, 5), "gas": (-950, 20), "bowel": (35, 8),
    "gallbladder": (8, 5), "liver_lesion": (30, 0), "kidney_lesion": (30, 0), "rib": (350, 50),
    "table": (150, 30),
}
# Tissues that get a faint smooth texture (parenchyma is never perfectly flat on CT).
_TEXTURED = ("liver", "spleen", "kidney_cortex", "kidney_medulla", "muscle", "heart", "bowel",
             "stomach_wall", "liver_lesion", "kidney_lesion")


@dataclasses.dataclass
class PhantomCase:
  """One generated volume plus what the cohort writer records about it."""
  ct: np.ndarray  # int16 HU
  seg: np.ndarray  # uint8 label ids (LABELS)
  affine: np.ndarray  # 4x4 RAS
  tissues: np.ndarray  # uint8 tissue ids (TISSUES)
  num_liver_lesions: int = 0
  num_kidney_lesions: int = 0


def _rot(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
  """Rotation matrix (radians): yaw about z, pitch about y, roll about x."""
  cz, sz = math.cos(yaw), math.sin(yaw)
  cy, sy = math.cos(pitch), math.sin(pitch)
  cx, sx = math.cos(roll), math.sin(roll)
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  return rz @ ry @ rx


def _wobble(rng: np.random.Generator, n: int = 3, amp: float = 0.07) -> tuple:
  """Low-order surface perturbation terms (freq (3,), phase, amplitude) for an ellipsoid."""
  return tuple((rng.normal(size=3) * 1.6, rng.uniform(0, 2 * np.pi), amp * rng.uniform(0.3, 1.0))
               for _ in range(n))


@dataclasses.dataclass
class _Ellipsoid:
  """Implicit wobbly ellipsoid: `level(P) < 1` inside (P in world mm)."""
  center: Sequence[float]
  axes: Sequence[float]
  rot: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
  wobble: tuple = ()
  mirror_x: bool = False  # evaluate in a left-right mirrored frame (paired organs)

  def local(self, p):
    d = [p[i] - np.float32(self.center[i]) for i in range(3)]
    if self.mirror_x:
      d[0] = -d[0]
    r = self.rot
    return [(np.float32(r[0, k]) * d[0] + np.float32(r[1, k]) * d[1] + np.float32(r[2, k]) * d[2])
            / np.float32(self.axes[k]) for k in range(3)]

  def level(self, p, u=None):
    u = self.local(p) if u is None else u
    lev = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    for f, ph, a in self.wobble:
      lev = lev - np.float32(a) * np.cos(f[0] * u[0] + f[1] * u[1] + f[2] * u[2] + ph)
    return lev

  def extent(self) -> float:
    return float(max(self.axes)) * (1.0 + sum(abs(a) for _, _, a in self.wobble))


class _Canvas:
  """The volume being painted: base HU, tissue ids, label ids and reserved (fat) margins."""

  def __init__(self, shape, spacing, coords, hu_table, warp_margin):
    self.shape = shape
    self.spacing = np.asarray(spacing, np.float64)
    self.x, self.y, self.z = coords  # warped world coordinates, full volume
    self.origin = -(np.asarray(shape) - 1) / 2 * self.spacing
    self.hu_table = hu_table
    self.margin = warp_margin
    self.hu = np.full(shape, hu_table[T["air"]], np.float32)
    self.tissue = np.zeros(shape, np.uint8)
    self.seg = np.zeros(shape, np.uint8)
    self.reserved = np.zeros(shape, bool)

  def box(self, center, radius) -> tuple[slice, slice, slice]:
    """Index box covering a world-space ball (plus the warp amplitude)."""
    r = radius + self.margin
    lo = np.floor((np.asarray(center) - r - self.origin) / self.spacing).astype(int)
    hi = np.ceil((np.asarray(center) + r - self.origin) / self.spacing).astype(int) + 1
    lo = np.clip(lo, 0, self.shape)
    hi = np.clip(hi, 0, self.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))

  def coords(self, sl):
    return self.x[sl], self.y[sl], self.z[sl]

  def allowed(self, sl, onto, respect_reserved=True):
    ok = np.isin(self.tissue[sl], [T[t] for t in onto])
    if respect_reserved:
      ok &= ~self.reserved[sl]
    return ok

  def paint(self, sl, mask, tissue, label=0, onto=None, hu=None, respect_reserved=True):
    """Sets tissue/label/HU on `mask` (within box `sl`); `onto` limits which tissues it covers."""
    if onto is not None:
      mask = mask & self.allowed(sl, onto, respect_reserved)
    self.tissue[sl][mask] = T[tissue]
    self.seg[sl][mask] = label
    value = self.hu_table[T[tissue]] if hu is None else hu
    if np.ndim(value):
      self.hu[sl][mask] = value[mask]
    else:
      self.hu[sl][mask] = value
    return mask


def _as_rng(rng_or_seed) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  if isinstance(rng_or_seed, (int, np.integer, np.random.SeedSequence)) and not isinstance(
      rng_or_seed, bool):
    return np.random.default_rng(rng_or_seed)
  raise TypeError(f"expected an int seed, SeedSequence or numpy Generator, got {rng_or_seed!r}")


def case_rng(seed: int, index: int) -> np.random.Generator:
  """The generator behind case `index` of a cohort with `seed` (independent streams)."""
  if seed < 0 or index < 0:
    raise ValueError(f"seed and case index must be >= 0, got seed={seed}, index={index}")
  return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _check_grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
  shape = tuple(int(s) for s in shape)
  spacing = tuple(float(s) for s in spacing)
  if len(shape) != 3 or min(shape) < 4:
    raise ValueError(f"phantom grid must be 3 sizes >= 4 voxels, got {shape}")
  if len(spacing) != 3 or min(spacing) <= 0:
    raise ValueError(f"phantom spacing must be 3 positive mm values, got {spacing}")
  return shape, spacing


def affine_for(shape, spacing) -> np.ndarray:
  """Diagonal RAS affine with the volume centred on the world origin."""
  shape, spacing = _check_grid(shape, spacing)
  aff = np.diag([*spacing, 1.0])
  aff[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
  return aff


def _smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3 - 2 * t)


def _generate(rng: np.random.Generator, shape, spacing, lesions: bool) -> PhantomCase:
  shape, spacing = _check_grid(shape, spacing)
  affine = affine_for(shape, spacing)
  nx, ny, nz = shape
  sx, sy, sz = spacing
  f32 = np.float32

  hu_table = np.array([m + rng.uniform(-j, j) for m, j in (_TISSUE_HU[t] for t in TISSUES)], f32)
  # Keep the contrast ordering radiologists rely on whatever the draw.
  hu_table[T["kidney_medulla"]] = min(hu_table[T["kidney_medulla"]],
                                      hu_table[T["kidney_cortex"]] - 60)

  # ---- World coordinates, warped by a smooth random displacement (a few cosine modes).
  x1 = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(f32)[:, None, None]
  y1 = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(f32)[None, :, None]
  z1 = ((np.arange(nz) - (nz - 1) / 2) * sz).astype(f32)[None, None, :]
  warp_amp = 6.0
  coords = []
  for base in (x1, y1, z1):
    disp = np.zeros(shape, f32)
    for _ in range(3):
      w = rng.normal(size=3)
      w *= 2 * np.pi / rng.uniform(180, 360) / np.linalg.norm(w)
      phase = rng.uniform(0, 2 * np.pi)
      disp += f32(rng.normal() * warp_amp / 2) * np.cos(
          f32(w[0]) * x1 + f32(w[1]) * y1 + f32(w[2]) * z1 + f32(phase))
    coords.append(base + disp)
  X, Y, Z = coords
  cv = _Canvas(shape, spacing, coords, hu_table, warp_margin=2 * warp_amp)
  full = (slice(None),) * 3

  # ---- Global body parameters.
  s = rng.uniform(0.9, 1.1)  # patient size
  ax = rng.uniform(138, 168) * s
  ay = rng.uniform(98, 120) * s
  yc = rng.uniform(-8, 8)
  zshift = rng.uniform(-15, 15)  # cranio-caudal position of the anatomy in the field of view
  tf = rng.uniform(8, 26)  # subcutaneous fat thickness
  tm = rng.uniform(7, 12)  # abdominal wall muscle thickness
  z_dia = 55 + zshift  # right diaphragm dome

  # Body outline: superellipse, flatter posteriorly, slowly varying along z.
  axz = ax * (1 + 0.04 * np.sin(Z / 130 + rng.uniform(0, 6.3)))
  dx, dy = X, Y - f32(yc)
  n = np.where(dy < 0, f32(2.6), f32(2.0))
  rho = (np.abs(dx / axz) ** n + np.abs(dy / f32(ay)) ** n) ** (1 / n)
  rad = np.sqrt(dx ** 2 + dy ** 2)
  depth = rad * (1 - rho) / np.maximum(rho, 1e-3)  # distance in from the skin along the ray
  theta = np.arctan2(dy, dx)
  tf_theta = tf * (1 + 0.3 * np.cos(theta - rng.uniform(0, 2 * np.pi))
                   + 0.15 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi)))
  body = rho < 1
  cv.paint(full, body, "subcutaneous_fat")
  cv.paint(full, body & (depth >= tf_theta), "muscle")
  cavity = body & (depth >= tf_theta + tm)
  cv.paint(full, cavity, "visceral_fat")
  del n, rho, rad

  # Scanner table under the back.
  if rng.random() < 0.8:
    y_tab = yc - ay - rng.uniform(8, 25) + X ** 2 / 900.0
    table = (np.abs(Y - y_tab) < 4) & (np.abs(X) < 0.8 * ax)
    cv.paint(full, table & ~body, "table")

  # ---- Spine: vertebral bodies (shell + cancellous core), discs, canal, posterior elements.
  def spine_y(z):  # vertebral body centre; lumbar lordosis: lower = more anterior
    return yc - ay + tf * 0.6 + 78 * s - 0.06 * (z - zshift)

  y_vb = spine_y(Z)
  x_vb = 3 * np.sin(Z / 150 + rng.uniform(0, 6.3))  # slight scoliosis
  lumbar = _smoothstep((z_dia - 20 - Z) / 80)  # 0 thoracic .. 1 lumbar
  rx = (17 + 6 * lumbar) * s
  ry = (14 + 4 * lumbar) * s
  seg_h = rng.uniform(31, 36) * s  # vertebra + disc height
  disc_h = rng.uniform(7, 9)
  z_l1 = -15 + zshift + rng.uniform(-5, 5)  # lower end of L1
  t_lvl = (Z - z_l1) / seg_h
  level = np.floor(t_lvl)
  frac = t_lvl - level
  vlabel = (_VERTEBRA_L1 + np.clip(level, -4, 6)).astype(np.uint8)
  vdx, vdy = X - x_vb, Y - y_vb
  vrho = np.sqrt((vdx / rx) ** 2 + (vdy / ry) ** 2)
  is_disc = frac > 1 - disc_h / seg_h
  vb = vrho < 1
  cv.paint(full, vb & is_disc & body, "disc")
  bone_shell = vb & ~is_disc & (vrho > 1 - 3.0 / rx)
  cv.paint(full, vb & ~is_disc & body, "cancellous_bone")
  cv.paint(full, bone_shell & body, "cortical_bone")
  cv.seg[vb & ~is_disc & body] = vlabel[vb & ~is_disc & body]
  # Canal and posterior arch.
  rc = 8.5 * s
  y_can = y_vb - ry - rc - 1
  cdist = np.sqrt((X - x_vb) ** 2 + (Y - y_can) ** 2)
  arch_z = (frac > 0.08) & (frac < 0.72)
  arch = (cdist >= rc) & (cdist < rc + 6 * s) & (Y < y_vb - ry * 0.6)
  spinous = (np.abs(X - x_vb) < 3.5 * s) & (Y < y_can - rc) & (Y > y_can - rc - 32 * s)
  transverse = ((np.abs(Y - (y_can + 2)) < 3 * s) & (np.abs(X - x_vb) > rc)
                & (np.abs(X - x_vb) < rc + (16 + 8 * lumbar) * s) & (frac > 0.3) & (frac < 0.55))
  post = (arch | spinous | transverse) & arch_z & body & (depth > tf_theta)
  cv.paint(full, post, "cortical_bone")
  cv.seg[post] = vlabel[post]
  cv.paint(full, (cdist < rc) & body, "spinal_cord", ID["spinal_cord"])
  del vrho, cdist, t_lvl

  # ---- Paraspinal (autochthon) and psoas muscles.
  for side, name in ((1, "autochthon_left"), (-1, "autochthon_right")):
    e = (((X - x_vb - side * 27 * s) / (22 * s)) ** 2
         + ((Y - (y_can - 20 * s)) / (20 * s)) ** 2)
    cv.paint(full, (e < 1) & (depth > tf_theta), "muscle", ID[name],
             onto=("muscle", "visceral_fat", "subcutaneous_fat"))
  psoas_top = z_l1 + seg_h
  r_ps = np.where(Z < psoas_top, 4 + 18 * s * _smoothstep((psoas_top - Z) / 110), 0)
  for side, name in ((1, "iliopsoas_left"), (-1, "iliopsoas_right")):
    cxp = x_vb + side * (rx + r_ps * 0.85)
    r = np.maximum(r_ps, 1e-3)
    e = ((X - cxp) / r) ** 2 + ((Y - y_vb - 3) / (0.9 * r)) ** 2
    cv.paint(full, (e < 1) & (r_ps > 0), "muscle", ID[name], onto=("visceral_fat",))

  # ---- Ribs: oblique bony arcs in the chest wall, anterior gap widening caudally.
  ang_post = np.abs(np.angle(np.exp(1j * (theta + np.pi / 2))))  # 0 posterior .. pi anterior
  gap = np.deg2rad(20 + 75 * _smoothstep((z_dia - 10 - Z) / 70))
  rib_period = rng.uniform(26, 32) * s
  z_eff = Z + 60 * ang_post + rng.uniform(0, rib_period)
  rib_band = (depth > tf_theta + 1) & (depth < tf_theta + tm + 1)
  ribs = (rib_band & (np.mod(z_eff, rib_period) < 9) & (ang_post > np.deg2rad(28))
          & (ang_post < np.pi - gap) & (Z > z_dia - 85))
  cv.paint(full, ribs, "rib", onto=("muscle", "visceral_fat"))
  del z_eff, ang_post

  # ---- Diaphragm: two domes; lungs/heart above, abdominal organs below.
  zd_r = z_dia
  zd_l = z_dia - rng.uniform(5, 18)
  drop = rng.uniform(35, 50)

  def diaphragm(x, y):
    hr = zd_r - drop * (((x + 55 * s) / (95 * s)) ** 2 + ((y - 5) / (90 * s)) ** 2)
    hl = zd_l - drop * (((x - 55 * s) / (95 * s)) ** 2 + ((y - 5) / (90 * s)) ** 2)
    return np.maximum(hr, hl)

  h = diaphragm(X, Y)
  cv.paint(full, np.abs(Z - h) < 2.5, "muscle", onto=("visceral_fat",))
  above = Z > h

  # ---- Great vessels.
  thor = _smoothstep((Z - (z_dia - 40)) / 60)  # 0 abdomen .. 1 thorax
  r_a = (10 + 2.5 * thor) * s * rng.uniform(0.9, 1.1)
  xa = x_vb + (1 - thor) * 9 * s + thor * (rx + r_a - 4)
  ya = y_vb + (1 - thor) * (ry + r_a + 3) + thor * 3
  aorta = (X - xa) ** 2 + (Y - ya) ** 2 < r_a ** 2
  cv.paint(full, aorta & cavity, "aorta", ID["aorta"],
           onto=("visceral_fat", "muscle", "cancellous_bone", "cortical_bone"))
  cv.reserved |= (X - xa) ** 2 + (Y - ya) ** 2 < (r_a + 4) ** 2
  # Retroperitoneal midline (crura, aorta, spine): intraperitoneal organs stay out of it.
  retro = ((((X - x_vb) / (rx + 10)) ** 2 + ((Y - y_vb) / (ry + 12)) ** 2 < 1)
           | ((X - xa) ** 2 + (Y - ya) ** 2 < (r_a + 9) ** 2))
  xi, yi = x_vb - 24 * s, y_vb + ry + 13 * s
  ivc = (((X - xi) / (13 * s)) ** 2 + ((Y - yi) / (9 * s)) ** 2 < 1) & (Z < h + 15)
  cv.paint(full, ivc & cavity, "ivc", ID["inferior_vena_cava"], onto=("visceral_fat", "muscle"))
  del thor, aorta

  # ---- Heart (on the diaphragm, left-anterior) with a pericardial fat margin.
  heart = _Ellipsoid((18 * s, 28 * s + yc, z_dia + 48),
                     np.array([58, 45, 55]) * s * rng.uniform(0.9, 1.1),
                     _rot(np.deg2rad(rng.uniform(20, 40))), _wobble(rng, amp=0.05))
  sl = cv.box(heart.center, heart.extent() * 1.15)
  lev = heart.level(cv.coords(sl))
  cv.paint(sl, (lev < 1) & (Z[sl] > h[sl] + 2.5), "heart", ID["heart"], onto=("visceral_fat",))
  cv.reserved[sl] |= lev < 1.12

  # ---- Lungs: cavity above the diaphragm, outside the mediastinum; five lobes by fissures.
  mediastinum = (np.abs(X - x_vb - 4) < 16 * s) & (Y > y_vb - ry)
  lung = above & (Z > h + 2.5) & ~mediastinum & ~(np.abs(X - x_vb) < rx + 6)
  yf = y_vb + rng.uniform(-10, 10)
  z_obl = z_dia + rng.uniform(45, 70) - rng.uniform(0.8, 1.2) * (Y - yf)  # oblique fissure
  z_hor = z_dia + rng.uniform(30, 55)  # right horizontal fissure
  lower = Z < z_obl
  left = np.where(lower, ID["lung_lower_lobe_left"], ID["lung_upper_lobe_left"])
  right = np.where(lower, ID["lung_lower_lobe_right"],
                   np.where(Z < z_hor, ID["lung_middle_lobe_right"], ID["lung_upper_lobe_right"]))
  lobes = np.where(X > x_vb, left, right).astype(np.uint8)
  painted = cv.paint(full, lung, "lung", 0, onto=("visceral_fat",))
  cv.seg[painted] = lobes[painted]
  vess = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=f32),
                                 (1.5 / sx, 1.5 / sy, 1.5 / sz))
  vess = painted & (vess > 2.1 * vess.std())
  cv.tissue[vess] = T["lung_vessel"]
  cv.hu[vess] = hu_table[T["lung_vessel"]]
  del lobes, left, right, lower, z_obl, vess, mediastinum

  # ---- Kidneys (perirenal fat margin reserved so neighbours never touch them).
  z_kr = -40 + zshift + rng.uniform(-10, 10)
  kidneys = []
  for side, name, zk in ((-1, "kidney_right", z_kr), (1, "kidney_left", z_kr + rng.uniform(5, 20))):
    axes = np.array([26, 30, 54]) * s * rng.uniform(0.88, 1.12, size=3)
    c = (side * rng.uniform(62, 74) * s, spine_y(zk) - 6 + rng.uniform(-5, 5), zk)
    # Mirrored frame: local +x is medial; yaw turns the hilum anteromedially, pitch tilts the
    # upper pole medially.
    rot = _rot(np.deg2rad(rng.uniform(20, 40)), np.deg2rad(-rng.uniform(5, 15)))
    kid = _Ellipsoid(c, axes, rot, _wobble(rng, amp=0.04), mirror_x=(side > 0))
    kidneys.append((name, kid))
    sl = cv.box(c, kid.extent() * 1.3)
    p = cv.coords(sl)
    u = kid.local(p)
    lev = kid.level(p, u)
    inside = lev < 1
    mask = cv.paint(sl, inside, "kidney_cortex", ID[name],
                    onto=("visceral_fat", "muscle"), respect_reserved=False)
    # Renal sinus: opens medially at the hilum.
    sin = ((u[0] - 0.5) / 0.55) ** 2 + (u[1] / 0.42) ** 2 + (u[2] / 0.58) ** 2 < 1
    # Medulla: pyramids under a ~6 mm cortex, separated by cortical columns.
    cort = 6.0 / float(np.mean(axes))
    phi = np.arctan2(u[1], u[0] - 0.3)
    pyr = (np.cos(4 * phi + rng.uniform(0, 6.3))
           + np.cos(np.pi * u[2] * 2.2 + rng.uniform(0, 6.3))) > -0.7
    med = mask & (lev < 1 - cort) & ~sin & pyr
    cv.paint(sl, med, "kidney_medulla", ID[name])
    cv.paint(sl, mask & sin, "renal_sinus_fat", ID[name])
    cv.reserved[sl] |= lev < 1 + 7.0 / float(np.mean(axes))
    del u, lev, phi, pyr

  # ---- Liver: big right lobe + left lobe across the midline, under the right dome.
  liver_parts = [
      _Ellipsoid((-62 * s + rng.uniform(-8, 8), yc + rng.uniform(-8, 8), z_dia - 45),
                 np.array([72, 85, 70]) * s * rng.uniform(0.9, 1.1, size=3),
                 _rot(np.deg2rad(rng.uniform(-10, 10)), np.deg2rad(rng.uniform(-8, 8))),
                 _wobble(rng, 4, 0.06)),
      _Ellipsoid((12 * s + rng.uniform(-10, 10), yc + 52 * s, z_dia - 30),
                 np.array([60, 27, 30]) * s * rng.uniform(0.8, 1.15, size=3),
                 _rot(np.deg2rad(rng.uniform(-30, -5))), _wobble(rng, 3, 0.06)),
  ]
  for part in liver_parts:
    sl = cv.box(part.center, part.extent())
    cv.paint(sl, (part.level(cv.coords(sl)) < 1) & (Z[sl] < h[sl] - 2.5) & ~retro[sl], "liver",
             ID["liver"], onto=("visceral_fat",))
  liver_z = np.nonzero((cv.seg == ID["liver"]).any(axis=(0, 1)))[0]

  # Gallbladder in the fossa under the liver (overrides liver, may bulge below it).
  if rng.random() < 0.7 and liver_z.size:
    z_low = float(z1.ravel()[liver_z[0]])
    gb = _Ellipsoid((-28 * s, yc + 30 * s, z_low + 30),
                    np.array([14, 18, 32]) * s * rng.uniform(0.8, 1.2),
                    _rot(0, np.deg2rad(rng.uniform(10, 30))), _wobble(rng, amp=0.05))
    sl = cv.box(gb.center, gb.extent())
    cv.paint(sl, gb.level(cv.coords(sl)) < 1, "gallbladder", ID["gallbladder"],
             onto=("liver", "visceral_fat"))

  # ---- Spleen: along the left posterolateral wall, concave medially.
  spl_axes = np.array([26, 62, 55]) * s * rng.uniform(0.85, 1.15, size=3)
  spl_c = np.array([80 * s, yc - 38 * s, zd_l - 38 + rng.uniform(-8, 8)])
  yaw = np.deg2rad(-45 + rng.uniform(-12, 12))
  spleen = _Ellipsoid(spl_c, spl_axes, _rot(yaw), _wobble(rng, amp=0.05))
  inward = np.array([-math.cos(-np.pi / 4), -math.sin(-np.pi / 4), 0.0])
  notch = _Ellipsoid(spl_c + inward * spl_axes[0] * 1.5, spl_axes * [1.2, 0.85, 0.8], _rot(yaw))
  sl = cv.box(spl_c, spleen.extent())
  p = cv.coords(sl)
  cv.paint(sl, (spleen.level(p) < 1) & (notch.level(p) > 1) & (Z[sl] < h[sl] - 2.5) & ~retro[sl],
           "spleen", ID["spleen"], onto=("visceral_fat",))

  # ---- Stomach: wall, fluid and an anterior gas cap (patient supine).
  if rng.random() < 0.85:
    st = _Ellipsoid((45 * s, yc + 22 * s, zd_l - 45 + rng.uniform(-8, 8)),
                    np.array([42, 34, 50]) * s * rng.uniform(0.8, 1.15, size=3),
                    _rot(np.deg2rad(rng.uniform(-30, 30)), np.deg2rad(rng.uniform(-15, 15))),
                    _wobble(rng, amp=0.06))
    sl = cv.box(st.center, st.extent())
    p = cv.coords(sl)
    lev = st.level(p)
    m = cv.paint(sl, (lev < 1) & (Z[sl] < h[sl] - 2.5) & ~retro[sl], "stomach_wall", ID["stomach"],
                 onto=("visceral_fat",))
    lumen = m & (lev < 1 - 5.0 / float(np.mean(st.axes)))
    gas_level = st.center[1] + st.axes[1] * rng.uniform(0.1, 0.6)
    cv.paint(sl, lumen & (p[1] <= gas_level), "fluid", ID["stomach"])
    cv.paint(sl, lumen & (p[1] > gas_level), "gas", ID["stomach"])

  # ---- Bowel loops: a band around the zero set of a smooth random field (tube-like), with
  # some gas, in the free abdominal fat below the liver dome.
  field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=f32), (9 / sx, 9 / sy, 9 / sz))
  field /= field.std() + 1e-6
  loops = (np.abs(field) < rng.uniform(0.3, 0.45)) & (Z < z_dia - 55) & (Y > y_vb - ry)
  m = cv.paint(full, loops, "bowel", ID["small_bowel"], onto=("visceral_fat",))
  gas = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=f32), (5 / sx, 5 / sy, 5 / sz))
  gas = m & (gas > 1.6 * gas.std())
  cv.tissue[gas] = T["gas"]
  cv.hu[gas] = hu_table[T["gas"]]
  del field, loops, gas

  # ---- Lesions strictly inside their host (host eroded by one voxel, 26-connectivity).
  n_liver = n_kidney = 0
  if lesions:
    n_liver = _add_lesions(cv, rng, [ID["liver"]], LIVER_TUMOR, "liver_lesion",
                           int(rng.integers(1, 4)), (6.0, 20.0))
    n_kidney = _add_lesions(cv, rng, [ID["kidney_right"], ID["kidney_left"]], KIDNEY_TUMOR,
                            "kidney_lesion", int(rng.integers(1, 3)), (7.0, 18.0))

  # ---- Image formation: texture, scanner blur (PSF), correlated noise.
  hu = cv.hu
  tex = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=f32), (4 / sx, 4 / sy, 4 / sz))
  tex *= f32(6.0 / (tex.std() + 1e-6))
  textured = np.isin(cv.tissue, [T[t] for t in _TEXTURED])
  hu[textured] += tex[textured]
  hu = ndimage.gaussian_filter(hu, (0.45, 0.45 * sx / sy, 0.35))
  sigma_n = rng.uniform(8, 18)
  noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=f32), (0.6, 0.6, 0.0))
  noise *= f32(sigma_n / (noise.std() + 1e-6))
  ct = np.clip(np.rint(hu + noise), -1024, 3071).astype(np.int16)
  # Anatomy is modelled with +x towards the patient's left; RAS+ voxel axis 0 points to the
  # patient's right (as nibabel and the shared TotalSegmentator cases have it), so flip x.
  flip = lambda a: np.ascontiguousarray(a[::-1])
  return PhantomCase(ct=flip(ct), seg=flip(cv.seg), affine=affine, tissues=flip(cv.tissue),
                     num_liver_lesions=n_liver, num_kidney_lesions=n_kidney)


def _add_lesions(cv: _Canvas, rng: np.random.Generator, host_ids: list[int], label: int,
                 tissue: str, count: int, radius_mm: tuple[float, float]) -> int:
  """Places up to `count` blob tumours inside the host labels; returns how many were placed."""
  placed = 0
  margin = 1.5 * float(cv.spacing.max())
  for _ in range(count):
    host_id = int(rng.choice(host_ids))
    host = cv.seg == host_id
    if not host.any():
      continue
    # Distance (mm) to the host boundary, on the host's bounding box only.
    idx = np.nonzero(host)
    sl = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    sub = host[sl]
    dist = ndimage.distance_transform_edt(sub, sampling=cv.spacing)
    r = rng.uniform(*radius_mm)
    cand = np.argwhere(dist >= r + margin)
    if cand.size == 0:
      r = float(dist.max()) - margin
      if r < 4.0:
        continue
      cand = np.argwhere(dist >= r + margin - 1e-6)
    ci = cand[rng.integers(len(cand))]
    center = [float(cv.x[sl][tuple(ci)]), float(cv.y[sl][tuple(ci)]), float(cv.z[sl][tuple(ci)])]
    blob = _Ellipsoid(center, r * rng.uniform(0.8, 1.2, size=3),
                      _rot(rng.uniform(0, np.pi), rng.uniform(0, np.pi)), _wobble(rng, amp=0.08))
    p = cv.coords(sl)
    lev = blob.level(p)
    inner = ndimage.binary_erosion(sub, np.ones((3, 3, 3), bool), border_value=0)
    mask = (lev < 1) & inner
    if not mask.any():
      continue
    kind = rng.random()
    if tissue == "liver_lesion":
      # Mostly hypodense (metastasis-like, sometimes rim-enhancing), else hyperdense (HCC-like).
      if kind < 0.7:
        hu = np.full(lev.shape, rng.uniform(18, 40), np.float32)
        hu[(lev > 0.8)] += rng.uniform(0, 40)
      else:
        hu = np.full(lev.shape, rng.uniform(90, 120), np.float32)
    else:
      # Solid enhancing renal tumour with a necrotic core, or homogeneous hypodense.
      if kind < 0.6:
        hu = np.where(lev < 0.5, rng.uniform(15, 30), rng.uniform(70, 110)).astype(np.float32)
      else:
        hu = np.full(lev.shape, rng.uniform(20, 35), np.float32)
    cv.paint(sl, mask, tissue, label, hu=hu)
    placed += 1
  return placed


def generate_case(rng_or_seed, shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: Sequence[float] = DEFAULT_SPACING, lesions: bool = False,
                  return_tissues: bool = False):
  """Generates one phantom volume.

  Args:
    rng_or_seed: an int seed, a SeedSequence or a numpy Generator (consumed).
    shape: grid size (x, y, z) in voxels; anatomy is in mm so this sets the field of view.
    spacing: voxel size (x, y, z) in mm.
    lesions: add liver and kidney tumours (labels LIVER_TUMOR / KIDNEY_TUMOR).
    return_tissues: also return the tissue-class map (ids index TISSUES).

  Returns:
    (ct int16 HU, seg uint8 labels, affine 4x4) [+ tissues uint8].
  """
  case = _generate(_as_rng(rng_or_seed), shape, spacing, lesions)
  if return_tissues:
    return case.ct, case.seg, case.affine, case.tissues
  return case.ct, case.seg, case.affine


MANIFEST_COLUMNS = ("case_id", "image", "label", "num_slices", "spacing_x", "spacing_y",
                    "spacing_z", "has_lesions", "num_liver_lesions", "num_kidney_lesions")


def write_cohort(output_dir, num_cases: int, seed: int = 0, lesions: bool = False,
                 shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] = DEFAULT_SPACING, prefix: str = "phantom",
                 progress: bool = True) -> list[str]:
  """Writes `num_cases` phantom cases, labels.json and manifest.csv; returns the case ids.

  Case i uses `case_rng(seed, i)`, so a case does not depend on how many others are written.
  """
  if num_cases < 1:
    raise ValueError(f"num_cases must be >= 1, got {num_cases}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  shape, spacing = _check_grid(shape, spacing)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "labels.json", "w") as f:
    json.dump({str(k): v for k, v in sorted(LABELS.items())}, f, indent=1)
  rows, ids = [], []
  for i in tqdm(range(num_cases), desc="phantom cases", unit="case", disable=not progress):
    case_id = f"{prefix}_{i:03d}"
    case = _generate(case_rng(seed, i), shape, spacing, lesions)
    img = nib.Nifti1Image(case.ct, case.affine)
    img.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, out / f"{case_id}_ct.nii.gz")
    lab = nib.Nifti1Image(case.seg, case.affine)
    lab.set_data_dtype(np.uint8)
    lab.header.set_xyzt_units("mm", "sec")
    nib.save(lab, out / f"{case_id}_seg.nii.gz")
    ids.append(case_id)
    rows.append({
        "case_id": case_id, "image": f"{case_id}_ct.nii.gz", "label": f"{case_id}_seg.nii.gz",
        "num_slices": shape[2], "spacing_x": spacing[0], "spacing_y": spacing[1],
        "spacing_z": spacing[2],
        "has_lesions": int(case.num_liver_lesions + case.num_kidney_lesions > 0),
        "num_liver_lesions": case.num_liver_lesions,
        "num_kidney_lesions": case.num_kidney_lesions,
    })
  with open(out / "manifest.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return ids
