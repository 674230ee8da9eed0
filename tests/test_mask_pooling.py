"""Mask → grid, id sampling and mask pooling vs brute-force NumPy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.ops import mask_pooling


def np_grid(masks, g, num_ids, soft=False):
  """Full-resolution one-hot → average pool → argmax (the official DetCon recipe)."""
  b, h, w = masks.shape
  onehot = np.zeros((b, h, w, num_ids))
  for i in range(num_ids):
    onehot[..., i] = masks == i  # ids < 0 or >= num_ids: all-zero rows
  ch, cw = h // g, w // g
  pooled = onehot.reshape(b, g, ch, g, cw, num_ids).mean(axis=(2, 4))  # [B, g, g, K]
  if soft:
    return pooled.reshape(b, g * g, num_ids)
  ids = np.argmax(pooled, axis=-1)  # first maximum: lowest id on ties
  return np.where(pooled.max(-1) > 0, ids, -1)


jit_grid = jax.jit(mask_pooling.masks_to_grid, static_argnums=(1, 2))
jit_soft = jax.jit(mask_pooling.masks_to_grid_soft, static_argnums=(1, 2))


@pytest.mark.parametrize("b,h,w,g,num_ids", [(2, 14, 21, 7, 5), (1, 8, 8, 2, 3),
                                             (3, 12, 12, 1, 40)])
def test_masks_to_grid_matches_bruteforce(b, h, w, g, num_ids):
  rng = np.random.default_rng(h * w + g)
  masks = rng.integers(-1, num_ids + 2, (b, h, w)).astype(np.int32)  # incl. ignore/out of range
  got = np.asarray(jit_grid(jnp.asarray(masks), g, num_ids))
  np.testing.assert_array_equal(got, np_grid(masks, g, num_ids))
  got_soft = np.asarray(jit_soft(jnp.asarray(masks), g, num_ids))
  np.testing.assert_allclose(got_soft, np_grid(masks, g, num_ids, soft=True), atol=1e-6)


def test_masks_to_grid_ties_and_ignore():
  # 2x2 grid of 2x2 cells: tie 3 vs 1 -> 1; tie 2 vs ignore -> 2; all ignored -> -1; single 4.
  masks = np.array([[[3, 1, 2, -1],
                     [1, 3, -1, 2],
                     [-1, -1, 4, 4],
                     [-1, -1, 4, 4]]], np.int32)
  got = np.asarray(mask_pooling.masks_to_grid(jnp.asarray(masks), 2, 5))
  np.testing.assert_array_equal(got, [[[1, 2], [-1, 4]]])
  np.testing.assert_array_equal(got, np_grid(masks, 2, 5))


def test_masks_to_grid_not_divisible():
  with pytest.raises(ValueError, match="not divisible by the feature grid size 7"):
    mask_pooling.masks_to_grid(jnp.zeros((1, 30, 28), jnp.int32), 7, 4)


def test_sample_mask_ids_present_uniform_deterministic():
  num_ids, r = 8, 4000
  grid = np.full((3, 6), -1, np.int32)
  grid[0] = [1, 1, 1, 1, 1, 6]  # ids {1, 6}: uniform over ids, not over cells
  grid[1] = [0, 2, 3, 3, 7, -1]
  # grid[2]: nothing present
  key = jax.random.PRNGKey(0)
  sample = jax.jit(mask_pooling.sample_mask_ids, static_argnums=(2, 3))
  got = np.asarray(sample(key, jnp.asarray(grid), num_ids, r))
  assert got.shape == (3, r) and got.dtype == np.int32
  for row in range(2):
    present = set(grid[row][grid[row] >= 0])
    assert set(got[row]) == present
    freq = np.array([np.mean(got[row] == i) for i in sorted(present)])
    np.testing.assert_allclose(freq, 1 / len(present), atol=0.03)
  np.testing.assert_array_equal(got[2], -1)
  np.testing.assert_array_equal(got, np.asarray(sample(key, jnp.asarray(grid), num_ids, r)))
  other = np.asarray(sample(jax.random.PRNGKey(1), jnp.asarray(grid), num_ids, r))
  assert np.any(other != got)


def test_sample_shared_mask_ids():
  g1 = np.array([[0, 1, 2, 2], [3, 3, 3, 3]], np.int32)
  g2 = np.array([[2, 1, 5, 5], [4, 4, 4, 4]], np.int32)
  got = np.asarray(mask_pooling.sample_shared_mask_ids(
      jax.random.PRNGKey(0), jnp.asarray(g1), jnp.asarray(g2), 6, 200))
  assert set(got[0]) == {1, 2}
  np.testing.assert_array_equal(got[1], -1)


def np_mask_pool(features, grid, ids):
  b, h, w, c = features.shape
  out = np.zeros(ids.shape + (c,))
  for i in range(b):
    for r in range(ids.shape[1]):
      cells = [features[i, y, x] for y in range(h) for x in range(w)
               if ids[i, r] >= 0 and grid[i, y, x] == ids[i, r]]
      if cells:
        out[i, r] = np.mean(cells, axis=0)
  return out


def test_mask_pool_matches_bruteforce():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
  grid = rng.integers(-1, 3, (2, 3, 3)).astype(np.int32)
  grid[1, 0, 0] = -1
  ids = np.array([[0, 1, 2, 2, 5], [-1, 0, 1, 2, 0]], np.int32)  # 5 absent; -1 empty
  got = np.asarray(mask_pooling.mask_pool(jnp.asarray(features), jnp.asarray(grid),
                                          jnp.asarray(ids)))
  want = np_mask_pool(features, grid, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[0, 4] == 0) and np.all(got[1, 0] == 0)


def test_mask_pool_soft_matches_bruteforce():
  rng = np.random.default_rng(1)
  b, h, w, c, k = 2, 2, 3, 4, 4
  features = rng.normal(size=(b, h, w, c)).astype(np.float32)
  weights = rng.uniform(size=(b, h * w, k)).astype(np.float32)
  weights[0, :, 3] = 0.0  # id 3 absent in image 0
  ids = np.array([[0, 3, 1], [2, -1, 3]], np.int32)
  got = np.asarray(mask_pooling.mask_pool_soft(jnp.asarray(features), jnp.asarray(weights),
                                               jnp.asarray(ids)))
  flat = features.reshape(b, h * w, c).astype(np.float64)
  want = np.zeros((b, 3, c))
  for i in range(b):
    for r in range(3):
      if ids[i, r] < 0:
        continue
      m = weights[i, :, ids[i, r]].astype(np.float64)
      if m.sum() > 0:
        want[i, r] = (m[:, None] * flat[i]).sum(0) / m.sum()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- data parallelism


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def test_mask_to_grid_needs_no_collective_on_8_devices():
  """Counting is per example: with the batch sharded over 8 devices, the compiled HLO of the
  hard and soft grids holds no collective (a segment_sum over the flattened global batch made
  every device build the global counts and all-reduce them)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  masks = jax.device_put(np.random.default_rng(0).integers(-1, 9, (16, 16, 16)).astype(np.int8),
                         sharded)
  fn = jax.jit(lambda m: (mask_pooling.masks_to_grid(m, 4, 8),
                          mask_pooling.masks_to_grid_soft(m, 4, 8)),
               in_shardings=sharded, out_shardings=(sharded, sharded))
  compiled = fn.lower(masks).compile()
  hlo = compiled.as_text()
  assert "scatter" in hlo  # the counting is in there
  assert not [c for c in COLLECTIVES if c in hlo], [c for c in COLLECTIVES if c in hlo]
  grid, soft = compiled(masks)
  np.testing.assert_array_equal(np.asarray(grid), np_grid(np.asarray(masks), 4, 8))
  np.testing.assert_allclose(np.asarray(soft), np_grid(np.asarray(masks), 4, 8, soft=True),
                             atol=1e-6)


# ---------------------------------------------------------------- soft pooling samples


def test_soft_present_ids_include_ids_that_win_no_cell():
  """Id 2 covers a quarter of every cell of the top row: it wins none (hard grid), yet has a
  positive soft weight there, so soft pooling can pool it and must be able to sample it; id 3
  covers nothing and is never sampled."""
  masks = np.zeros((1, 8, 8), np.int32)
  masks[0, 4:] = 1
  masks[0, 0:2, 0:2] = 2  # 4 of the 16 pixels of cell (0, 0)
  masks[0, 0:2, 4:6] = 2  # 4 of the 16 pixels of cell (0, 1)
  grid = np.asarray(mask_pooling.masks_to_grid(jnp.asarray(masks), 2, 4))
  weights = mask_pooling.masks_to_grid_soft(jnp.asarray(masks), 2, 4)
  np.testing.assert_array_equal(grid, [[[0, 0], [1, 1]]])
  hard = np.asarray(mask_pooling.present_ids(jnp.asarray(grid), 4))
  soft = np.asarray(mask_pooling.present_ids_soft(weights))
  np.testing.assert_array_equal(hard, [[True, True, False, False]])
  np.testing.assert_array_equal(soft, [[True, True, True, False]])
  # Reference: an id is present when some pixel of it lies in a counted cell.
  np.testing.assert_array_equal(soft[0], [np.any(masks == i) for i in range(4)])
  got = np.asarray(mask_pooling.sample_present_ids(jax.random.PRNGKey(0), jnp.asarray(soft), 300))
  assert set(got[0]) == {0, 1, 2}
  np.testing.assert_allclose([np.mean(got[0] == i) for i in range(3)], 1 / 3, atol=0.08)
