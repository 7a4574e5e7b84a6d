"""Fixtures shared by the training tests."""

import pathlib

import pytest

import phantom_kidneys


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """phantom_kidneys' dataset (read only: every test writes into its own workdir)."""
  return phantom_kidneys.build(tmp_path_factory.mktemp("train_data"))
