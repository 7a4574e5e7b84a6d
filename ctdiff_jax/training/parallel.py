"""Data-parallel mapping of per-device functions: `jax.pmap` or `jax.shard_map`, one place.

Every mapped function is written per device: it sees its local slice of the batch and
reduces across devices with `lax.pmean(..., axis_name=AXIS)`. State and batches carry a
leading device axis of size `len(devices)` in both modes, so callers never branch on the mode;
the mode is fixed once, in the `DataParallel` that `create(config.parallel, devices)` returns:

  * `pmap`: the design's original mapping (since JAX 0.8 a wrapper over jit + shard_map);
  * `shard_map`: `jax.shard_map` over a 1-D `Mesh(devices, (AXIS,))` inside `jax.jit`, each
    shard seeing a leading axis of 1 that is squeezed away before the per-device function.

Both give the same numbers (tests/training/test_train.py checks it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
MODES = ("pmap", "shard_map")


def local_devices(num_devices: int | None = None) -> list[jax.Device]:
  devices = jax.local_devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
    devices = devices[:num_devices]
  return devices


def _mesh(devices: Sequence[jax.Device]) -> Mesh:
  return Mesh(np.asarray(devices), (AXIS,))


class DataParallel:
  """The data-parallel layer of one run: its mode and devices, fixed once (`create`).

  `map(fn)` maps a per-device function, `shard` / `replicate` put host pytrees on the devices
  with the leading device axis `map`ped functions expect.
  """

  def __init__(self, mode: str, devices: Sequence[jax.Device]):
    if mode not in MODES:
      raise ValueError(f"config.parallel must be one of {MODES}, got {mode!r}")
    self.mode = mode
    self.devices = list(devices)
    self._sharding = NamedSharding(_mesh(self.devices), P(AXIS))

  def __repr__(self) -> str:
    return f"DataParallel(mode={self.mode!r}, devices={len(self.devices)})"

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def map(self, fn: Callable[..., Any], *, donate_argnums: tuple[int, ...] = ()
          ) -> Callable[..., Any]:
    """Maps per-device `fn(*args)`; every arg and output has a leading device axis."""
    if self.mode == "pmap":
      return jax.pmap(fn, axis_name=AXIS, devices=self.devices, donate_argnums=donate_argnums)

    def per_shard(*args):
      args = jax.tree.map(lambda x: x[0], args)
      out = fn(*args)
      return jax.tree.map(lambda x: jnp.asarray(x)[None], out)

    mapped = jax.shard_map(per_shard, mesh=self._sharding.mesh, in_specs=P(AXIS),
                           out_specs=P(AXIS))
    return jax.jit(mapped, donate_argnums=donate_argnums)

  def shard(self, tree: Any) -> Any:
    """Puts host arrays with a leading device axis onto the devices (one slice each).

    Both modes accept arrays sharded along a 1-D mesh (pmap is jit + shard_map now).
    """
    return jax.tree.map(lambda x: jax.device_put(x, self._sharding), tree)

  def replicate(self, tree: Any) -> Any:
    """Copies a single (unreplicated) pytree to every device, adding the leading device axis."""
    n = self.num_devices
    return self.shard(
        jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))


def create(mode: str, devices: Sequence[jax.Device]) -> DataParallel:
  """The data-parallel layer for `config.parallel` (`mode`) over `devices`."""
  return DataParallel(mode, devices)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated pytree (as device arrays, no host transfer)."""
  return jax.tree.map(lambda x: x[0], tree)


def device_keys(key: jax.Array, n: int) -> jax.Array:
  """[n] keys, one per device, derived from `key` by fold_in of the device index."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """Per-device: one key per local example, indexed by its position in the global batch.

  Randomness drawn from these keys does not depend on how the batch is split over devices.
  """
  first = jax.lax.axis_index(AXIS) * batch_size
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(batch_size))
