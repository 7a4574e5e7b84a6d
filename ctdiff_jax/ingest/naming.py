"""Names of `ct_slices` datasets (options <-> config name) and their on-disk metadata.

Pure Python (no absl flags, no TFDS, no TensorFlow): the builder, the build CLI and the
training-time reader all take names and metadata from here.

Dataset names. Every set of content options gets its own deterministic config name, so
datasets built with different options never collide in one data_dir: the named configs of
ctdiff_jax.ingest.organs.DATASET_CONFIGS at defaults keep their name (`kidneys`), other options add
suffixes in a fixed order (`kidneys_64px_6mm`, `liver+spleen_128px_min20`):
  _{N}px          image_size != 256
  _{X}mm          spacing_mm != 1.5 (in-plane)
  _min{N}         min_organ_area != 0
  _empty{F}       empty_slice_fraction != 0
  _split{a-b-c}   split ratios != 0.8/0.1/0.1, in percent
  _lesion-{name} / _nolesion   lesion group other than the inferred one
  _mr / _pet      modality other than CT (ctdiff_jax/ingest/modality.py)
A custom organ list is named by its organs joined with '+' (or the named config with exactly
these organs and lesion), prefixed `custom-` where it would read as another named config.
`layout` and `skip_bad_cases` only change how raw files are read, not the content, so they
are not part of the name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from typing import Any, Sequence

from ctdiff_jax.ingest import modality as modality_lib
from ctdiff_jax.ingest import organs as organs_lib

DATASET = "ct_slices"
SPLITS = ("train", "validation", "test")
DEFAULT_IMAGE_SIZE = 256
DEFAULT_SPACING_MM = 1.5
DEFAULT_SPLIT_RATIOS = (0.8, 0.1, 0.1)
# Options that change how raw files are read but not what is written.
READ_OPTIONS = ("layout", "skip_bad_cases")
_INFER = object()


def _g(x: float) -> str:
  return f"{float(x):g}"


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  """The content-defining options of a ct_slices dataset (pure Python, no TFDS)."""

  organs: tuple[str, ...]
  lesion: str | None
  image_size: int = DEFAULT_IMAGE_SIZE
  spacing_mm: float = DEFAULT_SPACING_MM
  min_organ_area: int = 0
  empty_slice_fraction: float = 0.0
  split_ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS
  modality: str = modality_lib.DEFAULT

  @property
  def base_name(self) -> str:
    for name, (organs, lesion) in organs_lib.DATASET_CONFIGS.items():
      if tuple(organs) == self.organs and lesion == self.lesion:
        return name
    joined = "+".join(self.organs)
    if joined in organs_lib.DATASET_CONFIGS or joined.startswith("custom-"):
      joined = "custom-" + joined
    return joined

  @property
  def name(self) -> str:
    """The TFDS config name (see the module docstring for the rule)."""
    base = self.base_name
    parts = [base]
    if self.image_size != DEFAULT_IMAGE_SIZE:
      parts.append(f"{self.image_size}px")
    if self.spacing_mm != DEFAULT_SPACING_MM:
      parts.append(f"{_g(self.spacing_mm)}mm")
    if self.min_organ_area:
      parts.append(f"min{self.min_organ_area}")
    if self.empty_slice_fraction:
      parts.append(f"empty{_g(self.empty_slice_fraction)}")
    if self.split_ratios != DEFAULT_SPLIT_RATIOS:
      parts.append("split" + "-".join(_g(100 * r) for r in self.split_ratios))
    named = organs_lib.DATASET_CONFIGS.get(base)
    default_lesion = named[1] if named else infer_lesion(self.organs)
    if self.lesion != default_lesion:
      parts.append(f"lesion-{self.lesion}" if self.lesion else "nolesion")
    if self.modality != modality_lib.DEFAULT:
      parts.append(self.modality)
    return "_".join(parts)

  def label_names(self) -> dict[int, str]:
    return {i + 1: o for i, o in enumerate(self.organs)}

  @property
  def lesion_label_id(self) -> int | None:
    return None if self.lesion is None else self.organs.index(self.lesion) + 1


def infer_lesion(organs: Sequence[str]) -> str | None:
  """The lesion group of a custom organ list: its one *_tumor / *lesion group, else None."""
  found = [o for o in organs if o.endswith(("_tumor", "_tumour", "lesion"))]
  return found[0] if len(found) == 1 else None


_SUFFIXES = (  # parsed right to left, i.e. in reverse order of SliceSpec.name
    ("modality", re.compile(r"_(?P<v>mr|pet)$")),
    ("lesion", re.compile(r"_(lesion-(?P<v>[a-z0-9_]+)|nolesion)$")),
    ("split_ratios", re.compile(r"_split(?P<v>[\d.]+-[\d.]+-[\d.]+)$")),
    ("empty_slice_fraction", re.compile(r"_empty(?P<v>[\d.]+)$")),
    ("min_organ_area", re.compile(r"_min(?P<v>\d+)$")),
    ("spacing_mm", re.compile(r"_(?P<v>[\d.]+)mm$")),
    ("image_size", re.compile(r"_(?P<v>\d+)px$")),
)
_DEFAULTS = dict(image_size=DEFAULT_IMAGE_SIZE, spacing_mm=DEFAULT_SPACING_MM,
                 min_organ_area=0, empty_slice_fraction=0.0,
                 split_ratios=DEFAULT_SPLIT_RATIOS, modality=modality_lib.DEFAULT)


def _split_name(name: str) -> tuple[str, dict[str, Any]]:
  """'kidneys_64px_6mm' -> ('kidneys', {'image_size': 64, 'spacing_mm': 6.0})."""
  rest, opts = name.strip(), {}
  for key, pattern in _SUFFIXES:
    m = pattern.search(rest)
    if m:
      v = m.group("v")
      if key == "lesion":
        opts[key] = v
      elif key == "split_ratios":
        opts[key] = tuple(float(x) / 100 for x in v.split("-"))
      else:
        opts[key] = v
      rest = rest[: m.start()]
  return rest, opts


def parse_config_name(name: str) -> SliceSpec:
  """Inverse of SliceSpec.name: 'kidneys_64px_6mm' -> SliceSpec (ValueError if not canonical)."""
  spec = slice_spec(name)
  if spec.name != name:
    raise ValueError(f"{name!r} is not a canonical ct_slices config name (did you mean "
                     f"{spec.name!r}?)")
  return spec


def slice_spec(name_or_organs: str | Sequence[str],
               image_size: int | None = None,
               spacing_mm: float | None = None,
               *,
               lesion: Any = _INFER,
               min_organ_area: int | None = None,
               empty_slice_fraction: float | None = None,
               split_ratios: Sequence[float] | str | None = None,
               modality: str | None = None,
               **read_options) -> SliceSpec:
  """Validated SliceSpec from a config name (named or suffixed), 'a,b' text or organ list.

  Options left as None take their default (image_size 256, spacing_mm 1.5, min_organ_area 0,
  empty_slice_fraction 0, split_ratios 0.8/0.1/0.1, modality ct) or the value a suffixed
  name gives;
  options given explicitly win over the name's suffixes. The lesion defaults to the named
  config's, else to the custom list's one *_tumor group. `read_options` may hold layout /
  skip_bad_cases (accepted and ignored here: they don't change the content).
  """
  unknown = set(read_options) - set(READ_OPTIONS)
  if unknown:
    raise TypeError(f"unknown ct_slices option(s) {sorted(unknown)}")
  opts: dict[str, Any] = {}
  if isinstance(name_or_organs, str) and "," not in name_or_organs:
    base, opts = _split_name(name_or_organs)
    if base in organs_lib.DATASET_CONFIGS:
      organs, default_lesion = organs_lib.DATASET_CONFIGS[base]
    else:
      organs = organs_lib.parse_organ_list(base.removeprefix("custom-").split("+"))
      default_lesion = infer_lesion(organs)
  else:
    organs = organs_lib.parse_organ_list(name_or_organs)
    default_lesion = infer_lesion(organs)
  explicit = dict(image_size=image_size, spacing_mm=spacing_mm, min_organ_area=min_organ_area,
                  empty_slice_fraction=empty_slice_fraction, split_ratios=split_ratios,
                  modality=modality)
  opts.update({k: v for k, v in explicit.items() if v is not None})
  if lesion is not _INFER:
    opts["lesion"] = lesion
  lesion = opts.pop("lesion", default_lesion)
  if lesion is not None:
    lesion = organs_lib.canonical_name(lesion)
  values = {k: _normalise(k, opts.get(k, d)) for k, d in _DEFAULTS.items()}
  return _validated(SliceSpec(organs=tuple(organs_lib.canonical_name(o) for o in organs),
                              lesion=lesion, **values))


def _normalise(key: str, value: Any) -> Any:
  try:
    if key in ("image_size", "min_organ_area"):
      if float(value) != int(float(value)):
        raise ValueError
      return int(float(value))
    if key in ("spacing_mm", "empty_slice_fraction"):
      return float(value)
    if key == "modality":
      return modality_lib.check(value)
    if isinstance(value, str):
      value = value.split(",")
    # Rounded so that '80-10-10' parsed back from a name equals (0.8, 0.1, 0.1).
    return tuple(round(float(v), 6) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"bad value for {key}: {value!r}") from e


def config_name(name_or_organs: str | Sequence[str], image_size: int | None = None,
                spacing_mm: float | None = None, **options) -> str:
  """The ct_slices config name for these options, e.g. 'kidneys' or 'kidneys_64px_6mm'."""
  return slice_spec(name_or_organs, image_size, spacing_mm, **options).name


def dataset_name(name_or_organs: str | Sequence[str], image_size: int | None = None,
                 spacing_mm: float | None = None, **options) -> str:
  """The full TFDS name, e.g. 'ct_slices/kidneys_64px_6mm' (for tfds.data_source)."""
  return f"{DATASET}/{config_name(name_or_organs, image_size, spacing_mm, **options)}"


def _validated(spec: SliceSpec) -> SliceSpec:
  if not spec.organs:
    raise ValueError("empty organ list")
  for o in spec.organs:
    if not re.fullmatch(r"[a-z0-9_]+", o):
      raise ValueError(f"organ name {o!r} must be lower-case letters, digits and '_'")
  if len(set(spec.organs)) != len(spec.organs):
    raise ValueError(f"organ listed twice in {spec.organs}")
  if len(spec.organs) > 255:
    raise ValueError("at most 255 organs fit a uint8 label map")
  if spec.lesion is not None and spec.lesion not in spec.organs:
    raise ValueError(f"lesion {spec.lesion!r} is not one of the organs {spec.organs}")
  if not 8 <= spec.image_size <= 4096:
    raise ValueError(f"image_size must be in [8, 4096], got {spec.image_size}")
  if not 0.01 <= spec.spacing_mm <= 100:
    raise ValueError(f"spacing_mm must be in [0.01, 100] mm, got {spec.spacing_mm}")
  if spec.min_organ_area < 0:
    raise ValueError(f"min_organ_area must be >= 0, got {spec.min_organ_area}")
  if not 0 <= spec.empty_slice_fraction <= 1:
    raise ValueError(f"empty_slice_fraction must be in [0, 1], got {spec.empty_slice_fraction}")
  r = spec.split_ratios
  if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1) > 1e-6 or r[0] <= 0:
    raise ValueError(f"split_ratios (train, validation, test) must be >= 0, sum to 1 and give "
                     f"train a share; got {r}")
  return spec


# ---- reading a built dataset's metadata (no TFDS, no TensorFlow) --------------------------


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def dataset_dir(data_dir: str | pathlib.Path, name: str) -> pathlib.Path:
  """The version directory of a built dataset: 'kidneys', 'ct_slices/kidneys[:1.0.0]'.

  Without a version, the highest complete one (TFDS writes into `incomplete.*` folders and
  renames them when done, so a finished dataset is a folder with dataset_info.json).
  """
  name = name.strip()
  if name.startswith(DATASET + "/"):
    name = name[len(DATASET) + 1:]
  config, _, version = name.partition(":")
  root = pathlib.Path(data_dir) / DATASET / config
  if version:
    path = root / version
  else:
    versions = sorted((p.name for p in root.glob("*.*.*")
                       if re.fullmatch(r"\d+\.\d+\.\d+", p.name)
                       and (p / "dataset_info.json").exists()), key=_version_key)
    if not versions:
      built = sorted(p.name for p in (pathlib.Path(data_dir) / DATASET).glob("*") if p.is_dir())
      raise FileNotFoundError(f"no built dataset {DATASET}/{config} in {data_dir} "
                              f"(built configs there: {built})")
    path = root / versions[-1]
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"no built dataset at {path}")
  return path


def read_dataset_metadata(data_dir: str | pathlib.Path, name: str) -> dict[str, Any]:
  """The metadata of a built ct_slices dataset, read from its JSON files.

  Keys: organs (names of label ids 1..K), label_names {"1": name}, lesion, lesion_label_id,
  modality (absent in datasets built before modalities: CT), image_size, spacing_mm, min_organ_area, empty_slice_fraction, split_ratios, orientation,
  pad_hu, build (the build summary), plus splits {split: num_examples}, version, path,
  dataset ('ct_slices/<config>').
  """
  path = dataset_dir(data_dir, name)
  meta_path = path / "metadata.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"{meta_path}: missing (not a ct_slices dataset?)")
  meta = json.loads(meta_path.read_text())
  info = json.loads((path / "dataset_info.json").read_text())
  meta["splits"] = {s["name"]: sum(int(n) for n in s.get("shardLengths", []))
                    for s in info.get("splits", [])}
  meta["version"] = path.name
  meta["path"] = str(path)
  meta["dataset"] = f"{DATASET}/{path.parent.name}"
  return meta
