"""Geometry the phantom painters draw with: the volume canvas and wobbly ellipsoids.

All geometry is in world millimetres (x towards the patient's left, y anterior, z cranial,
origin at the volume centre), so a different grid or spacing shows the same body. The canvas
holds a smoothly warped copy of those coordinates: every structure painted through it gets
the same random global deformation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from ctdiff_jax.phantom.tables import T

FULL = (slice(None),) * 3  # the whole volume, as a `Canvas.box`
WARP_AMP = 6.0  # mm, amplitude scale of the smooth global warp


def rot(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
  """Rotation matrix (radians): yaw about z, pitch about y, roll about x."""
  cz, sz = math.cos(yaw), math.sin(yaw)
  cy, sy = math.cos(pitch), math.sin(pitch)
  cx, sx = math.cos(roll), math.sin(roll)
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  return rz @ ry @ rx


def wobble(rng: np.random.Generator, n: int = 3, amp: float = 0.07) -> tuple:
  """Low-order surface perturbation terms (freq (3,), phase, amplitude) for an ellipsoid."""
  return tuple((rng.normal(size=3) * 1.6, rng.uniform(0, 2 * np.pi), amp * rng.uniform(0.3, 1.0))
               for _ in range(n))


def smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3 - 2 * t)


@dataclasses.dataclass
class Ellipsoid:
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


def check_grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
  """Validated (shape, spacing) as 3 ints >= 4 and 3 positive floats."""
  shape = tuple(int(s) for s in shape)
  spacing = tuple(float(s) for s in spacing)
  if len(shape) != 3 or min(shape) < 4:
    raise ValueError(f"phantom grid must be 3 sizes >= 4 voxels, got {shape}")
  if len(spacing) != 3 or min(spacing) <= 0:
    raise ValueError(f"phantom spacing must be 3 positive mm values, got {spacing}")
  return shape, spacing


def grid_axes(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Unwarped world mm of the voxel centres along x, y, z, shaped to broadcast to `shape`."""
  (nx, ny, nz), (sx, sy, sz) = shape, spacing
  f32 = np.float32
  x1 = ((np.arange(nx) - (nx - 1) / 2) * sx).astype(f32)[:, None, None]
  y1 = ((np.arange(ny) - (ny - 1) / 2) * sy).astype(f32)[None, :, None]
  z1 = ((np.arange(nz) - (nz - 1) / 2) * sz).astype(f32)[None, None, :]
  return x1, y1, z1


def _warped(rng: np.random.Generator, shape, axes) -> list[np.ndarray]:
  """Full-volume world coordinates plus a smooth random displacement (a few cosine modes)."""
  f32 = np.float32
  x1, y1, z1 = axes
  coords = []
  for base in axes:
    disp = np.zeros(shape, f32)
    for _ in range(3):
      w = rng.normal(size=3)
      w *= 2 * np.pi / rng.uniform(180, 360) / np.linalg.norm(w)
      phase = rng.uniform(0, 2 * np.pi)
      disp += f32(rng.normal() * WARP_AMP / 2) * np.cos(
          f32(w[0]) * x1 + f32(w[1]) * y1 + f32(w[2]) * z1 + f32(phase))
    coords.append(base + disp)
  return coords


class Canvas:
  """The volume being painted: base HU, tissue ids, label ids and reserved (fat) margins.

  `x, y, z` are the warped world coordinates of every voxel; `axes` the unwarped ones per
  axis. Painters work on index boxes (`box`) so that small organs touch small arrays.
  """

  def __init__(self, rng: np.random.Generator, shape, spacing, hu_table: np.ndarray):
    """Draws the case's warp from `rng`; `hu_table` is the HU per tissue id for this case."""
    self.shape = shape
    self.spacing = np.asarray(spacing, np.float64)
    self.axes = grid_axes(shape, spacing)
    self.x, self.y, self.z = _warped(rng, shape, self.axes)
    self.origin = -(np.asarray(shape) - 1) / 2 * self.spacing
    self.hu_table = hu_table
    self.margin = 2 * WARP_AMP  # boxes grow by this so a warped organ still fits
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

  def smooth_noise(self, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """White noise over the volume, Gaussian-smoothed at `sigma_mm` (not normalised)."""
    sx, sy, sz = self.spacing
    return ndimage.gaussian_filter(rng.standard_normal(self.shape, dtype=np.float32),
                                   (sigma_mm / sx, sigma_mm / sy, sigma_mm / sz))

  def set_tissue(self, mask, tissue) -> None:
    """Retypes voxels (tissue and HU) without touching their label: vessels in a lung, gas."""
    self.tissue[mask] = T[tissue]
    self.hu[mask] = self.hu_table[T[tissue]]
