"""From a run config to its built TFDS slice dataset: name, (auto-)build, open a split.

The dataset a config reads is `ct_slices/<name>` where `<name>` encodes the dataset config and
every non-default build option (e.g. `kidneys_64px_6mm`), so datasets built at different sizes
never collide in one data dir. When it is missing and `config.manual_dir` is set, it is built.

The config's modality (`config.modality`: ct, mr, pet) picks the dataset's modality suffix
(`kidneys_64px_6mm_mr`) and is checked against the dataset's metadata whenever a split is
opened (train, generate, evaluate): a CT config refuses MR records and vice versa.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from absl import logging

from ctdiff_jax.ingest import modality as modality_lib
from ctdiff_jax.ingest import naming
from ctdiff_jax.ingest import organs as organs_lib


def data_dir(config) -> str:
  return os.path.abspath(os.path.expanduser(config.data_dir))


def config_modality(config) -> str:
  """The run config's modality (configs without the field are CT)."""
  return modality_lib.check(getattr(config, "modality", modality_lib.DEFAULT))


def dataset_config_name(config) -> str:
  """The ct_slices config name a run config reads (e.g. 'kidneys_64px_6mm', '..._mr').

  A dataset name with a modality suffix must agree with config.modality (ModalityError).
  """
  what = organs_lib.parse_organ_list(config.organs) if config.organs else config.dataset
  spec = naming.slice_spec(what, config.image_size, config.spacing_mm)
  want = config_modality(config)
  if spec.modality == modality_lib.DEFAULT and want != spec.modality:
    spec = naming.slice_spec(what, config.image_size, config.spacing_mm, modality=want)
  modality_lib.check_match(f"{naming.DATASET}/{spec.name}", spec.modality, want, "the config")
  return spec.name


def check_modality(config, meta: dict[str, Any]) -> dict[str, Any]:
  """`meta` if the built dataset's modality is the config's, else a ModalityError."""
  modality_lib.check_match(meta.get("dataset") or meta.get("config"),
                           modality_lib.of_metadata(meta), config_modality(config), "the config")
  return meta


def ensure_built(config) -> str:
  """Returns the dataset config name, building it from `config.manual_dir` when missing."""
  name = dataset_config_name(config)
  try:
    naming.read_dataset_metadata(data_dir(config), name)
    return name
  except FileNotFoundError:
    if not config.manual_dir:
      what = f"--organs={config.organs}" if config.organs else f"--config={config.dataset}"
      raise FileNotFoundError(
          f"dataset ct_slices/{name} is not built in {data_dir(config)}. Build it with:\n"
          f"  python -m ctdiff_jax.build_dataset {what} --image_size={config.image_size} "
          f"--spacing_mm={config.spacing_mm} --manual_dir=RAW_CASES --data_dir={config.data_dir}\n"
          f"or set --config.manual_dir=RAW_CASES to build it automatically.") from None
  what = organs_lib.parse_organ_list(config.organs) if config.organs else config.dataset
  # Only here, when asked to build, does the read path touch build code.
  from ctdiff_jax.ingest import build as ingest_build  # pylint: disable=g-import-not-at-top
  logging.info("building ct_slices/%s from %s", name, config.manual_dir)
  summary = ingest_build.build(what, os.path.expanduser(config.manual_dir), data_dir(config),
                                image_size=config.image_size, spacing_mm=config.spacing_mm,
                                modality=config_modality(config))
  logging.info("%s", ingest_build.format_summary(summary))
  return name


def metadata(config) -> dict[str, Any]:
  return check_modality(config, naming.read_dataset_metadata(data_dir(config),
                                                            ensure_built(config)))


def open_split(config, split: str) -> tuple[Any, dict[str, Any]]:
  """(random-access source of records, dataset metadata) for `split`; clear error if empty."""
  name = ensure_built(config)
  meta = check_modality(config, naming.read_dataset_metadata(data_dir(config), name))
  n = meta.get("splits", {}).get(split, 0)
  if n == 0:
    raise ValueError(
        f"split {split!r} of ct_slices/{name} in {data_dir(config)} has no slices "
        f"(splits: {meta.get('splits')}). Use another split (e.g. --config.eval_split=train) "
        f"or add cases.")
  return load_source(data_dir(config), name, split), meta


def load_source(data_dir: str | pathlib.Path, dataset_name: str, split: str):
  """The TFDS random-access data source of one split (no TensorFlow needed).

  Reads the directory's own metadata (`tfds.builder_from_directory`): no builder code, so
  reading never imports the build path.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = naming.dataset_dir(data_dir, dataset_name)
  builder = tfds.builder_from_directory(str(path))
  if split not in builder.info.splits:
    raise ValueError(f"dataset {path} has no split {split!r} (splits: "
                     f"{sorted(builder.info.splits)})")
  return builder.as_data_source(split=split)
