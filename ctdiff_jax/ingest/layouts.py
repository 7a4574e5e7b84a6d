"""Raw CT dataset layouts: detect which one a directory holds and enumerate its cases.

Layouts (names accepted by `read_layout(root, layout=...)`):
  flat              <case>_ct.nii[.gz] + <case>_seg.nii[.gz] + labels.json (id -> name);
                    MR / PET images as <case>_mr / _mri / _pet.nii[.gz]
  totalsegmentator  <case>/ct.nii[.gz] + <case>/segmentations/<name>.nii[.gz] binary masks;
                    the TotalSegmentator MRI release has <case>/mri.nii[.gz] instead of ct
  kits              case_xxxxx/imaging.nii[.gz] + segmentation.nii[.gz]
                    (1 kidney, 2 kidney_tumor, 3 kidney_cyst); cases without a segmentation
                    (the official unlabelled test cases) are listed in `unlabelled`, not read
  msd               Medical Segmentation Decathlon dataset.json ("labels", "training")
  lits              volume-N.nii[.gz] + segmentation-N.nii[.gz] (1 liver, 2 liver_tumor), in
                    the root or its subfolders ("Training Batch 1/", "Training Batch 2/")
  csv               a manifest CSV with columns case_id,image,label[,label_map]; label_map is
                    a labels.json for that row, else labels.json beside the CSV; relative
                    paths are relative to the CSV

Auto-detection: exactly one layout must match, except that a manifest CSV found beside
another layout's files is taken as an index of them (the other layout wins).

Label names are mapped to the names ctdiff_jax.ingest.organs knows (e.g. MSD Task03_Liver "cancer"
-> liver_tumor). Missing files are NOT errors here: the case is listed with the expected path
and ctdiff_jax.ingest.volumes reports it when the case is read (so it can be skipped and counted).
Duplicate case ids are always an error. An image file whose name says its modality (`ct`,
`mr`, `mri`, `pet`) must match the build's modality (`check_modality`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
from typing import Mapping

from ctdiff_jax.ingest import modality as modality_lib
from ctdiff_jax.ingest.volumes import Case

LAYOUTS = ("flat", "totalsegmentator", "kits", "msd", "lits", "csv")
NII_SUFFIXES = (".nii.gz", ".nii")

# Image file stems (TotalSegmentator) / name suffixes (flat) -> the modality they hold.
IMAGE_STEMS = {"ct": "ct", "mri": "mr", "mr": "mr", "pet": "pet"}
KITS_LABELS = {1: "kidney", 2: "kidney_tumor", 3: "kidney_cyst"}
LITS_LABELS = {1: "liver", 2: "liver_tumor"}
CSV_COLUMNS = ("case_id", "image", "label")

# MSD task name (letters only, lower case) -> host organ of its "cancer"/"tumour" label.
MSD_TASK_ORGANS = {
    "liver": "liver",
    "hepaticvessel": "liver",
    "lung": "lung",
    "pancreas": "pancreas",
    "colon": "colon",
    "kidney": "kidney",
    "spleen": "spleen",
    "prostate": "prostate",
    "braintumour": "brain",
}
_TUMOUR_WORDS = ("cancer", "tumour", "tumor", "lesion", "neoplasm", "primaries")


# What to do about a duplicate case id (said by every layout's check).
_ONE_ID = "one id per case: rename or remove one of them"


class LayoutError(ValueError):
  """A raw dataset directory that cannot be enumerated (names the path and the problem)."""


@dataclasses.dataclass
class RawDataset:
  """The cases of one raw dataset directory."""

  root: pathlib.Path
  layout: str
  cases: list[Case]
  unlabelled: list[str] = dataclasses.field(default_factory=list)

  def vocabulary(self) -> dict[int, str]:
    """Union of the label names of all cases, as a pseudo id -> name map."""
    names = sorted({str(n).lower() for c in self.cases for n in c.label_names.values()})
    return {i + 1: n for i, n in enumerate(names)}


def strip_nii(name: str) -> str | None:
  for suffix in NII_SUFFIXES:
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return None


def _nii_files(folder: pathlib.Path) -> list[pathlib.Path]:
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and strip_nii(p.name))


def _find_nii(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  for suffix in NII_SUFFIXES:
    if (folder / (stem + suffix)).exists():
      return folder / (stem + suffix)
  return None


def read_label_map(path: pathlib.Path) -> dict[int, str]:
  """labels.json: {"1": "spleen", ...} (or {"spleen": 1, ...}); id 0 / background dropped."""
  try:
    raw = json.loads(pathlib.Path(path).read_text())
  except FileNotFoundError as e:
    raise LayoutError(f"{path}: label map file is missing") from e
  except (OSError, ValueError) as e:
    raise LayoutError(f"{path}: cannot read label map JSON ({e}); expected an object like "
                      '{"1": "liver", "2": "spleen"}') from e
  if isinstance(raw, dict) and "labels" in raw and isinstance(raw["labels"], dict):
    raw = raw["labels"]
  if not isinstance(raw, dict) or not raw:
    raise LayoutError(f"{path}: expected a JSON object id -> label name")
  out = {}
  for k, v in raw.items():
    try:
      i, name = (int(k), str(v)) if str(k).strip().lstrip("-").isdigit() else (int(v), str(k))
    except (TypeError, ValueError) as e:
      raise LayoutError(f"{path}: entry {k!r}: {v!r} is not id -> name") from e
    if i != 0 and name.lower() != "background":
      out[i] = name.strip().lower()
  return out


def _check_unique(cases: list[Case], where: pathlib.Path) -> list[Case]:
  seen: dict[str, Case] = {}
  for c in cases:
    if c.case_id in seen:
      raise LayoutError(
          f"duplicate case id {c.case_id!r} in {where}: {seen[c.case_id].image} and {c.image}: "
          f"{_ONE_ID}")
    seen[c.case_id] = c
  return sorted(cases, key=lambda c: c.case_id)


# ---- detection ----------------------------------------------------------------------------


def image_modality(path: pathlib.Path) -> str | None:
  """The modality an image file's name states (`ct.nii.gz`, `s01_mr.nii.gz`), else None."""
  stem = (strip_nii(pathlib.Path(path).name) or "").lower()
  for word, modality in IMAGE_STEMS.items():
    if stem == word or stem.endswith("_" + word):
      return modality
  return None


def check_modality(raw: "RawDataset", modality: str) -> None:
  """Refuses cases whose image file name says another modality than the build's."""
  for c in raw.cases:
    said = image_modality(c.image)
    if said is not None and said != modality:
      raise modality_lib.ModalityError(
          f"case {c.case_id!r}: {c.image}: the file name says {modality_lib.NAMES[said]} but "
          f"the dataset is built as {modality_lib.NAMES[modality]}: build it with "
          f"--modality={said} (its intensities are not {modality_lib.UNITS[modality]})")


def _image_kinds() -> tuple[str, ...]:
  return tuple("_" + w for w in IMAGE_STEMS)


def _is_flat(root: pathlib.Path) -> bool:
  return (root / "labels.json").exists() and any(
      (strip_nii(p.name) or "").endswith(_image_kinds()) for p in _nii_files(root))


def _ts_image(d: pathlib.Path) -> pathlib.Path | None:
  """A TotalSegmentator case's image: ct.nii.gz (CT release) or mri.nii.gz (MRI release)."""
  for stem in IMAGE_STEMS:
    found = _find_nii(d, stem)
    if found:
      return found
  return None


def _ts_case_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  return [d for d in sorted(root.iterdir()) if d.is_dir() and _ts_image(d)
          and (d / "segmentations").is_dir()]


def _kits_case_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  return [d for d in sorted(root.iterdir())
          if d.is_dir() and d.name.startswith("case_") and _find_nii(d, "imaging")]


def _csv_manifests(root: pathlib.Path) -> list[pathlib.Path]:
  paths = [root] if root.is_file() else sorted(root.glob("*.csv"))
  out = []
  for p in paths:
    try:
      with open(p, newline="") as f:
        header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
      continue
    if set(CSV_COLUMNS) <= {h.strip() for h in header}:
      out.append(p)
  return out


def detect_layout(root: str | pathlib.Path) -> str:
  """The layout of a raw directory (or a manifest .csv path); LayoutError if none or several."""
  root = pathlib.Path(root)
  if not root.exists():
    raise LayoutError(f"{root}: raw data directory does not exist")
  if root.is_file():
    if _csv_manifests(root):
      return "csv"
    raise LayoutError(f"{root}: not a directory nor a manifest CSV with columns {CSV_COLUMNS}")
  found = []
  if _is_flat(root):
    found.append("flat")
  if _ts_case_dirs(root):
    found.append("totalsegmentator")
  if _kits_case_dirs(root):
    found.append("kits")
  if (root / "dataset.json").exists():
    found.append("msd")
  if _lits_volumes(root):
    found.append("lits")
  if _csv_manifests(root):
    found.append("csv")
  if not found:
    raise LayoutError(
        f"{root}: no known raw layout found (looked for {', '.join(LAYOUTS)}; see "
        "ctdiff_jax/ingest/layouts.py for what each expects)")
  if len(found) > 1 and "csv" in found:
    # A manifest beside another layout's files (e.g. ctdiff_jax.phantom's manifest.csv next to
    # its flat files) indexes the same cases: the file layout wins; layout='csv' forces it.
    found.remove("csv")
  if len(found) > 1:
    raise LayoutError(f"{root}: ambiguous raw layout, matches {found}; name one with layout=")
  return found[0]


def check_manual_dir(root: str | pathlib.Path) -> pathlib.Path:
  """`root` if it holds something; else FileNotFoundError / ValueError saying what to do.

  The builder calls this before TFDS creates any folder: TFDS's own check comes later, as an
  AssertionError, and leaves an empty dataset folder behind.
  """
  root = pathlib.Path(root)
  todo = ("put the raw CT cases there or point manual_dir at them (--manual_dir=RAW for "
          "`python -m ctdiff_jax.build_dataset` and `tfds build`), in one of the layouts "
          f"{', '.join(LAYOUTS)} (see ctdiff_jax/ingest/layouts.py)")
  if not root.exists():
    raise FileNotFoundError(f"manual_dir {root} does not exist: {todo}")
  if root.is_dir() and not any(root.iterdir()):
    raise ValueError(f"manual_dir {root} is empty: {todo}")
  return root


# ---- enumeration --------------------------------------------------------------------------


def _flat(root: pathlib.Path) -> RawDataset:
  names = read_label_map(root / "labels.json")
  cases = []
  stems = {}
  for p in _nii_files(root):
    stem = strip_nii(p.name)
    for kind in _image_kinds() + ("_seg",):
      if stem.endswith(kind):
        stems.setdefault((stem[: -len(kind)], "_seg" if kind == "_seg" else "_img"),
                         []).append(p)
  for (cid, kind), paths in sorted(stems.items()):
    if len(paths) > 1:
      raise LayoutError(f"duplicate case id {cid!r} in {root}: "
                        f"{' and '.join(str(p) for p in paths)}: {_ONE_ID}")
  ids = sorted({cid for cid, _ in stems})
  for cid in ids:
    image = stems.get((cid, "_img"), [root / f"{cid}_ct.nii.gz"])[0]
    label = stems.get((cid, "_seg"), [root / f"{cid}_seg.nii.gz"])[0]
    cases.append(Case(cid, image, label, names))
  return RawDataset(root, "flat", _check_unique(cases, root))


def _totalsegmentator(root: pathlib.Path) -> RawDataset:
  cases = []
  for d in _ts_case_dirs(root):
    masks = {}
    for p in _nii_files(d / "segmentations"):
      masks[strip_nii(p.name).lower()] = p
    names = {i + 1: n for i, n in enumerate(sorted(masks))}
    cases.append(Case(d.name, _ts_image(d), None, names, masks=masks))
  return RawDataset(root, "totalsegmentator", _check_unique(cases, root))


def _kits(root: pathlib.Path) -> RawDataset:
  cases, unlabelled = [], []
  for d in _kits_case_dirs(root):
    seg = _find_nii(d, "segmentation")
    if seg is None:
      unlabelled.append(d.name)
      continue
    cases.append(Case(d.name, _find_nii(d, "imaging"), seg, KITS_LABELS))
  return RawDataset(root, "kits", _check_unique(cases, root), unlabelled)


def msd_label_names(dataset_json: Mapping) -> dict[int, str]:
  """MSD dataset.json "labels" -> ids to our names ("cancer" -> "<task organ>_tumor")."""
  task = re.sub(r"[^a-z]", "", str(dataset_json.get("name", "")).lower())
  task = re.sub(r"^task\d*", "", task)
  organ = MSD_TASK_ORGANS.get(task, task or "unknown")
  out = {}
  for k, v in dict(dataset_json.get("labels", {})).items():
    i, name = int(k), str(v).strip().lower()
    if i == 0 or name == "background":
      continue
    if any(w in name for w in _TUMOUR_WORDS):
      name = f"{organ}_tumor"
    elif name == "vessel" and organ == "liver":
      name = "hepatic_vessel"
    out[i] = re.sub(r"\W+", "_", name).strip("_")
  return out


def _msd(root: pathlib.Path) -> RawDataset:
  path = root / "dataset.json"
  try:
    meta = json.loads(path.read_text())
    names = msd_label_names(meta)
    training = list(meta["training"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise LayoutError(f"{path}: not a readable MSD dataset.json ({type(e).__name__}: {e})") from e
  cases = []
  for entry in training:
    try:
      image, label = root / entry["image"], root / entry["label"]
    except (KeyError, TypeError) as e:
      raise LayoutError(f"{path}: training entry {entry!r} lacks image/label") from e
    cid = strip_nii(image.name) or image.name
    cases.append(Case(cid, image.resolve(), label.resolve(), names))
  return RawDataset(root, "msd", _check_unique(cases, path))


def _lits_volumes(root: pathlib.Path) -> list[pathlib.Path]:
  folders = [root] + [d for d in sorted(root.iterdir()) if d.is_dir()]
  return [p for d in folders for p in _nii_files(d)
          if re.fullmatch(r"volume-\d+", strip_nii(p.name))]


def _lits(root: pathlib.Path) -> RawDataset:
  cases = []
  for p in _lits_volumes(root):
    n = strip_nii(p.name).split("-")[1]
    seg = _find_nii(p.parent, f"segmentation-{n}") or p.parent / f"segmentation-{n}.nii"
    cases.append(Case(f"volume-{n}", p, seg, LITS_LABELS))
  return RawDataset(root, "lits", _check_unique(cases, root))


def _csv(root: pathlib.Path) -> RawDataset:
  manifests = _csv_manifests(root)
  if len(manifests) != 1:
    raise LayoutError(f"{root}: expected exactly one manifest CSV with columns {CSV_COLUMNS}, "
                      f"found {[str(m) for m in manifests]}")
  manifest = manifests[0]
  base = manifest.parent
  default_map = base / "labels.json"
  maps: dict[pathlib.Path, dict[int, str]] = {}
  cases = []
  with open(manifest, newline="") as f:
    for row_no, row in enumerate(csv.DictReader(f), start=2):
      row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
      if not any(row.values()):
        continue
      cid = row["case_id"]
      if not cid or not row["image"] or not row["label"]:
        raise LayoutError(f"{manifest}: line {row_no}: case_id, image and label are required")
      map_path = base / row["label_map"] if row.get("label_map") else default_map
      if map_path not in maps:
        if not map_path.exists():
          raise LayoutError(f"{manifest}: line {row_no} (case {cid!r}): label map {map_path} "
                            "is missing (add a label_map column or labels.json beside the CSV)")
        maps[map_path] = read_label_map(map_path)
      cases.append(Case(cid, base / row["image"], base / row["label"], maps[map_path]))
  if not cases:
    raise LayoutError(f"{manifest}: manifest lists no cases")
  return RawDataset(manifest, "csv", _check_unique(cases, manifest))


_READERS = {"flat": _flat, "totalsegmentator": _totalsegmentator, "kits": _kits, "msd": _msd,
            "lits": _lits, "csv": _csv}


def read_layout(root: str | pathlib.Path, layout: str = "auto") -> RawDataset:
  """Enumerates the cases of a raw dataset directory (layout 'auto' = detect_layout)."""
  root = pathlib.Path(root)
  if not root.exists():
    raise LayoutError(f"{root}: raw data directory does not exist")
  layout = layout.lower()
  if layout == "auto":
    layout = detect_layout(root)
  if layout not in _READERS:
    raise LayoutError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
  ds = _READERS[layout](root)
  if not ds.cases:
    raise LayoutError(f"{root}: no cases found for layout {layout!r}")
  return ds
