"""Tests for the ct_slices TFDS builder, its config names, metadata reader and build CLI.

Acceptance: the two shared TotalSegmentator cases give the slice counts of the issue, image
and labels align, no case is in two splits, and the result reads back with tfds.data_source
in a process where TensorFlow cannot be imported. The same builder reads synthetic KiTS /
MSD / LiTS / TotalSegmentator / CSV datasets. Shared-data builds run once per session.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import naming
from ctdiff_jax.ingest import organs as organs_lib
from ctdiff_jax.ingest import records
from ctdiff_jax.ingest import builder as ctb
import test_volumes_layouts as synth
from no_tf import run_python  # pylint: disable=g-bad-import-order

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = 16  # slice counts are decided on the source grid, so tiny images suffice

# Slice counts (all splits together) from the acceptance criteria.
EXPECTED = {
    "kidneys": {"s01": 39},
    "liver": {"s01": 43, "s02": 20},
    "lungs": {"s01": 11},
    "abdomen": {"s01": 46, "s02": 20},
}


def read_all(data_dir, name: str) -> dict[str, list[dict]]:
  """split -> records of a built dataset (via tfds.data_source, no TensorFlow)."""
  sources = tfds.data_source(name, data_dir=str(data_dir))
  return {split: [src[i] for i in range(len(src))] for split, src in sources.items()}


def case_of(record) -> str:
  cid = record[records.CASE_ID]
  return cid.decode() if isinstance(cid, bytes) else str(cid)


def counts_by_case(recs_by_split) -> dict[str, int]:
  out: dict[str, int] = {}
  for recs in recs_by_split.values():
    for r in recs:
      out[case_of(r)] = out.get(case_of(r), 0) + 1
  return out


def raw_reference_counts(totalseg_dir, config: str, min_area: int = 0) -> dict[str, int]:
  """Organ slices per case straight from the raw files (independent of ctdiff_jax.ingest.volumes).

  Both shared cases store z inferior -> superior (RAS / LAS), so z needs no reorientation
  and the per-slice voxel count does not depend on in-plane flips.
  """
  names = {int(k): v for k, v in json.loads((totalseg_dir / "labels.json").read_text()).items()}
  wanted = {n for g in organs_lib.DATASET_CONFIGS[config][0] for n in organs_lib.source_names(g)}
  ids = [i for i, n in names.items() if n in wanted]
  out = {}
  for cid in ("s01", "s02"):
    seg = np.asarray(nib.load(totalseg_dir / f"{cid}_seg.nii.gz").dataobj)
    area = np.isin(seg, ids).sum(axis=(0, 1))
    n = int((area > min_area).sum())
    if n:
      out[cid] = n
  return out


@pytest.fixture(scope="session")
def shared_builds(tmp_path_factory, totalseg_dir):
  """The shared cases built once: liver at the defaults, the rest at 16 px."""
  data_dir = tmp_path_factory.mktemp("ct_slices_shared")
  builds = {
      "liver": ("liver", {}),
      "kidneys": ("kidneys", {"image_size": SMALL}),
      "lungs": ("lungs", {"image_size": SMALL}),
      # 50/50 so that the two cases land in different splits.
      "abdomen": ("abdomen", {"image_size": SMALL, "split_ratios": (0.5, 0.5, 0.0)}),
  }
  out = {}
  for key, (config, options) in builds.items():
    summary = ingest_build.build(config, totalseg_dir, data_dir, **options)
    name = naming.dataset_name(config, **options)
    out[key] = (name, summary)
  return data_dir, out


# ---- the shared TotalSegmentator cases -------------------------------------------------------


@pytest.mark.parametrize("config", sorted(EXPECTED))
def test_shared_slice_counts(shared_builds, totalseg_dir, config):
  data_dir, builds = shared_builds
  name, summary = builds[config]
  recs = read_all(data_dir, name)
  assert counts_by_case(recs) == EXPECTED[config]
  assert counts_by_case(recs) == raw_reference_counts(totalseg_dir, config)
  assert summary["total_slices"] == sum(EXPECTED[config].values())
  assert summary["cases_found"] == summary["cases_read"] == 2
  assert summary["cases_skipped"] == {}


def test_case_without_organ_is_reported_not_an_error(shared_builds):
  _, builds = shared_builds
  summary = builds["kidneys"][1]
  assert summary["cases_without_organ"] == ["s02"]
  assert summary["cases_read"] == 2 and summary["total_slices"] == 39
  assert "cases without the organ(s): 1 (s02)" in ingest_build.format_summary(summary)


def test_default_build_shapes_and_alignment(shared_builds, totalseg_dir):
  data_dir, builds = shared_builds
  name, _ = builds["liver"]
  assert name == "ct_slices/liver"  # defaults keep the plain config name
  recs = [r for rs in read_all(data_dir, name).values() for r in rs]
  for r in recs:
    assert r[records.IMAGE].shape == (256, 256, 1) and r[records.IMAGE].dtype == np.int16
    assert r[records.LABELS].dtype == np.uint8 and set(np.unique(r[records.LABELS])) <= {0, 1}
  s02 = sorted((r for r in recs if case_of(r) == "s02"), key=lambda r: r[records.SLICE_INDEX])
  hu = np.concatenate([r[records.IMAGE][r[records.LABELS] == 1] for r in s02]).astype(float)
  # Reference on the source grid, straight from the raw files (liver id from labels.json).
  names = json.loads((totalseg_dir / "labels.json").read_text())
  liver_id = int(next(k for k, v in names.items() if v == "liver"))
  ct = np.asarray(nib.load(totalseg_dir / "s02_ct.nii.gz").dataobj).astype(float)
  seg = np.asarray(nib.load(totalseg_dir / "s02_seg.nii.gz").dataobj)
  ref = ct[seg == liver_id].mean()
  assert 60 < hu.mean() < 120
  assert abs(hu.mean() - ref) < 3, (hu.mean(), ref)  # misaligned labels would drift far
  # Liver area after resampling ~ source area * (source / target pixel area): 10% tolerance.
  area = sum(int((r[records.LABELS] == 1).sum()) for r in s02)
  expected_area = (seg == liver_id).sum() * (0.9765625 / 1.5) ** 2
  assert abs(area / expected_area - 1) < 0.1
  np.testing.assert_allclose(s02[0][records.SPACING_MM], [1.5, 1.5, 2.0])
  s01 = next(r for r in recs if case_of(r) == "s01")
  np.testing.assert_allclose(s01[records.SPACING_MM], [1.5, 1.5, 3.0])
  # Radiological view: the liver (patient's right) lies in the left half of the image.
  cols = np.nonzero(np.concatenate([r[records.LABELS][..., 0] for r in s02]))[1]
  assert cols.mean() < 128


def test_neighbour_slices(shared_builds):
  data_dir, builds = shared_builds
  recs = [r for rs in read_all(data_dir, builds["liver"][0]).values() for r in rs]
  s02 = {int(r[records.SLICE_INDEX]): r for r in recs if case_of(r) == "s02"}
  assert sorted(s02) == list(range(20))  # every s02 slice has liver
  for z, r in s02.items():
    prev = s02[max(z - 1, 0)][records.IMAGE]
    nxt = s02[min(z + 1, 19)][records.IMAGE]
    np.testing.assert_array_equal(r[records.PREV_IMAGE], prev)
    np.testing.assert_array_equal(r[records.NEXT_IMAGE], nxt)
  assert not np.array_equal(s02[5][records.IMAGE], s02[6][records.IMAGE])


def test_no_case_in_two_splits(shared_builds):
  data_dir, builds = shared_builds
  name, summary = builds["abdomen"]
  recs = read_all(data_dir, name)
  cases = {split: {case_of(r) for r in rs} for split, rs in recs.items()}
  assert sorted(cases) == ["train", "validation"]  # the empty test split is not written
  assert cases["train"].isdisjoint(cases["validation"])
  assert cases["train"] | cases["validation"] == {"s01", "s02"}
  assert {s: set(c) for s, c in summary["cases"].items() if c} == cases
  assert ctb.assign_splits(["s01", "s02"], (0.5, 0.5, 0.0)) == {
      c: s for s, cs in cases.items() for c in cs}


def test_dataset_metadata(shared_builds):
  data_dir, builds = shared_builds
  name, _ = builds["abdomen"]
  assert name == "ct_slices/abdomen_16px_split50-50-0"
  meta = naming.read_dataset_metadata(data_dir, name)
  assert meta["organs"] == ["liver", "spleen", "kidney"]
  assert meta["label_names"] == {"1": "liver", "2": "spleen", "3": "kidney"}
  assert meta["lesion"] is None and meta["lesion_label_id"] is None
  assert meta["image_size"] == SMALL and meta["spacing_mm"] == 1.5
  assert meta["split_ratios"] == [0.5, 0.5, 0.0]
  assert sum(meta["splits"].values()) == 66 and meta["build"]["layout"] == "flat"
  assert {s: n for s, n in meta["build"]["slices"].items() if n} == meta["splits"]
  assert meta["version"] == "1.0.0"
  assert naming.read_dataset_metadata(data_dir, "abdomen_16px_split50-50-0:1.0.0") == meta
  # TFDS exposes the same metadata.
  info_meta = tfds.builder(name, data_dir=str(data_dir)).info.metadata
  assert info_meta["organs"] == meta["organs"]
  with pytest.raises(FileNotFoundError, match="no built dataset ct_slices/kidneys_32px"):
    naming.read_dataset_metadata(data_dir, "kidneys_32px")


def test_read_back_without_tensorflow(shared_builds):
  data_dir, builds = shared_builds
  code = f"""
import sys
import numpy as np
import tensorflow_datasets as tfds
from ctdiff_jax.data import sources
from ctdiff_jax.ingest import naming
name = naming.dataset_name("kidneys", image_size={SMALL})
meta = naming.read_dataset_metadata({str(data_dir)!r}, name)
assert meta["organs"] == ["kidney"] and meta["image_size"] == {SMALL}, meta
ds = {{"train": sources.load_source({str(data_dir)!r}, name.split("/")[1], "train")}}
assert len(ds["train"]) == 39, len(ds["train"])
r = ds["train"][0]
for k in ("image", "prev_image", "next_image"):
  assert r[k].shape == ({SMALL}, {SMALL}, 1) and r[k].dtype == np.int16, (k, r[k].dtype)
assert r["labels"].shape == ({SMALL}, {SMALL}, 1) and r["labels"].dtype == np.uint8
assert r["spacing_mm"].dtype == np.float32 and r["spacing_mm"].shape == (3,)
assert isinstance(r["slice_index"], (int, np.integer)) and 0 <= r["slice_index"] < 112  # scalar
assert r["case_id"] in (b"s01", "s01")
ds = tfds.builder_from_directory(str(naming.dataset_dir({str(data_dir)!r}, "liver")))
assert ds.as_data_source("train")[0]["image"].shape == (256, 256, 1)
assert "tensorflow" not in sys.modules
# Reading never imports build code (the builder, the build driver, the builder folder).
assert not any(m.startswith(("data_builders", "ctdiff_jax.ingest.build")) for m in sys.modules)
print("OK")
"""
  assert "OK" in run_python(code).stdout


def test_min_organ_area_counts_on_source_grid(shared_builds, totalseg_dir):
  data_dir, _ = shared_builds
  summary = ingest_build.build("kidneys", totalseg_dir, data_dir, image_size=SMALL,
                                min_organ_area=100)
  expected = raw_reference_counts(totalseg_dir, "kidneys", min_area=100)
  assert 0 < expected["s01"] < 39
  assert summary["total_slices"] == expected["s01"]
  recs = read_all(data_dir, naming.dataset_name("kidneys", SMALL, min_organ_area=100))
  assert counts_by_case(recs) == expected


def test_existing_build_is_reused(shared_builds, totalseg_dir):
  data_dir, builds = shared_builds
  again = ingest_build.build("lungs", totalseg_dir, data_dir, image_size=SMALL)
  assert again["already_built"] and again["total_slices"] == 11
  assert again["slices"] == builds["lungs"][1]["slices"]


# ---- synthetic layouts -----------------------------------------------------------------------

# Six cases each: label k on the listed z (see test_volumes_layouts.make_volume).
SYNTH_CASES = [
    {1: [1, 2], 2: [2]},
    {1: [0, 1, 2, 3]},
    {2: [4, 5]},
    {1: [3], 2: [3]},
    {},  # no organ at all
    {1: [5]},
]


def _synthetic(layout: str, root: pathlib.Path):
  """(root, config, options, {case_id: expected slices}, expected label ids present)."""
  # 16 px * 4 mm covers the whole 64 mm synthetic field of view, so no organ is cropped.
  options = {"spacing_mm": 4.0}
  ids = [f"c{i}" for i in range(len(SYNTH_CASES))]
  cases = dict(zip(ids, SYNTH_CASES))

  def expect(organ_ids, case_ids=ids):
    out = {}
    for cid, spec in zip(case_ids, SYNTH_CASES):
      zs = {z for k, v in spec.items() if k in organ_ids for z in v}
      if zs:
        out[cid] = len(zs)
    return out

  if layout == "kits":
    kits_ids = [f"case_{i:05d}" for i in range(6)]
    synth.write_kits(root, dict(zip(kits_ids, SYNTH_CASES)), unlabelled=["case_00210"])
    return root, "kidney_tumor", options, expect({1, 2}, kits_ids), {1, 2}
  if layout == "msd":
    synth.write_msd(root, cases, task="Liver")
    return root, "liver_tumor", options, expect({1, 2}), {1, 2}
  if layout == "lits":
    synth.write_lits(root, dict(enumerate(SYNTH_CASES)))
    return root, "liver", options, expect({1}, [f"volume-{i}" for i in range(6)]), {1}
  if layout == "totalsegmentator":
    synth.write_totalseg(root, cases, {1: "kidney_left", 2: "kidney_right"})
    return root, "kidneys", options, expect({1, 2}), {1}
  if layout == "csv":
    synth.write_csv(root, cases, {1: "liver", 2: "spleen"}, per_row_map=True)
    return root, ["spleen"], options, expect({2}), {1}
  synth.write_flat(root, cases, {1: "liver", 2: "spleen"})
  return root, "liver,spleen", options, expect({1, 2}), {1, 2}


@pytest.mark.parametrize("layout", ["kits", "msd", "lits", "totalsegmentator", "csv", "flat"])
def test_synthetic_layouts(tmp_path, layout):
  root, config, options, expected, label_ids = _synthetic(layout, tmp_path / "raw")
  summary = ingest_build.build(config, root, tmp_path / "out", image_size=SMALL, **options)
  name = naming.dataset_name(config, SMALL, **options)
  assert summary["layout"] == layout and summary["dataset"] == name
  recs = read_all(tmp_path / "out", name)
  assert counts_by_case(recs) == expected
  present = set()
  for rs in recs.values():
    for r in rs:
      present |= set(np.unique(r[records.LABELS]).tolist())
  assert present - {0} == label_ids
  # Splits by case id, as assign_splits says, over the 3-5 cases with slices (-> n-2/1/1).
  splits = ctb.assign_splits(sorted(expected), (0.8, 0.1, 0.1))
  assert sorted(recs) == ["test", "train", "validation"]
  assert [list(splits.values()).count(s) for s in ("train", "validation", "test")] == [
      len(expected) - 2, 1, 1]
  for split, rs in recs.items():
    assert {splits[case_of(r)] for r in rs} == {split}
  meta = naming.read_dataset_metadata(tmp_path / "out", name)
  spec = naming.slice_spec(config)
  assert meta["organs"] == list(spec.organs) and meta["lesion_label_id"] == spec.lesion_label_id
  if layout == "kits":
    assert summary["cases_unlabelled"] == ["case_00210"]
    assert meta["lesion"] == "kidney_tumor" and meta["lesion_label_id"] == 2


def test_empty_slice_fraction(tmp_path):
  root = synth.write_flat(tmp_path / "raw", {"a": {1: [2]}, "b": {1: [0, 1]}}, {1: "liver"})
  opts = dict(image_size=SMALL, spacing_mm=4.0, empty_slice_fraction=0.4,
              split_ratios=(0.5, 0.5, 0.0))
  summary = ingest_build.build("liver", root, tmp_path / "out", **opts)
  # a: 1 organ slice + round(0.4 * 5) = 2 empty; b: 2 + round(0.4 * 4) = 2
  assert summary["total_slices"] == 7
  recs = read_all(tmp_path / "out", naming.dataset_name("liver", **opts))
  assert counts_by_case(recs) == {"a": 3, "b": 4}
  empty = [r for rs in recs.values() for r in rs if not r[records.LABELS].any()]
  assert len(empty) == 4


# ---- splits, names, configs --------------------------------------------------------------


def test_assign_splits_rule():
  ids = [f"case{i:03d}" for i in range(100)]
  splits = ctb.assign_splits(ids)
  assert [list(splits.values()).count(s) for s in ("train", "validation", "test")] == [80, 10, 10]
  assert ctb.assign_splits(list(reversed(ids))) == splits  # order-independent
  for n in (3, 4, 7):
    got = ctb.assign_splits(ids[:n])
    assert set(got.values()) == {"train", "validation", "test"}, (n, got)
  assert set(ctb.assign_splits(ids[:2]).values()) == {"train"}  # too few cases to share
  assert set(ctb.assign_splits(ids[:10], (1.0, 0.0, 0.0)).values()) == {"train"}
  # Rank by sha1: the first-ranked case goes to train.
  import hashlib  # pylint: disable=g-import-not-at-top
  first = min(ids[:10], key=lambda c: hashlib.sha1(c.encode()).hexdigest())
  last = max(ids[:10], key=lambda c: hashlib.sha1(c.encode()).hexdigest())
  got = ctb.assign_splits(ids[:10])
  assert got[first] == "train" and got[last] == "test"


def test_config_names():
  assert [c.name for c in ctb.Builder.BUILDER_CONFIGS] == list(organs_lib.DATASET_CONFIGS)
  assert ctb.Builder.name == "ct_slices"
  assert naming.config_name("kidneys") == "kidneys"
  assert naming.config_name("kidneys", 64, 6.0) == "kidneys_64px_6mm"
  assert naming.dataset_name("kidneys", image_size=64, spacing_mm=6) == \
      "ct_slices/kidneys_64px_6mm"
  assert naming.config_name(["liver", "spleen", "kidneys"]) == "abdomen"
  assert naming.config_name("liver,spleen", min_organ_area=20) == "liver+spleen_min20"
  assert naming.config_name(["kidney_tumor"]) == "custom-kidney_tumor"
  assert naming.config_name(["kidney", "kidney_tumor"], lesion=None) == \
      "kidney+kidney_tumor_nolesion"
  assert naming.config_name("kidneys", layout="kits", skip_bad_cases=True) == "kidneys"
  names = set()
  for opts in ({}, {"image_size": 64}, {"spacing_mm": 0.75}, {"min_organ_area": 5},
               {"empty_slice_fraction": 0.25}, {"split_ratios": (0.7, 0.15, 0.15)}):
    name = naming.config_name("liver", **opts)
    names.add(name)
    spec = naming.parse_config_name(name)  # the name round-trips to the options
    assert spec == naming.slice_spec("liver", **opts)
  assert len(names) == 6
  with pytest.raises(ValueError, match="did you mean 'kidneys'"):
    naming.parse_config_name("kidney")
  with pytest.raises(ValueError, match="image_size"):
    naming.config_name("kidneys", image_size=4)
  with pytest.raises(TypeError, match="unknown ct_slices option"):
    naming.config_name("kidneys", imagesize=64)


def test_builder_accepts_config_names_and_objects(tmp_path):
  b = ctb.Builder(config="liver+spleen_64px_6mm", data_dir=str(tmp_path))
  cfg = b.builder_config
  assert (cfg.organs, cfg.image_size, cfg.spacing_mm) == (("liver", "spleen"), 64, 6.0)
  assert b.info.metadata["label_names"] == {"1": "liver", "2": "spleen"}
  b = ctb.Builder(config=ctb.make_config("kidneys", skip_bad_cases=True), data_dir=str(tmp_path))
  assert b.builder_config.skip_bad_cases and b.builder_config.name == "kidneys"
  with pytest.raises(ValueError, match="not a canonical"):
    ctb.Builder(config="kidneys_256px", data_dir=str(tmp_path))
  # Plain TFDS usage (as `tfds build` does it) writes array_record by default.
  raw = synth.write_flat(tmp_path / "raw", {"a": {1: [1]}}, {1: "liver"})
  b = ctb.Builder(config="liver_16px", data_dir=str(tmp_path / "out"))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  info = json.loads((tmp_path / "out/ct_slices/liver_16px/1.0.0/dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record"
  assert b.build_summary["slices"] == {"train": 1, "validation": 0, "test": 0}


def test_cli_without_tensorflow(tmp_path):
  root = synth.write_flat(tmp_path / "raw", {"a": {1: [1, 2]}, "b": {2: [3]}, "c": {}},
                          {1: "liver", 2: "spleen"})
  out = tmp_path / "out"
  code = f"""
import runpy, sys
sys.argv = ["build_dataset", "--organs=spleen,liver", "--manual_dir={root}",
            "--data_dir={out}", "--image_size=16", "--split_ratios=0.5,0.5,0"]
try:
  runpy.run_module("ctdiff_jax.build_dataset", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
assert "tensorflow" not in sys.modules
"""
  proc = run_python(code)
  assert "ct_slices/spleen+liver_16px_split50-50-0" in proc.stdout
  assert "cases found 3, read 3" in proc.stdout
  assert "total           3 slices" in proc.stdout
  assert "cases without the organ(s): 1 (c)" in proc.stdout
  meta = naming.read_dataset_metadata(out, "spleen+liver_16px_split50-50-0")
  assert meta["organs"] == ["spleen", "liver"] and sum(meta["splits"].values()) == 3
