"""Default config: every field every task uses; organ configs override a few.

Variants (`--config=configs/<x>.py:<variant>`):
  ""          GPU/TPU defaults (256 px, 1.5 mm, AdaGN UNet on the reference channel layout).
  "smoke"     CPU-sized: 64 px at 6 mm, a tiny UNet, a few hundred steps (tests, quickstart).
  "reference" MONAI-twin architecture of the performance benchmarks (72.7M, bf16, cuDNN).
"""

import os

import ml_collections

from ctdiff_jax.diffusion import schedule as schedule_lib
from ctdiff_jax.data import pipeline
from ctdiff_jax.models import unet


# HU range mapped to [-1, 1] for abdominal organs: the model's resolution goes to soft tissue
# (air and bone outside the mask are pasted back from the input unchanged anyway).
ABDOMEN_WINDOW = (-250.0, 350.0)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_family = "diffusion"  # "diffusion" or "pix2pix": which task the trainer runs.
  config.seed = 0  # Seeds init, data order, masks, noise: same config + seed, same run.

  # Data: which TFDS slice dataset to read (built by `python -m ctdiff_jax.build_dataset`).
  config.data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
  config.manual_dir = ""  # Raw cases; if set and the dataset is missing, it is built first.
  config.dataset = "kidneys"  # Builder config: kidneys, liver, lungs, kidney_tumor, abdomen, ...
  config.organs = ""  # Custom comma-separated organ list (overrides `dataset`'s organs).
  config.image_size = 256  # Slice size in pixels (the dataset is built at this size).
  config.spacing_mm = 1.5  # In-plane spacing the dataset is resampled to.
  config.train_split = "train"  # Split to train on.
  config.eval_split = "test"  # Split that generate/evaluate read by default.
  config.data = pipeline.default_data_config()  # Masks, HU window, loader workers, augmentation.
  for field in ("dataset", "data_dir", "image_size", "spacing_mm"):  # One source of truth.
    setattr(config.data, field, config.get_ref(field))

  config.model = unet.default_model_config()  # UNet width/depth/attention/dtype.
  config.diffusion = schedule_lib.default_diffusion_config()  # Schedule, T, prediction target.

  config.sampling = ml_collections.ConfigDict()
  config.sampling.sampler = "ddim"  # "ddim" (num_steps, eta) or "ddpm" (all T steps).
  config.sampling.num_steps = 50  # DDIM steps.
  config.sampling.eta = 0.0  # DDIM stochasticity (0 = deterministic).
  config.sampling.repaint = False  # Re-noise the known region each step (RePaint).
  config.sampling.resample = 1  # RePaint jumps per step.
  config.sampling.batch_size = 8  # Per-device batch when generating.

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-4  # Peak learning rate.
  config.optim.schedule = "cosine"  # Warmup then "cosine" decay or "constant".
  config.optim.warmup_steps = 1000  # Linear warmup steps.
  config.optim.end_lr_factor = 0.01  # Cosine ends at this fraction of the peak.
  config.optim.weight_decay = 0.0  # AdamW decoupled weight decay.
  config.optim.b1 = 0.9  # Adam beta1.
  config.optim.b2 = 0.999  # Adam beta2.
  config.optim.eps = 1e-8  # Adam epsilon.
  config.optim.grad_clip = 1.0  # Global-norm clipping (0 = off).
  config.optim.ema_decay = 0.9999  # EMA of params, used for sampling.

  config.eval = ml_collections.ConfigDict()
  config.eval.fid_window = (-160.0, 240.0)  # HU window for FID images (abdominal soft tissue).
  config.eval.crop_margin_mm = 10.0  # Organ-crop FID: mask bounding box + this margin.
  config.eval.crop_size = 128  # Organ crops are resized to this before the 299 px FID resize.
  config.eval.num_samples = 0  # Test slices to evaluate (0 = all).
  config.eval.bootstrap = 0  # Bootstrap resamples for an FID spread (0 = off).
  config.eval.fid_batch_size = 32  # Inception batch per device.

  config.num_train_steps = 200_000  # Optimiser steps.
  config.per_device_batch_size = 8  # Global batch = this x devices x processes.
  config.parallel = "pmap"  # "pmap" or "shard_map" (same numbers).
  config.num_devices = 0  # Local devices to use (0 = all).
  config.distributed = False  # Call jax.distributed.initialize() (multi-host).
  config.log_every_steps = 100  # Metrics pulled to host (no per-step host sync).
  config.checkpoint_every_steps = 5000  # Orbax save period.
  config.keep_checkpoints = 3  # Keep the last N.
  config.async_checkpointing = True  # Save in the background.
  config.sample_every_steps = 10_000  # Sample-grid images (EMA params, DDIM).
  config.num_grid_images = 8  # Rows in the logged sample grid.
  config.profile = False  # clu Profile action (needs TensorFlow).
  return apply_variant(config, variant)


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Applies a named size variant; organ configs call get_config(variant) so it stays last."""
  if variant in ("", None):
    pass  # ADM-style AdaGN UNet on the reference channel layout (74.6M params).
  elif variant == "reference":
    config.model = unet.reference_model_config()
    config.model.dtype = "bfloat16"
    config.model.attention_impl = "cudnn"
    config.per_device_batch_size = 32
  elif variant == "smoke":
    config.image_size = 64
    config.spacing_mm = 6.0
    config.model = unet.smoke_model_config()
    config.per_device_batch_size = 4
    config.num_train_steps = 300
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 20
    config.optim.ema_decay = 0.99
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    config.sample_every_steps = 150
    config.num_grid_images = 4
    config.sampling.num_steps = 10
    config.sampling.batch_size = 4
    config.data.worker_count = 0
  else:
    raise ValueError(f"unknown config variant {variant!r}: use '', 'smoke' or 'reference'")
  return config


def for_dataset(dataset: str, variant: str = "", mask_mode: str = "organ",
                hu_window: tuple[float, float] = ABDOMEN_WINDOW
                ) -> ml_collections.ConfigDict:
  """The default config pointed at one dataset config, mask mode and model HU window."""
  config = get_config(variant)
  config.dataset = dataset
  config.data.mask_mode = mask_mode
  config.data.hu_window = hu_window
  return config
