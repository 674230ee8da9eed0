"""Projector / predictor MLPs and the linear-probe classifier.

MLP: (Dense → norm → ReLU) × (num_layers − 1) → Dense → optional last norm, covering
- SimCLR v1 / BYOL / DetCon projectors and predictors: norm="bn", last_norm="none";
- MoCo v2: norm="none" (2-layer head without BN);
- MoCo v3 projector: last_norm="bn_noaffine" (its `_build_mlp(..., last_bn=True)` ends with
  BatchNorm1d(affine=False)); the official MoCo v3 layers have no bias (use_bias=False);
- Masked MoCo/BYOL LN heads: norm="ln".
Batch norm uses batch statistics in train mode and keeps running statistics in `batch_stats`
(momentum 0.9 == torch 0.1, ε 1e-5, biased running variance as in `resnet.py`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_NORMS = ("bn", "ln", "none")
_LAST_NORMS = ("none", "bn", "bn_noaffine")


class MLP(nn.Module):
  """Attributes: hidden_dim, out_dim, num_layers (≥ 1), norm, last_norm, use_bias, dtype.

  Parameter names: `dense_{i}`, `norm_{i}` (hidden layers), `last_norm`.
  """
  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  norm: str = "bn"
  last_norm: str = "none"
  use_bias: bool = True
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: [N, D] -> [N, out_dim] in the compute dtype."""
    if self.norm not in _NORMS:
      raise ValueError(f"MLP.norm={self.norm!r} must be one of {_NORMS}")
    if self.last_norm not in _LAST_NORMS:
      raise ValueError(f"MLP.last_norm={self.last_norm!r} must be one of {_LAST_NORMS}")
    if self.num_layers < 1:
      raise ValueError(f"MLP.num_layers={self.num_layers} must be >= 1")
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                           epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=jnp.float32)
    dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=jnp.float32)
    x = jnp.asarray(x, self.dtype)
    for i in range(self.num_layers - 1):
      x = dense(self.hidden_dim, name=f"dense_{i}")(x)
      if self.norm == "bn":
        x = bn(name=f"norm_{i}")(x)
      elif self.norm == "ln":
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name=f"norm_{i}")(x)
      x = nn.relu(x)
    x = dense(self.out_dim, name=f"dense_{self.num_layers - 1}")(x)
    if self.last_norm != "none":
      affine = self.last_norm == "bn"
      x = bn(use_scale=affine, use_bias=affine, name="last_norm")(x)
    return x


class LinearClassifier(nn.Module):
  """Linear probe: optional BatchNorm without affine (MAE's probe, ε 1e-6), then Dense.

  The weights start at normal(0.01) and the bias at 0, as the MAE and MoCo v3 linear probes.
  """
  num_classes: int
  batch_norm: bool = False
  bn_epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: [N, D] features -> [N, num_classes] float32 logits."""
    x = jnp.asarray(x, self.dtype)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=self.bn_epsilon,
                       use_scale=False, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                       name="bn")(x)
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                 param_dtype=jnp.float32, name="head")(x)
    return x.astype(jnp.float32)
