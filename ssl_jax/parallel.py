"""Mesh construction, sharding rules and multi-host initialisation.

One mesh axis, "data": the batch is sharded over it; params and optimizer state are replicated
(data parallel) or, with `config.sharding.fsdp`, their largest divisible axis is sharded over
"data" too (ZeRO-3 style; XLA all-gathers them for the forward). Batch-norm statistics and
contrastive negatives are computed over the global batch because the train step is one
`jax.jit` over global arrays.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def distributed_init_args(env: Mapping[str, str]) -> dict | None:
  """The `jax.distributed.initialize` keyword arguments this environment asks for, or None when
  this is a single-process run. One place decides, per cluster (tested with faked environments):

  * the local launcher (`launch/local_multiprocess.sh`): JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID given explicitly;
  * Cloud TPU VM pod slices and GKE TPU node pools (TPU_WORKER_HOSTNAMES lists more than one
    host): JAX detects everything;
  * SLURM (more than one task): JAX detects the coordinator and process ids. JAX then binds each
    process to the one GPU of its SLURM_LOCALID, which is right for one task per GPU; with one
    task per node (`launch/gpu_slurm.sh`) every GPU of the node must be this process's, so the
    local device ids are all of them (from SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES);
  * SSL_JAX_DISTRIBUTED=1: let JAX detect any other cluster it knows.
  """
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(env["JAX_NUM_PROCESSES"]),
            "process_id": int(env.get("JAX_PROCESS_ID", "0"))}
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return {}
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if tasks_per_node == "1":
      gpus = _gpus_on_node(env)
      return {"local_device_ids": list(range(gpus))} if gpus else {}
    return {}
  if env.get("SSL_JAX_DISTRIBUTED") == "1":
    return {}
  return None


def _gpus_on_node(env: Mapping[str, str]) -> int:
  if env.get("SLURM_GPUS_ON_NODE"):
    return int(env["SLURM_GPUS_ON_NODE"])
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  return len(visible)


def initialize_distributed() -> None:
  """Calls `jax.distributed.initialize(...)` when launched as one of several processes
  (`distributed_init_args` decides how); a no-op otherwise or when already initialised."""
  if jax.distributed.is_initialized():
    return
  args = distributed_init_args(os.environ)
  if args is not None:
    jax.distributed.initialize(**args)


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
