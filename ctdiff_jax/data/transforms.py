"""The HU <-> model intensity map and the Grain transforms that turn slice records into model examples.

This is an importable module (not a closure in pipeline code) so Grain worker processes can
unpickle the transforms.

`hu_to_unit` / `unit_to_hu` are the one place that maps Hounsfield units to the model's [-1, 1]
range and back; training, sampling and export all use them. The map (`IntensityMap`, knots from
config.data.intensity_hu / intensity_unit) is monotone piecewise-linear: most of [-1, 1] goes to
the organ's soft tissue, but it reaches the whole CT range, so generated HU are not capped by a
soft-tissue window (bone and gas inside a context/shape mask are representable).

Other modalities (config.data.modality, ctdiff_jax/ingest/modality.py): `to_unit` /
`unit_to_stored` first take an MR / PET record's stored int16 to its normalised value (MR: the
case's body percentiles p0.5 / p99.5 -> 0 / 1; PET: log(1 + SUV)), and the same knots then map
that normalised value instead of HU. CT records go through `hu_to_unit` unchanged.

Per record (see ctdiff_jax/ingest/records.py), `MakeExample` produces:

  image        float32 (H, W, 1) in [-1, 1]   CT slice through the intensity map
  mask         float32 (H, W, 1) in {0, 1}    1 = region to regenerate (see data/masks.py)
  cond         float32 (H, W, C)              concat([image * (1 - mask), mask]
                                                     + [prev, next, prev_known, next_known]
                                                     if neighbours)
  labels       uint8   (H, W, 1)
  slice_index  int32   ()

The masked region of cond's first channel is 0, i.e. mid-grey in [-1, 1].

prev_known / next_known are 0/1 maps of the pixels where the neighbour is known; an unknown
pixel of a neighbour is 0 in its channel:
- A missing neighbour (the builder repeats the edge slice at a volume end, so prev/next is
  bit-identical to the slice itself) would hand the model the answer, unmasked: it is unknown
  everywhere.
- A hidden neighbour is unknown inside a mask. 2.5D generation (generation/volume25d.py)
  hides a neighbour that is not generated yet inside its own slice of the 3D mask: its real
  content there is what the volume regenerates, so it must not be copied. Training hides each
  neighbour inside the slice's mask with probability data.neighbour_hide_prob, so one model
  serves every case: both neighbours hidden (independent slices, the seed slice), one
  generated and one hidden (the chain), both generated (a second pass).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import grain.python as grain
import numpy as np

from ctdiff_jax.ingest import modality as modality_lib
from ctdiff_jax.ingest import records
from ctdiff_jax.data import masks

# The default intensity map, equal to configs/default.py's config.data (tests/test_defaults.py):
# the whole CT range [-1024, 3071] HU, with soft tissue [-250, 350] HU on 80% of [-1, 1].
DEFAULT_INTENSITY_HU = (-1024.0, -250.0, 350.0, 3071.0)
DEFAULT_INTENSITY_UNIT = (-1.0, -0.8, 0.8, 1.0)
# HU used for pixels shifted in by a random translation (air).
AIR_HU = -1024


def _is_jax(x) -> bool:
  return type(x).__module__.startswith(("jax", "jaxlib"))


def _increasing(v) -> bool:
  return all(b > a for a, b in zip(v, v[1:]))


@dataclasses.dataclass(frozen=True)
class IntensityMap:
  """A monotone piecewise-linear map between HU knots and model-unit knots.

  `unit` runs from exactly -1 to exactly +1, so every model output in [-1, 1] has an HU. HU
  outside [hu[0], hu[-1]] are clipped; inside, the map is exactly invertible. A (lo, hi) HU
  window (display windows, older configs) is the two-knot map (lo, hi) -> (-1, 1).
  """

  hu: tuple[float, ...]
  unit: tuple[float, ...] = (-1.0, 1.0)

  def __post_init__(self):
    hu, unit = tuple(float(v) for v in self.hu), tuple(float(v) for v in self.unit)
    object.__setattr__(self, "hu", hu)
    object.__setattr__(self, "unit", unit)
    if len(hu) < 2 or len(hu) != len(unit):
      raise ValueError(f"an intensity map / HU window needs >= 2 knots and as many HU as unit "
                       f"knots, got hu={hu} unit={unit}")
    if not (_increasing(hu) and _increasing(unit)):
      raise ValueError(f"intensity map / HU window knots must increase strictly (lo < hi), "
                       f"got hu={hu} unit={unit}")
    if unit[0] != -1.0 or unit[-1] != 1.0:
      raise ValueError(f"intensity unit knots must run from -1 to 1, got {unit}")

  @classmethod
  def of(cls, spec) -> "IntensityMap":
    """`spec` if it is an IntensityMap, else the map of a (lo, hi) HU window."""
    return spec if isinstance(spec, IntensityMap) else cls(tuple(spec))


DEFAULT_INTENSITY = IntensityMap(DEFAULT_INTENSITY_HU, DEFAULT_INTENSITY_UNIT)


def hu_to_unit(hu, intensity=DEFAULT_INTENSITY):
  """HU -> float32 in [-1, 1] through `intensity` (an IntensityMap or a (lo, hi) window).

  HU outside the knots' range are clipped. Works on numpy arrays/scalars (numpy float32,
  computed in float64) and on jax arrays (jax float32).
  """
  imap = IntensityMap.of(intensity)
  if _is_jax(hu):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    x = jnp.asarray(hu, jnp.float32)
    return jnp.interp(x, jnp.asarray(imap.hu, jnp.float32), jnp.asarray(imap.unit, jnp.float32))
  return np.interp(np.asarray(hu, np.float64), imap.hu, imap.unit).astype(np.float32)


def unit_to_hu(x, intensity=DEFAULT_INTENSITY):
  """[-1, 1] -> HU, the exact inverse of hu_to_unit on the knots' range (x clipped to [-1, 1]).

  Numpy input gives float64 if it was float64, else float32; jax input gives a jax array.
  """
  imap = IntensityMap.of(intensity)
  if _is_jax(x):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    x = jnp.asarray(x, jnp.float32)
    return jnp.interp(x, jnp.asarray(imap.unit, jnp.float32), jnp.asarray(imap.hu, jnp.float32))
  x = np.asarray(x)
  dtype = np.float64 if x.dtype == np.float64 else np.float32
  return np.interp(x.astype(np.float64), imap.unit, imap.hu).astype(dtype)


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """The plain, picklable subset of the data config that `MakeExample` needs."""

  # Only for fields a data config lacks: equal to configs/default.py's config.data
  # (tests/test_defaults.py checks it).
  intensity_hu: tuple[float, ...] = DEFAULT_INTENSITY_HU
  intensity_unit: tuple[float, ...] = DEFAULT_INTENSITY_UNIT
  mask_mode: str = "organ"
  mask_labels: tuple[int, ...] = ()
  dilation_mm: float = 0.0
  bbox_margin_mm: float = 10.0
  shape_area: tuple[float, float] = (0.05, 0.3)
  shape_kinds: tuple[str, ...] = masks.SHAPE_KINDS
  mixed_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
  lesion_label_id: int = 0
  lesion_dilation_mm: float = 0.0
  neighbours: bool = False
  neighbour_hide_prob: float = 0.0
  spacing_mm: float = 1.5
  flip_lr_prob: float = 0.0
  translate_px: int = 0
  intensity_jitter: float = 0.0
  modality: str = modality_lib.DEFAULT

  def __post_init__(self):
    IntensityMap(self.intensity_hu, self.intensity_unit)  # Raises on bad knots.
    object.__setattr__(self, "modality", modality_lib.check(self.modality))
    if self.mask_mode not in masks.MODES:
      raise ValueError(f"unknown mask_mode {self.mask_mode!r}; expected one of {masks.MODES}")
    for name in ("flip_lr_prob", "neighbour_hide_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
    if self.translate_px < 0 or self.intensity_jitter < 0:
      raise ValueError("translate_px and intensity_jitter must be >= 0")

  @property
  def intensity(self) -> IntensityMap:
    """The HU <-> [-1, 1] map of the model (data fields intensity_hu / intensity_unit)."""
    return IntensityMap(self.intensity_hu, self.intensity_unit)

  @classmethod
  def from_data_config(cls, cfg: Any) -> "ExampleConfig":
    """Reads the matching fields of a data config (ConfigDict or any attribute object)."""
    kw = {}
    for f in dataclasses.fields(cls):
      if hasattr(cfg, f.name):
        v = getattr(cfg, f.name)
        if isinstance(f.default, tuple) and v is not None:
          v = tuple(v)
        kw[f.name] = v
    kw["mask_labels"] = tuple(int(i) for i in kw.get("mask_labels", ()))
    kw["translate_px"] = int(kw.get("translate_px", 0))
    return cls(**kw)


NEIGHBOURS = (records.PREV_IMAGE, records.NEXT_IMAGE)


def _text(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def intensity_params(record: Mapping[str, Any], modality: str
                     ) -> tuple[float, tuple[float, float] | None]:
  """(value_scale, intensity_ref) of a record; refuses a record of another modality.

  CT records carry neither (HU, scale 1); MR / PET records carry both (ingest/modality.py).
  """
  has = records.VALUE_SCALE in record
  if has != (modality != modality_lib.CT):
    said = "MR/PET (it has value_scale)" if has else "CT (no value_scale)"
    raise modality_lib.ModalityError(
        f"slice record of case {_text(record.get(records.CASE_ID))!r} is {said} but the config's "
        f"modality is {modality!r}: train and generate with a config of the data's modality")
  if not has:
    return 1.0, None
  ref = np.asarray(record[records.INTENSITY_REF], np.float64).reshape(2)
  return float(np.asarray(record[records.VALUE_SCALE])), (float(ref[0]), float(ref[1]))


def to_unit(stored: np.ndarray, record: Mapping[str, Any], cfg: "ExampleConfig") -> np.ndarray:
  """A record's stored int16 image -> float32 model units (CT: hu_to_unit of the HU)."""
  scale, ref = intensity_params(record, cfg.modality)
  if cfg.modality == modality_lib.CT:
    return hu_to_unit(stored, cfg.intensity)
  n = modality_lib.normalise(np.asarray(stored, np.float64) * scale, cfg.modality, ref)
  return hu_to_unit(n, cfg.intensity)


def unit_to_stored(x: np.ndarray, scale: float, ref, cfg: "ExampleConfig") -> np.ndarray:
  """Model units -> the records' int16 (CT: rint HU; MR / PET: rint(source / scale))."""
  n = unit_to_hu(np.asarray(x, np.float64), cfg.intensity)
  values = modality_lib.denormalise(n, cfg.modality, ref)
  return modality_lib.to_stored(values, scale)


def cond_channels(cfg: Any) -> int:
  """Channels of `cond`: masked image + mask, plus prev/next slices and their 0/1 flags."""
  return 2 + 2 * len(NEIGHBOURS) if bool(getattr(cfg, "neighbours", False)) else 2


def neighbours_present(hu: Mapping[str, np.ndarray]) -> dict[str, bool]:
  """Per neighbour: False when it is missing, i.e. bit-identical to the slice (volume end)."""
  return {k: not np.array_equal(hu[k], hu[records.IMAGE]) for k in NEIGHBOURS if k in hu}


def sided_labels(label_names: Mapping[Any, str]) -> list[str]:
  """The label names with a side (a `left` / `right` word, e.g. kidney_left), sorted."""
  words = lambda n: set(re.split(r"[^a-z]+", str(n).lower()))
  return sorted(str(n) for n in label_names.values() if words(n) & {"left", "right"})


def check_flip(cfg: "ExampleConfig", label_names: Mapping[Any, str]) -> None:
  """Refuses left-right flips of a dataset with sided labels (a flip would not swap them)."""
  sided = sided_labels(label_names)
  if cfg.flip_lr_prob > 0 and sided:
    raise ValueError(
        f"data.flip_lr_prob={cfg.flip_lr_prob} flips slices left-right, but the dataset's "
        f"labels have sides ({', '.join(sided)}): a flipped kidney_left would keep the left "
        f"label on the right. Set --config.data.flip_lr_prob=0, or build the dataset with "
        f"side-free organs (e.g. 'kidney').")


def pixel_spacing(record: Mapping[str, Any], default_mm: float) -> tuple[float, float]:
  """(row_mm, col_mm) of a record's pixels.

  The record stores (x, y, z) spacing; slices are laid out image[row=y, col=x], so rows take y.
  Falls back to `default_mm` when the record has no spacing.
  """
  sp = record.get(records.SPACING_MM)
  if sp is None:
    return (float(default_mm), float(default_mm))
  sp = np.asarray(sp, np.float64).reshape(-1)
  return (float(sp[1]), float(sp[0]))


def _translate(x: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
  out = np.full_like(x, fill)
  h, w = x.shape[:2]
  src = x[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  out[max(dy, 0):max(dy, 0) + src.shape[0], max(dx, 0):max(dx, 0) + src.shape[1]] = src
  return out


def _field(record: Mapping[str, Any], key: str) -> np.ndarray:
  try:
    x = np.asarray(record[key])
  except KeyError:
    raise KeyError(f"slice record lacks {key!r} (has {sorted(record)})") from None
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] != 1:
    raise ValueError(f"record field {key!r} must be (H, W, 1), got {x.shape}")
  return x


def make_example(
    record: Mapping[str, Any], cfg: ExampleConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
  """One model example from one slice record (see the module docstring)."""
  image = _field(record, records.IMAGE)
  labels = _field(record, records.LABELS).astype(np.uint8)
  if labels.shape != image.shape:
    raise ValueError(f"labels shape {labels.shape} != image shape {image.shape} "
                     f"(case {record.get(records.CASE_ID)!r})")
  hu = {records.IMAGE: image}
  if cfg.neighbours:
    hu.update({k: _field(record, k) for k in NEIGHBOURS})
  present = neighbours_present(hu)  # On the stored int16 HU, before any augmentation.

  # Geometric augmentation first so the mask is computed on the augmented labels.
  if cfg.flip_lr_prob > 0 and rng.uniform() < cfg.flip_lr_prob:
    hu = {k: v[:, ::-1] for k, v in hu.items()}
    labels = labels[:, ::-1]
  if cfg.translate_px > 0:
    dy, dx = (int(v) for v in rng.integers(-cfg.translate_px, cfg.translate_px + 1, size=2))
    air = modality_lib.AIR[cfg.modality]  # shifted-in pixels: air (stored units)
    hu = {k: _translate(v, dy, dx, air) for k, v in hu.items()}
    labels = _translate(labels, dy, dx, 0)

  unit = {k: to_unit(v, record, cfg) for k, v in hu.items()}
  if cfg.intensity_jitter > 0:
    j = cfg.intensity_jitter
    scale, shift = 1.0 + rng.uniform(-j, j), rng.uniform(-j, j)
    unit = {k: np.clip(v * scale + shift, -1.0, 1.0).astype(np.float32) for k, v in unit.items()}

  mask = masks.make_mask(
      labels[..., 0], cfg.mask_mode, rng,
      label_ids=cfg.mask_labels,
      dilation_mm=cfg.dilation_mm,
      bbox_margin_mm=cfg.bbox_margin_mm,
      spacing_mm=pixel_spacing(record, cfg.spacing_mm),
      shape_area=cfg.shape_area,
      shape_kinds=cfg.shape_kinds,
      mixed_weights=cfg.mixed_weights,
      lesion_label_id=cfg.lesion_label_id,
      lesion_dilation_mm=cfg.lesion_dilation_mm,
  )[..., None]
  hidden = None
  if cfg.neighbours and cfg.neighbour_hide_prob > 0:  # No draw otherwise: same rng stream.
    hidden = {k: mask for k in NEIGHBOURS if rng.uniform() < cfg.neighbour_hide_prob}
  return assemble(unit, mask, labels, record.get(records.SLICE_INDEX, -1), cfg.neighbours,
                  present, hidden)


def assemble(unit: Mapping[str, np.ndarray], mask: np.ndarray, labels: np.ndarray,
             slice_index: int, neighbours: bool,
             present: Mapping[str, bool] | None = None,
             hidden: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """The model example from mapped images (`image`[, prev, next]) and a (H, W, 1) mask.

  `present` (default: all present) flags each neighbour; a missing one is unknown everywhere.
  `hidden`: neighbour -> (H, W[, 1]) mask of its pixels that are unknown (module docstring).
  """
  image_u = unit[records.IMAGE]
  parts = [image_u * (1.0 - mask), mask]
  if neighbours:
    known = {}
    for k in NEIGHBOURS:
      known[k] = np.full(image_u.shape, bool((present or {}).get(k, True)))
      if hidden is not None and k in hidden:
        known[k] &= np.asarray(hidden[k]).reshape(image_u.shape) <= 0
    parts += [np.where(known[k], unit[k], 0.0).astype(image_u.dtype) for k in NEIGHBOURS]
    parts += [known[k].astype(image_u.dtype) for k in NEIGHBOURS]
  return {
      "image": np.ascontiguousarray(image_u, np.float32),
      "mask": np.ascontiguousarray(mask, np.float32),
      "cond": np.ascontiguousarray(np.concatenate(parts, axis=-1), np.float32),
      "labels": np.ascontiguousarray(labels, np.uint8),
      "slice_index": np.int32(slice_index),
  }


def example_with_mask(record: Mapping[str, Any], cfg: ExampleConfig, mask: np.ndarray,
                      hidden: Mapping[str, np.ndarray] | None = None
                      ) -> dict[str, np.ndarray]:
  """The model example of a record with a given (H, W) mask (generation; no augmentation);
  `hidden`: neighbour -> (H, W) mask where it is unknown (see `assemble`)."""
  hu = {records.IMAGE: _field(record, records.IMAGE)}
  if cfg.neighbours:
    hu.update({k: _field(record, k) for k in NEIGHBOURS})
  unit = {k: to_unit(v, record, cfg) for k, v in hu.items()}
  mask = np.asarray(mask, np.float32).reshape(unit[records.IMAGE].shape)
  labels = _field(record, records.LABELS).astype(np.uint8)
  return assemble(unit, mask, labels, record.get(records.SLICE_INDEX, -1), cfg.neighbours,
                  neighbours_present(hu), hidden)


class MakeExample(grain.RandomMapTransform):
  """Grain RandomMap: slice record -> model example, with the mask drawn from Grain's rng."""

  def __init__(self, cfg: ExampleConfig | Any):
    self.cfg = cfg if isinstance(cfg, ExampleConfig) else ExampleConfig.from_data_config(cfg)

  def random_map(self, element, rng: np.random.Generator):
    return make_example(element, self.cfg, rng)


def _tree_map(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _tree_map(fn, v) for k, v in tree.items()}
  return fn(tree)


class ReshapeBatch(grain.MapTransform):
  """Reshapes the leading (flat batch) dimension of every leaf to `batch_shape`.

  With `pad=True` a short final batch is padded by repeating its last example and every batch
  gets `valid`: float32 `batch_shape` (1 = real example, 0 = padding).
  """

  def __init__(self, batch_shape: Sequence[int], pad: bool = False):
    self.batch_shape = tuple(int(d) for d in batch_shape)
    self.size = int(np.prod(self.batch_shape))
    self.pad = pad

  def map(self, element):
    n = len(next(iter(_flat_leaves(element))))
    if n != self.size and not self.pad:
      raise ValueError(f"batch of {n} cannot be reshaped to {self.batch_shape}")

    def fix(x):
      x = np.asarray(x)
      if x.shape[0] < self.size:
        x = np.concatenate([x, np.repeat(x[-1:], self.size - x.shape[0], axis=0)])
      return x.reshape(self.batch_shape + x.shape[1:])

    out = _tree_map(fix, element)
    if self.pad:
      out["valid"] = (np.arange(self.size) < n).astype(np.float32).reshape(self.batch_shape)
    return out


def _flat_leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _flat_leaves(v)
  else:
    yield tree
