"""`ct_slices`: 2D axial CT slice records (HU + organ label map) from raw NIfTI volumes.

A manual-download TFDS builder: point `manual_dir` at raw cases in one of the layouts of
ctdiff_jax/ingest/layouts.py. Writes array_record files that `tfds.data_source` reads without
TensorFlow (features are zlib tensors, see ctdiff_jax/ingest/records.py). Building needs no
TensorFlow either:

  builder = Builder(config=make_config("kidneys", image_size=64), data_dir=OUT)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=RAW),
      file_format="array_record")

or `python -m ctdiff_jax.build_dataset ...` / `tfds build data_builders/ct_slices
--manual_dir=RAW --config=kidneys` (with the tf extra).

Build in two passes over the cases: a scan (reads and validates every case, decides its kept
slices on the source grid, counts problems) and the write pass (reads the kept cases again
and emits their records). Only splits with at least one slice are written: TFDS cannot
write an empty split. Given Beam options (DownloadConfig.beam_options / beam_runner, `tfds
build --beam_pipeline_options=...`), both passes run on Apache Beam, one case per element,
through the same per-case functions `scan_case` and `case_records` (ingest/beam_build.py).

Splits are by case (no case in two splits): cases are ranked by sha1(case_id) and the first
n_train go to train, the next n_validation to validation, the rest to test, where the counts
are the largest-remainder rounding of n_cases * ratios; when there are at least as many
cases as splits with a nonzero ratio, each of those splits gets >= 1 case (taken from the
largest split). The ranking covers the cases that contribute slices (after the scan), so
skipped or organ-free cases never leave a split empty; a case's split can therefore differ
between organ configs.

Interrupted and concurrent builds: TFDS writes into `<config>/incomplete.*` and renames it
when done, so a killed build leaves no dataset under its final name (naming.dataset_dir
ignores the leftover). Builds of one config into one data_dir take turns on a lock file
(`build_lock`); the build holding it deletes incomplete.* leftovers first, and an --overwrite
renames the old dataset away before deleting it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import pathlib
import shutil
from typing import Any, Iterable, Iterator, Sequence

try:
  import fcntl
except ImportError:  # Windows: builds are not serialised
  fcntl = None

import tensorflow_datasets as tfds
import tqdm

from ctdiff_jax.ingest import beam_build
from ctdiff_jax.ingest import naming
from ctdiff_jax.ingest import layouts
from ctdiff_jax.ingest import modality as modality_lib
from ctdiff_jax.ingest import organs as organs_lib
from ctdiff_jax.ingest import records
from ctdiff_jax.ingest import volumes

SPLITS = naming.SPLITS

_LOG = logging.getLogger(__name__)
# TFDS writes a build into <config>/incomplete.<random>_<version>/ and renames it when done.
_INCOMPLETE = "incomplete."
# In a config's description ("Axial MR slices with ..."); CT keeps its old wording.
_MODALITY_WORD = {"ct": "", "mr": "MR ", "pet": "PET "}


@dataclasses.dataclass(eq=False)
class CtSlicesConfig(tfds.core.BuilderConfig):
  """Options of one ct_slices dataset; build with `make_config` so the name encodes them."""

  organs: tuple[str, ...] = ()
  lesion: str | None = None
  layout: str = "auto"
  image_size: int = naming.DEFAULT_IMAGE_SIZE
  spacing_mm: float = naming.DEFAULT_SPACING_MM
  min_organ_area: int = 0
  empty_slice_fraction: float = 0.0
  split_ratios: tuple[float, float, float] = naming.DEFAULT_SPLIT_RATIOS
  skip_bad_cases: bool = False
  modality: str = modality_lib.DEFAULT  # ct, mr or pet (ctdiff_jax/ingest/modality.py)

  @property
  def spec(self) -> naming.SliceSpec:
    return naming.SliceSpec(
        organs=tuple(self.organs), lesion=self.lesion, image_size=self.image_size,
        spacing_mm=self.spacing_mm, min_organ_area=self.min_organ_area,
        empty_slice_fraction=self.empty_slice_fraction,
        split_ratios=tuple(self.split_ratios), modality=self.modality)


def make_config(name_or_organs: str | Sequence[str], image_size: int | None = None,
                spacing_mm: float | None = None, *, layout: str = "auto",
                skip_bad_cases: bool = False, **options) -> CtSlicesConfig:
  """A config from a named config ('kidneys'), a suffixed name or an organ list.

  Options: image_size (256), spacing_mm (1.5), lesion, min_organ_area (0),
  empty_slice_fraction (0), split_ratios ((0.8, 0.1, 0.1)), modality ('ct'), layout ('auto'),
  skip_bad_cases (False). The name encodes the content options (naming.SliceSpec).
  """
  spec = naming.slice_spec(name_or_organs, image_size, spacing_mm, **options)
  if layout != "auto" and layout not in layouts.LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {layouts.LAYOUTS}")
  lesion = f", lesion {spec.lesion} (label {spec.lesion_label_id})" if spec.lesion else ""
  return CtSlicesConfig(
      name=spec.name,
      description=(f"Axial {_MODALITY_WORD[spec.modality]}slices with {', '.join(spec.organs)} "
                   f"(labels 1..{len(spec.organs)}"
                   f"{lesion}), {spec.image_size}px at {spec.spacing_mm:g} mm in-plane."),
      organs=spec.organs, lesion=spec.lesion, layout=layout, image_size=spec.image_size,
      spacing_mm=spec.spacing_mm, min_organ_area=spec.min_organ_area,
      empty_slice_fraction=spec.empty_slice_fraction, split_ratios=spec.split_ratios,
      skip_bad_cases=bool(skip_bad_cases), modality=spec.modality)


def assign_splits(case_ids: Sequence[str],
                  ratios: Sequence[float] = naming.DEFAULT_SPLIT_RATIOS
                  ) -> dict[str, str]:
  """case id -> split name, by sha1 rank (see the module docstring for the rule)."""
  if len(set(case_ids)) != len(case_ids):
    raise ValueError("duplicate case ids")
  n, total = len(case_ids), float(sum(ratios))
  exact = [n * r / total for r in ratios]
  counts = [math.floor(x) for x in exact]
  # Largest remainder; ties go to the earlier split.
  order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
  for i in order[: n - sum(counts)]:
    counts[i] += 1
  nonzero = [i for i, r in enumerate(ratios) if r > 0]
  if n >= len(nonzero):
    for i in nonzero:
      if counts[i] == 0:
        donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
        counts[donor] -= 1
        counts[i] += 1
  ranked = sorted(case_ids, key=lambda c: (hashlib.sha1(c.encode("utf-8")).hexdigest(), c))
  out, start = {}, 0
  for split, count in zip(SPLITS, counts):
    for c in ranked[start: start + count]:
      out[c] = split
    start += count
  return out


def static_metadata(cfg: CtSlicesConfig) -> dict[str, Any]:
  """What training / evaluation code needs to interpret the records (JSON-able)."""
  spec = cfg.spec
  return {
      "config": cfg.name,
      "organs": list(spec.organs),
      "label_names": {str(i): n for i, n in spec.label_names().items()},
      "lesion": spec.lesion,
      "lesion_label_id": spec.lesion_label_id,
      "image_size": spec.image_size,
      "spacing_mm": spec.spacing_mm,
      "min_organ_area": spec.min_organ_area,
      "empty_slice_fraction": spec.empty_slice_fraction,
      "split_ratios": list(spec.split_ratios),
      "orientation": volumes.ORIENTATION,
      # MR / PET: stored values (value_scale), normalised per case (ingest/modality.py).
      "modality": spec.modality,
      "intensity_unit": modality_lib.UNITS[spec.modality],
      "pad_hu": volumes.PAD_HU if spec.modality == "ct" else modality_lib.AIR[spec.modality],
  }


class Builder(tfds.core.GeneratorBasedBuilder):
  """2D CT slices with organ label maps, from NIfTI volumes in a manual directory."""

  # Explicit: TFDS would otherwise name a class `Builder` after its module ("builder").
  name = naming.DATASET
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put raw CT cases (NIfTI) in `manual_dir`, in one of these layouts (auto-detected, or set
  the config's `layout`):
    flat              <case>_ct.nii.gz + <case>_seg.nii.gz + labels.json ({"1": "spleen"..})
    totalsegmentator  <case>/ct.nii.gz + <case>/segmentations/<organ>.nii.gz
    kits              case_00000/imaging.nii.gz + segmentation.nii.gz (KiTS19/21/23)
    msd               Medical Segmentation Decathlon task folder with dataset.json
    lits              volume-N.nii + segmentation-N.nii (LiTS)
    csv               manifest CSV: case_id,image,label[,label_map] (+ labels.json beside it)
  """
  BUILDER_CONFIGS = [make_config(name) for name in organs_lib.DATASET_CONFIGS]
  # Set by a build: cases read / skipped / without the organ, slices and cases per split.
  build_summary: dict[str, Any] | None = None
  # Set by a build given Beam options: (runner, options); None builds locally.
  _beam: tuple[Any, Any] | None = None

  def __init__(self, *, file_format=None, **kwargs):
    # array_record by default: written and read without TensorFlow (tfrecord needs TF).
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    config = download_config or tfds.download.DownloadConfig()
    mode = config.download_mode
    fmt = kwargs.get("file_format")
    if fmt and self.data_path.exists() and (
        tfds.core.FileFormat(fmt) == self.info.file_format):
      # TFDS refuses to "override" the format of a DatasetInfo read from an existing build,
      # even with the same one: an overwrite would fail.
      del kwargs["file_format"]
    prepare = functools.partial(super().download_and_prepare, download_dir=download_dir,
                                download_config=download_config, **kwargs)
    reused = self.data_path.exists() and not mode.overwrite_dataset
    if reused or mode == tfds.download.GenerateMode.UPDATE_DATASET_INFO:
      return prepare()  # writes no records: needs neither the raw dir nor the lock
    # Check the raw directory before TFDS creates any folder.
    downloads = pathlib.Path(download_dir or self.data_dir_root / "downloads")
    layouts.check_manual_dir(config.manual_dir or downloads / "manual")
    config_dir = pathlib.Path(os.fspath(self.data_path)).parent
    with build_lock(config_dir):
      # Under the lock no other build runs: incomplete.* folders are from killed builds.
      for stale in sorted(config_dir.glob(f"{_INCOMPLETE}*")):
        _LOG.warning("removing %s, left behind by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)
      if self.data_path.exists() and mode.overwrite_dataset:
        _discard(pathlib.Path(os.fspath(self.data_path)))
      return prepare()

  def _create_builder_config(self, builder_config, version):
    # A CtSlicesConfig whose name matches a predefined one differs at most in the read
    # options (layout, skip_bad_cases), which don't change the content: accept it as is.
    if isinstance(builder_config, CtSlicesConfig):
      known = self.builder_configs.get(builder_config.name)
      if known is not None and known is not builder_config:
        if known.spec != builder_config.spec:
          raise ValueError(f"config {builder_config.name!r} does not match its options")
        return builder_config
    # An unknown name such as 'kidneys_64px_6mm' or 'liver+spleen' defines its options.
    if isinstance(builder_config, str):
      name = builder_config.split(":")[0]
      if name not in self.builder_configs:
        naming.parse_config_name(name)  # canonical names only: one name, one content
        builder_config = make_config(name)
    return super()._create_builder_config(builder_config, version)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return _DatasetInfo(
        builder=self,
        description=("Axial CT slices (HU, int16) with organ label maps, resampled in-plane; "
                     "see ctdiff_jax/ingest/records.py for the record schema."),
        features=records.tfds_features(cfg.image_size, cfg.modality),
        metadata=tfds.core.MetadataDict(static_metadata(cfg)),
        homepage="https://github.com/ctdiff-jax/ctdiff-jax",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    raw = layouts.read_layout(dl_manager.manual_dir, cfg.layout)
    layouts.check_modality(raw, cfg.modality)  # an mri.nii.gz is not read as CT
    try:  # Config-level: an organ no case has is always an error.
      organs_lib.resolve_label_ids(cfg.organs, raw.vocabulary())
    except organs_lib.UnknownOrganError as e:
      raise organs_lib.UnknownOrganError(
          f"{e} [raw dataset {raw.root}, layout {raw.layout}]") from e
    summary = {
        "dataset": f"{self.name}/{cfg.name}",
        "layout": raw.layout,
        "manual_dir": str(raw.root),
        "cases_found": len(raw.cases),
        "cases_read": 0,
        "cases_without_organ": [],
        "cases_skipped": {},
        "cases_unlabelled": list(raw.unlabelled),
        "cases": {s: [] for s in SPLITS},
        "slices": {s: 0 for s in SPLITS},
    }
    if raw.unlabelled:
      _LOG.warning("%d cases without a label file ignored: %s", len(raw.unlabelled),
                   raw.unlabelled[:10])
    scanned: list[tuple[volumes.Case, list[int]]] = []
    # In case order either way: the first bad case stops both builds (Beam scans them all).
    for case, (kept, n_organ, e) in zip(raw.cases, self._scan_cases(raw.cases)):
      if e is not None:
        if not cfg.skip_bad_cases:
          raise _with_skip_hint(e) from e
        _LOG.warning("skipping bad case %s: %s", case.case_id, e)
        summary["cases_skipped"][case.case_id] = str(e)
        continue
      summary["cases_read"] += 1
      if n_organ == 0:
        _LOG.info("case %s has none of %s on any slice: no organ slices", case.case_id,
                  list(cfg.organs))
        summary["cases_without_organ"].append(case.case_id)
      if kept:
        scanned.append((case, kept))
    split_of = assign_splits([c.case_id for c, _ in scanned], cfg.split_ratios)
    todo: dict[str, list[tuple[volumes.Case, list[int]]]] = {s: [] for s in SPLITS}
    for case, kept in scanned:
      todo[split_of[case.case_id]].append((case, kept))
      summary["cases"][split_of[case.case_id]].append(case.case_id)
    self.info.metadata["build"] = summary  # filled in further while writing; saved at the end
    self.build_summary = summary
    if not scanned:
      raise ValueError(
          f"no slices to write: none of the {summary['cases_read']} readable cases in "
          f"{raw.root} has {list(cfg.organs)} on a slice (min_organ_area "
          f"{cfg.min_organ_area}; cases skipped as bad: {len(summary['cases_skipped'])}): "
          "check the organs asked for against the label names, or lower min_organ_area")
    if self._beam is not None:
      # Workers cannot count into this summary: a case writes one record per kept slice.
      for s in SPLITS:
        summary["slices"][s] = sum(len(kept) for _, kept in todo[s])
      records_fn = functools.partial(case_records, cfg=cfg)
      return {s: beam_build.write_split(todo[s], records_fn) for s in SPLITS if todo[s]}
    return {s: self._generate_examples(cases=todo[s], split=s) for s in SPLITS if todo[s]}

  def _generate_splits(self, dl_manager, download_config):
    # Beam options (or a runner) select the Beam path: ctdiff_jax/ingest/beam_build.py.
    runner, options = download_config.beam_runner, download_config.beam_options
    self._beam = None if runner is None and options is None else (runner, options)
    return super()._generate_splits(dl_manager, download_config)

  def _scan_cases(self, cases: Sequence[volumes.Case]
                  ) -> Iterable[tuple[list[int], int, volumes.VolumeError | None]]:
    """scan_case of every case, in order: lazily here, or all at once on Beam."""
    scan_fn = functools.partial(scan_case, cfg=self.builder_config)
    if self._beam is None:
      return map(scan_fn, tqdm.tqdm(cases, desc="Scanning cases", unit="case"))
    runner, options = self._beam
    outcomes = beam_build.scan(cases, scan_fn, work_dir=self.data_path, runner=runner,
                               options=options)
    return [(kept, n, None if e is None else volumes.VolumeError(e)) for kept, n, e in outcomes]

  def _generate_examples(self, cases: list[tuple[volumes.Case, list[int]]],
                         split: str) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    for case, kept in tqdm.tqdm(cases, desc=f"Writing {split}", unit="case"):
      for key, record in case_records(case, kept, cfg):
        self.build_summary["slices"][split] += 1
        yield key, record


class _DatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that does not look for ct_slices on the TFDS bucket (it is never there).

  TFDS's `initialize_from_bucket` (run by every construction of an unbuilt builder) first makes
  a `tempfile.mkdtemp("tfds")` folder and never removes it: one empty /tmp/tmp*tfds each time.
  """

  def initialize_from_bucket(self) -> None:
    pass


def scan_case(case: volumes.Case, cfg: CtSlicesConfig
              ) -> tuple[list[int], int, volumes.VolumeError | None]:
  """The scan of one case: (kept z indices, organ slices, None), or ([], 0, its error)."""
  try:
    kept, n_organ = _scan(case, cfg)
  except volumes.VolumeError as e:
    return [], 0, e
  return kept, n_organ, None


def case_records(case: volumes.Case, kept: Sequence[int], cfg: CtSlicesConfig
                 ) -> Iterator[tuple[str, dict]]:
  """The write of one case: (key, record) per kept slice, re-read (must match the scan)."""
  loaded = volumes.load_case(case, cfg.organs)
  again, _ = volumes.select_slices(loaded.organ_map, cfg.min_organ_area,
                                   cfg.empty_slice_fraction, case.case_id)
  if list(again) != list(kept):
    raise volumes.VolumeError(
        f"case {case.case_id!r}: {', '.join(str(f) for f in case.files())}: files changed "
        "during the build (other slices than at the scan): rerun it with the files left alone")
  for record in volumes.slice_records(loaded, kept, cfg.image_size, cfg.spacing_mm,
                                      cfg.modality):
    yield f"{case.case_id}/{int(record[records.SLICE_INDEX]):05d}", record


@contextlib.contextmanager
def build_lock(config_dir: pathlib.Path) -> Iterator[pathlib.Path]:
  """Holds `<data_dir>/ct_slices/<config>.lock` (fcntl.flock): one build of a config at a time.

  A second build of the same config into the same data_dir waits here, then finds the first
  one's dataset and reuses it (or, with overwrite, rebuilds it). The lock goes with the process
  (also when killed); the empty lock file stays, deleting it would race with a waiting build.
  """
  lock_path = config_dir.parent / f"{config_dir.name}.lock"
  if fcntl is None or "://" in str(config_dir):  # no flock on Windows / remote file systems
    yield lock_path
    return
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      _LOG.warning("another build of %s/%s is running (lock %s): waiting for it to finish",
                   naming.DATASET, config_dir.name, lock_path)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield lock_path
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _discard(path: pathlib.Path) -> None:
  """Deletes a dataset folder so that a kill midway leaves no half dataset under its name."""
  doomed = path.with_name(f"{_INCOMPLETE}discarded_{path.name}")
  shutil.rmtree(doomed, ignore_errors=True)
  path.rename(doomed)  # atomic: the final name is complete or gone
  shutil.rmtree(doomed)


def _with_skip_hint(error: volumes.VolumeError) -> volumes.VolumeError:
  """The error with what to do on its first line (a message may go on with details)."""
  first, sep, rest = str(error).partition("\n")
  return volumes.VolumeError(f"{first} [fix or remove the case, or build with skip_bad_cases "
                             f"(--skip_bad_cases) to skip and count bad cases]{sep}{rest}")


def _scan(case: volumes.Case, cfg: CtSlicesConfig) -> tuple[list[int], int]:
  loaded = volumes.load_case(case, cfg.organs)
  return volumes.select_slices(loaded.organ_map, cfg.min_organ_area, cfg.empty_slice_fraction,
                               case.case_id)
