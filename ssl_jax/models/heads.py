"""Projector / predictor MLPs and the linear-probe classifier.

MLP: (Dense → norm → ReLU) × (num_layers − 1) → Dense → optional last norm, covering
- SimCLR v1 / BYOL / DetCon projectors and predictors: norm="bn", last_norm="none";
- MoCo v2: norm="none" (2-layer head without BN);
- MoCo v3 projector: last_norm="bn_noaffine" (its `_build_mlp(..., last_bn=True)` ends with
  BatchNorm1d(affine=False)); the official MoCo v3 layers have no bias (use_bias=False);
- Masked MoCo/BYOL LN heads: norm="ln", last_norm="ln" (MoCo v3's heads with every BN replaced by
  a LayerNorm, its Sec. 3.4).
Batch norm uses batch statistics in train mode and keeps running statistics in `batch_stats`
(momentum 0.9 == torch 0.1, ε 1e-5, biased running variance as in `resnet.py`). Layer norms use
flax's ε 1e-6 (what `export.torch.mlp_to_torch_state_dict` writes out).

CrossAttentionHead: CaiT's class-attention blocks (Touvron et al. 2021) between a ViT and its
projector, as ExtreMA (Wu et al. 2022) and Masked MoCo/BYOL's "+ CA" heads (its Table 3).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models import vit

_NORMS = ("bn", "ln", "none")
_LAST_NORMS = ("none", "bn", "bn_noaffine", "ln")


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
    if self.last_norm == "ln":
      return nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="last_norm")(x)
    if self.last_norm != "none":
      affine = self.last_norm == "bn"
      x = bn(use_scale=affine, use_bias=affine, name="last_norm")(x)
    return x


class ClassAttentionBlock(nn.Module):
  """CaiT class-attention block (Touvron et al. 2021, Sec. 3; ExtreMA's `Block_CA`).

  Only the class token is updated; it attends to itself and the patch tokens:
      u = [x_cls; x_patches],  x_cls ← x_cls + γ₁ · CA(norm1(u)),
      x_cls ← x_cls + γ₂ · MLP(norm2(x_cls)),
  where CA's query is q(norm1(u)[:, :1]) and its keys/values k, v(norm1(u)) over all tokens
  (separate q, k, v projections as ExtreMA's `Class_Attention`), softmax(q kᵀ/√d_head) v, then
  `proj`. γ are LayerScale vectors (CaiT), initialised to `layer_scale_init` (ExtreMA's
  `--layer_scale_init_value` default 0.1); `layer_scale_init=0` removes them (plain residuals).
  LayerNorm ε 1e-6, exact-erf GELU MLP (`vit.Mlp`), xavier-uniform Dense as the ViT.

  Attributes: num_heads, mlp_ratio, qkv_bias, layer_scale_init, dtype.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layer_scale_init: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_cls, x_patches):
    """x_cls: [S, 1, D], x_patches: [S, T, D] -> updated x_cls [S, 1, D]."""
    s, t, d = x_patches.shape
    if x_cls.shape != (s, 1, d):
      raise ValueError(f"x_cls must be [S, 1, D] = {(s, 1, d)}, got {x_cls.shape}")
    if d % self.num_heads:
      raise ValueError(f"embed_dim={d} is not divisible by num_heads={self.num_heads}")
    hd = d // self.num_heads
    dense = functools.partial(nn.Dense, kernel_init=vit.dense_init, dtype=self.dtype,
                              param_dtype=jnp.float32)
    norm = functools.partial(nn.LayerNorm, epsilon=vit.LN_EPSILON, dtype=self.dtype,
                             param_dtype=jnp.float32)

    def scale(name, y):
      if not self.layer_scale_init:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (d,),
                         jnp.float32)
      return y * gamma.astype(y.dtype)

    x_cls = jnp.asarray(x_cls, self.dtype)
    u = norm(name="norm1")(jnp.concatenate([x_cls, jnp.asarray(x_patches, self.dtype)], axis=1))
    q = dense(d, use_bias=self.qkv_bias, name="q")(u[:, :1]).reshape(s, 1, self.num_heads, hd)
    k = dense(d, use_bias=self.qkv_bias, name="k")(u).reshape(s, 1 + t, self.num_heads, hd)
    v = dense(d, use_bias=self.qkv_bias, name="v")(u).reshape(s, 1 + t, self.num_heads, hd)
    logits = jnp.einsum("sqhd,skhd->shqk", q, k).astype(jnp.float32) * hd**-0.5
    attn = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("shqk,skhd->sqhd", attn.astype(self.dtype), v).reshape(s, 1, d)
    x_cls = x_cls + scale("gamma_1", dense(d, name="proj")(y))
    y = vit.Mlp(int(d * self.mlp_ratio), d, self.dtype, name="mlp")(norm(name="norm2")(x_cls))
    return x_cls + scale("gamma_2", y)


class CrossAttentionHead(nn.Module):
  """`num_blocks` class-attention blocks on a ViT's output tokens, then a LayerNorm.

  Masked MoCo/BYOL Sec. 3.4 "Extra cross-attention block": two blocks between the backbone and
  the projector "following ExtreMA, but differently we keep CLS and thus make the backbone
  intact": the class token entering the blocks is the backbone's own (normed) CLS output, not a
  new learned token as in ExtreMA, and it attends to [CLS; patch tokens] of the backbone. The
  blocks' output CLS, normed, is what the projector sees.

  Attributes: num_blocks (≥ 1), num_heads, mlp_ratio, layer_scale_init, dtype.
  """
  num_blocks: int
  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale_init: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    """tokens: [S, 1+T, D] backbone output (CLS first) -> [S, D] in the compute dtype."""
    if tokens.ndim != 3 or tokens.shape[1] < 2:
      raise ValueError(f"tokens must be [S, 1+T, D] with T >= 1, got {tokens.shape}")
    if self.num_blocks < 1:
      raise ValueError(f"CrossAttentionHead.num_blocks={self.num_blocks} must be >= 1")
    x_cls, x_patches = tokens[:, :1], tokens[:, 1:]
    for i in range(self.num_blocks):
      x_cls = ClassAttentionBlock(self.num_heads, self.mlp_ratio,
                                  layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                                  name=f"blocks_{i}")(x_cls, x_patches)
    return nn.LayerNorm(epsilon=vit.LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                        name="norm")(x_cls[:, 0])


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
