"""TFDS dataset builders of ctdiff_jax (importing registers them with TFDS)."""
