"""DetCon mask handling: segment ids → feature-grid ids → sampled ROIs → pooled ROI features.

The official DetCon code one-hot encodes the masks at full image resolution, average-pools them
to the 7×7 feature grid and takes the argmax. A full-resolution one-hot costs B·H·W·num_ids memory
and dominated DetCon's overhead in a PyTorch peer; here each grid cell's pixels are *counted* per
id with one scatter-add (`segment_sum`), which gives the same pooled values (counts / cell area)
at O(B·H·W) cost.

Conventions: ids are int; ids < 0 mean "ignore" (padding, unlabelled) and are never counted or
sampled. Ids ≥ num_ids are ignored too (like `jax.nn.one_hot`), so choose num_ids above the
largest id (config.data.max_segments).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _cell_counts(masks: jax.Array, grid_size: int, num_ids: int) -> jax.Array:
  """masks: [B, H, W] int -> [B, g*g, num_ids] int32 pixel counts of each id in each grid cell.

  One scatter-add per example (`vmap`): the batch axis stays a batch axis of the scatter, so
  under data parallelism every device counts its own examples and no collective is needed. (A
  single `segment_sum` over the flattened global batch makes every device build the global
  counts, which XLA then all-reduces: ~200 MB per step at batch 4096.)
  """
  if masks.ndim != 3:
    raise ValueError(f"masks must be [B, H, W], got shape {masks.shape}")
  _, h, w = masks.shape
  if grid_size <= 0 or h % grid_size or w % grid_size:
    raise ValueError(f"mask size {h}x{w} is not divisible by the feature grid size {grid_size};"
                     " resize the masks (nearest) to a multiple of the grid size")
  g = grid_size
  ch, cw = h // g, w // g
  cell = (jnp.arange(h) // ch)[:, None] * g + (jnp.arange(w) // cw)[None, :]   # [H, W]
  num_segments = g * g * num_ids

  def one(mask):  # [H, W] -> [g*g, num_ids]
    ids = mask.astype(jnp.int32)
    valid = (ids >= 0) & (ids < num_ids)
    # Ignored pixels go to one extra trailing segment that is dropped afterwards.
    segment = jnp.where(valid, cell * num_ids + ids, num_segments)
    counts = jax.ops.segment_sum(jnp.ones(segment.size, jnp.int32), segment.reshape(-1),
                                 num_segments=num_segments + 1)
    return counts[:num_segments].reshape(g * g, num_ids)

  return jax.vmap(one)(masks)


def masks_to_grid(masks: jax.Array, grid_size: int, num_ids: int) -> jax.Array:
  """Hard assignment of each feature-grid cell to one segment id (official DetCon).

  Equal to one-hot(masks) → average pool to g×g → argmax over ids (ties → lowest id), computed
  from per-cell pixel counts instead of a full-resolution one-hot.

  Args:
    masks: [B, H, W] int segment ids; H and W divisible by grid_size; ids < 0 ignored.
    grid_size: g, the side of the backbone's feature grid (7 for ResNet-50 at 224 px).
    num_ids: ids in [0, num_ids) are counted.

  Returns:
    [B, g, g] int32 ids; −1 for a cell whose pixels are all ignored.
  """
  counts = _cell_counts(masks, grid_size, num_ids)
  ids = jnp.argmax(counts, axis=-1).astype(jnp.int32)
  ids = jnp.where(jnp.max(counts, axis=-1) > 0, ids, -1)
  return ids.reshape(masks.shape[0], grid_size, grid_size)


def masks_to_grid_soft(masks: jax.Array, grid_size: int, num_ids: int) -> jax.Array:
  """Soft assignment (the paper's average-pooled masks): fraction of each cell's pixels per id.

  Args:
    masks: [B, H, W] int segment ids; H and W divisible by grid_size; ids < 0 ignored.
    grid_size: g.
    num_ids: ids in [0, num_ids) are counted.

  Returns:
    [B, g*g, num_ids] float32; a row sums to the fraction of the cell's pixels not ignored.
  """
  counts = _cell_counts(masks, grid_size, num_ids)
  area = (masks.shape[1] // grid_size) * (masks.shape[2] // grid_size)
  return counts.astype(jnp.float32) / area


def present_ids(grid_ids: jax.Array, num_ids: int) -> jax.Array:
  """grid_ids: [B, G] (or [B, g, g]) int -> [B, num_ids] bool, whether each id wins a grid cell
  (the ids hard pooling can sample)."""
  grid_ids = grid_ids.reshape(grid_ids.shape[0], -1)
  return jnp.any(grid_ids[:, :, None] == jnp.arange(num_ids)[None, None, :], axis=1)


def present_ids_soft(weights: jax.Array) -> jax.Array:
  """weights: [B, G, num_ids] from `masks_to_grid_soft` -> [B, num_ids] bool, whether each id has
  a positive soft weight in some cell (the ids soft pooling can sample: an id that covers part of
  a cell without winning it still pools to a non-zero vector)."""
  return jnp.any(weights > 0, axis=1)


def sample_present_ids(rng: jax.Array, present: jax.Array, num_samples: int) -> jax.Array:
  """present: [B, num_ids] bool -> [B, R] int32 ids drawn uniformly with replacement among the
  present ids of each example; all −1 for an example with none.

  Official DetCon: categorical over log(present), i.e. uniform over the present ids.
  """
  logits = jnp.where(present, 0.0, -jnp.inf)
  samples = jax.random.categorical(rng, logits, axis=-1,
                                   shape=(num_samples, present.shape[0])).T
  return jnp.where(jnp.any(present, axis=-1, keepdims=True), samples, -1).astype(jnp.int32)


def sample_mask_ids(rng: jax.Array, grid_ids: jax.Array, num_ids: int,
                    num_samples: int = 16) -> jax.Array:
  """Per example, `num_samples` ids drawn uniformly with replacement among the ids in its grid.

  Args:
    rng: PRNG key.
    grid_ids: [B, G] (or [B, g, g]) int ids of one view's feature grid; −1 cells are ignored.
    num_ids: ids lie in [0, num_ids).
    num_samples: R, 16 in DetCon.

  Returns:
    [B, R] int32; all −1 for an example with no id present.
  """
  return sample_present_ids(rng, present_ids(grid_ids, num_ids), num_samples)


def sample_shared_mask_ids(rng: jax.Array, grid_ids1: jax.Array, grid_ids2: jax.Array,
                           num_ids: int, num_samples: int = 16) -> jax.Array:
  """One sample per example among the ids present in *both* views (FIDELITY 3b option).

  Every ROI then has a positive in the other view, unless the views share no id (−1s).

  Args:
    rng: PRNG key.
    grid_ids1, grid_ids2: [B, G] int ids of the two views' feature grids.
    num_ids: ids lie in [0, num_ids).
    num_samples: R.

  Returns:
    [B, R] int32 ids used for both views.
  """
  present = present_ids(grid_ids1, num_ids) & present_ids(grid_ids2, num_ids)
  return sample_present_ids(rng, present, num_samples)


def _pool(features: jax.Array, weights: jax.Array) -> jax.Array:
  """features: [B, P, C], weights: [B, R, P] >= 0 -> area-normalised mean [B, R, C]."""
  area = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.maximum(area, 1e-12)
  return jnp.einsum("brp,bpc->brc", weights.astype(features.dtype), features)


def mask_pool(features: jax.Array, grid_ids: jax.Array, sample_ids: jax.Array) -> jax.Array:
  """Mean feature vector over the grid cells of each sampled id (hard masks).

  Args:
    features: [B, h, w, C] float backbone feature map.
    grid_ids: [B, h, w] (or [B, h*w]) int cell ids from `masks_to_grid`.
    sample_ids: [B, R] int sampled ids; a negative id pools to the zero vector.

  Returns:
    [B, R, C]: Σ_cells [id = s] f / #cells with id s; zero where no cell has the id.
  """
  b, c = features.shape[0], features.shape[-1]
  flat = features.reshape(b, -1, c)
  grid_ids = grid_ids.reshape(b, -1)
  hit = (grid_ids[:, None, :] == sample_ids[:, :, None]) & (sample_ids >= 0)[:, :, None]
  return _pool(flat, hit.astype(jnp.float32))


def mask_pool_soft(features: jax.Array, weights: jax.Array, sample_ids: jax.Array) -> jax.Array:
  """Weighted mean feature vector of each sampled id with soft cell weights (paper variant).

  Args:
    features: [B, h, w, C] float backbone feature map.
    weights: [B, h*w, num_ids] float from `masks_to_grid_soft`.
    sample_ids: [B, R] int sampled ids; a negative id pools to the zero vector.

  Returns:
    [B, R, C]: Σ_cells m_s f / Σ_cells m_s, with m_s the soft weight of id s.
  """
  b, c = features.shape[0], features.shape[-1]
  flat = features.reshape(b, -1, c)
  safe = jnp.clip(sample_ids, 0, weights.shape[-1] - 1)
  picked = jnp.take_along_axis(weights, safe[:, None, :], axis=-1)   # [B, P, R]
  picked = picked * (sample_ids >= 0)[:, None, :]
  return _pool(flat, jnp.swapaxes(picked, 1, 2).astype(jnp.float32))
