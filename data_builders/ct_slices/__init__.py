"""The `ct_slices` TFDS dataset: 2D CT slice records from NIfTI volumes (importing registers it)."""

from .ct_slices_dataset_builder import Builder, CtSlicesConfig, assign_splits, make_config

__all__ = ["Builder", "CtSlicesConfig", "assign_splits", "make_config"]
