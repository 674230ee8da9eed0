"""Swin Transformer (Liu et al., ICCV 2021) laid out like timm 1.0, so PyTorch export is a rename.

Swin-T: patch 4, window 7, embed_dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), MLP ratio 4.
Stage i works at 1/(4·2^i) of the image with 96·2^i channels; inside a stage, blocks alternate
regular (W-MSA) and shifted (SW-MSA, cyclic shift by ⌊window/2⌋) window attention, with a learned
relative position bias B added to the logits (paper Eq. 4: softmax(QKᵀ/√d + B)V).

Layout (timm `swin_tiny_patch4_window7_224`, timm 1.0):
  `patch_embed` with `proj` (conv, kernel = stride = patch) and `norm` (LayerNorm);
  `layers_{i}`: `downsample` (PatchMerging: `norm` LN(4C), `reduction` Dense 4C→2C without bias)
    at the START of stages 1..3 (timm 1.0; Microsoft's code has it at the END of stages 0..2:
    the same weights, `export.torch` renames), then `blocks_{j}` with `norm1`, `attn`
    (`relative_position_bias_table` [(2w−1)², heads], `qkv` fused C→3C ordered (3, heads, hd) as
    timm's reshape, `proj`), `norm2`, `mlp` (`fc1`, exact-erf GELU, `fc2`);
  final `norm`. LayerNorm ε = 1e-5 (torch's default, which timm's Swin uses).
The relative position index and the shifted-window attention mask are constants computed from the
shapes with NumPy at trace time (timm: non-persistent buffers), never variables.

Windows at small resolutions (timm and Microsoft, which we follow): in a stage whose feature size r
is at most the window w, the window shrinks to r (one window covers the map) and the shift is
dropped; e.g. Swin-T at 224 px has a 7×7 map in stage 3, so both of its blocks are unshifted. The
relative bias table then has (2r−1)² rows, so its shape depends on the resolution the model was
built for. Where r > w, r must be a multiple of w: timm pads such maps, we raise a ValueError
instead (`check_image_size`), so every window is full.

SimMIM masking (`token_mask`, `mask_token`): as SimMIM's `SwinTransformerForSimMIM.forward`, the
masked patch embeddings are replaced by the mask token AFTER the patch embedding's LayerNorm and
before the first stage (Swin has no absolute position embedding: `ape=False` in SimMIM's Swin
configs). The mask token belongs to the method (it is passed in), so the backbone's variables
stay exactly timm's.

Initialisation (timm `init_weights_vit_timm` / Microsoft `_init_weights`): Dense weights and the
relative bias table normal(0.02) (timm's `trunc_normal_(std=.02)` cuts at ±2 in absolute value,
i.e. ±100σ, so it is a plain normal), zero biases, LayerNorm 1/0. The patch conv keeps torch's
default weight init (uniform ±1/√fan_in, i.e. variance scaling 1/3, fan_in, uniform); we start its
bias at zero rather than torch's uniform.

Stochastic depth: rate linear in the block index over all Σdepths blocks, 0 → drop_path_rate
(timm). Our default is 0.0 (timm's constructor default is 0.1: a fine-tuning setting).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.models.vit import DropPath

LN_EPSILON = 1e-5
MASK_VALUE = -100.0  # timm/Microsoft fill value of the shifted-window mask (not -inf)
dense_init = nn.initializers.normal(0.02)
# torch Conv2d default: kaiming_uniform(a=√5) == uniform(±1/√fan_in).
patch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def stage_windows(grid: tuple[int, int], window_size: int) -> tuple[tuple[int, int],
                                                                     tuple[int, int]]:
  """(window (wh, ww), shift (sh, sw)) of the shifted blocks of a stage with feature size `grid`.

  Per dimension, as timm's `_calc_window_shift`: r ≤ w → window r, shift 0; else window w,
  shift ⌊w/2⌋. The unshifted blocks of the stage use the same window and shift 0.
  """
  window = tuple(r if r <= window_size else window_size for r in grid)
  shift = tuple(0 if r <= w else window_size // 2 for r, w in zip(grid, window))
  return window, shift  # type: ignore[return-value]


def check_image_size(height: int, width: int, patch_size: int, window_size: int,
                     num_stages: int) -> list[tuple[int, int]]:
  """The feature size of each stage, or a ValueError saying which sizes would fit.

  The image must be divisible by patch_size·2^(num_stages−1) (each patch merging halves the map),
  and in every stage the feature size r must be a multiple of window_size or at most window_size
  (then the window shrinks to r). Any multiple of patch·window·2^(stages−1) fits (224 for Swin-T).
  """
  fit = patch_size * window_size * 2 ** (num_stages - 1)
  fix = (f"use a multiple of config.model.patch_size·window_size·2^{num_stages - 1} = {fit} "
         f"(or change config.model.window_size)")
  size = height if height == width else f"{height}x{width}"
  where = (f"config.data.image_size={size} does not fit Swin with "
           f"config.model.patch_size={patch_size}, config.model.window_size={window_size}, "
           f"{num_stages} stages")
  step = patch_size * 2 ** (num_stages - 1)
  if height % step or width % step:
    raise ValueError(f"{where}: it must be divisible by patch_size·2^{num_stages - 1} = {step}; "
                     f"{fix}")
  grids = [(height // patch_size // 2**i, width // patch_size // 2**i) for i in range(num_stages)]
  for i, grid in enumerate(grids):
    for r in grid:
      if r > window_size and r % window_size:
        raise ValueError(f"{where}: stage {i} has a {grid[0]}x{grid[1]} feature map, neither a "
                         f"multiple of the window nor at most the window; {fix}")
  return grids


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
  """[N, N] int, N = wh·ww: row of the bias table for (query, key) tokens of a window.

  Offsets (Δy, Δx) ∈ [−(wh−1), wh−1] × [−(ww−1), ww−1] shifted to start at 0 and flattened
  row-major: index = (Δy + wh − 1)·(2ww − 1) + (Δx + ww − 1) (the paper's B̂ indexing).
  """
  wh, ww = window
  ys, xs = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + wh - 1
  dx = xs[:, None] - xs[None, :] + ww - 1
  return dy * (2 * ww - 1) + dx


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """x: [B, H, W, C] -> [B·nW, wh·ww, C], windows row-major, tokens row-major inside.

  Uses only array methods, so a NumPy input stays NumPy (the mask is built at trace time)."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: jax.Array, window: tuple[int, int], grid: tuple[int, int]
                   ) -> jax.Array:
  """The inverse of `window_partition`: [B·nW, wh·ww, C] -> [B, H, W, C]."""
  (wh, ww), (h, w) = window, grid
  c = windows.shape[-1]
  x = windows.reshape(-1, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
                        ) -> np.ndarray:
  """[nW, N, N] float32: 0 where query and key come from the same region of the rolled map,
  MASK_VALUE elsewhere (paper Sec. 3.2, "efficient batch computation for shifted configuration").

  After rolling by −shift, the map splits per axis into [0, H−w), [H−w, H−s), [H−s, H): tokens
  of different regions are not neighbours in the image and must not attend to each other.
  """
  h, w = grid
  region = np.zeros((h, w), np.int64)
  bounds = lambda n, win, s: ((0, n - win), (n - win, n - s), (n - s, n))  # noqa: E731
  label = 0
  for y0, y1 in bounds(h, window[0], shift[0]):
    for x0, x1 in bounds(w, window[1], shift[1]):
      region[y0:y1, x0:x1] = label
      label += 1
  windows = window_partition(region[None, :, :, None], window)[..., 0]  # NumPy in, NumPy out
  same = windows[:, :, None] == windows[:, None, :]
  return np.where(same, 0.0, MASK_VALUE).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a relative position bias (paper Eq. 4)."""
  num_heads: int
  window: tuple[int, int]
  qkv_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, mask: Optional[np.ndarray]):
    """x: [B·nW, N, C] windows; mask: [nW, N, N] additive (shifted blocks) or None."""
    bw, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"Swin stage width {c} is not divisible by num_heads={self.num_heads}")
    hd = c // self.num_heads
    wh, ww = self.window
    table = self.param("relative_position_bias_table", dense_init,
                       ((2 * wh - 1) * (2 * ww - 1), self.num_heads), jnp.float32)
    bias = table[relative_position_index(self.window).reshape(-1)]
    bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)  # [heads, N, N]
    dense = functools.partial(nn.Dense, kernel_init=dense_init, dtype=self.dtype,
                              param_dtype=jnp.float32)
    qkv = dense(3 * c, use_bias=self.qkv_bias, name="qkv")(x).reshape(bw, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # float32 logits straight from the matmul (no bf16 rounding of q·k), float32 softmax.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * hd**-0.5 + bias
    if mask is not None:
      nw = mask.shape[0]
      logits = logits.reshape(bw // nw, nw, self.num_heads, n, n) + jnp.asarray(mask)[None, :, None]
      logits = logits.reshape(bw, self.num_heads, n, n)
    attn = jax.nn.softmax(logits, axis=-1)  # float32 softmax, also under bf16 compute
    out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v).reshape(bw, n, c)
    return dense(c, name="proj")(out)


class Mlp(nn.Module):
  """timm Mlp: fc1 → exact-erf GELU → fc2, Dense weights normal(0.02)."""
  hidden_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, kernel_init=dense_init, dtype=self.dtype,
                              param_dtype=jnp.float32)
    y = nn.gelu(dense(self.hidden_dim, name="fc1")(x), approximate=False)  # torch's exact GELU
    return dense(x.shape[-1], name="fc2")(y)


class SwinBlock(nn.Module):
  """x + attn(norm1(x)) over (shifted) windows; x + mlp(norm2(x)). timm `SwinTransformerBlock`."""
  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int]
  mlp_ratio: float
  qkv_bias: bool
  drop_path: float
  dtype: Any

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: [B, H, W, C] -> [B, H, W, C]."""
    _, h, w, c = x.shape
    norm = functools.partial(nn.LayerNorm, epsilon=LN_EPSILON, dtype=self.dtype,
                             param_dtype=jnp.float32)
    drop = DropPath(self.drop_path)
    shifted = any(self.shift)
    y = norm(name="norm1")(x)
    if shifted:  # cyclic shift towards the top-left (paper Fig. 4)
      y = jnp.roll(y, (-self.shift[0], -self.shift[1]), axis=(1, 2))
    mask = shifted_window_mask((h, w), self.window, self.shift) if shifted else None
    y = WindowAttention(self.num_heads, self.window, self.qkv_bias, self.dtype, name="attn")(
        window_partition(y, self.window), mask)
    y = window_reverse(y, self.window, (h, w))
    if shifted:
      y = jnp.roll(y, self.shift, axis=(1, 2))
    x = x + drop(y, train=train)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(norm(name="norm2")(x))
    return x + drop(y, train=train)


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, H/2, W/2, out_dim]: concatenate each 2×2 neighbourhood, LN, Linear.

  Channel order of the 4C vector: (0,0), (1,0), (0,1), (1,1) as (row, column) offsets, i.e.
  Microsoft's cat([x0, x1, x2, x3]) and timm 1.0's reshape-permute; the `reduction` weights of
  both load unchanged.
  """
  out_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)  # (.., dx, dy, C)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(x)
    return nn.Dense(self.out_dim, use_bias=False, kernel_init=dense_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name="reduction")(x)


class PatchEmbed(nn.Module):
  """timm PatchEmbed with norm: `proj` conv p×p stride p, then `norm` LayerNorm; NHWC out."""
  patch_size: int
  embed_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                dtype=self.dtype, param_dtype=jnp.float32, name="proj")(x)
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                        name="norm")(x)


class SwinStage(nn.Module):
  """timm `SwinTransformerStage`: optional `downsample` (PatchMerging) then `blocks_{j}`; odd
  blocks shifted by ⌊w/2⌋ unless the map is no larger than the window."""
  depth: int
  num_heads: int
  out_dim: int
  downsample: bool
  window_size: int
  mlp_ratio: float
  qkv_bias: bool
  drop_path: tuple[float, ...]
  dtype: Any

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: [B, H, W, C_in] -> [B, H', W', out_dim] (H' = H/2 with downsample)."""
    if self.downsample:
      x = PatchMerging(self.out_dim, self.dtype, name="downsample")(x)
    window, shift = stage_windows(x.shape[1:3], self.window_size)
    for j in range(self.depth):
      x = SwinBlock(self.num_heads, window, shift if j % 2 else (0, 0), self.mlp_ratio,
                    self.qkv_bias, self.drop_path[j], self.dtype, name=f"blocks_{j}")(x,
                                                                                     train=train)
    return x


class SwinTransformer(nn.Module):
  """Swin backbone without the classifier (timm `SwinTransformer(num_classes=0)`).

  Attributes:
    patch_size: p (4); the image must pass `check_image_size`.
    embed_dim: C of stage 0; stage i has C·2^i channels.
    depths, num_heads: blocks and attention heads per stage.
    window_size: w (7); clamped per stage as described in the module docstring.
    mlp_ratio, qkv_bias: as timm.
    drop_path_rate: stochastic depth, linear over all blocks from 0 (timm); needs the "dropout"
      rng when > 0 and train.
    dtype: compute dtype; parameters stay float32.
  """
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @property
  def num_layers(self) -> int:
    """Σ depths: the number of blocks (layer-wise lr decay counts these)."""
    return int(sum(self.depths))

  @nn.compact
  def __call__(self, x, *, train: bool, token_mask: Optional[jax.Array] = None,
               mask_token: Optional[jax.Array] = None) -> dict:
    """x: [B, H, W, 3] float; token_mask: [B, N] bool (N = (H/p)·(W/p), row-major; True =
    masked) with mask_token: [C] float (SimMIM), or both None.

    Returns dict(
      pooled [B, 8C] float32: global average of the final normed map (timm's pre-logits),
      feature_map [B, H/(8p), W/(8p), 8C]: last stage after the final norm,
      stages: the 4 stage outputs [B, H/(p·2^i), W/(p·2^i), C·2^i] (before the final norm),
      patch_embed [B, H/p, W/p, C]: the normed patch embeddings after masking).
    """
    depths, heads = tuple(self.depths), tuple(self.num_heads)
    if len(depths) != len(heads) or not depths:
      raise ValueError(f"SwinTransformer.depths={depths} and num_heads={heads} must be non-empty "
                       "and of the same length")
    b, height, width, _ = x.shape
    p, c = self.patch_size, self.embed_dim
    grids = check_image_size(height, width, p, self.window_size, len(depths))
    n = grids[0][0] * grids[0][1]
    if (token_mask is None) != (mask_token is None):
      raise ValueError("pass token_mask and mask_token together (SimMIM masking), or neither")

    x = jnp.asarray(x, self.dtype)
    # Step 1) patch embedding: conv p×p/p then LayerNorm (timm PatchEmbed with norm_layer).
    x = PatchEmbed(p, c, self.dtype, name="patch_embed")(x)
    # Step 2) SimMIM: masked patch embeddings -> the mask token (after the embedding norm).
    if token_mask is not None:
      if tuple(token_mask.shape) != (b, n):
        raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}; expected [B, N] = "
                         f"{(b, n)} for a {height}x{width} image with patch_size={p}")
      if int(np.prod(jnp.shape(mask_token))) != c:
        raise ValueError(f"mask_token has shape {tuple(jnp.shape(mask_token))}; expected [{c}] "
                         "(embed_dim)")
      token = jnp.reshape(jnp.asarray(mask_token, self.dtype), (c,))
      x = jnp.where(token_mask.reshape(b, *grids[0], 1), token, x)
    embedded = x

    # Step 3) stages: patch merging (stages 1..), then blocks alternating W-MSA / SW-MSA.
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
    stages = []
    for i, (depth, nh) in enumerate(zip(depths, heads)):
      x = SwinStage(depth=depth, num_heads=nh, out_dim=c * 2**i, downsample=i > 0,
                 window_size=self.window_size, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                 drop_path=tuple(float(r) for r in rates[sum(depths[:i]):sum(depths[:i + 1])]),
                 dtype=self.dtype, name=f"layers_{i}")(x, train=train)
      stages.append(x)
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return {"pooled": pooled, "feature_map": x, "stages": tuple(stages), "patch_embed": embedded}


# name -> (embed_dim, depths, num_heads), timm's swin_{tiny,small,base}_patch4_window7_224.
SIZES = {"swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
         "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
         "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32))}


def _swin(size: str, **kwargs) -> SwinTransformer:
  embed_dim, depths, num_heads = SIZES[size]
  fields = {"embed_dim": embed_dim, "depths": depths, "num_heads": num_heads, **kwargs}
  # Config files and config.json give lists; module fields stay hashable tuples.
  for key in ("depths", "num_heads"):
    fields[key] = tuple(int(v) for v in fields[key])
  return SwinTransformer(**fields)


swin_tiny = functools.partial(_swin, "swin_tiny")
swin_small = functools.partial(_swin, "swin_small")
swin_base = functools.partial(_swin, "swin_base")
