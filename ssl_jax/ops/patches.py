"""Which patches a ViT sees: chunking (Masked MoCo/BYOL) and masking (MAE, ccMIM, SimMIM, MimCo).

Every function is a pure function of its arguments (a PRNG key where it is random), batched over
a leading B axis, jit-safe (shapes depend only on static Python numbers) and returns int32
indices. Each draws the whole batch's randomness from its one key; do not `vmap` them over
per-example keys: with "rbg" keys a vmapped draw takes every example's bits from the first key
(JAX's `rng_bit_generator` batching rule), so all examples would share one mask. Patch indices are row-major over the patch grid, as `models.vit.patchify` and the ViT's
token order.

Index conventions, MAE's (`models_mae.random_masking`):
  * `ids_shuffle [B, N]`: a per-example permutation of the N patches; the first `num_keep` are
    visible (`keep_indices`), the rest are masked (`mask_indices`).
  * `restore [B, N]` = argsort(ids_shuffle) (MAE's `ids_restore`): the position of patch i in the
    shuffled order, so `take_along_axis(concat(visible, masked), restore)` puts tokens back in
    patch order (what the MAE decoder does).
  * `mask [B, N]` bool in the original patch order, True = masked (MAE's 1 = remove).

The masking functions keep `num_keep = int(N · (1 − mask_ratio))` patches (MAE's `len_keep`,
floor), so random, block and importance masking hide exactly the same number of patches and the
ccMIM ablation over dividing strategies compares like with like. SimMIM's own generator
(`simmim_mask`) counts the other way round, as its code does: ceil(T · ratio) masked.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Masking(NamedTuple):
  """A split of each example's N patches into a visible and a masked set.

  Attributes:
    keep_indices: [B, K_keep] int32 visible patches (feed to the ViT's `keep_indices`).
    mask_indices: [B, N − K_keep] int32 masked patches.
    restore: [B, N] int32, argsort of concat(keep_indices, mask_indices) (MAE's `ids_restore`).
    mask: [B, N] bool in patch order, True = masked.
  """
  keep_indices: jax.Array
  mask_indices: jax.Array
  restore: jax.Array
  mask: jax.Array


def _check_ratio(mask_ratio: float) -> None:
  if not 0.0 <= mask_ratio <= 1.0:
    raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1]")


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """K_keep = int(N · (1 − mask_ratio)), MAE's `len_keep` (floor): 196 patches at 0.75 keep 49."""
  _check_ratio(mask_ratio)
  return int(num_patches * (1 - mask_ratio))


def _check_positive(name: str, value: int) -> None:
  if int(value) != value or value < 1:
    raise ValueError(f"{name}={value} must be a positive integer")


def _shuffle_order(rng: jax.Array, batch_size: int, num_patches: int) -> jax.Array:
  """[B, N] int32 per-example permutations: argsort of uniform noise (MAE's `ids_shuffle`)."""
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  return jnp.argsort(noise, axis=1).astype(jnp.int32)


def masking_from_order(ids_shuffle: jax.Array, num_keep: int) -> Masking:
  """The `Masking` whose first `num_keep` patches of each row of `ids_shuffle` stay visible.

  Args:
    ids_shuffle: [B, N] int, a permutation of arange(N) in every row.
    num_keep: K_keep, 0 ≤ K_keep ≤ N (static).

  Returns:
    Masking with keep_indices = ids_shuffle[:, :K_keep], mask_indices = ids_shuffle[:, K_keep:],
    restore = the inverse permutation (a scatter, equal to argsort(ids_shuffle)), and
    mask = restore ≥ K_keep.
  """
  b, n = ids_shuffle.shape
  if not 0 <= num_keep <= n:
    raise ValueError(f"num_keep={num_keep} must be in [0, {n}]")
  ids_shuffle = ids_shuffle.astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  restore = jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], ids_shuffle].set(positions)
  return Masking(keep_indices=ids_shuffle[:, :num_keep], mask_indices=ids_shuffle[:, num_keep:],
                 restore=restore, mask=restore >= num_keep)


def gather_patches(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Per-example gather along the patch axis.

  Args:
    x: [B, N, ...] patches or tokens.
    indices: [B, K] or [B, n, K] int patch indices.

  Returns:
    [B, K, ...] or [B, n, K, ...]: out[b, (c,) k] = x[b, indices[b, (c,) k]].
  """
  if indices.ndim not in (2, 3) or indices.shape[0] != x.shape[0]:
    raise ValueError(f"indices must be [B, K] or [B, n, K] with B={x.shape[0]}, got shape "
                     f"{indices.shape}")
  flat = indices.reshape(x.shape[0], -1).astype(jnp.int32)
  flat = flat.reshape(flat.shape + (1,) * (x.ndim - 2))
  out = jnp.take_along_axis(x, flat, axis=1)
  return out.reshape(indices.shape + x.shape[2:])


# ---------------------------------------------------------------- chunking (Masked MoCo/BYOL)


def chunk_indices(rng: Optional[jax.Array], batch_size: int, num_patches: int, num_chunks: int,
                  shuffle: bool = True) -> tuple[jax.Array, int]:
  """Masked MoCo/BYOL's masking (paper Sec. 3.2, Fig. 2): shuffle the patches, cut n equal chunks.

  Each example gets its own keyed shuffle (argsort of uniform noise, as MAE); the shuffled
  sequence is cut into n consecutive chunks of K = N // n patches. When n does not divide N the
  paper gives no rule; here the last N − n·K patches of the *shuffled* order are dropped (a
  random subset, different per example and step), so every chunk is a uniform random K-subset,
  the chunks are disjoint and no padding token is needed. The number dropped is returned.

  Args:
    rng: PRNG key (unused, may be None, when shuffle=False).
    batch_size: B.
    num_patches: N, the ViT's patch count.
    num_chunks: n, 1 ≤ n ≤ N.
    shuffle: False keeps patch order (chunk c = patches c·K … c·K + K − 1), so n = 1 without
      shuffling is the full image in order (Masked MoCo with n = 1 is MoCo v3).

  Returns:
    (indices [B, n, K] int32, dropped = N − n·K, a Python int).
  """
  _check_positive("num_patches", num_patches)
  _check_positive("num_chunks", num_chunks)
  if num_chunks > num_patches:
    raise ValueError(f"num_chunks={num_chunks} exceeds num_patches={num_patches}; every chunk "
                     "needs at least one patch")
  k = num_patches // num_chunks
  if shuffle:
    if rng is None:
      raise ValueError("chunk_indices(shuffle=True) needs a PRNG key rng")
    order = _shuffle_order(rng, batch_size, num_patches)
  else:
    order = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), (batch_size, num_patches))
  indices = order[:, :num_chunks * k].reshape(batch_size, num_chunks, k)
  return indices, num_patches - num_chunks * k


# ---------------------------------------------------------------- masking (MAE, ccMIM)


def random_masking(rng: jax.Array, batch_size: int, num_patches: int,
                   mask_ratio: float) -> Masking:
  """MAE's per-example random masking (He et al. 2022, Sec. 3; `models_mae.random_masking`).

  ids_shuffle = argsort(u), u ~ U[0, 1)^[B, N]; the first int(N·(1 − mask_ratio)) stay visible.
  Visible patches are therefore in random order (irrelevant to a ViT with position embeddings).

  Args:
    rng: PRNG key.
    batch_size: B.
    num_patches: N.
    mask_ratio: fraction masked, in [0, 1] (MAE 0.75).

  Returns:
    Masking (see the class).
  """
  _check_positive("num_patches", num_patches)
  num_keep = num_visible(num_patches, mask_ratio)
  return masking_from_order(_shuffle_order(rng, batch_size, num_patches), num_keep)


def _beit_blocks(rng: jax.Array, batch_size: int, grid: tuple[int, int], num_mask: int,
                 min_num_patches: int, max_num_patches: int, log_aspect: tuple[float, float],
                 max_failures: int) -> jax.Array:
  """BEiT's `MaskingGenerator.__call__` for B examples at once: [B, h, w] bool, ≤ num_mask True.

  One batched loop with one key per iteration drawing [B] values, not a vmap over per-example
  keys: under vmap, "rbg" keys generate every example's bits from the first key only (JAX's
  `rng_bit_generator` batching rule), which would correlate the examples.
  """
  height, width = grid
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]

  def cond(state):
    _, count, failures, _ = state
    return jnp.any((count < num_mask) & (failures < max_failures))

  def body(state):
    mask, count, failures, key = state
    key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    active = (count < num_mask) & (failures < max_failures)
    max_mask = jnp.minimum(num_mask - count, max_num_patches).astype(jnp.float32)
    # random.uniform(a, b) = a + (b − a)·U, also for b < a (BEiT relies on that near the end).
    area = min_num_patches + (max_mask - min_num_patches) * jax.random.uniform(k_area,
                                                                               (batch_size,))
    aspect = jnp.exp(jax.random.uniform(k_aspect, (batch_size,), minval=log_aspect[0],
                                        maxval=log_aspect[1]))
    # jnp.round is round-half-to-even like Python's round.
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w < width) & (h < height)
    # random.randint(0, H − h) includes both ends: floor(U · (H − h + 1)).
    top = jnp.floor(jax.random.uniform(k_top, (batch_size,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch_size,)) * (width - w + 1)).astype(jnp.int32)
    top, left, h, w = (v[:, None, None] for v in (top, left, h, w))
    rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    new = jnp.sum(rect & ~mask, axis=(1, 2), dtype=jnp.int32)
    accept = active & fits & (new > 0) & (new <= max_mask)
    mask = jnp.where(accept[:, None, None], mask | rect, mask)
    count = count + jnp.where(accept, new, 0)
    failures = jnp.where(accept, 0, failures + active)
    return mask, count, failures, key

  zeros = jnp.zeros((batch_size,), jnp.int32)
  init = (jnp.zeros((batch_size, height, width), bool), zeros, zeros, rng)
  return jax.lax.while_loop(cond, body, init)[0]


def block_masking(rng: jax.Array, batch_size: int, grid: Sequence[int], mask_ratio: float,
                  min_num_patches: int = 16, max_num_patches: Optional[int] = None,
                  min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                  max_failures: int = 10) -> Masking:
  """BEiT's blockwise masking (Bao et al. 2022, Alg. 1; unilm `beit/masking_generator.py`).

  Per example, as BEiT's `MaskingGenerator`: repeat { area ~ U(min_num_patches, M) with
  M = min(remaining, max_num_patches); aspect r = exp(U(log min_aspect, log max_aspect));
  h = round(√(area·r)), w = round(√(area/r)); if h < H and w < W, place the h×w block at a
  uniform top-left corner and accept it when it adds between 1 and M new patches } until the
  target count is reached or `max_failures` (BEiT: 10) consecutive attempts add nothing. ccMIM's
  block-wise ablation uses this with min_num_patches=16 (its Sec. 4.3).

  Exact count (our addition, documented): BEiT stops early when no block fits, leaving fewer than
  the target masked. Here the masked set is then topped up with patches drawn uniformly at random
  among the unmasked ones (and, were the blocks ever to overshoot, trimmed uniformly at random
  among the block patches), so exactly N − int(N·(1 − mask_ratio)) patches are masked, the same
  count as `random_masking`. Implemented as one ascending sort of `2·in_block + u`, u ~ U[0, 1).

  Args:
    rng: PRNG key.
    batch_size: B.
    grid: (H, W) patch grid, N = H·W.
    mask_ratio: fraction masked, in [0, 1].
    min_num_patches: smallest block area (BEiT and ccMIM: 16).
    max_num_patches: largest block area; None = the target count (BEiT's default).
    min_aspect: smallest aspect ratio (BEiT 0.3); max_aspect None = 1 / min_aspect.
    max_failures: consecutive failed placements that end the block loop (BEiT 10).

  Returns:
    Masking; keep_indices in random order (the ascending sort of the noise).
  """
  if len(grid) != 2:
    raise ValueError(f"grid={grid} must be (height, width) in patches")
  height, width = int(grid[0]), int(grid[1])
  _check_positive("grid height", height)
  _check_positive("grid width", width)
  _check_positive("min_num_patches", min_num_patches)
  _check_positive("max_failures", max_failures)
  if min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
    raise ValueError(f"need 0 < min_aspect={min_aspect} <= max_aspect={max_aspect}")
  n = height * width
  num_keep = num_visible(n, mask_ratio)
  num_mask = n - num_keep
  max_num_patches = num_mask if max_num_patches is None else max_num_patches
  if max_num_patches < 0:
    raise ValueError(f"max_num_patches={max_num_patches} must be >= 0")
  max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
  log_aspect = (math.log(min_aspect), math.log(max_aspect))
  k_blocks, k_noise = jax.random.split(rng)
  blocks = _beit_blocks(k_blocks, batch_size, (height, width), num_mask, min_num_patches,
                        max_num_patches, log_aspect, max_failures)
  score = 2.0 * blocks.reshape(batch_size, n) + jax.random.uniform(k_noise, (batch_size, n))
  return masking_from_order(jnp.argsort(score, axis=1), num_keep)


def importance_masking(importance: jax.Array, mask_ratio: float) -> Masking:
  """ccMIM's deterministic "importance" dividing (Sec. 3.2, Table 5 row "importance").

  The int(N·(1 − mask_ratio)) *least* important patches stay visible; the most important are
  masked (so reconstruction is harder). ids_shuffle = argsort(importance) ascending; ties go to
  the lower patch index first.

  Args:
    importance: [B, N] float, e.g. `attention_importance(...)`.
    mask_ratio: fraction masked, in [0, 1] (ccMIM 0.75).

  Returns:
    Masking.
  """
  if importance.ndim != 2:
    raise ValueError(f"importance must be [B, N], got shape {importance.shape}")
  num_keep = num_visible(importance.shape[1], mask_ratio)
  return masking_from_order(jnp.argsort(importance, axis=1, stable=True), num_keep)


def importance_sampling(rng: Optional[jax.Array], importance: jax.Array, mask_ratio: float,
                        noise: bool = True) -> Masking:
  """ccMIM's default dividing: importance sampling (Sec. 3.2; official `get_mask_idx`).

  Official code (Sherrylone/ccMIM `models_ccmim.py`), with a = importance [B, N] the raw sum over
  blocks of head-averaged attention (`attention_importance`, not normalised):

      s = softmax(a, axis=patches) / softmax(u, axis=patches),  u ~ U[0, 1)^[B, N]  (torch.rand)
      ids_shuffle = argsort(s) ascending;  first int(N·(1 − ratio)) visible.

  Both softmaxes are over the patch axis with temperature 1, the noise is uniform (not Gumbel),
  and the importance is softmaxed once (by this function: pass the raw sum). Since
  s_i = exp(a_i − u_i) · c with c constant per example, the order of s is the order of a − u;
  this function sorts by a − u, the same permutation without exp under/overflow. So the noise
  perturbs the importance by at most 1: its effect depends on the scale of a (a sum of 12
  blocks' attention in [0, 12] for the official reading, small and nearly flat early in
  training, hence nearly random masking then; see the paper's Sec. 4.3 discussion). The masked set
  is biased towards *important* patches; the least important stay visible.

  Args:
    rng: PRNG key for u (unused, may be None, with noise=False).
    importance: [B, N] float raw importance a.
    mask_ratio: fraction masked, in [0, 1] (ccMIM 0.75).
    noise: False drops u (u = 0), which gives exactly `importance_masking(importance, ratio)`.

  Returns:
    Masking.
  """
  if importance.ndim != 2:
    raise ValueError(f"importance must be [B, N], got shape {importance.shape}")
  if noise:
    if rng is None:
      raise ValueError("importance_sampling(noise=True) needs a PRNG key rng")
    u = jax.random.uniform(rng, importance.shape)
  else:
    u = jnp.zeros(importance.shape, jnp.float32)
  score = importance.astype(jnp.float32) - u
  return masking_from_order(jnp.argsort(score, axis=1, stable=True),
                            num_visible(importance.shape[1], mask_ratio))


def attention_importance(cls_attention: jax.Array, reduce: str = "sum") -> jax.Array:
  """Patch importance from a ViT's CLS attention (ccMIM Sec. 3.2).

  Input is the ViT's `cls_attention` output, whose direction is chosen by its
  `return_attention` argument:
    * "cls_key" — patch queries → CLS key, attn[b, h, 1 + i, 0]: what the official ccMIM code
      reads (`basic_module.Attention` returns `attn.mean(dim=1)[:, 1:, 0]`, head-averaged
      softmax probabilities). Each entry is a different query's share for the CLS key.
    * "cls_query" — CLS query → patch keys, attn[b, h, 0, 1 + i]: the paper's Eq. 4 direction.
      Eq. 4 averages the *logits* q₀K₁:ᵀ/√D over heads and then applies a softmax over the patch
      keys only; here the softmax probabilities (whose softmax also covers the CLS key) are
      averaged over heads instead, so the paper's option is its direction, not its exact formula.

  Official reduction (`get_mask_idx`): a no-grad forward of the current encoder over all tokens,
  summing the head-averaged attention over *all* blocks: importance = Σ_blocks mean_heads attn.
  The softmax of `importance_sampling` is applied afterwards, not here.

  Args:
    cls_attention: [L, B, heads, N] (or [L, B, n, heads, K] from a chunked ViT) float.
    reduce: "sum" over blocks (official), "mean" over blocks, or "last" (last block only).

  Returns:
    [B, N] (or [B, n, K]) float32; stop_gradient is the caller's (the official code uses
    torch.no_grad).
  """
  if cls_attention.ndim not in (4, 5):
    raise ValueError("cls_attention must be [depth, B, heads, N] or [depth, B, n, heads, K], got "
                     f"shape {cls_attention.shape}")
  per_block = jnp.mean(cls_attention.astype(jnp.float32), axis=-2)
  if reduce == "sum":
    return jnp.sum(per_block, axis=0)
  if reduce == "mean":
    return jnp.mean(per_block, axis=0)
  if reduce == "last":
    return per_block[-1]
  raise ValueError(f"reduce={reduce!r} must be 'sum', 'mean' or 'last'")


# ---------------------------------------------------------------- SimMIM / MimCo


def simmim_mask(rng: jax.Array, batch_size: int, image_size, model_patch_size: int,
                mask_patch_size: int = 32, mask_ratio: float = 0.6) -> jax.Array:
  """SimMIM's random masking (Xie et al. 2022, Sec. 3.1; official `data_simmim.MaskGenerator`).

  The image is cut into T = (H/32)·(W/32) mask patches; exactly ceil(T · mask_ratio) of them,
  chosen uniformly per example, are masked (SimMIM's `mask_count = int(np.ceil(...))`), and each
  is spread over the (32/p)² model patches it covers (p = 16 for ViT-B/16, 4 for Swin). MimCo uses
  the same generator (its Sec. 4.1).

  Args:
    rng: PRNG key.
    batch_size: B.
    image_size: int or (H, W) pixels, divisible by mask_patch_size.
    model_patch_size: p, the backbone's patch size; must divide mask_patch_size.
    mask_patch_size: the masking granularity (SimMIM 32).
    mask_ratio: fraction of mask patches masked, in [0, 1] (SimMIM 0.6).

  Returns:
    token_mask [B, (H/p)·(W/p)] bool, True = masked, row-major over the model's patch grid (the
    ViT/Swin `token_mask` input).
  """
  _check_ratio(mask_ratio)
  height, width = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
  _check_positive("model_patch_size", model_patch_size)
  _check_positive("mask_patch_size", mask_patch_size)
  if height % mask_patch_size or width % mask_patch_size:
    raise ValueError(f"image_size={image_size} is not divisible by mask_patch_size="
                     f"{mask_patch_size}")
  if mask_patch_size % model_patch_size:
    raise ValueError(f"mask_patch_size={mask_patch_size} is not divisible by model_patch_size="
                     f"{model_patch_size}")
  gh, gw = height // mask_patch_size, width // mask_patch_size
  count = int(np.ceil(gh * gw * mask_ratio))
  order = _shuffle_order(rng, batch_size, gh * gw)
  masking = masking_from_order(order, gh * gw - count)
  scale = mask_patch_size // model_patch_size
  coarse = masking.mask.reshape(batch_size, gh, gw)
  fine = jnp.repeat(jnp.repeat(coarse, scale, axis=1), scale, axis=2)
  return fine.reshape(batch_size, gh * scale * gw * scale)


def mask_to_pixels(mask: jax.Array, grid: Sequence[int], patch_size: int) -> jax.Array:
  """Per-patch mask [B, h·w] → per-pixel mask [B, h·p, w·p] (SimMIM's `repeat_interleave`).

  Args:
    mask: [B, h·w] bool or float, row-major over the patch grid.
    grid: (h, w).
    patch_size: p.

  Returns:
    [B, h·p, w·p], same dtype as mask.
  """
  h, w = grid
  if mask.ndim != 2 or mask.shape[1] != h * w:
    raise ValueError(f"mask must be [B, {h * w}] for grid {tuple(grid)}, got shape {mask.shape}")
  x = mask.reshape(mask.shape[0], h, w)
  return jnp.repeat(jnp.repeat(x, patch_size, axis=1), patch_size, axis=2)
