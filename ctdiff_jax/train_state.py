"""The small functional train state, the optimiser and EMA shared by every model family.

A pytree of arrays only (no apply_fn inside), so it maps cleanly over devices with pmap /
shard_map and saves with Orbax as-is. Families with several networks (Pix2Pix) keep one
`NetState` per network inside their own state.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class NetState:
  """Parameters, their EMA and the optimiser state of one network."""
  params: Any
  ema_params: Any
  opt_state: Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  nets: dict[str, NetState]


def learning_rate_schedule(optim_cfg, num_train_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay (or constant) until the last step."""
  warmup, peak = int(optim_cfg.warmup_steps), optim_cfg.learning_rate
  if optim_cfg.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif optim_cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, max(num_train_steps - warmup, 1),
                                       alpha=optim_cfg.end_lr_factor)
  else:
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {optim_cfg.schedule!r}")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(optim_cfg, num_train_steps: int) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
  """AdamW (or Adam when weight_decay is 0) with global-norm clipping."""
  lr = learning_rate_schedule(optim_cfg, num_train_steps)
  chain = []
  if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  chain.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay))
  return optax.chain(*chain), lr


def init_net(params: Any, tx: optax.GradientTransformation) -> NetState:
  return NetState(params=params, ema_params=jax.tree.map(jnp.copy, params),
                  opt_state=tx.init(params))


def apply_gradients(net: NetState, grads: Any, tx: optax.GradientTransformation,
                    ema_decay: float) -> NetState:
  updates, opt_state = tx.update(grads, net.opt_state, net.params)
  params = optax.apply_updates(net.params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, net.ema_params, params)
  return NetState(params=params, ema_params=ema, opt_state=opt_state)


def all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
