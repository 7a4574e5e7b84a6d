"""Which share of a generate run this process writes, and the barrier before the merge.

Two ways to spread `generate --num_samples=N` over P hosts (export/parts.py: the split, the
parts and the merge):
- jax.distributed (`generate --distributed`): the same command on every host; `initialize`
  joins the processes (coordinator address, process count and id from the flags, the
  environment JAX_COORDINATOR_ADDRESS, or a detected cluster: SLURM, Open MPI, Cloud TPU, ...),
  `current()` is this process's share, and process 0 merges the parts after `barrier`.
- independent jobs (`--num_processes=P --process_id=p`, e.g. a job array; no coordinator):
  each job writes its part, `generate --merge` joins them once all are done.
Each process uses its own local devices (inference.Inpainter); generation needs no
collectives. The barrier is the coordination service's (orbax's barrier function), not a
device collective: gloo's all-gather gives up when the processes arrive more than ~30 s apart
(measured), and parts finish minutes or hours apart.
"""

from __future__ import annotations

import jax

# How long the processes that are done wait for the others (and for the merge).
BARRIER_TIMEOUT_S = 7 * 24 * 3600


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """jax.distributed.initialize (arguments None: from the environment / the cluster)."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def current():
  """This process's share under jax.distributed (process 0 of 1 without it): a parts.Shard."""
  from ctdiff_jax.generation.export import parts  # pylint: disable=g-import-not-at-top
  count = jax.process_count()
  return parts.Shard(jax.process_index(), count, distributed=count > 1)


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Waits until every process of the jax.distributed run got to the barrier `name`."""
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
