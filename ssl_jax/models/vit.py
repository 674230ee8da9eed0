"""Vision Transformer (Dosovitskiy et al., 2021) laid out like timm, so PyTorch export is a rename.

Layout: `patch_embed` (conv, kernel = stride = patch; timm `patch_embed.proj`), `cls_token`
[1, 1, D], `pos_embed` [1, 1+N, D], blocks `blocks_{i}` with `norm1`, `attn` (`qkv` fused D→3D
whose output is ordered (3, heads, head_dim) as timm's reshape, `proj`), `norm2`, `mlp`
(`fc1`, exact-erf GELU, `fc2`), then the final `norm`. LayerNorm ε = 1e-6.

Position embeddings: "learned" is a parameter (timm's truncated normal, std 0.02) sized at init
from the input resolution; "sincos" is the fixed 2-D sin-cos table of MoCo v3 / MAE, computed at
call time and *not* a parameter (so no optimizer, weight decay or EMA ever touches it); export
writes it out as timm's `pos_embed`.

Masked methods pass per-call inputs (none of them adds a parameter, so the backbone exports as is):
  * `keep_indices` [B, K] (MAE, ccMIM): the chosen patch tokens, after their position embedding
    is added, enter the blocks together with the CLS token.
  * `keep_indices` [B, n, K] (Masked MoCo/BYOL chunks, `ops.patches.chunk_indices`): B·n
    independent sequences, each with its own CLS token; the patch embedding runs once.
  * `token_mask` [B, N] with `mask_token` [D] (SimMIM, MimCo): masked patch embeddings are
    replaced by the method's mask token before the position embedding is added.
  * `return_attention` "cls_key" / "cls_query": per-block CLS attention for ccMIM's importance
    (`ops.patches.attention_importance`).

Initialisation follows MAE / timm: xavier-uniform Dense layers with zero bias, the patch
projection xavier-uniform on its [p·p·3, D] view, CLS token normal(0.02).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from ssl_jax.ops import patches

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
    # Logits leave the matmul in float32 (bf16 operands, no bf16 rounding of q·k) and the softmax
    # runs in float32, also under bf16 compute.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * hd**-0.5
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v).reshape(b, t, d)
    return dense(d, name="proj")(out), attn


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x Φ(x), in torch's form 0.5·x·(1 + erf(x/√2)) (x any shape; same dtype).

  `jax.nn.gelu(approximate=False)` is the same function through erfc, which XLA:CPU expands
  into a slower polynomial: fc1's GELU of a ViT-S/16 MoCo v3 step at 96 px took 1.75x longer
  forward + backward (2.68 vs 1.53 ms on [1184, 1536]; 2026-12-02). Error against float64: at
  most 1.2e-6 absolute (the erfc form 3.8e-7; both far below float32 training noise).
  """
  return 0.5 * x * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))))


class Mlp(nn.Module):
  """timm Mlp: fc1 → exact-erf GELU → fc2 (x [..., D] → [..., out_dim]); weights xavier-uniform
  as MAE / MoCo v3 initialise them, `kernel_init` for others (Swin: normal(0.02))."""
  hidden_dim: int
  out_dim: int
  dtype: Any
  kernel_init: Callable = dense_init

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, kernel_init=self.kernel_init, dtype=self.dtype,
                              param_dtype=jnp.float32)
    x = gelu(dense(self.hidden_dim, name="fc1")(x))
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
               token_mask: Optional[jax.Array] = None, mask_token: Optional[jax.Array] = None,
               return_attention: bool | str = False) -> dict:
    """Encode images, optionally a subset or chunks of their patches, optionally masked.

    Args:
      x: [B, H, W, 3] float images.
      train: enables stochastic depth (needs the "dropout" rng when drop_path_rate > 0).
      keep_indices: None (all N patches); [B, K] int patch indices (row-major) to keep; or
        [B, n, K] chunks: each of the B·n chunks is its own sequence [CLS, K patches] (no
        attention across chunks). The patches are embedded and given their positions once,
        [B, N, D], then gathered; stochastic depth then drops per chunk (per sequence).
      token_mask: optional [B, N] bool, True = masked (SimMIM): those patch embeddings are
        replaced by `mask_token` before the position embedding is added (SimMIM's
        `VisionTransformerForSimMIM.forward`: mask, then CLS, then `+ pos_embed`). Combines with
        keep_indices (masking happens first).
      mask_token: [D] float, required with token_mask: the method's parameter (not the
        backbone's, so the backbone exports to timm unchanged); cast to the compute dtype.
      return_attention: False; "cls_query" (True means the same) = attn[b, h, 0, 1 + i], the CLS
        query's softmax attention over the patch keys, a row summing to ≤ 1 (the CLS key's share
        is left out; ccMIM paper Eq. 4's direction); or "cls_key" = attn[b, h, 1 + i, 0], patch
        query i's softmax attention to the CLS key, each entry in [0, 1] (what the official
        ccMIM code reads, `avg_attn[:, 1:, 0]`).

    Returns:
      dict with
        pooled: [B, D] float32 ([B, n, D] with chunks): the normed CLS token, or the mean of the
          normed patch tokens (pool="mean").
        tokens: [B, 1+K, D] ([B, n, 1+K, D] with chunks; K = N without keep_indices), after the
          final norm, CLS first, patches in keep_indices order.
        feature_map: [B, H/p, W/p, D], only without keep_indices.
        cls_attention: with return_attention, [depth, B, heads, K] ([depth, B, n, heads, K] with
          chunks) float32 in the requested direction.
    """
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"VisionTransformer.pool={self.pool!r} must be 'cls' or 'mean'")
    if self.pos_embed not in ("learned", "sincos"):
      raise ValueError(f"VisionTransformer.pos_embed={self.pos_embed!r} must be 'learned' or "
                       "'sincos'")
    direction = {False: None, True: "cls_query", "cls_query": "cls_query",
                 "cls_key": "cls_key"}.get(return_attention, "invalid")
    if direction == "invalid":
      raise ValueError(f"return_attention={return_attention!r} must be False, True, 'cls_query' "
                       "or 'cls_key'")
    b, height, width, _ = x.shape
    p, d = self.patch_size, self.embed_dim
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}")
    grid = (height // p, width // p)
    n = grid[0] * grid[1]
    if (token_mask is None) != (mask_token is None):
      raise ValueError("token_mask and mask_token go together: pass both (SimMIM) or neither")
    if token_mask is not None and (token_mask.shape != (b, n) or mask_token.shape != (d,)):
      raise ValueError(f"token_mask must be [B, N] = {(b, n)} and mask_token [D] = {(d,)}, got "
                       f"{token_mask.shape} and {mask_token.shape}")
    if keep_indices is not None and (keep_indices.ndim not in (2, 3)
                                     or keep_indices.shape[0] != b):
      raise ValueError(f"keep_indices must be [B, K] or [B, n, K] with B={b}, got shape "
                       f"{keep_indices.shape}")

    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed")(x)
    x = x.reshape(b, n, d)
    if token_mask is not None:
      x = jnp.where(token_mask[:, :, None], jnp.asarray(mask_token, self.dtype), x)
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
    chunks = keep_indices is not None and keep_indices.ndim == 3
    if keep_indices is not None:
      x = patches.gather_patches(x, keep_indices)       # [B, K, D] or [B, n, K, D]
      x = x.reshape(-1, x.shape[-2], d)                 # sequences [B or B·n, K, D]
    seqs = x.shape[0]
    cls = jnp.broadcast_to((cls + pos[:, :1]).astype(self.dtype), (seqs, 1, d))
    x = jnp.concatenate([cls, x], axis=1)

    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    cls_attention = []
    for i in range(self.depth):
      x, attn = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, float(rates[i]), self.dtype,
                      name=f"blocks_{i}")(x, train=train)
      if direction == "cls_query":
        cls_attention.append(attn[:, :, 0, 1:])
      elif direction == "cls_key":
        cls_attention.append(attn[:, :, 1:, 0])
    tokens = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                          name="norm")(x)
    pooled = (tokens[:, 0] if self.pool == "cls"
              else jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1))
    out = {"pooled": pooled.astype(jnp.float32), "tokens": tokens}
    if keep_indices is None:
      out["feature_map"] = tokens[:, 1:].reshape(b, grid[0], grid[1], d)
    if direction is not None:
      out["cls_attention"] = jnp.stack(cls_attention)   # [depth, seqs, heads, K]
    if chunks:
      num_chunks = keep_indices.shape[1]
      out = {k: (v.reshape(v.shape[:1] + (b, num_chunks) + v.shape[2:]) if k == "cls_attention"
                 else v.reshape((b, num_chunks) + v.shape[1:])) for k, v in out.items()}
    return out


# (embed_dim, depth, num_heads) of timm's vit_{tiny,small,base,large}_patch16_224.
_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
          "vit_large": (1024, 24, 16)}


def _vit(size: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
  embed_dim, depth, num_heads = _SIZES[size]
  fields = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **kwargs}
  return VisionTransformer(patch_size=patch_size, **fields)


vit_tiny = functools.partial(_vit, "vit_tiny")
vit_small = functools.partial(_vit, "vit_small")
vit_base = functools.partial(_vit, "vit_base")
vit_large = functools.partial(_vit, "vit_large")
