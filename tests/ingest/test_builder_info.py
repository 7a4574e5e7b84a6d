"""Constructing the ct_slices builder for an unbuilt dataset leaves no temporary folder.

TFDS's DatasetInfo.initialize_from_bucket makes a `tempfile.mkdtemp("tfds")` folder before
looking for the dataset on its GCS bucket and never removes it; ct_slices is never there, so
its DatasetInfo skips the look-up (builder._DatasetInfo).
"""

from __future__ import annotations

import tempfile

import tensorflow_datasets as tfds

from ctdiff_jax.ingest import builder as ctb


def _leftovers(tmp_path) -> list:
  return sorted(tmp_path.glob("tmp*tfds"))


def test_constructing_the_builder_leaves_no_tmp_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what mkdtemp uses
  for config in ("kidneys", "kidneys_16px_24mm", "liver"):
    builder = ctb.Builder(config=config, data_dir=str(tmp_path / "data"))
    assert not builder.data_path.exists()  # unbuilt: TFDS takes the info from the code
  assert _leftovers(tmp_path) == []
  # The stock TFDS method still leaks here: the check above would see it.
  tfds.core.DatasetInfo.initialize_from_bucket(builder.info)
  assert len(_leftovers(tmp_path)) == 1
