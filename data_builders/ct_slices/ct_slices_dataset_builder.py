"""`ct_slices` for `tfds build data_builders/ct_slices`: the builder lives in the library.

The builder class is defined in ctdiff_jax/ingest/builder.py (so `pip install` ships it under
`ctdiff_jax` and nothing imports this folder back); this module only exposes it to the TFDS
CLI, which looks for exactly one DatasetBuilder here.
"""

from ctdiff_jax.ingest.builder import Builder

__all__ = ["Builder"]
