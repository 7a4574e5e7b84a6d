"""Input pipeline: Grain loader over TFDS slice records and on-the-fly mask modes."""
