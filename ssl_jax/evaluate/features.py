"""Frozen features of many images: the one place that batches, pads and collects them.

Every evaluator (kNN, feature-level linear probes, multi-layer probes) and the supervised
protocols' evaluation pass run an encoder over images in batches of exactly `batch_size` rows:
the final short batch is zero-padded so the encoder compiles once, and the padded rows are dropped
from the result. The encoder must treat rows independently (eval mode: batch norm with running
statistics), otherwise the padding would change the real rows.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from ssl_jax import parallel
from ssl_jax.data import pipeline


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads axis 0 of `x` with zeros up to `rows` (zeros: the padded outputs are dropped anyway)."""
  if x.shape[0] == rows:
    return x
  pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad], axis=0)


def extract_features(encode_fn: Callable[..., Any],
                     images: np.ndarray | Iterable[np.ndarray], batch_size: int, *,
                     args: tuple = (), mesh=None) -> Any:
  """Runs a frozen encoder over images in batches of exactly `batch_size` rows.

  Args:
    encode_fn: (*args, images [batch_size, H, W, 3]) -> features [batch_size, D] or any pytree
      of [batch_size, ...] arrays (e.g. a dict of per-layer features). Jitted here unless it
      already is; pass weights through `args` (traced arguments), not a closure, so repeated
      evaluations reuse one compiled program.
    args: leading arguments of every call (e.g. the train state).
    images: [N, H, W, 3] array, or an iterable of such arrays (batches of any size).
    batch_size: rows per call of `encode_fn`.
    mesh: shard each batch over this mesh's "data" axis (batch_size divisible by its size);
      None: default placement.

  Returns:
    np.ndarray [N, D] (or the pytree of encode_fn's output, each leaf [N, ...]) on the host.
  """
  if batch_size <= 0:
    raise ValueError(f"extract_features: batch_size={batch_size} must be positive")
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"extract_features: batch_size={batch_size} is not divisible by the "
                     f"{mesh.size} devices")
  encode = encode_fn if hasattr(encode_fn, "lower") else jax.jit(encode_fn)
  chunks = [images] if isinstance(images, (np.ndarray, jax.Array)) else images
  outputs = []
  for chunk in chunks:
    chunk = np.asarray(chunk)
    for start in range(0, chunk.shape[0], batch_size):
      rows = chunk[start:start + batch_size]
      padded = pad_rows(rows, batch_size)
      if mesh is not None:
        padded = parallel.global_batch({"x": padded}, mesh)["x"]
      out = jax.device_get(encode(*args, padded))
      outputs.append(jax.tree.map(lambda o, n=rows.shape[0]: np.asarray(o)[:n], out))
  if not outputs:
    raise ValueError("extract_features: `images` holds no rows")
  return jax.tree.map(lambda *leaves: np.concatenate(leaves, axis=0), *outputs)


def source_features(encode_fn: Callable[..., Any], source, *, image_size: int,
                    batch_size: int, limit: int = 0, crop_fraction: float = 1.0,
                    args: tuple = (), mesh=None) -> tuple[Any, np.ndarray]:
  """(features, labels [N]) of one ordered pass over a record source (centre crops, the first
  `limit` records when > 0; bad records left out), on any number of processes.

  Every process reads its rows of each global batch of `batch_size` (`pipeline.eval_batches`,
  padded to full batches). Two ways to run the encoder:
    * `mesh` given: `encode_fn(*args, images)` is jitted and gets the global uint8 batch
      [batch_size, S, S, 3] sharded over the mesh; its outputs are gathered to every host;
    * `mesh` None: `encode_fn(*args, local_images)` is called with this process's rows and must
      return host arrays for the whole global batch (e.g. the trainer's `predict_fn`).
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  process_index, process_count = jax.process_index(), jax.process_count()
  if mesh is not None:
    encode = encode_fn if hasattr(encode_fn, "lower") else jax.jit(encode_fn)

    def run(local_images):
      x = parallel.global_batch({"x": local_images}, mesh)["x"]
      return parallel.to_host(encode(*args, x))
  else:
    run = lambda local_images: encode_fn(*args, local_images)  # noqa: E731
  outputs, labels, valid = [], [], []
  for batch in pipeline.eval_batches(source, image_size=image_size, batch_size=batch_size,
                                     limit=limit, crop_fraction=crop_fraction,
                                     process_index=process_index, process_count=process_count):
    outputs.append(jax.tree.map(np.asarray, run(batch["image"])))
    labels.append(batch["label"])
    valid.append(batch["valid"])
  if not outputs:
    raise ValueError(f"evaluation source {source!r} yielded no records")
  labels, valid = np.concatenate(labels), np.concatenate(valid)
  if process_count > 1:  # rows of global batch k: process 0's, then process 1's, ...
    local = batch_size // process_count
    gather = lambda x: np.asarray(multihost_utils.process_allgather(  # noqa: E731
        x.reshape(-1, local), tiled=False)).transpose(1, 0, 2).reshape(-1)
    labels, valid = gather(labels), gather(valid)
  feats = jax.tree.map(lambda *leaves: np.concatenate(leaves)[valid], *outputs)
  if not valid.any():
    raise ValueError(f"evaluation source {source!r} yielded no readable records")
  return feats, labels[valid]
