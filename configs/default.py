"""Default config: every field every task uses, each default in this one place.

Plain ml_collections values with a comment per field; no library code is imported, so the
library takes its settings from here (or requires them) instead of keeping a second default
(tests/test_defaults.py checks it). Organ configs override a few fields.

Variants (`--config=configs/<x>.py:<variant>`):
  ""          GPU/TPU defaults (256 px, 1.5 mm, AdaGN UNet on the reference channel layout).
  "smoke"     CPU-sized: 64 px at 6 mm, a tiny UNet, a few hundred steps (tests, quickstart).
  "reference" MONAI-twin architecture of the performance benchmarks (72.7M, bf16, cuDNN).
"""

import os

import ml_collections
from ml_collections import config_dict


# HU -> model-unit knots (data/transforms.py IntensityMap): a monotone piecewise-linear map
# over the whole CT range [-1024, 3071] HU. Abdominal organs: soft tissue [-250, 350] HU keeps
# 80% of [-1, 1] (slope 1.6/600 vs the old window's 2/600), but bone and gas stay representable,
# so context/shape masks over spine, ribs and bowel gas are not clipped at +-1.
ABDOMEN_INTENSITY_HU = (-1024.0, -250.0, 350.0, 3071.0)
ABDOMEN_INTENSITY_UNIT = (-1.0, -0.8, 0.8, 1.0)
# MR (ctdiff_jax/ingest/modality.py): the knots act on the per-case normalised value, 0 / 1 =
# the case's body percentiles p0.5 / p99.5, so each scan's robust range fills [-1, 1].
MR_INTENSITY = (0.0, 1.0)
MR_INTENSITY_UNIT = (-1.0, 1.0)
# PET: knots on log(1 + SUV); SUV 0..25 fills [-1, 1] (hotter voxels are clipped).
PET_INTENSITY = (0.0, 3.2580965)
PET_INTENSITY_UNIT = (-1.0, 1.0)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_family = "diffusion"  # "diffusion" or "pix2pix": which task the trainer runs.
  config.seed = 0  # Seeds init, data order, masks, noise: same config + seed, same run.

  # Data: which TFDS slice dataset to read (built by `python -m ctdiff_jax.build_dataset`).
  config.data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
  config.manual_dir = ""  # Raw cases; if set and the dataset is missing, it is built first.
  config.dataset = "kidneys"  # Builder config: kidneys, liver, lungs, kidney_tumor, abdomen, ...
  config.organs = ""  # Custom comma-separated organ list (overrides `dataset`'s organs).
  # "ct", "mr" or "pet": the dataset's modality (checked against its metadata) and how its
  # values reach the intensity knots; mr/pet read ct_slices/<dataset>..._mr / _pet.
  config.modality = "ct"
  config.image_size = 256  # Slice size in pixels (the dataset is built at this size).
  config.spacing_mm = 1.5  # In-plane spacing the dataset is resampled to.
  config.train_split = "train"  # Split to train on.
  config.eval_split = "test"  # Split that generate/evaluate read by default.
  config.data = data_config()  # Masks, intensity map, loader workers, augmentation.
  for field in ("dataset", "data_dir", "image_size", "spacing_mm", "modality"):  # One truth.
    setattr(config.data, field, config.get_ref(field))

  config.model = model_config()  # UNet width/depth/attention/dtype.
  config.diffusion = diffusion_config()  # Schedule, T, prediction target, loss weight.

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
  # Paired bootstrap resamples: each FID's std and 95% CI (0 = off). Cheap below N = 2048 images
  # (an N x N SVD each); above, each resample is a 2048 x 2048 eigh (~1 s on a CPU).
  config.eval.bootstrap = 200
  config.eval.fid_batch_size = 32  # Inception batch per device.

  config.num_train_steps = 200_000  # Optimiser steps.
  config.per_device_batch_size = 8  # Global batch = this x devices x processes.
  config.parallel = "pmap"  # "pmap" or "shard_map" (same numbers).
  config.num_devices = 0  # Devices per process to use (0 = all local ones).
  config.distributed = False  # Multi-host: join jax.distributed (README "Multi-host training").
  config.log_every_steps = 100  # Metrics pulled to host (no per-step host sync).
  config.checkpoint_every_steps = 5000  # Orbax save period.
  config.keep_checkpoints = 3  # Keep the last N.
  config.async_checkpointing = True  # Save in the background.
  config.sample_every_steps = 10_000  # Sample-grid images (EMA params, DDIM).
  config.num_grid_images = 8  # Rows in the logged sample grid.
  config.profile = False  # clu Profile action (needs TensorFlow).
  return apply_variant(config, variant)


def data_config() -> ml_collections.ConfigDict:
  """`config.data` (fields documented in ctdiff_jax/data/pipeline.py).

  get_config adds dataset, data_dir, image_size and spacing_mm as references to the top-level
  fields (records' own spacing wins over spacing_mm).
  """
  data = ml_collections.ConfigDict()
  data.intensity_hu = ABDOMEN_INTENSITY_HU  # HU knots of the map to [-1, 1] (increasing).
  data.intensity_unit = ABDOMEN_INTENSITY_UNIT  # Their model units (from -1 to 1).
  data.mask_mode = "organ"  # "organ", "bbox", "shape", "lesion" or "mixed" (data/masks.py).
  data.mask_labels = ()  # Label ids whose union is the organ region; () = every organ.
  data.dilation_mm = 0.0  # organ mode: grow the organ mask by this many mm.
  data.bbox_margin_mm = 10.0  # bbox mode: margin around the organ bounding box.
  data.shape_area = (0.05, 0.3)  # shape mode: (lo, hi) fraction of the image covered.
  data.shape_kinds = ("ellipse", "polygon", "brush")  # shape mode: random shape families.
  data.mixed_weights = (1.0, 1.0, 1.0)  # mixed mode: weights of (organ, bbox, shape[, lesion]).
  data.lesion_label_id = 0  # lesion mode: the dataset's lesion label (0 = none).
  data.lesion_dilation_mm = 0.0  # lesion mode: grow the lesion mask by this many mm.
  data.neighbours = False  # Previous/next slices + their known-pixel maps in `cond` (2 -> 6).
  # neighbours: each neighbour is hidden inside the slice's mask with this probability (a 2.5D
  # volume's not-yet-generated neighbour is unknown there; data/transforms.py).
  data.neighbour_hide_prob = 0.0
  data.flip_lr_prob = 0.0  # Left-right flips (0: anatomy has laterality).
  data.translate_px = 0  # Max random translation in pixels (0 = off).
  data.intensity_jitter = 0.0  # j > 0: x -> clip(x * (1 + a) + b), a, b ~ U(-j, j).
  data.worker_count = 0  # Grain worker processes (0 = load in the main process).
  data.worker_buffer_size = 1  # Batches each worker prepares ahead.
  return data


def model_config() -> ml_collections.ConfigDict:
  """`config.model`: the reference channel layout with ADM-style AdaGN (74.6M params)."""
  model = ml_collections.ConfigDict()
  model.channels = (64, 128, 256, 256, 512)  # Width per level (len = levels).
  model.attention_levels = (False, False, False, True, True)  # Self-attention per level.
  model.num_res_blocks = 2  # Residual blocks per level (an int or one per level).
  model.head_dim = 32  # Channels per attention head.
  model.dropout = 0.0  # Dropout in the residual blocks.
  model.dtype = "float32"  # Compute dtype ("float32" or "bfloat16"); params stay float32.
  # Attention kernel: None lets jax pick; "cudnn" needs a GPU and bfloat16 compute.
  model.attention_impl = config_dict.placeholder(str)
  model.out_channels = 1  # One CT channel out (eps or v).
  model.use_scale_shift_norm = True  # AdaGN time injection (False: MONAI's additive one).
  return model


def diffusion_config() -> ml_collections.ConfigDict:
  """`config.diffusion`: the noise schedule and training target."""
  diffusion = ml_collections.ConfigDict()
  diffusion.schedule = "cosine"  # "cosine" (Nichol & Dhariwal) or "linear" (DDPM).
  diffusion.num_timesteps = 1000  # T.
  # v (Salimans & Ho) rather than eps: with eps the smoke kidney model's inpainted HU were
  # biased bright (mean 0.45 vs 0.04 in model units, MAE 0.41) and with v unbiased
  # (0.03 vs 0.04, MAE 0.14), same data, steps and seed (1200 steps, 64 px, DDIM-25,
  # mask_weight 20).
  diffusion.prediction = "v"
  # Extra loss weight inside the inpainting mask: w = 1 + mask_weight * mask. Outside the mask
  # the answer is in the conditioning; 20 cut the smoke model's in-mask MAE from 0.20 to 0.14.
  diffusion.mask_weight = 20.0
  return diffusion


def pix2pix_config(variant: str = "") -> ml_collections.ConfigDict:
  """`config.pix2pix` of model_family="pix2pix": the paper's settings; "smoke" is CPU-sized."""
  pix = ml_collections.ConfigDict()
  pix.base_filters = 8 if variant == "smoke" else 64  # ngf = ndf: G base*(1,2,4,8,8..).
  pix.num_downs = 0  # U-Net depth; 0 = log2(image_size) capped at 8.
  pix.disc_layers = 3  # Stride-2 PatchGAN convs; 3 = the 70x70 PatchGAN.
  pix.norm = "instance"  # "instance" (split invariant), "batch" (batch stats) or "none".
  pix.gan_loss = "vanilla"  # "vanilla" (BCE with logits) or "lsgan" (least squares).
  pix.l1_weight = 100.0  # lambda of the L1 term.
  pix.lr = 2e-4  # Adam learning rate of both networks.
  pix.b1 = 0.5  # Adam beta1.
  pix.b2 = 0.999  # Adam beta2.
  pix.lr_decay_fraction = 0.5  # Constant LR, then linear decay to 0 over this last fraction.
  pix.dropout = 0.5  # Decoder dropout, the generator's noise source.
  pix.dropout_blocks = 3  # Decoder blocks (from the innermost) with dropout.
  pix.dropout_at_generation = True  # Keep dropout on when generating (as in the paper).
  pix.ema_decay = 0.999  # EMA kept for comparison only; generation uses the raw params.
  return pix


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Applies a named size variant; organ configs call get_config(variant) so it stays last."""
  if variant in ("", None):
    pass  # ADM-style AdaGN UNet on the reference channel layout (74.6M params).
  elif variant == "reference":
    # MONAI DiffusionModelUNet twin: additive time embedding, exactly MONAI's 72,730,113 params.
    config.model.use_scale_shift_norm = False
    config.model.dtype = "bfloat16"
    config.model.attention_impl = "cudnn"
    config.per_device_batch_size = 32
  elif variant == "smoke":
    config.image_size = 64
    config.spacing_mm = 6.0
    config.model.channels = (16, 32, 32)  # A tiny UNet for CPU tests on 32-64 px images.
    config.model.attention_levels = (False, False, True)
    config.model.num_res_blocks = 1
    config.model.head_dim = 16
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
                intensity_hu: tuple[float, ...] = ABDOMEN_INTENSITY_HU,
                intensity_unit: tuple[float, ...] = ABDOMEN_INTENSITY_UNIT,
                modality: str = "ct") -> ml_collections.ConfigDict:
  """The default config pointed at one dataset config, mask mode and HU -> unit knots."""
  config = get_config(variant)
  config.modality = modality
  config.dataset = dataset
  config.data.mask_mode = mask_mode
  config.data.intensity_hu = intensity_hu
  config.data.intensity_unit = intensity_unit
  return config
