"""The phantom's anatomy, painted onto a `Canvas` by one function per structure.

`paint_case` walks `PAINTERS` in order. Each painter takes the canvas, the case's numpy
Generator and the `Anatomy` landmarks the earlier painters left (body outline, spine position,
diaphragm height, ...), paints its structure and records the landmarks later ones need. Order
matters twice: a structure only covers the tissues it is allowed `onto` (so later organs fill
the fat left between earlier ones), and every case is a fixed sequence of draws from its
generator. Reordering painters, or draws inside one, changes every case; tests/phantom pins
the output.

Sizes are in mm scaled by the patient size `s`; x runs towards the patient's left (the cohort
writer flips it to RAS+ at the end).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from ctdiff_jax.phantom.canvas import FULL, Canvas, Ellipsoid, rot, smoothstep, wobble
from ctdiff_jax.phantom.tables import ID, KIDNEY_TUMOR, LIVER_TUMOR, VERTEBRA_L1

f32 = np.float32


@dataclasses.dataclass(slots=True)
class Anatomy:
  """Landmarks one painter leaves for the next (world mm; arrays are full-volume)."""
  # paint_body: global body parameters and the body outline.
  s: float = None  # patient size
  ax: float = None  # body half-width
  ay: float = None  # body half-depth
  yc: float = None  # body centre, anterior-posterior
  zshift: float = None  # cranio-caudal position of the anatomy in the field of view
  tf: float = None  # subcutaneous fat thickness
  tm: float = None  # abdominal wall muscle thickness
  z_dia: float = None  # right diaphragm dome
  body: np.ndarray = None  # inside the skin
  cavity: np.ndarray = None  # inside the abdominal wall
  depth: np.ndarray = None  # distance in from the skin along the ray from the body axis
  theta: np.ndarray = None  # angle of that ray
  tf_theta: np.ndarray = None  # subcutaneous fat thickness along that ray
  # paint_spine.
  x_vb: np.ndarray = None  # vertebral body centre (x, y), radii (rx, ry)
  y_vb: np.ndarray = None
  rx: np.ndarray = None
  ry: np.ndarray = None
  seg_h: float = None  # vertebra + disc height
  z_l1: float = None  # lower end of L1
  y_can: np.ndarray = None  # spinal canal centre
  # paint_diaphragm.
  zd_l: float = None  # left dome
  h: np.ndarray = None  # diaphragm height over (x, y)
  # paint_great_vessels.
  retro: np.ndarray = None  # retroperitoneal midline, kept free of intraperitoneal organs

  def spine_y(self, z):
    """Vertebral body centre (y) at height z; lumbar lordosis: lower = more anterior."""
    return self.yc - self.ay + self.tf * 0.6 + 78 * self.s - 0.06 * (z - self.zshift)

  def below_diaphragm(self, sl, z):
    """Abdominal organ space in box `sl` (z its warped heights): under the diaphragm muscle and
    out of the retroperitoneal midline."""
    return (z < self.h[sl] - 2.5) & ~self.retro[sl]


def paint_body(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Draws the global body parameters; paints subcutaneous fat, abdominal wall, visceral fat."""
  X, Y, Z = cv.x, cv.y, cv.z
  a.s = s = rng.uniform(0.9, 1.1)
  a.ax = ax = rng.uniform(138, 168) * s
  a.ay = ay = rng.uniform(98, 120) * s
  a.yc = yc = rng.uniform(-8, 8)
  a.zshift = rng.uniform(-15, 15)
  a.tf = tf = rng.uniform(8, 26)
  a.tm = tm = rng.uniform(7, 12)
  a.z_dia = 55 + a.zshift

  # Outline: superellipse, flatter posteriorly, slowly varying along z.
  axz = ax * (1 + 0.04 * np.sin(Z / 130 + rng.uniform(0, 6.3)))
  dx, dy = X, Y - f32(yc)
  n = np.where(dy < 0, f32(2.6), f32(2.0))
  rho = (np.abs(dx / axz) ** n + np.abs(dy / f32(ay)) ** n) ** (1 / n)
  rad = np.sqrt(dx ** 2 + dy ** 2)
  a.depth = depth = rad * (1 - rho) / np.maximum(rho, 1e-3)
  a.theta = theta = np.arctan2(dy, dx)
  a.tf_theta = tf_theta = tf * (1 + 0.3 * np.cos(theta - rng.uniform(0, 2 * np.pi))
                                + 0.15 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi)))
  a.body = body = rho < 1
  cv.paint(FULL, body, "subcutaneous_fat")
  cv.paint(FULL, body & (depth >= tf_theta), "muscle")
  a.cavity = body & (depth >= tf_theta + tm)
  cv.paint(FULL, a.cavity, "visceral_fat")


def paint_table(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Scanner table under the back (most cases)."""
  if rng.random() < 0.8:
    y_tab = a.yc - a.ay - rng.uniform(8, 25) + cv.x ** 2 / 900.0
    table = (np.abs(cv.y - y_tab) < 4) & (np.abs(cv.x) < 0.8 * a.ax)
    cv.paint(FULL, table & ~a.body, "table")


def paint_spine(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Vertebral bodies (shell + cancellous core), discs, canal and cord, posterior elements."""
  X, Y, Z = cv.x, cv.y, cv.z
  s, body = a.s, a.body
  a.y_vb = y_vb = a.spine_y(Z)
  a.x_vb = x_vb = 3 * np.sin(Z / 150 + rng.uniform(0, 6.3))  # slight scoliosis
  lumbar = smoothstep((a.z_dia - 20 - Z) / 80)  # 0 thoracic .. 1 lumbar
  a.rx = rx = (17 + 6 * lumbar) * s
  a.ry = ry = (14 + 4 * lumbar) * s
  a.seg_h = seg_h = rng.uniform(31, 36) * s
  disc_h = rng.uniform(7, 9)
  a.z_l1 = -15 + a.zshift + rng.uniform(-5, 5)
  t_lvl = (Z - a.z_l1) / seg_h
  level = np.floor(t_lvl)
  frac = t_lvl - level
  vlabel = (VERTEBRA_L1 + np.clip(level, -4, 6)).astype(np.uint8)
  vdx, vdy = X - x_vb, Y - y_vb
  vrho = np.sqrt((vdx / rx) ** 2 + (vdy / ry) ** 2)
  is_disc = frac > 1 - disc_h / seg_h
  vb = vrho < 1
  cv.paint(FULL, vb & is_disc & body, "disc")
  bone_shell = vb & ~is_disc & (vrho > 1 - 3.0 / rx)
  cv.paint(FULL, vb & ~is_disc & body, "cancellous_bone")
  cv.paint(FULL, bone_shell & body, "cortical_bone")
  cv.seg[vb & ~is_disc & body] = vlabel[vb & ~is_disc & body]
  # Canal and posterior arch.
  rc = 8.5 * s
  a.y_can = y_can = y_vb - ry - rc - 1
  cdist = np.sqrt((X - x_vb) ** 2 + (Y - y_can) ** 2)
  arch_z = (frac > 0.08) & (frac < 0.72)
  arch = (cdist >= rc) & (cdist < rc + 6 * s) & (Y < y_vb - ry * 0.6)
  spinous = (np.abs(X - x_vb) < 3.5 * s) & (Y < y_can - rc) & (Y > y_can - rc - 32 * s)
  transverse = ((np.abs(Y - (y_can + 2)) < 3 * s) & (np.abs(X - x_vb) > rc)
                & (np.abs(X - x_vb) < rc + (16 + 8 * lumbar) * s) & (frac > 0.3) & (frac < 0.55))
  post = (arch | spinous | transverse) & arch_z & body & (a.depth > a.tf_theta)
  cv.paint(FULL, post, "cortical_bone")
  cv.seg[post] = vlabel[post]
  cv.paint(FULL, (cdist < rc) & body, "spinal_cord", ID["spinal_cord"])


def paint_back_muscles(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Paraspinal (autochthon) and psoas muscles beside the spine (no random draws)."""
  del rng
  X, Y, Z = cv.x, cv.y, cv.z
  s, x_vb = a.s, a.x_vb
  for side, name in ((1, "autochthon_left"), (-1, "autochthon_right")):
    e = (((X - x_vb - side * 27 * s) / (22 * s)) ** 2
         + ((Y - (a.y_can - 20 * s)) / (20 * s)) ** 2)
    cv.paint(FULL, (e < 1) & (a.depth > a.tf_theta), "muscle", ID[name],
             onto=("muscle", "visceral_fat", "subcutaneous_fat"))
  psoas_top = a.z_l1 + a.seg_h
  r_ps = np.where(Z < psoas_top, 4 + 18 * s * smoothstep((psoas_top - Z) / 110), 0)
  for side, name in ((1, "iliopsoas_left"), (-1, "iliopsoas_right")):
    cxp = x_vb + side * (a.rx + r_ps * 0.85)
    r = np.maximum(r_ps, 1e-3)
    e = ((X - cxp) / r) ** 2 + ((Y - a.y_vb - 3) / (0.9 * r)) ** 2
    cv.paint(FULL, (e < 1) & (r_ps > 0), "muscle", ID[name], onto=("visceral_fat",))


def paint_ribs(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Oblique bony arcs in the chest wall, the anterior gap widening caudally."""
  Z, depth, tf_theta = cv.z, a.depth, a.tf_theta
  ang_post = np.abs(np.angle(np.exp(1j * (a.theta + np.pi / 2))))  # 0 posterior .. pi anterior
  gap = np.deg2rad(20 + 75 * smoothstep((a.z_dia - 10 - Z) / 70))
  rib_period = rng.uniform(26, 32) * a.s
  z_eff = Z + 60 * ang_post + rng.uniform(0, rib_period)
  rib_band = (depth > tf_theta + 1) & (depth < tf_theta + a.tm + 1)
  ribs = (rib_band & (np.mod(z_eff, rib_period) < 9) & (ang_post > np.deg2rad(28))
          & (ang_post < np.pi - gap) & (Z > a.z_dia - 85))
  cv.paint(FULL, ribs, "rib", onto=("muscle", "visceral_fat"))


def paint_diaphragm(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Two domes of muscle; lungs and heart go above them, abdominal organs below."""
  s = a.s
  zd_r = a.z_dia
  a.zd_l = zd_l = a.z_dia - rng.uniform(5, 18)
  drop = rng.uniform(35, 50)
  X, Y = cv.x, cv.y
  hr = zd_r - drop * (((X + 55 * s) / (95 * s)) ** 2 + ((Y - 5) / (90 * s)) ** 2)
  hl = zd_l - drop * (((X - 55 * s) / (95 * s)) ** 2 + ((Y - 5) / (90 * s)) ** 2)
  a.h = np.maximum(hr, hl)
  cv.paint(FULL, np.abs(cv.z - a.h) < 2.5, "muscle", onto=("visceral_fat",))


def paint_great_vessels(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Aorta (ventral to the spine, swinging left in the chest) and IVC; marks the midline."""
  X, Y, Z = cv.x, cv.y, cv.z
  s, x_vb, y_vb, rx, ry = a.s, a.x_vb, a.y_vb, a.rx, a.ry
  thor = smoothstep((Z - (a.z_dia - 40)) / 60)  # 0 abdomen .. 1 thorax
  r_a = (10 + 2.5 * thor) * s * rng.uniform(0.9, 1.1)
  xa = x_vb + (1 - thor) * 9 * s + thor * (rx + r_a - 4)
  ya = y_vb + (1 - thor) * (ry + r_a + 3) + thor * 3
  aorta = (X - xa) ** 2 + (Y - ya) ** 2 < r_a ** 2
  cv.paint(FULL, aorta & a.cavity, "aorta", ID["aorta"],
           onto=("visceral_fat", "muscle", "cancellous_bone", "cortical_bone"))
  cv.reserved |= (X - xa) ** 2 + (Y - ya) ** 2 < (r_a + 4) ** 2
  # Retroperitoneal midline (crura, aorta, spine): intraperitoneal organs stay out of it.
  a.retro = ((((X - x_vb) / (rx + 10)) ** 2 + ((Y - y_vb) / (ry + 12)) ** 2 < 1)
             | ((X - xa) ** 2 + (Y - ya) ** 2 < (r_a + 9) ** 2))
  xi, yi = x_vb - 24 * s, y_vb + ry + 13 * s
  ivc = (((X - xi) / (13 * s)) ** 2 + ((Y - yi) / (9 * s)) ** 2 < 1) & (Z < a.h + 15)
  cv.paint(FULL, ivc & a.cavity, "ivc", ID["inferior_vena_cava"], onto=("visceral_fat", "muscle"))


def paint_heart(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Heart on the diaphragm, left-anterior, with a pericardial fat margin."""
  s = a.s
  heart = Ellipsoid((18 * s, 28 * s + a.yc, a.z_dia + 48),
                    np.array([58, 45, 55]) * s * rng.uniform(0.9, 1.1),
                    rot(np.deg2rad(rng.uniform(20, 40))), wobble(rng, amp=0.05))
  sl = cv.box(heart.center, heart.extent() * 1.15)
  lev = heart.level(cv.coords(sl))
  cv.paint(sl, (lev < 1) & (cv.z[sl] > a.h[sl] + 2.5), "heart", ID["heart"],
           onto=("visceral_fat",))
  cv.reserved[sl] |= lev < 1.12


def paint_lungs(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Chest cavity above the diaphragm, outside the mediastinum; five lobes split by fissures,
  with a sparse tree of vessels."""
  X, Y, Z = cv.x, cv.y, cv.z
  x_vb, y_vb, z_dia = a.x_vb, a.y_vb, a.z_dia
  mediastinum = (np.abs(X - x_vb - 4) < 16 * a.s) & (Y > y_vb - a.ry)
  lung = (Z > a.h + 2.5) & ~mediastinum & ~(np.abs(X - x_vb) < a.rx + 6)
  yf = y_vb + rng.uniform(-10, 10)
  z_obl = z_dia + rng.uniform(45, 70) - rng.uniform(0.8, 1.2) * (Y - yf)  # oblique fissure
  z_hor = z_dia + rng.uniform(30, 55)  # right horizontal fissure
  lower = Z < z_obl
  left = np.where(lower, ID["lung_lower_lobe_left"], ID["lung_upper_lobe_left"])
  right = np.where(lower, ID["lung_lower_lobe_right"],
                   np.where(Z < z_hor, ID["lung_middle_lobe_right"], ID["lung_upper_lobe_right"]))
  lobes = np.where(X > x_vb, left, right).astype(np.uint8)
  painted = cv.paint(FULL, lung, "lung", 0, onto=("visceral_fat",))
  cv.seg[painted] = lobes[painted]
  cv.set_tissue(painted & _blobs(cv, rng, 1.5, 2.1), "lung_vessel")


def _blobs(cv: Canvas, rng: np.random.Generator, sigma_mm: float, threshold: float):
  """Where smooth noise (scale `sigma_mm`) exceeds `threshold` SDs: sparse random blobs."""
  field = cv.smooth_noise(rng, sigma_mm)
  return field > threshold * field.std()


def paint_kidneys(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Right then left kidney, the left a little higher."""
  z_kr = -40 + a.zshift + rng.uniform(-10, 10)
  for side, name, zk in ((-1, "kidney_right", z_kr), (1, "kidney_left", z_kr + rng.uniform(5, 20))):
    _paint_kidney(cv, rng, a, side, name, zk)


def _paint_kidney(cv: Canvas, rng: np.random.Generator, a: Anatomy, side: int, name: str,
                  zk: float) -> None:
  """Cortex, medullary pyramids and sinus fat; a perirenal fat margin is reserved so that
  neighbours never touch the kidney."""
  s = a.s
  axes = np.array([26, 30, 54]) * s * rng.uniform(0.88, 1.12, size=3)
  c = (side * rng.uniform(62, 74) * s, a.spine_y(zk) - 6 + rng.uniform(-5, 5), zk)
  # Mirrored frame: local +x is medial; yaw turns the hilum anteromedially, pitch tilts the
  # upper pole medially.
  r = rot(np.deg2rad(rng.uniform(20, 40)), np.deg2rad(-rng.uniform(5, 15)))
  kid = Ellipsoid(c, axes, r, wobble(rng, amp=0.04), mirror_x=(side > 0))
  sl = cv.box(c, kid.extent() * 1.3)
  p = cv.coords(sl)
  u = kid.local(p)
  lev = kid.level(p, u)
  mask = cv.paint(sl, lev < 1, "kidney_cortex", ID[name],
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


def _paint_organ(cv: Canvas, a: Anatomy, organ: Ellipsoid, tissue: str, label: str,
                 outside: Ellipsoid | None = None):
  """Paints an intraperitoneal organ into the visceral fat below the diaphragm (minus the
  `outside` ellipsoid); returns its box, coordinates, level and painted mask."""
  sl = cv.box(organ.center, organ.extent())
  p = cv.coords(sl)
  lev = organ.level(p)
  inside = lev < 1
  if outside is not None:
    inside = inside & (outside.level(p) > 1)
  mask = cv.paint(sl, inside & a.below_diaphragm(sl, p[2]), tissue, ID[label],
                  onto=("visceral_fat",))
  return sl, p, lev, mask


def paint_liver(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Big right lobe plus a left lobe across the midline, under the right dome."""
  s, yc, z_dia = a.s, a.yc, a.z_dia
  parts = [
      Ellipsoid((-62 * s + rng.uniform(-8, 8), yc + rng.uniform(-8, 8), z_dia - 45),
                np.array([72, 85, 70]) * s * rng.uniform(0.9, 1.1, size=3),
                rot(np.deg2rad(rng.uniform(-10, 10)), np.deg2rad(rng.uniform(-8, 8))),
                wobble(rng, 4, 0.06)),
      Ellipsoid((12 * s + rng.uniform(-10, 10), yc + 52 * s, z_dia - 30),
                np.array([60, 27, 30]) * s * rng.uniform(0.8, 1.15, size=3),
                rot(np.deg2rad(rng.uniform(-30, -5))), wobble(rng, 3, 0.06)),
  ]
  for part in parts:
    _paint_organ(cv, a, part, "liver", "liver")


def paint_gallbladder(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """In the fossa under the liver (most cases); overrides liver, may bulge below it."""
  liver_z = np.nonzero((cv.seg == ID["liver"]).any(axis=(0, 1)))[0]
  if rng.random() < 0.7 and liver_z.size:
    z_low = float(cv.axes[2].ravel()[liver_z[0]])
    s = a.s
    gb = Ellipsoid((-28 * s, a.yc + 30 * s, z_low + 30),
                   np.array([14, 18, 32]) * s * rng.uniform(0.8, 1.2),
                   rot(0, np.deg2rad(rng.uniform(10, 30))), wobble(rng, amp=0.05))
    sl = cv.box(gb.center, gb.extent())
    cv.paint(sl, gb.level(cv.coords(sl)) < 1, "gallbladder", ID["gallbladder"],
             onto=("liver", "visceral_fat"))


def paint_spleen(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Along the left posterolateral wall, concave medially."""
  s = a.s
  axes = np.array([26, 62, 55]) * s * rng.uniform(0.85, 1.15, size=3)
  c = np.array([80 * s, a.yc - 38 * s, a.zd_l - 38 + rng.uniform(-8, 8)])
  yaw = np.deg2rad(-45 + rng.uniform(-12, 12))
  spleen = Ellipsoid(c, axes, rot(yaw), wobble(rng, amp=0.05))
  inward = np.array([-math.cos(-np.pi / 4), -math.sin(-np.pi / 4), 0.0])
  notch = Ellipsoid(c + inward * axes[0] * 1.5, axes * [1.2, 0.85, 0.8], rot(yaw))
  _paint_organ(cv, a, spleen, "spleen", "spleen", outside=notch)


def paint_stomach(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Wall, fluid and an anterior gas cap (patient supine), in most cases."""
  if rng.random() < 0.85:
    s = a.s
    st = Ellipsoid((45 * s, a.yc + 22 * s, a.zd_l - 45 + rng.uniform(-8, 8)),
                   np.array([42, 34, 50]) * s * rng.uniform(0.8, 1.15, size=3),
                   rot(np.deg2rad(rng.uniform(-30, 30)), np.deg2rad(rng.uniform(-15, 15))),
                   wobble(rng, amp=0.06))
    sl, p, lev, m = _paint_organ(cv, a, st, "stomach_wall", "stomach")
    lumen = m & (lev < 1 - 5.0 / float(np.mean(st.axes)))
    gas_level = st.center[1] + st.axes[1] * rng.uniform(0.1, 0.6)
    cv.paint(sl, lumen & (p[1] <= gas_level), "fluid", ID["stomach"])
    cv.paint(sl, lumen & (p[1] > gas_level), "gas", ID["stomach"])


def paint_bowel(cv: Canvas, rng: np.random.Generator, a: Anatomy) -> None:
  """Loops: a band around the zero set of a smooth random field (tube-like), with some gas,
  in the free abdominal fat below the liver dome."""
  field = cv.smooth_noise(rng, 9)
  field /= field.std() + 1e-6
  loops = (np.abs(field) < rng.uniform(0.3, 0.45)) & (cv.z < a.z_dia - 55) & (cv.y > a.y_vb - a.ry)
  m = cv.paint(FULL, loops, "bowel", ID["small_bowel"], onto=("visceral_fat",))
  cv.set_tissue(m & _blobs(cv, rng, 5, 1.6), "gas")


# The anatomy in painting order (see the module docstring: the order is part of the output).
PAINTERS = (paint_body, paint_table, paint_spine, paint_back_muscles, paint_ribs,
            paint_diaphragm, paint_great_vessels, paint_heart, paint_lungs, paint_kidneys,
            paint_liver, paint_gallbladder, paint_spleen, paint_stomach, paint_bowel)


def paint_case(cv: Canvas, rng: np.random.Generator, lesions: bool) -> tuple[int, int]:
  """Paints the whole anatomy (then tumours if `lesions`); returns (#liver, #kidney) tumours."""
  a = Anatomy()
  for paint in PAINTERS:
    paint(cv, rng, a)
  if not lesions:
    return 0, 0
  return paint_lesions(cv, rng)


def paint_lesions(cv: Canvas, rng: np.random.Generator) -> tuple[int, int]:
  """1-3 liver and 1-2 kidney tumours strictly inside their host; returns how many of each."""
  n_liver = _add_lesions(cv, rng, [ID["liver"]], LIVER_TUMOR, "liver_lesion",
                         int(rng.integers(1, 4)), (6.0, 20.0))
  n_kidney = _add_lesions(cv, rng, [ID["kidney_right"], ID["kidney_left"]], KIDNEY_TUMOR,
                          "kidney_lesion", int(rng.integers(1, 3)), (7.0, 18.0))
  return n_liver, n_kidney


def _add_lesions(cv: Canvas, rng: np.random.Generator, host_ids: list[int], label: int,
                 tissue: str, count: int, radius_mm: tuple[float, float]) -> int:
  """Places up to `count` blob tumours inside the host labels (the host eroded by one voxel,
  26-connectivity); returns how many were placed."""
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
    ci = tuple(cand[rng.integers(len(cand))])
    center = [float(cv.x[sl][ci]), float(cv.y[sl][ci]), float(cv.z[sl][ci])]
    blob = Ellipsoid(center, r * rng.uniform(0.8, 1.2, size=3),
                     rot(rng.uniform(0, np.pi), rng.uniform(0, np.pi)), wobble(rng, amp=0.08))
    lev = blob.level(cv.coords(sl))
    mask = (lev < 1) & ndimage.binary_erosion(sub, np.ones((3, 3, 3), bool), border_value=0)
    if not mask.any():
      continue
    cv.paint(sl, mask, tissue, label, hu=_lesion_hu(rng, tissue, lev))
    placed += 1
  return placed


def _lesion_hu(rng: np.random.Generator, tissue: str, lev: np.ndarray) -> np.ndarray:
  """A tumour's HU over its box (`lev` its ellipsoid level) for one of a few appearances."""
  kind = rng.random()
  if tissue == "liver_lesion":
    # Mostly hypodense (metastasis-like, sometimes rim-enhancing), else hyperdense (HCC-like).
    if kind < 0.7:
      hu = np.full(lev.shape, rng.uniform(18, 40), np.float32)
      hu[(lev > 0.8)] += rng.uniform(0, 40)
      return hu
    return np.full(lev.shape, rng.uniform(90, 120), np.float32)
  # Solid enhancing renal tumour with a necrotic core, or homogeneous hypodense.
  if kind < 0.6:
    return np.where(lev < 0.5, rng.uniform(15, 30), rng.uniform(70, 110)).astype(np.float32)
  return np.full(lev.shape, rng.uniform(20, 35), np.float32)
