"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc, Wu et al. 2018; DINO).

Every feature is L2-normalised; a test sample's k nearest training samples by cosine similarity
s_i vote for their labels with weight exp(s_i / T), and the class with the largest summed vote
wins (k=20, T=0.07 as in DINO's `eval_knn.py`; InstDisc's weighting). Test samples are processed
in fixed-size batches (the last one padded) so one compiled top-k serves the whole set and the
[batch, N] similarity block, not [M, N], is what has to fit in memory.

Features come from `ssl_jax.evaluate.features`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.evaluate.features import pad_rows


def _l2_normalize(x: jax.Array) -> jax.Array:
  # Same epsilon convention as the losses (rsqrt(max(|x|², 1e-12))): a zero row stays zero.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_votes_batch(train_features: jax.Array, train_labels: jax.Array,
                     test_features: jax.Array, num_classes: int, k: int,
                     temperature: float) -> jax.Array:
  """Class votes [b, C] for one test batch; train features already L2-normalised."""
  sim = _l2_normalize(test_features.astype(jnp.float32)) @ train_features.T  # [b, N]
  top_sim, top_idx = jax.lax.top_k(sim, k)  # [b, k]
  weights = jnp.exp(top_sim / temperature)
  neighbour_labels = train_labels[top_idx]  # [b, k]
  one_hot = jax.nn.one_hot(neighbour_labels, num_classes, dtype=weights.dtype)  # [b, k, C]
  return jnp.einsum("bk,bkc->bc", weights, one_hot)


def knn_votes(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
              num_classes: int, k: int = 20, temperature: float = 0.07,
              batch_size: int = 1024) -> np.ndarray:
  """Summed neighbour weights per class, Σ_{i in top-k} exp(cos(x, x_i)/T)·[y_i = c].

  Args:
    train_features: [N, D] float, any scale (normalised here).
    train_labels: [N] int in [0, num_classes).
    test_features: [M, D] float.
    num_classes: C.
    k: neighbours per test sample; k > N raises (clamping would silently change the vote).
    temperature: T of the exp weighting.
    batch_size: test rows per compiled call; the [batch_size, N] similarity block must fit.

  Returns:
    np.ndarray [M, C] float32 votes.
  """
  train_features = np.asarray(train_features)
  train_labels = np.asarray(train_labels)
  test_features = np.asarray(test_features)
  n = train_features.shape[0]
  if train_features.ndim != 2 or test_features.ndim != 2:
    raise ValueError(f"knn: features must be [N, D]; got train {train_features.shape},"
                     f" test {test_features.shape}")
  if train_features.shape[1] != test_features.shape[1]:
    raise ValueError(f"knn: train feature dim {train_features.shape[1]} != test feature dim"
                     f" {test_features.shape[1]}")
  if train_labels.shape != (n,):
    raise ValueError(f"knn: train_labels shape {train_labels.shape} != ({n},)")
  if not 1 <= k <= n:
    raise ValueError(f"knn: k={k} must be in [1, number of training samples={n}]")
  if n and (train_labels.min() < 0 or train_labels.max() >= num_classes):
    raise ValueError(f"knn: train_labels must lie in [0, num_classes={num_classes}); got"
                     f" [{train_labels.min()}, {train_labels.max()}]")
  if batch_size <= 0:
    raise ValueError(f"knn: batch_size={batch_size} must be positive")
  m = test_features.shape[0]
  # A batch larger than the test set would only pad: shrink it (still one compiled shape).
  batch_size = max(1, min(batch_size, m))
  train = _l2_normalize(jnp.asarray(train_features, jnp.float32))
  labels = jnp.asarray(train_labels, jnp.int32)
  votes = []
  for start in range(0, m, batch_size):
    rows = test_features[start:start + batch_size]
    v = _knn_votes_batch(train, labels, jnp.asarray(pad_rows(rows, batch_size)),
                         num_classes=num_classes, k=k, temperature=temperature)
    votes.append(np.asarray(v[:rows.shape[0]]))
  if not votes:
    return np.zeros((0, num_classes), np.float32)
  return np.concatenate(votes, axis=0)


def knn_classify(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, num_classes: int, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 1024) -> np.ndarray:
  """Predicted class [M] int (argmax of `knn_votes`; ties go to the lower class id)."""
  votes = knn_votes(train_features, train_labels, test_features, num_classes, k, temperature,
                    batch_size)
  return np.argmax(votes, axis=-1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)
                  ) -> dict[str, float]:
  """Fraction of rows whose label is among the k highest scores, for each k.

  Args:
    scores: [M, C] float (votes or logits).
    labels: [M] int.
    ks: which k; k ≥ C counts every row correct (top-5 of a 4-class task is 1.0).

  Returns:
    {"top1": ..., "top5": ...} as Python floats.
  """
  scores, labels = np.asarray(scores), np.asarray(labels)
  # Stable descending order: on ties the lower class id ranks first, as in argmax.
  order = np.argsort(-scores, axis=-1, kind="stable")
  hits = order == labels[:, None]
  return {f"top{k}": float(hits[:, :k].any(axis=-1).mean()) if len(labels) else 0.0
          for k in ks}


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, num_classes: int,
                 k: int = 20, temperature: float = 0.07, batch_size: int = 1024
                 ) -> dict[str, float]:
  """kNN top-1 and top-5 accuracy of `test_labels` [M] (same arguments as `knn_votes`)."""
  votes = knn_votes(train_features, train_labels, test_features, num_classes, k, temperature,
                    batch_size)
  return topk_accuracy(votes, test_labels)
