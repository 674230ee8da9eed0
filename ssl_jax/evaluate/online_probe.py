"""Online linear probe trained alongside pretraining (BYOL §3.3 / official BYOL and DetCon code).

A linear classifier on the backbone's pooled features of the first view learns with the same
optimizer step as the self-supervised loss, giving a cheap accuracy curve during training. The
features pass through `stop_gradient`, so the classifier's cross-entropy never reaches the
encoder: the probe measures the representation and must not shape it (otherwise labels would
leak into "self-supervised" pretraining). Rows with a negative label (unlabelled sources) are
ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def init_online_probe(rng: jax.Array, feature_dim: int, num_classes: int) -> dict:
  """Parameters {"kernel": [D, C], "bias": [C]}; LeCun-normal kernel (the Dense default)."""
  kernel = jax.nn.initializers.lecun_normal()(rng, (feature_dim, num_classes), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def online_probe_loss(probe_params: dict, features: jax.Array, labels: jax.Array
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean softmax cross-entropy over labelled rows, on stop-gradient features.

  Args:
    probe_params: {"kernel": [D, C], "bias": [C]}.
    features: [B, D] float backbone features (gradient is stopped here).
    labels: [B] int in [0, C), or < 0 for an unlabelled row (excluded from loss and accuracy).
      Labels ≥ C cannot be checked inside jit; the caller must not pass them.

  Returns:
    (loss scalar, {"probe_loss": loss, "probe_top1": accuracy over labelled rows}). Both are 0
    when no row is labelled. Sums run over the whole (global, under jit sharding) batch.
  """
  features = jax.lax.stop_gradient(features).astype(jnp.float32)
  logits = features @ probe_params["kernel"] + probe_params["bias"]  # [B, C]
  valid = labels >= 0
  safe_labels = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)  # [B]
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(valid, ce, 0.0)) / count
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  top1 = jnp.sum(correct).astype(jnp.float32) / count
  return loss, {"probe_loss": loss, "probe_top1": top1}
