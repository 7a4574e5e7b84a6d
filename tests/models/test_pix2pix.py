"""Tests of the Pix2Pix baseline: networks, losses, the per-device step, generation, resume."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from ctdiff_jax.models import pix2pix
from ctdiff_jax.training import checkpointing
from ctdiff_jax.training import parallel
from ctdiff_jax.training.tasks import pix2pix as pix2pix_task

COND_CHANNELS = 2  # [masked image, mask]


def make_config(image_size: int = 32, **pix2pix_overrides) -> ml_collections.ConfigDict:
  """Only the fields the task reads; the pix2pix settings are configs/default.py's."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model_family = "pix2pix"
  config.image_size = image_size
  config.num_train_steps = 100
  config.pix2pix = default.pix2pix_config()
  config.pix2pix.base_filters = 4
  config.pix2pix.update(pix2pix_overrides)
  return config


def make_batch(batch_size: int = 4, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  """Smooth slices in [-1, 1] with one rectangular hole each (different per example)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  images, masks = [], []
  for _ in range(batch_size):
    f = rng.uniform(1, 4, size=2)
    images.append(0.8 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + rng.uniform(0, 6)))
    m = np.zeros((size, size))
    y0, x0 = rng.integers(2, size // 2, size=2)
    h, w = rng.integers(size // 4, size // 2, size=2)
    m[y0:y0 + h, x0:x0 + w] = 1.0
    masks.append(m)
  image = np.stack(images)[..., None].astype(np.float32)
  mask = np.stack(masks)[..., None].astype(np.float32)
  cond = np.concatenate([image * (1 - mask), mask], axis=-1)
  return {"image": image, "mask": mask, "cond": cond}


def split(batch: dict[str, np.ndarray], n_dev: int) -> dict[str, np.ndarray]:
  return {k: v.reshape((n_dev, -1) + v.shape[1:]) for k, v in batch.items()}


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# The step tests' task: lr 1e-3 so a few steps show progress; a 3-level U-Net (outermost, one
# normed block with dropout, innermost) as every level type is there and it compiles faster.
STEP_CONFIG = {"lr": 1e-3, "num_downs": 3}


class Harness:
  """One task, its initial state and mapped steps, shared by the step tests so that each
  (mode, device count) compiles once: on CPU the compiles dominate the run time.
  """

  def __init__(self):
    self.task = pix2pix_task.Pix2PixTask(make_config(**STEP_CONFIG), COND_CHANNELS)
    self.state = jax.device_get(jax.jit(self.task.init_state)(jax.random.key(0)))
    self._steps = {}

  def run(self, batch, num_steps, mode="pmap", n_dev=1, state=None):
    """`num_steps` train steps on `batch` over `n_dev` devices -> (host state, host metrics)."""
    par = parallel.create(mode, parallel.local_devices(n_dev))
    if (mode, n_dev) not in self._steps:
      self._steps[mode, n_dev] = par.map(self.task.train_step)
    step = self._steps[mode, n_dev]
    state_r = par.replicate(self.state if state is None else state)
    key_r = par.replicate(jax.random.key_data(jax.random.key(1)))
    batch_r = par.shard(split(batch, n_dev))
    history = []
    for _ in range(num_steps):
      state_r, metrics = step(state_r, batch_r, key_r)
      history.append(jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(metrics)))
    return jax.device_get(parallel.unreplicate(state_r)), history


@pytest.fixture(scope="module")
def harness() -> Harness:
  return Harness()


# --- networks ------------------------------------------------------------------------------
@pytest.mark.parametrize("size,depth", [(32, 5), (64, 6), (256, 8), (512, 8), (96, 5)])
def test_unet_depth_follows_image_size(size, depth):
  assert pix2pix.num_downsamplings(size) == depth


@pytest.mark.parametrize("size", [32, 64])
def test_network_output_shapes(size):
  task = pix2pix_task.Pix2PixTask(make_config(size), COND_CHANNELS)
  params = jax.eval_shape(task.init_params, jax.random.key(0))
  cond = jax.ShapeDtypeStruct((2, size, size, COND_CHANNELS), jnp.float32)
  image = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
  gen = jax.eval_shape(task.apply_generator, {"params": params["generator"]}, cond)
  assert gen.shape == (2, size, size, 1) and gen.dtype == jnp.float32
  logits = jax.eval_shape(task.apply_discriminator, {"params": params["discriminator"]}, cond,
                          image)
  grid = size // 8 - 2  # Three stride-2 convs, then two stride-1 4x4 convs with padding 1.
  assert logits.shape == (2, grid, grid, 1)
  assert grid == pix2pix.patch_grid_size(size)
  # log2(size) stride-2 downsamplings: a 1x1 bottleneck with base * 8 = 32 filters.
  assert 2**task.generator.num_downs == size
  assert params["generator"][f"down_{task.generator.num_downs - 1}"]["kernel"].shape[-1] == 32


def test_param_counts_match_reference_pix2pix():
  """unet_256 / basic D of the reference PyTorch code (ngf=ndf=64, batch norm, RGB->RGB).

  Counted here from that code's block list; the published logs print 54.414 M and 2.769 M.
  Our only difference: the outermost and innermost down convs (no norm after them) keep a bias.
  """
  def conv(cin, cout, bias):
    return 16 * cin * cout + (cout if bias else 0)

  ngf = 64
  feats = [ngf * min(2**i, 8) for i in range(8)]  # 64 128 256 512 512 512 512 512
  ref_g = conv(3, feats[0], False) + conv(2 * feats[0], 3, True)  # outermost
  for i in range(1, 8):
    innermost = i == 7
    ref_g += conv(feats[i - 1], feats[i], False) + (0 if innermost else 2 * feats[i])
    ref_g += conv(feats[i] * (1 if innermost else 2), feats[i - 1], False) + 2 * feats[i - 1]
  ref_d = (conv(6, 64, True) + conv(64, 128, False) + 256 + conv(128, 256, False) + 512
           + conv(256, 512, False) + 1024 + conv(512, 1, True))
  assert round(ref_g / 1e6, 3) == 54.414 and round(ref_d / 1e6, 3) == 2.769

  gen = pix2pix.UNetGenerator(num_downs=8, base_filters=64, out_channels=3, norm="batch",
                              dropout_rate=0.5, dropout_blocks=3)
  disc = pix2pix.PatchDiscriminator(base_filters=64, norm="batch", n_layers=3)
  x = jnp.zeros((1, 256, 256, 3))
  g_params = jax.eval_shape(gen.init, jax.random.key(0), x)
  d_params = jax.eval_shape(disc.init, jax.random.key(0), x, x)
  assert num_params(g_params) == ref_g + feats[0] + feats[7]
  assert num_params(d_params) == ref_d
  assert jax.eval_shape(disc.apply, d_params, x, x).shape == (1, 30, 30, 1)  # 256 px -> 30x30


def test_patchgan_receptive_field_is_70():
  layers = pix2pix.patchgan_layers(3)
  assert layers == [(4, 2), (4, 2), (4, 2), (4, 1), (4, 1)]
  # Backwards from one output pixel: r <- (r - 1) * stride + kernel.
  field = 1
  for kernel, stride in reversed(layers):
    field = (field - 1) * stride + kernel
  assert field == pix2pix.receptive_field(layers) == 70
  # Empirically: one interior logit depends on exactly a 70x70 input patch (no norm, which
  # would couple every pixel through its statistics).
  disc = pix2pix.PatchDiscriminator(base_filters=2, norm="none", n_layers=3)
  cond = jnp.zeros((1, 128, 128, 1))
  image = jax.random.normal(jax.random.key(0), (1, 128, 128, 1))
  params = disc.init(jax.random.key(1), cond, image)
  grad = jax.grad(lambda im: disc.apply(params, cond, im)[0, 7, 7, 0])(image)
  rows, cols = np.nonzero(np.asarray(grad[0, ..., 0]))
  assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
  assert rows.min() > 0 and rows.max() < 127  # Interior: not clipped by the image border.


def test_instance_norm_matches_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 6, 3)), np.float64) * 3 + 1
  norm = pix2pix.Norm("instance")
  params = norm.init(jax.random.key(0), x.astype(np.float32))
  got = norm.apply(params, x.astype(np.float32))
  mean, var = x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
  np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)


def test_dropout_masks_are_per_example():
  """Example i's mask depends only on its own key: a sub-batch gets the same masks."""
  x = jnp.ones((4, 8, 8, 3))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4))
  full = pix2pix.example_dropout(x, keys, 0, 0.5)
  part = pix2pix.example_dropout(x[2:], keys[2:], 0, 0.5)
  np.testing.assert_array_equal(full[2:], part)
  kept = np.asarray(full > 0)
  assert np.all(np.asarray(full)[kept] == 2.0)  # Inverted dropout scales the kept units.
  assert 0.35 < kept.mean() < 0.65


# --- losses and schedule -------------------------------------------------------------------
def test_gan_losses_and_l1_match_numpy():
  logits32 = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 4, 1))) * 2
  logits = logits32.astype(np.float64)
  sig = 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(pix2pix_task.gan_loss(logits32, True, "vanilla"),
                             -np.log(sig).mean(), rtol=1e-5)
  np.testing.assert_allclose(pix2pix_task.gan_loss(logits32, False, "vanilla"),
                             -np.log(1 - sig).mean(), rtol=1e-5)
  np.testing.assert_allclose(pix2pix_task.gan_loss(logits32, True, "lsgan"),
                             ((logits - 1) ** 2).mean(), rtol=1e-5)
  np.testing.assert_allclose(pix2pix_task.gan_loss(logits32, False, "lsgan"),
                             (logits ** 2).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="gan_loss"):
    pix2pix_task.gan_loss(logits32, True, "wgan")

  b = make_batch(3, 16)
  pred = np.asarray(jax.random.uniform(jax.random.key(1), b["image"].shape, minval=-1))
  err = np.abs(pred.astype(np.float64) - b["image"])
  ref = [err[i][b["mask"][i] > 0.5].mean() for i in range(3)]
  np.testing.assert_allclose(pix2pix_task.masked_l1(pred, b["image"], b["mask"]), np.mean(ref),
                             rtol=1e-5)


def test_lr_schedule_constant_then_linear_to_zero():
  sched = pix2pix_task.learning_rate_schedule(2e-4, 1000, 0.5)
  steps = np.array([0, 250, 500, 750, 1000])
  ref = np.where(steps <= 500, 2e-4, 2e-4 * (1000 - steps) / 500)
  np.testing.assert_allclose([float(sched(s)) for s in steps], ref, rtol=1e-6, atol=1e-12)


def test_flattened_adam_matches_adam():
  """The task's optimiser is the paper's Adam; flattening the moments changes no number."""
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 4, 2, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32)}
  tx, lr = pix2pix_task.make_optimizer(default.pix2pix_config(), 10)
  ref = optax.adam(2e-4, b1=0.5, b2=0.999)
  p_tx, p_ref, s_tx, s_ref = params, params, tx.init(params), ref.init(params)
  for i in range(3):
    grads = jax.tree.map(lambda x: np.sin(x * (i + 1)).astype(np.float32), p_tx)
    u_tx, s_tx = tx.update(grads, s_tx, p_tx)
    # tx gives the update for LR 1; the step's LR is applied by the caller (traced, not baked).
    u_tx = jax.tree.map(lambda u: np.float32(lr(i)) * u, u_tx)
    u_ref, s_ref = ref.update(grads, s_ref, p_ref)
    p_tx, p_ref = optax.apply_updates(p_tx, u_tx), optax.apply_updates(p_ref, u_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), p_tx, p_ref)


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="gan_loss"):
    pix2pix_task.Pix2PixTask(make_config(gan_loss="hinge"), COND_CHANNELS)
  with pytest.raises(ValueError, match="norm"):
    pix2pix_task.Pix2PixTask(make_config(norm="layer"), COND_CHANNELS)
  with pytest.raises(ValueError, match="too small"):
    pix2pix_task.Pix2PixTask(make_config(16), COND_CHANNELS)


# --- the train step ------------------------------------------------------------------------
def test_steps_lower_d_loss_and_l1(harness):
  _, hist = harness.run(make_batch(4), 20)
  assert all(bool(m["finite"]) for m in hist)
  d_loss = np.array([m["d_loss"] for m in hist])
  l1 = np.array([m["g_l1"] for m in hist])
  assert d_loss[-3:].mean() < 0.5 * d_loss[0], d_loss
  assert l1[-3:].mean() < 0.85 * l1[0], l1
  np.testing.assert_allclose([m["g_loss"] for m in hist],
                             [m["g_gan"] + 100.0 * m["g_l1"] for m in hist], rtol=1e-5)
  # D outputs P(real): it learns to tell the pasted composite from the slice.
  assert hist[-1]["d_real"] > 0.5 > hist[-1]["d_fake"]
  np.testing.assert_allclose([m["learning_rate"] for m in hist], 1e-3)  # constant half
  computed = harness.task.metrics_collection.single_from_model_output(
      **{k: v for k, v in hist[0].items() if k != "finite"}).compute()
  assert set(computed) >= {"g_gan", "g_l1", "g_loss", "d_loss", "d_real", "d_fake",
                           "learning_rate"}
  np.testing.assert_allclose(computed["d_loss"], d_loss[0])


def test_two_device_step_equals_one_device_step(harness):
  """Same global batch, dropout on (per-example masks): params and metrics agree.

  The 1-device pmap step is the reference for the 2-device pmap and shard_map steps.
  """
  batch = make_batch(4)
  state1, hist1 = harness.run(batch, 1, "pmap", n_dev=1)
  for mode in parallel.MODES:
    state2, hist2 = harness.run(batch, 1, mode, n_dev=2)
    assert int(state1.step) == int(state2.step) == 1
    for name in harness.task.nets:
      # atol: 1% of one Adam step (lr 1e-3); a flipped update sign would differ by 2e-3.
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                   state1.nets[name].params, state2.nets[name].params)
    for k in ("g_loss", "g_gan", "g_l1", "d_loss", "d_real", "d_fake"):
      np.testing.assert_allclose(hist1[0][k], hist2[0][k], rtol=1e-5, err_msg=f"{mode} {k}")
  # The update is not a no-op (so the comparison above is meaningful).
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       harness.state.nets["generator"].params, state1.nets["generator"].params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_non_finite_step_leaves_state_untouched(harness):
  batch = make_batch(4)
  batch["image"][0, 3, 3, 0] = np.nan
  new_state, hist = harness.run(batch, 1)
  assert not bool(hist[0]["finite"])
  jax.tree.map(np.testing.assert_array_equal, harness.state.nets, new_state.nets)


# --- generation and resume -----------------------------------------------------------------
def make_generate(task):
  """Host function (state, batch, seed) -> [B, H, W, 1] via the 1-device mapped generate."""
  par = parallel.create("pmap", parallel.local_devices(1))
  mapped = par.map(lambda s, b, k: task.generate(task.sampling_variables(s), b, k))

  def generate(state, batch, seed):
    out = mapped(par.replicate(state), par.shard(split(batch, 1)),
                 par.replicate(jax.random.key_data(jax.random.key(seed))))
    return np.asarray(out)[0]
  return generate


@pytest.mark.parametrize("dropout_at_generation", [True, False])
def test_generate_pastes_back_outside_mask(harness, dropout_at_generation):
  task = pix2pix_task.Pix2PixTask(
      make_config(dropout_at_generation=dropout_at_generation, **STEP_CONFIG), COND_CHANNELS)
  batch = make_batch(4)
  generate = make_generate(task)
  out_a, out_b = generate(harness.state, batch, 0), generate(harness.state, batch, 1)
  assert out_a.shape == (4, 32, 32, 1) and out_a.dtype == np.float32
  outside, inside = batch["mask"] <= 0.5, batch["mask"] > 0.5
  np.testing.assert_array_equal(out_a[outside], batch["image"][outside])  # bit for bit
  assert np.all(np.abs(out_a) <= 1.0)
  assert not np.allclose(out_a[inside], batch["image"][inside])
  np.testing.assert_array_equal(out_a, generate(harness.state, batch, 0))  # same key
  # Dropout is the only noise: different keys differ inside the mask iff it stays on.
  assert np.array_equal(out_a, out_b) != dropout_at_generation
  # Inside the mask: the raw generator output (with the training state's raw params).
  if not dropout_at_generation:
    raw = task.apply_generator(task.sampling_variables(harness.state), batch["cond"])
    np.testing.assert_allclose(out_a[inside], np.asarray(raw)[inside], atol=1e-6)


def test_checkpoint_roundtrip(harness, tmp_path):
  state, _ = harness.run(make_batch(4), 1)  # Non-trivial Adam moments.
  manager = checkpointing.create_manager(str(tmp_path), async_save=False, with_data=False)
  checkpointing.save(manager, 1, state, None)
  manager.wait_until_finished()
  restored, step = checkpointing.restore(manager, checkpointing.abstract(harness.state), None)
  manager.close()
  assert step == 1 and int(restored.step) == 1
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)


def test_config_file_builds_the_task():
  pytest.importorskip("configs.default")
  from configs import pix2pix_kidneys  # pylint: disable=g-import-not-at-top
  config = pix2pix_kidneys.get_config("smoke")
  assert config.model_family == "pix2pix" and config.data.mask_mode == "organ"
  assert config.pix2pix.l1_weight == 100.0 and config.pix2pix.gan_loss == "vanilla"
  assert config.pix2pix.norm == "instance" and config.pix2pix.dropout_at_generation
  task = pix2pix_task.Pix2PixTask(config, COND_CHANNELS)
  state = jax.eval_shape(task.init_state, jax.random.key(0))
  assert set(state.nets) == {"generator", "discriminator"}
  full = pix2pix_kidneys.get_config("")
  assert full.pix2pix.base_filters == 64 and full.pix2pix.lr == 2e-4 and full.pix2pix.b1 == 0.5
