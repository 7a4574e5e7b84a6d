"""From a run config to its built TFDS slice dataset: name, (auto-)build, open a split.

The dataset a config reads is `ct_slices/<name>` where `<name>` encodes the dataset config and
every non-default build option (e.g. `kidneys_64px_6mm`), so datasets built at different sizes
never collide in one data dir. When it is missing and `config.manual_dir` is set, it is built.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from ctdiff_jax import build_dataset
from ctdiff_jax import organs as organs_lib
from ctdiff_jax.data import pipeline


def data_dir(config) -> str:
  return os.path.abspath(os.path.expanduser(config.data_dir))


def dataset_config_name(config) -> str:
  """The ct_slices config name a run config reads (e.g. 'kidneys_64px_6mm')."""
  what = organs_lib.parse_organ_list(config.organs) if config.organs else config.dataset
  return build_dataset.config_name(what, config.image_size, config.spacing_mm)


def ensure_built(config) -> str:
  """Returns the dataset config name, building it from `config.manual_dir` when missing."""
  name = dataset_config_name(config)
  try:
    build_dataset.read_dataset_metadata(data_dir(config), name)
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
  logging.info("building ct_slices/%s from %s", name, config.manual_dir)
  summary = build_dataset.build(what, os.path.expanduser(config.manual_dir), data_dir(config),
                                image_size=config.image_size, spacing_mm=config.spacing_mm)
  logging.info("%s", build_dataset.format_summary(summary))
  return name


def metadata(config) -> dict[str, Any]:
  return build_dataset.read_dataset_metadata(data_dir(config), ensure_built(config))


def open_split(config, split: str) -> tuple[Any, dict[str, Any]]:
  """(random-access source of records, dataset metadata) for `split`; clear error if empty."""
  name = ensure_built(config)
  meta = build_dataset.read_dataset_metadata(data_dir(config), name)
  n = meta.get("splits", {}).get(split, 0)
  if n == 0:
    raise ValueError(
        f"split {split!r} of ct_slices/{name} in {data_dir(config)} has no slices "
        f"(splits: {meta.get('splits')}). Use another split (e.g. --config.eval_split=train) "
        f"or add cases.")
  return pipeline.load_source(data_dir(config), name, split), meta
