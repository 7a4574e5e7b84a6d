"""Downstream test: a small segmentation UNet trained on real and/or synthetic slices.

`python -m ctdiff_jax.downstream --config=configs/downstream.py[:smoke]` (see README,
"Downstream evaluation"). The segmenter reads the `kidney_tumor` dataset (kidney = 1, tumour =
2) like the generative models (same data fields); synthetic slices come from `generate --tfds`
exports named in `downstream.synthetic`. Each arm trains with the same steps and seeds and is
scored by per-class Dice on the real `eval_split`.

Variants: "" (GPU: 256 px, a wider UNet, 5000 steps, 5 arms x 5 seeds) and "smoke" (CPU: 64 px,
~30k parameters, 100 steps, batch 16, 3 arms x 3 seeds, a few minutes on 2 free cores).
"""

import ml_collections

from configs import default


def segmentation_config(variant: str = "") -> ml_collections.ConfigDict:
  seg = ml_collections.ConfigDict()
  seg.num_classes = 0  # Background + label ids 1..K; 0 = from the dataset's labels.
  seg.channels = (8, 16, 32) if variant == "smoke" else (32, 64, 128, 256)  # Width per level.
  return seg


def downstream_config(variant: str = "") -> ml_collections.ConfigDict:
  ds = ml_collections.ConfigDict()
  # Arms: '+'-joined sources; 'real' = the (scarce) real train cases, any other name = a
  # synthetic export in `synthetic`. Same model, steps and seeds in every arm.
  # smoke: (a) real only, (b) real + both scenarios' slices, (c) synthetic only.
  ds.arms = (("real", "real+organ+tumor", "organ+tumor") if variant == "smoke" else
             ("real", "real+organ", "real+tumor", "real+organ+tumor", "organ+tumor"))
  ds.seeds = (0, 1, 2) if variant == "smoke" else (0, 1, 2, 3, 4)
  # Real train cases used: the first N (by case id) with a lesion; 0 = every train case.
  ds.real_cases = 3
  # Synthetic exports: "name=dir,name=dir" (each dir = a `generate --tfds` output_dir).
  ds.synthetic = ""
  ds.max_synthetic = 0  # Records taken from each export (0 = all).
  ds.batch_size = 64  # Prediction batch when scoring.
  ds.output_dir = "downstream_out"  # downstream.{md,csv,json}, the bar plot, runs/.
  return ds


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = default.for_dataset("kidney_tumor", variant)
  config.model_family = "segmentation"
  config.segmentation = segmentation_config(variant)
  config.downstream = downstream_config(variant)
  config.eval_split = "test"  # The real slices every arm is scored on.
  config.optim.learning_rate = 3e-3 if variant == "smoke" else 1e-3
  config.optim.warmup_steps = 20 if variant == "smoke" else 200
  config.optim.ema_decay = 0.99
  config.num_train_steps = 100 if variant == "smoke" else 5000  # smoke: fits the quickstart budget
  config.per_device_batch_size = 16
  config.log_every_steps = 50 if variant == "smoke" else 500
  config.checkpoint_every_steps = config.get_ref("num_train_steps")  # One checkpoint: the final model.
  config.keep_checkpoints = 1
  config.async_checkpointing = False
  config.sample_every_steps = 0
  return config
