"""Pixel decoders of the masked-image-modelling methods: MAE's (also ccMIM's) and SimMIM's.

Both predict pixels; the targets and losses live in `ssl_jax.losses` (`masked_patch_mse`,
`masked_pixel_l1`), the masks in `ssl_jax.ops.patches`.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models import vit


class MAEDecoder(nn.Module):
  """MAE's lightweight decoder (He et al. 2022, Sec. 3 "MAE decoder"; `models_mae.forward_decoder`).

  Steps, as the official code (ccMIM's decoder is the same code):
    1. `embed`: Linear D_enc → D_dec on every encoded token (CLS included).
    2. Append N − K copies of the decoder's own `mask_token` [D_dec] after the K visible patch
       tokens and unshuffle them with `restore` (MAE's `ids_restore`), so token i is patch i.
    3. Put the CLS token back in front and add the fixed 2-D sin-cos positions
       (`vit.sincos_pos_embed`, CLS position zero; not a parameter).
    4. `depth` pre-norm transformer blocks (`vit.Block`, qkv bias, no stochastic depth), then
       LayerNorm (ε 1e-6) `norm`.
    5. `pred`: Linear D_dec → p·p·C per token; drop the CLS token.

  The output is in `vit.patchify` order (row-major patches, (row, col, channel) within a patch),
  MAE's target order. Initialisation as MAE: xavier-uniform Linear layers with zero bias,
  LayerNorm (1, 0), mask token normal(0.02).

  Attributes:
    patch_size: p of the encoder.
    embed_dim, depth, num_heads, mlp_ratio: decoder width, blocks, heads (MAE: 512, 8, 16, 4).
    out_channels: C of the predicted pixels (3).
    dtype: compute dtype; parameters stay float32.

  Parameters: `embed`, `mask_token` [1, 1, D_dec], `blocks_{i}`, `norm`, `pred`.
  """
  patch_size: int
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  out_channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, restore: jax.Array, grid: Sequence[int]) -> jax.Array:
    """Predict every patch's pixels from the visible tokens.

    Args:
      tokens: [B, 1+K, D_enc] encoder output (after its final norm): CLS first, then the K
        visible patches in `keep_indices` order (the ViT's `tokens` with `keep_indices`).
      restore: [B, N] int, `ops.patches.Masking.restore` of the same masking.
      grid: (h, w) patch grid, N = h·w (static).

    Returns:
      [B, N, p·p·C] float32 predictions in patch order.
    """
    b, t, _ = tokens.shape
    h, w = grid
    n = h * w
    if restore.shape != (b, n):
      raise ValueError(f"restore must be [B, N] = {(b, n)} for grid {tuple(grid)}, got "
                       f"{restore.shape}")
    if not 1 <= t <= n + 1:
      raise ValueError(f"tokens must be [B, 1+K, D] with CLS first and K <= N={n}, got "
                       f"{tokens.shape}")
    d = self.embed_dim
    dense = functools.partial(nn.Dense, kernel_init=vit.dense_init, dtype=self.dtype,
                              param_dtype=jnp.float32)
    x = dense(d, name="embed")(jnp.asarray(tokens, self.dtype))
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    filler = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n + 1 - t, d))
    patches = jnp.concatenate([x[:, 1:], filler], axis=1)           # [B, N, D] shuffled order
    patches = jnp.take_along_axis(patches, restore[:, :, None].astype(jnp.int32), axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(vit.sincos_pos_embed(d, (h, w)), self.dtype)
    for i in range(self.depth):
      x, _ = vit.Block(self.num_heads, self.mlp_ratio, qkv_bias=True, drop_path=0.0,
                       dtype=self.dtype, name=f"blocks_{i}")(x, train=False)
    x = nn.LayerNorm(epsilon=vit.LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(x)
    x = dense(self.patch_size**2 * self.out_channels, name="pred")(x)
    return x[:, 1:].astype(jnp.float32)


def _torch_default_bias_init(fan_in: int):
  """PyTorch's default Conv/Linear bias init: U(−1/√fan_in, 1/√fan_in)."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def pixel_shuffle(x: jax.Array, stride: int) -> jax.Array:
  """torch.nn.PixelShuffle on channels-last data: [B, h, w, C·r·r] -> [B, h·r, w·r, C].

  Channel c·r² + i·r + j goes to output pixel (y·r + i, x·r + j), channel c (torch's order).
  """
  b, h, w, c = x.shape
  r = stride
  if c % (r * r):
    raise ValueError(f"pixel_shuffle needs channels divisible by stride²={r * r}, got {c}")
  x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, c // (r * r))


class LinearPixelDecoder(nn.Module):
  """SimMIM's prediction head (Xie et al. 2022, Sec. 3.3 "linear layer"; `models/simmim.py`).

  A 1×1 convolution from the encoder's feature map to stride²·C channels followed by a pixel
  shuffle of factor `stride`, so each feature-map cell predicts its stride×stride×C pixels:
  stride = 16 on a ViT-B/16 feature map (the per-token Linear to p·p·3 of the paper's ViT setup),
  32 on Swin's final-stage map. The output channels are in torch's PixelShuffle order, so a
  SimMIM `decoder.0` Conv2d weight maps to `conv` by a transpose. Initialisation is PyTorch's
  Conv2d default, which SimMIM leaves in place: kernel U(±1/√fan_in), bias U(±1/√fan_in).

  Attributes:
    stride: encoder stride (pixels per feature-map cell).
    out_channels: C (3).
    dtype: compute dtype; parameters stay float32.

  Parameters: `conv` (kernel [1, 1, C_in, stride²·C], bias).
  """
  stride: int
  out_channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_map: jax.Array) -> jax.Array:
    """feature_map: [B, h, w, C_in] -> reconstructed images [B, h·stride, w·stride, C] float32."""
    if feature_map.ndim != 4:
      raise ValueError(f"feature_map must be [B, h, w, C], got shape {feature_map.shape}")
    fan_in = feature_map.shape[-1]
    x = nn.Conv(self.stride**2 * self.out_channels, (1, 1),
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=_torch_default_bias_init(fan_in), dtype=self.dtype,
                param_dtype=jnp.float32, name="conv")(jnp.asarray(feature_map, self.dtype))
    return pixel_shuffle(x, self.stride).astype(jnp.float32)
