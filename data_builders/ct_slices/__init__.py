"""The `ct_slices` TFDS dataset folder (builder entry for `tfds build`, its test and dummy data)."""
