"""The key queue of MoCo v2 and MimCo (He et al. 2020, Sec. 3.2 "Dictionary as a queue").

A queue is a [K, D] array of past keys (negatives) and an int32 pointer `ptr`: the B keys of a
step replace rows [ptr, ptr + B) (the oldest entries) and the pointer advances by B modulo K, as
the official `_dequeue_and_enqueue` of MoCo and MoBY. Keys are stored L2-normalised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses


def init_queue(rng: jax.Array, size: int, dim: int) -> tuple[jax.Array, jax.Array]:
  """(queue [size, dim] float32 of random unit vectors, ptr 0 int32), as the official
  `F.normalize(torch.randn(dim, K), dim=0)` initialisation."""
  queue = losses.l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
  return queue, jnp.zeros((), jnp.int32)


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes the L2-normalised keys at the pointer and advances it.

  Args:
    queue: [K, D] float keys.
    ptr: scalar int, the row where the next keys go (a multiple of B).
    keys: [B, D] float new keys (the caller stops their gradient); B must divide K so a write
      never runs past the end (the official code asserts the same).

  Returns:
    (new queue with rows [ptr, ptr + B) = keys / ‖keys‖ in the queue's dtype, (ptr + B) mod K).
  """
  size, batch = queue.shape[0], keys.shape[0]
  if keys.ndim != 2 or queue.ndim != 2 or keys.shape[1] != queue.shape[1]:
    raise ValueError(f"keys {keys.shape} must be [B, D] and queue {queue.shape} [K, D] with the "
                     "same D")
  if size % batch:
    raise ValueError(f"the queue size {size} must be a multiple of the number of keys per step "
                     f"{batch}")
  rows = losses.l2_normalize(keys.astype(jnp.float32)).astype(queue.dtype)
  queue = jax.lax.dynamic_update_slice(queue, rows, (ptr, jnp.zeros_like(ptr)))
  return queue, (ptr + batch) % size
