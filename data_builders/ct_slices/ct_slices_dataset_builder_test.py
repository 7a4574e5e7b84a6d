"""Tests of the `ct_slices` TFDS dataset folder: what `tfds build data_builders/ct_slices` runs.

Not a tfds.testing.DatasetBuilderTestCase: that needs TensorFlow in the test process (tf.nest,
tf.data) and the builder is TF-free. The dummy data (three tiny phantom cases, ~60 KB) is
written at test time by `write_dummy_data` rather than committed as .nii.gz.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from ctdiff_jax import phantom
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import builder as library_builder

FOLDER = pathlib.Path(__file__).resolve().parent
MODULE = f"{FOLDER.name}.ct_slices_dataset_builder"  # the name the TFDS CLI imports it under
CONFIG = "kidneys_16px_24mm"  # 16 px * 24 mm covers the whole 384 mm phantom field of view


def write_dummy_data(out: pathlib.Path) -> pathlib.Path:
  """Three phantom cases on a coarse 24x24x12 grid (16 x 16 x 20 mm voxels), flat layout."""
  phantom.write_cohort(out, 3, shape=(24, 24, 12), spacing=(16.0, 16.0, 20.0), progress=False)
  return out


@pytest.fixture(name="dummy_data", scope="module")
def _dummy_data(tmp_path_factory) -> pathlib.Path:
  return write_dummy_data(tmp_path_factory.mktemp("dummy_data"))


def _cli_builder_cls():
  # What `tfds build <folder>` does to find the builder: import <folder>.<folder>_dataset_builder
  # with the folder's parent on sys.path and take the one DatasetBuilder defined there.
  with tfds.core.utils.add_sys_path(FOLDER.parent):
    return tfds.core.community.builder_cls_from_module(MODULE)


def _records(data_dir: pathlib.Path) -> dict[str, list[tuple]]:
  out = {}
  for split, source in tfds.data_source(f"ct_slices/{CONFIG}", data_dir=str(data_dir)).items():
    recs = [source[i] for i in range(len(source))]
    out[split] = sorted((r["case_id"], int(r["slice_index"]), r["image"].tobytes(),
                         r["labels"].tobytes()) for r in recs)
  return out


def test_tfds_cli_finds_the_library_builder():
  cls = _cli_builder_cls()
  assert issubclass(cls, library_builder.Builder) and cls.__module__ == MODULE
  assert cls.name == "ct_slices"
  # Not registered a second time: `tfds.builder("ct_slices")` stays the library class.
  assert tfds.builder_cls("ct_slices") is library_builder.Builder


def test_build_like_tfds_build_equals_the_library_build(dummy_data, tmp_path):
  builder = _cli_builder_cls()(config=CONFIG, data_dir=str(tmp_path / "cli"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(dummy_data)))
  assert builder.info.file_format.value == "array_record"
  summary = ingest_build.build(CONFIG, dummy_data, tmp_path / "lib")
  got, want = _records(tmp_path / "cli"), _records(tmp_path / "lib")
  assert sorted(got) == ["test", "train", "validation"]
  assert {s: len(r) for s, r in got.items()} == summary["slices"]
  assert got == want
  assert builder.build_summary["cases"] == summary["cases"]


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("apache_beam", "mlcroissant")),
                    reason="the `tfds` CLI of TFDS 4.9 imports apache_beam and mlcroissant "
                           "(the beam extra, not in .venv): tests/ingest/test_builder_beam.py "
                           "runs it in the Beam venv")
def test_tfds_build_cli(dummy_data, tmp_path):
  launch = ("import sys; from tensorflow_datasets.scripts.cli.main import launch_cli; "
            "sys.argv[0] = 'tfds'; sys.exit(launch_cli())")
  proc = subprocess.run(
      [sys.executable, "-c", launch, "build", str(FOLDER), f"--manual_dir={dummy_data}",
       f"--config={CONFIG}", f"--data_dir={tmp_path / 'out'}"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = ingest_build.build(CONFIG, dummy_data, tmp_path / "lib")
  assert _records(tmp_path / "out") == _records(tmp_path / "lib")
  assert sum(summary["slices"].values()) > 0
