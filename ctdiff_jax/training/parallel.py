"""Data-parallel mapping of per-device functions: `jax.pmap` or `jax.shard_map`, one place.

Every mapped function is written per device: it sees its local slice of the batch and
reduces across devices with `lax.pmean(..., axis_name=AXIS)`. State and batches carry a
leading device axis of size `len(devices)` in both modes, so callers never branch on the mode;
the mode is fixed once, in the `DataParallel` that `create(config.parallel, devices)` returns:

  * `pmap`: the design's original mapping (since JAX 0.8 a wrapper over jit + shard_map);
  * `shard_map`: `jax.shard_map` over a 1-D `Mesh(devices, (AXIS,))` inside `jax.jit`, each
    shard seeing a leading axis of 1 that is squeezed away before the per-device function.

Both give the same numbers (tests/training/test_train.py checks it).

Multi-host (several JAX processes, `initialize_distributed`): the devices are every process's
(`global_devices`), ordered by process, so one mesh / pmap spans all hosts and `pmean` averages
over all of them. Each process passes only its own rows (`shard` / `replicate` take the
process-local leading axis, `num_local_devices`) and reads back only its own
(`unreplicate`, `local_rows`); tests/training/test_multihost.py runs 2 processes on localhost.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
MODES = ("pmap", "shard_map")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def initialize_distributed() -> None:
  """Joins the multi-process run (`jax.distributed.initialize`), once per process.

  Must run before anything touches a JAX backend. The coordinator comes from
  JAX_COORDINATOR_ADDRESS or cluster auto-detection (TPU pods, SLURM, Open MPI);
  JAX_NUM_PROCESSES / JAX_PROCESS_ID, when set, are passed on (JAX does not read them itself).
  CPU processes talk through gloo (XLA:CPU has no cross-process collectives otherwise); the
  setting does nothing on GPU/TPU.
  """
  if jax.distributed.is_initialized():
    return
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"num_processes": _env_int("JAX_NUM_PROCESSES"),
            "process_id": _env_int("JAX_PROCESS_ID")}
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})


def local_devices(num_devices: int | None = None) -> list[jax.Device]:
  devices = jax.local_devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
    devices = devices[:num_devices]
  return devices


def global_devices(num_local: int | None = None) -> list[jax.Device]:
  """Every process's first `num_local` local devices (0/None: all), ordered by process.

  With one process this is `local_devices(num_local)`. Process p's devices are contiguous in
  the list, so its rows of a batch are one block: rows [p * L, (p + 1) * L) of the global batch.
  """
  local = local_devices(num_local)
  by_process: dict[int, list[jax.Device]] = {}
  for d in jax.devices():
    by_process.setdefault(d.process_index, []).append(d)
  counts = {p: len(ds) for p, ds in by_process.items()}
  n = len(local)
  if any(c < n for c in counts.values()):
    raise ValueError(f"asked for {n} devices per process but the processes have {counts}")
  return [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:n]]


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
    me = jax.process_index()
    mine = [i for i, d in enumerate(self.devices) if d.process_index == me]
    if not mine or mine != list(range(mine[0], mine[0] + len(mine))):
      raise ValueError(f"process {me}'s devices must be one contiguous block of {self.devices} "
                       f"(use global_devices())")
    self.num_local_devices = len(mine)
    self._multiprocess = len({d.process_index for d in self.devices}) > 1

  def __repr__(self) -> str:
    return f"DataParallel(mode={self.mode!r}, devices={len(self.devices)})"

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def map(self, fn: Callable[..., Any], *, donate_argnums: tuple[int, ...] = ()
          ) -> Callable[..., Any]:
    """Maps per-device `fn(*args)`; every arg and output has a leading device axis."""
    mapped = self._map(fn, donate_argnums)
    return _CompiledInStep(mapped) if self._multiprocess else mapped

  def _map(self, fn, donate_argnums):
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

    The leading axis is this process's: `num_local_devices` rows, which become rows
    [p * L, (p + 1) * L) of one global array over every process's devices. Both modes accept
    arrays sharded along a 1-D mesh (pmap is jit + shard_map now).
    """
    if not self._multiprocess:
      return jax.tree.map(lambda x: jax.device_put(x, self._sharding), tree)

    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(
          self._sharding, x, (self.num_devices,) + x.shape[1:])
    return jax.tree.map(put, tree)

  def replicate(self, tree: Any) -> Any:
    """Copies a single (unreplicated) pytree to every device, adding the leading device axis."""
    n = self.num_local_devices
    return self.shard(
        jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))


class _CompiledInStep:
  """A mapped function that compiles (per argument shapes), then waits for every process.

  Why: a process's first collective waits only ~30 s for the others (gloo on CPU), less than
  one process may lag another in compiling; a coordination-service barrier (no such limit)
  after the compile lines the processes up. Every process calls the same functions in the
  same order (SPMD), so the barrier names agree.
  """

  _count = 0

  def __init__(self, mapped):
    self._mapped = mapped
    self._compiled: dict[Any, Any] = {}

  def __call__(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves))
    if key not in self._compiled:
      self._compiled[key] = self._mapped.lower(*args).compile()
      _CompiledInStep._count += 1
      barrier(f"ctdiff_compiled_{_CompiledInStep._count}")
    return self._compiled[key](*args)


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches `name` (the coordination service; not a collective)."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def create(mode: str, devices: Sequence[jax.Device]) -> DataParallel:
  """The data-parallel layer for `config.parallel` (`mode`) over `devices`."""
  return DataParallel(mode, devices)


def _first(x):
  if getattr(x, "is_fully_addressable", True):
    return x[0]
  return x.addressable_data(0)[0]  # device 0 may be another process's


def unreplicate(tree: Any) -> Any:
  """This process's first device's copy of a replicated pytree (device arrays, no transfer)."""
  return jax.tree.map(_first, tree)


def _own_rows(x) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def local_rows(tree: Any) -> Any:
  """Host numpy copies of this process's rows of per-device arrays (all rows on one process)."""
  return jax.tree.map(_own_rows, tree)


def device_keys(key: jax.Array, n: int) -> jax.Array:
  """[n] keys, one per device, derived from `key` by fold_in of the device index."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """Per-device: one key per local example, indexed by its position in the global batch.

  Randomness drawn from these keys does not depend on how the batch is split over devices.
  """
  first = jax.lax.axis_index(AXIS) * batch_size
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(batch_size))
