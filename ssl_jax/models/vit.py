"""Vision Transformer (Dosovitskiy et al., 2021) laid out like timm, so PyTorch export is a rename.

Layout: `patch_embed` (conv, kernel = stride = patch; timm `patch_embed.proj`), `cls_token`
[1, 1, D], `pos_embed` [1, 1+N, D], blocks `blocks_{i}` with `norm1`, `attn` (`qkv` fused D→3D
whose output is ordered (3, heads, head_dim) as timm's reshape, `proj`), `norm2`, `mlp`
(`fc1`, exact-erf GELU, `fc2`), then the final `norm`. LayerNorm ε = 1e-6.

Position embeddings: "learned" is a parameter (timm's truncated normal, std 0.02) sized at init
from the input resolution; "sincos" is the fixed 2-D sin-cos table of MoCo v3 / MAE, computed at
call time and *not* a parameter (so no optimizer, weight decay or EMA ever touches it); export
writes it out as timm's `pos_embed`.

Masked methods (MAE, Masked MoCo/BYOL, ccMIM) pass `keep_indices` [B, K]: the chosen patch tokens,
after their position embedding is added, enter the blocks together with the CLS token.

Initialisation follows MAE / timm: xavier-uniform Dense layers with zero bias, the patch
projection xavier-uniform on its [p·p·3, D] view, CLS token normal(0.02).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPSILON = 1e-6
dense_init = nn.initializers.xavier_uniform()
# MAE initialises the patch conv as a Linear on its flattened [D, p·p·3] view: fans p·p·3 and D.
patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """images: [B, H, W, C] -> [B, N, p·p·C], patches row-major, (row, col, channel) within a patch.

  Same order as MAE's `patchify` (channel last inside a patch), the target of MAE/SimMIM.
  """
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
  """patches: [B, h·w, p·p·C] -> images [B, h·p, w·p, C]; the inverse of `patchify`."""
  b, n, d = patches.shape
  h, w = grid
  p = patch_size
  if n != h * w or d % (p * p):
    raise ValueError(f"patches {patches.shape} do not fit grid {grid} with patch_size={p}")
  c = d // (p * p)
  x = patches.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


def sincos_pos_embed(embed_dim: int, grid: tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, [1, (1 if cls_token) + h·w, D] float32.

  As MAE's `get_2d_sincos_pos_embed` (temperature 10000): the first half of the channels encodes
  the column (x) coordinate, the second half the row (y); each half is [sin, cos] of the
  coordinate times ω_k = 10000^(−k/(D/4)). The CLS position is all zeros.
  """
  if embed_dim % 4:
    raise ValueError(f"sincos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
  h, w = grid
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
  ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")

  def encode(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([encode(xs), encode(ys)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
  return table[None].astype(np.float32)


class DropPath(nn.Module):
  """Stochastic depth (Huang et al., 2016): drops the residual branch per sample."""
  rate: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention with timm's fused qkv projection."""
  num_heads: int
  qkv_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    """x: [B, T, D] -> (out [B, T, D], attention [B, heads, T, T] float32)."""
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"embed_dim={d} is not divisible by num_heads={self.num_heads}")
    hd = d // self.num_heads
    dense = functools.partial(nn.Dense, kernel_init=dense_init, dtype=self.dtype,
                              param_dtype=jnp.float32)
    # timm: qkv(x).reshape(B, T, 3, heads, hd): keep that order so export is a transpose.
    qkv = dense(3 * d, use_bias=self.qkv_bias, name="qkv")(x).reshape(b, t, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * hd**-0.5
    attn = jax.nn.softmax(logits, axis=-1)  # float32 softmax, also under bf16 compute
    out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v).reshape(b, t, d)
    return dense(d, name="proj")(out), attn


class Mlp(nn.Module):
  """timm Mlp: fc1 → exact-erf GELU → fc2."""
  hidden_dim: int
  out_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, kernel_init=dense_init, dtype=self.dtype,
                              param_dtype=jnp.float32)
    x = nn.gelu(dense(self.hidden_dim, name="fc1")(x), approximate=False)  # torch's exact GELU
    return dense(self.out_dim, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float
  qkv_bias: bool
  drop_path: float
  dtype: Any

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: [B, T, D] -> (x [B, T, D], attention [B, heads, T, T])."""
    d = x.shape[-1]
    norm = functools.partial(nn.LayerNorm, epsilon=LN_EPSILON, dtype=self.dtype,
                             param_dtype=jnp.float32)
    drop = DropPath(self.drop_path)
    y, attn = Attention(self.num_heads, self.qkv_bias, self.dtype,
                        name="attn")(norm(name="norm1")(x))
    x = x + drop(y, train=train)
    y = norm(name="norm2")(x)
    y = Mlp(int(d * self.mlp_ratio), d, self.dtype, name="mlp")(y)
    return x + drop(y, train=train), attn


class VisionTransformer(nn.Module):
  """ViT backbone without the classifier head.

  Attributes:
    patch_size: p; images must be divisible by it.
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as timm.
    pool: "cls" (normed CLS token) or "mean" (mean of the normed patch tokens; in timm that is
      `global_pool="avg", fc_norm=False`).
    pos_embed: "learned" (a parameter) or "sincos" (fixed, not a parameter).
    drop_path_rate: stochastic depth, linearly increasing over blocks from 0 (timm); needs the
      "dropout" rng when > 0 and train.
    dtype: compute dtype; parameters stay float32.
  """
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  pool: str = "cls"
  pos_embed: str = "learned"
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, keep_indices: Optional[jax.Array] = None,
               return_attention: bool = False) -> dict:
    """x: [B, H, W, 3] float; keep_indices: [B, K] int32 patch indices (row-major) or None.

    Returns dict(pooled [B, D] float32, tokens [B, 1+K, D] (after the final norm; K = N without
    keep_indices), feature_map [B, H/p, W/p, D] (only without keep_indices), and with
    return_attention cls_attention [depth, B, heads, K] float32: the CLS query's softmax attention
    over the patch keys in each block (the CLS key's share is left out, so a row sums to ≤ 1)).
    """
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"VisionTransformer.pool={self.pool!r} must be 'cls' or 'mean'")
    if self.pos_embed not in ("learned", "sincos"):
      raise ValueError(f"VisionTransformer.pos_embed={self.pos_embed!r} must be 'learned' or "
                       "'sincos'")
    b, height, width, _ = x.shape
    p, d = self.patch_size, self.embed_dim
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}")
    grid = (height // p, width // p)
    n = grid[0] * grid[1]

    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed")(x)
    x = x.reshape(b, n, d)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    if self.pos_embed == "learned":
      if self.has_variable("params", "pos_embed"):
        trained = self.get_variable("params", "pos_embed").shape[1] - 1
        if trained != n:
          raise ValueError(f"learned pos_embed has {trained} patch positions but the "
                           f"{height}x{width} input gives {n}; use the training resolution")
      pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + n, d),
                       jnp.float32)
    else:
      pos = jnp.asarray(sincos_pos_embed(d, grid))
    x = x + pos[:, 1:].astype(self.dtype)
    if keep_indices is not None:
      x = jnp.take_along_axis(x, keep_indices[:, :, None].astype(jnp.int32), axis=1)
    cls = jnp.broadcast_to((cls + pos[:, :1]).astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1)

    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    cls_attention = []
    for i in range(self.depth):
      x, attn = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, float(rates[i]), self.dtype,
                      name=f"blocks_{i}")(x, train=train)
      if return_attention:
        cls_attention.append(attn[:, :, 0, 1:])
    tokens = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                          name="norm")(x)
    pooled = tokens[:, 0] if self.pool == "cls" else jnp.mean(tokens[:, 1:], axis=1)
    out = {"pooled": pooled.astype(jnp.float32), "tokens": tokens}
    if keep_indices is None:
      out["feature_map"] = tokens[:, 1:].reshape(b, grid[0], grid[1], d)
    if return_attention:
      out["cls_attention"] = jnp.stack(cls_attention)
    return out


_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def _vit(size: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
  embed_dim, depth, num_heads = _SIZES[size]
  fields = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **kwargs}
  return VisionTransformer(patch_size=patch_size, **fields)


vit_tiny = functools.partial(_vit, "vit_tiny")
vit_small = functools.partial(_vit, "vit_small")
vit_base = functools.partial(_vit, "vit_base")
