"""The shared optimiser step: EMA warm-up, the traced learning rate, the unchanged state tree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import kidneys
from configs import pix2pix_kidneys
from ctdiff_jax.training import parallel
from ctdiff_jax.training import tasks
from ctdiff_jax.training import train_state as ts


def _run_updates(ema_decay: float, steps: int, lr: float = 0.1):
  """`steps` SGD-like updates of a 3-vector through update_net on one device."""
  tx = optax.chain(optax.scale_by_schedule(lambda c: 1.0), ts.scale_by_traced_lr())
  p0 = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32)}
  net = ts.init_net(p0, tx)
  grads = {"w": jnp.array([1.0, 1.0, 1.0], jnp.float32)}

  def one(net, step):
    new, _, _ = ts.update_net(net, grads, tx, ema_decay, step=step, learning_rate=lr)
    return new, None

  f = jax.pmap(lambda n: jax.lax.scan(one, n, jnp.arange(steps))[0], axis_name=parallel.AXIS,
               devices=jax.local_devices()[:1])
  out = f(jax.tree.map(lambda x: x[None], net))
  return jax.tree.map(lambda x: np.asarray(x[0]), out), np.asarray(p0["w"], np.float64)


def test_ema_warms_up_like_the_hand_computed_product_of_decays():
  steps, decay, lr = 30, 0.9999, 0.1
  net, p0 = _run_updates(decay, steps, lr)
  # Params after update k (1-based): p0 - k * lr; EMA_k = d_k EMA_{k-1} + (1 - d_k) p_k.
  d = [min(decay, (1 + k) / (10 + k)) for k in range(steps)]
  ema = p0.copy()
  for k in range(steps):
    ema = d[k] * ema + (1 - d[k]) * (p0 - (k + 1) * lr)
  np.testing.assert_allclose(net.params["w"], p0 - steps * lr, rtol=0, atol=1e-5)
  np.testing.assert_allclose(net.ema_params["w"], ema, rtol=0, atol=1e-5)
  # The initial weights keep prod(d_k) of the EMA: tiny after warm-up (was 0.9999^30 ~ 1).
  init_weight = np.prod(d)
  assert init_weight < 1e-7
  assert np.abs(net.ema_params["w"] - p0).min() > 0.5 * steps * lr


def test_ema_decay_at():
  got = np.asarray(ts.ema_decay_at(0.99, jnp.array([0, 1, 8, 890, 100000])))
  np.testing.assert_allclose(got, [0.1, 2 / 11, 9 / 18, 0.99, 0.99], rtol=1e-6)


@pytest.mark.parametrize("module", [kidneys, pix2pix_kidneys])
def test_optimizer_state_tree_is_optax_s(module):
  """Checkpoints of the compiled-schedule optimiser still restore (same state tree)."""
  config = module.get_config("smoke")
  task = tasks.get_task(config, 2)
  x = jnp.zeros(5)
  if config.model_family == "diffusion":
    o = config.optim
    old = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                      optax.adamw(task.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                  weight_decay=o.weight_decay))
  else:
    p = config.pix2pix
    old = optax.flatten(optax.adam(task.lr, b1=p.b1, b2=p.b2))
  assert jax.tree.structure(task.tx.init(x)) == jax.tree.structure(old.init(x))


def test_traced_lr_matches_optax_update():
  """update_net at the schedule's LR == optax.adamw with the schedule compiled in."""
  config = kidneys.get_config("smoke")
  tx, schedule = ts.make_optimizer(config.optim, 100)
  o = config.optim
  ref_tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                   weight_decay=o.weight_decay))
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.normal(size=7), jnp.float32)
  ref_state, net = ref_tx.init(p), ts.init_net({"w": p}, tx)
  ref_p = p
  for step in range(25):  # Through the warmup (20 steps) into the cosine.
    g = jnp.asarray(rng.normal(size=7), jnp.float32)
    upd, ref_state = ref_tx.update(g, ref_state, ref_p)
    ref_p = optax.apply_updates(ref_p, upd)
    net = jax.pmap(lambda n, g, s: ts.update_net(n, {"w": g}, tx, 0.99, step=s,
                                                 learning_rate=schedule(s))[0],
                   axis_name=parallel.AXIS, devices=jax.local_devices()[:1])(
                       jax.tree.map(lambda x: x[None], net), g[None], jnp.array([step]))
    net = jax.tree.map(lambda x: x[0], net)
  np.testing.assert_allclose(net.params["w"], ref_p, rtol=1e-6, atol=1e-7)


def test_new_num_train_steps_does_not_change_the_compiled_step():
  """The step's HLO is the same for any num_train_steps: the LR is an argument, not a constant."""
  texts = []
  for n in (300, 12345):
    config = kidneys.get_config("smoke")
    config.image_size, config.num_train_steps = 16, n
    task = tasks.get_task(config, 2)
    state = jax.eval_shape(task.init_state, jax.random.key(0))
    batch = {k: jax.ShapeDtypeStruct((2, 16, 16, c), jnp.float32)
             for k, c in (("image", 1), ("mask", 1), ("cond", 2))}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    f = jax.pmap(task.train_step, axis_name=parallel.AXIS, devices=jax.local_devices()[:1])
    add = lambda s: jax.ShapeDtypeStruct((1,) + s.shape, s.dtype)
    lowered = f.lower(*jax.tree.map(add, (state, batch, key, lr)))
    texts.append(lowered.as_text())
  assert texts[0] == texts[1]
