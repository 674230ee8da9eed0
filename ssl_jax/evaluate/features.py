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
  """(features, labels [N]) of one ordered pass over a record source (centre crops,
  `pipeline.eval_batches`: the first `limit` records when > 0, bad records dropped).

  `encode_fn` gets uint8 images [batch_size, S, S, 3]; see `extract_features`.
  """
  labels: list[np.ndarray] = []

  def images():
    for batch in pipeline.eval_batches(source, image_size=image_size, batch_size=batch_size,
                                       limit=limit, crop_fraction=crop_fraction):
      labels.append(np.asarray(batch["label"]))
      yield batch["image"]

  try:
    feats = extract_features(encode_fn, images(), batch_size, args=args, mesh=mesh)
  except ValueError as e:
    if not labels:
      raise ValueError(f"evaluation source {source!r} yielded no records") from e
    raise
  return feats, np.concatenate(labels)
