"""`ct_slices` for `tfds build data_builders/ct_slices`: the builder lives in the library.

The builder is defined in ctdiff_jax/ingest/builder.py (so `pip install` ships it under
`ctdiff_jax` and nothing imports this folder back). The TFDS CLI takes the one DatasetBuilder
*defined* in this module (it looks the class up by its __module__), so a re-export is not
enough: this is an empty subclass, kept out of the name registry because the library class
already holds the name `ct_slices`.
"""

from ctdiff_jax.ingest import builder


class Builder(builder.Builder, skip_registration=True):
  """`ct_slices` (see ctdiff_jax/ingest/builder.py); TFDS reads its files from this folder."""

  name = builder.Builder.name
