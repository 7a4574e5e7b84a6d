"""Procedural phantom CT cohort: the project's embedded default dataset (see cohort.py)."""

from ctdiff_jax.phantom.cohort import (DEFAULT_SHAPE, DEFAULT_SPACING, ID, KIDNEY_TUMOR, LABEL_IDS,
                                       LABELS, LIVER_TUMOR, MANIFEST_COLUMNS, T, TISSUE_IDS,
                                       TISSUES, PhantomCase, affine_for, case_rng, generate_case,
                                       write_cohort)

__all__ = ["DEFAULT_SHAPE", "DEFAULT_SPACING", "ID", "KIDNEY_TUMOR", "LABEL_IDS", "LABELS",
           "LIVER_TUMOR", "MANIFEST_COLUMNS", "T", "TISSUE_IDS", "TISSUES", "PhantomCase",
           "affine_for", "case_rng", "generate_case", "write_cohort"]
