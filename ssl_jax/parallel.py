"""Mesh construction, sharding rules and multi-host initialisation.

One mesh axis, "data": the batch is sharded over it; params and optimizer state are replicated
(data parallel) or, with `config.sharding.fsdp`, their largest divisible axis is sharded over
"data" too (ZeRO-3 style; XLA all-gathers them for the forward). Batch-norm statistics and
contrastive negatives are computed over the global batch because the train step is one
`jax.jit` over global arrays.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when launched as one of several processes.

  Cloud TPU pods and SLURM are detected by JAX itself; a local multi-process launch
  (launch/local_multiprocess.sh) sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID; SSL_JAX_DISTRIBUTED=1 forces the call on any other cluster JAX knows.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  elif (env.get("SSL_JAX_DISTRIBUTED") == "1" or int(env.get("SLURM_NTASKS", "1")) > 1
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1):
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """A 1-D ("data",) mesh over all devices (Auto axes: jax 0.10 defaults to Explicit)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P(DATA))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int = 2**14) -> P:
  """Shards the largest axis divisible by `num_shards` (small arrays stay replicated)."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
  """NamedShardings for a train-state pytree of ShapeDtypeStructs."""
  n = mesh.shape[DATA]

  def rule(x):
    if not fsdp or not hasattr(x, "shape"):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(tuple(x.shape), n))

  return jax.tree.map(rule, abstract_state)


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy with all rows on every host (all-gathered across processes)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded on "data"."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
