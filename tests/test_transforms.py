"""Host geometry: random resized crop, joint image/mask crop-flip-resize, ids, grids, boxes."""

import numpy as np
import pytest

from ssl_jax.data import transforms

RED = np.array([255, 0, 0], np.uint8)


def painted(height=48, width=64, rect=(10, 20, 30, 44), obj_id=7):
  """Black image with a red rectangle rows [r0, r1) x cols [c0, c1) and its mask."""
  r0, c0, r1, c1 = rect
  image = np.zeros((height, width, 3), np.uint8)
  image[r0:r1, c0:c1] = RED
  masks = np.zeros((height, width), np.int32)
  masks[r0:r1, c0:c1] = obj_id
  return image, masks


def _attempts(height, width, scale, ratio, n=600):
  """Dense quadrature over one attempt of RandomResizedCrop: area fraction u ~ U(scale), log
  ratio ~ U(log ratio) on an n x n midpoint grid -> (h, w) of every grid point (rounded as
  torchvision rounds)."""
  u = scale[0] + (np.arange(n) + 0.5) / n * (scale[1] - scale[0])
  log_r = np.log(ratio[0]) + (np.arange(n) + 0.5) / n * (np.log(ratio[1]) - np.log(ratio[0]))
  target = height * width * u[:, None]
  aspect = np.exp(log_r)[None, :]
  w = np.round(np.sqrt(target * aspect)).astype(int)
  h = np.round(np.sqrt(target / aspect)).astype(int)
  return h.ravel(), w.ravel()


def _fallback_hw(height, width, ratio):
  """torchvision's fallback: the whole image, clamped to the ratio range, centred."""
  if width / height < ratio[0]:
    return int(round(width / ratio[0])), width
  if width / height > ratio[1]:
    return height, int(round(height * ratio[1]))
  return height, width


def rrc_reference(height, width, scale, ratio, tries=10):
  """(P(box is the centred fallback box), E[box area]) of torchvision's sampler, from the
  quadrature of one attempt: an attempt fits with probability p; after `tries` misses the
  fallback is used; an accepted attempt can coincide with the fallback box when it has the
  fallback's (h, w) and both uniform offsets land on the centre."""
  h, w = _attempts(height, width, scale, ratio)
  fit = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  p = fit.mean()
  q = (1 - p) ** tries
  hf, wf = _fallback_hw(height, width, ratio)
  if p == 0:
    return 1.0, hf * wf
  same = fit & (h == hf) & (w == wf)
  positions = np.where(same, (height - h + 1) * (width - w + 1), 1)
  coincide = np.sum(same / positions) / fit.sum()
  mean_area = np.sum(h * w * fit) / fit.sum()
  return q + (1 - q) * coincide, (1 - q) * mean_area + q * hf * wf


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (7, 9), (10, 1000), (1000, 10), (3, 40)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 1.0), (0.67, 1.0)])
def test_rrc_box_inside_image_fallback_rate_and_mean_area(shape, scale):
  """Every box lies inside the image; how often the centred fallback box comes out and the mean
  box area (fallbacks included) match the quadrature of torchvision's algorithm (10 attempts of
  area ~ U(scale)·HW, log-uniform ratio, then the clamped centre crop)."""
  height, width = shape
  ratio = (3 / 4, 4 / 3)
  n = 2000
  boxes = np.array([transforms.random_resized_crop_box(np.random.default_rng(seed), height,
                                                       width, scale, ratio) for seed in range(n)])
  top, left, h, w = boxes.T
  assert np.all((top >= 0) & (top + h <= height) & (left >= 0) & (left + w <= width))
  assert np.all((h > 0) & (w > 0))
  hf, wf = _fallback_hw(height, width, ratio)
  is_fallback = (h == hf) & (w == wf) & (top == (height - hf) // 2) & (left == (width - wf) // 2)
  want_rate, want_area = rrc_reference(height, width, scale, ratio)
  rate_tol = 4 * np.sqrt(max(want_rate * (1 - want_rate), 1 / n) / n) + 0.005
  assert abs(is_fallback.mean() - want_rate) <= rate_tol, (is_fallback.mean(), want_rate)
  areas = h * w
  area_tol = 4 * max(areas.std(), 1.0) / np.sqrt(n) + 0.005 * want_area
  assert abs(areas.mean() - want_area) <= area_tol, (areas.mean(), want_area)


def test_detcon_crop_is_one_draw_clipped_to_the_image():
  """DetCon's official crop: one draw of area and ratio, w and h clipped to the image, offsets
  uniform: on a 10 x 1000 strip (where torchvision always falls back to the centre) every box is
  full height and placed anywhere; mean area and mean width match the quadrature of one clipped
  draw; a box that fits is never retried."""
  ratio, scale, n = (3 / 4, 4 / 3), (0.08, 1.0), 2000
  for height, width in ((10, 1000), (48, 64), (7, 9)):
    boxes = np.array([transforms.detcon_crop_box(np.random.default_rng(seed), height, width,
                                                 scale, ratio) for seed in range(n)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (top + h <= height) & (left >= 0) & (left + w <= width))
    assert np.all((h >= 1) & (w >= 1))
    qh, qw = _attempts(height, width, scale, ratio)
    qh, qw = np.clip(qh, 1, height), np.clip(qw, 1, width)
    for got, want in ((h * w, qh * qw), (w, qw), (h, qh)):
      tol = 4 * max(got.std(), 1.0) / np.sqrt(n) + 0.005 * want.mean()
      assert abs(got.mean() - want.mean()) <= tol, (height, width, got.mean(), want.mean())
    if height == 10:
      assert np.all(h == 10) and len(set(left.tolist())) > 50
      torchvision = transforms.random_resized_crop_box(np.random.default_rng(0), height, width,
                                                       scale, ratio)
      assert torchvision == (0, (1000 - 13) // 2, 10, 13)  # the centre fallback


def test_crop_samplers_in_the_recipes():
  from ssl_jax.data import views  # pylint: disable=import-outside-toplevel
  for name in views.recipe_names():
    want = "detcon" if name.startswith("detcon") else "torchvision"
    assert {s.crop_sampler for s in views.get_recipe(name)} == {want}, name


def test_rrc_fallback_clamps_ratio():
  # A 10 x 1000 strip never fits a 3/4..4/3 window of >= 90 % of its area: fallback.
  top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(0), 10, 1000,
                                                       (0.9, 1.0))
  assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (1000 - w) // 2
  top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(0), 1000, 10,
                                                       (0.9, 1.0))
  assert (h, w) == (round(10 / (3 / 4)), 10) and left == 0 and top == (1000 - h) // 2


def test_rrc_deterministic_given_seed():
  a = [transforms.random_resized_crop_box(np.random.default_rng(3), 50, 60) for _ in range(3)]
  assert a[0] == a[1] == a[2]


def expected_rect_mask(rect, box, flip, size):
  """NumPy reference: output pixel (i, j) is in the rectangle iff its centre, mapped into the
  original image, falls in [r0, r1) x [c0, c1)."""
  r0, c0, r1, c1 = rect
  top, left, h, w = box
  y = top + (np.arange(size) + 0.5) * h / size
  x = left + (np.arange(size) + 0.5) * w / size
  inside = ((np.floor(y) >= r0) & (np.floor(y) < r1))[:, None] & (
      (np.floor(x) >= c0) & (np.floor(x) < c1))[None, :]
  return inside[:, ::-1] if flip else inside


@pytest.mark.parametrize("size", [16, 32, 80])
def test_mask_follows_painted_object(size):
  rect = (10, 20, 30, 44)
  image, masks = painted(rect=rect)
  checked = 0
  for seed in range(60):
    rng = np.random.default_rng(seed)
    box = transforms.random_resized_crop_box(rng, 48, 64, (0.08, 1.0))
    flip = bool(rng.random() < 0.5)
    out, out_masks = transforms.crop_flip_resize(image, box, flip, size, masks)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert out_masks.shape == (size, size) and out_masks.dtype == np.int32
    # Exact at the nearest-neighbour level.
    np.testing.assert_array_equal(out_masks == 7, expected_rect_mask(rect, box, flip, size))
    in_mask = out_masks == 7
    in_image = out[..., 0] > 127
    if in_mask.sum() >= 4 * size:  # IoU is meaningful once the object spans a few rows
      iou = (in_mask & in_image).sum() / (in_mask | in_image).sum()
      assert iou >= 0.95, (seed, box, flip, iou)
      checked += 1
  assert checked >= 10


def test_flip_applies_to_image_and_masks():
  image, masks = painted()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, image.shape, dtype=np.uint8)
  box = (3.5, 5.25, 30.0, 41.0)
  a, ma = transforms.crop_flip_resize(image, box, False, 24, masks)
  b, mb = transforms.crop_flip_resize(image, box, True, 24, masks)
  np.testing.assert_array_equal(b, a[:, ::-1])
  np.testing.assert_array_equal(mb, ma[:, ::-1])


def test_crop_and_resize_is_one_resampling():
  # An identity crop-resize (box = whole image, same size) must return the image unchanged;
  # a crop followed by a second resize would not be the same as the box resize.
  image = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  out, _ = transforms.crop_flip_resize(image, (0, 0, 20, 20), False, 20)
  np.testing.assert_array_equal(out, image)
  # An integer-aligned crop at its own size is an exact copy of the pixels.
  out, _ = transforms.crop_flip_resize(image, (4, 6, 10, 10), False, 10)
  np.testing.assert_array_equal(out, image[4:14, 6:16])


def test_large_ids_survive():
  masks = np.zeros((40, 40), np.int32)
  masks[:, 20:] = 300
  masks[20:, :] = 70000
  image = np.zeros((40, 40, 3), np.uint8)
  _, out = transforms.crop_flip_resize(image, (0, 0, 40, 40), False, 16, masks)
  assert set(np.unique(out)) == {0, 300, 70000}
  assert out[-1, 0] == 70000 and out[0, -1] == 300 and out[0, 0] == 0


def test_small_image_upsamples():
  image, masks = painted(8, 10, (2, 3, 6, 8))
  out, out_masks = transforms.crop_flip_resize(image, (0, 0, 8, 10), False, 32, masks)
  assert out.shape == (32, 32, 3)
  np.testing.assert_array_equal(out_masks == 7,
                                expected_rect_mask((2, 3, 6, 8), (0, 0, 8, 10), False, 32))


def test_mask_shape_mismatch_names_record():
  image = np.zeros((10, 12, 3), np.uint8)
  with pytest.raises(ValueError, match="rec_42"):
    transforms.crop_flip_resize(image, (0, 0, 10, 12), False, 8, np.zeros((12, 10)),
                                record_id="rec_42")


@pytest.mark.parametrize("shape,dtype", [((6, 5), np.uint8), ((6, 5, 1), np.uint8),
                                         ((6, 5, 4), np.uint8), ((6, 5, 3), np.float32),
                                         ((6, 5), bool)])
def test_to_rgb(shape, dtype):
  rng = np.random.default_rng(0)
  if dtype == np.float32:
    a = rng.random(shape, dtype=np.float32)
    expected = np.round(a * 255).astype(np.uint8)
  elif dtype == bool:
    a = rng.random(shape) < 0.5
    expected = np.repeat(a[..., None].astype(np.uint8) * 255, 3, -1)
  else:
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    expected = a.reshape(6, 5, -1)
    expected = np.repeat(expected, 3, -1) if expected.shape[-1] == 1 else expected[..., :3]
  out = transforms.to_rgb(a)
  assert out.shape == (6, 5, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)


def test_to_rgb_rejects_bad_layout():
  with pytest.raises(ValueError, match="shape"):
    transforms.to_rgb(np.zeros((4, 4, 2)))


def compact_reference(masks, max_segments):
  """Dictionary-based reference: rank ids by (-area, id)."""
  flat = masks.ravel().tolist()
  counts = {}
  for v in flat:
    if v >= 0:
      counts[v] = counts.get(v, 0) + 1
  ranked = sorted(counts, key=lambda i: (-counts[i], i))
  mapping = {old: (new if new < max_segments else -1) for new, old in enumerate(ranked)}
  out = np.array([mapping.get(v, -1) for v in flat], np.int32).reshape(masks.shape)
  return out, max(0, len(ranked) - max_segments)


@pytest.mark.parametrize("max_segments", [1, 3, 64])
@pytest.mark.parametrize("case", ["random", "large_ids", "with_ignore", "single", "all_ignored"])
def test_compact_segment_ids(case, max_segments):
  rng = np.random.default_rng(1)
  if case == "random":
    masks = rng.integers(0, 6, (2, 9, 9))
  elif case == "large_ids":
    masks = rng.choice([300, 70000, 5, 256], (2, 9, 9), p=[0.4, 0.3, 0.2, 0.1])
  elif case == "with_ignore":
    masks = rng.integers(-1, 4, (2, 9, 9))
  elif case == "single":
    masks = np.full((1, 4, 4), 123456)
  else:
    masks = np.full((2, 3, 3), -1)
  out, dropped = transforms.compact_segment_ids(masks, max_segments)
  ref, ref_dropped = compact_reference(masks, max_segments)
  np.testing.assert_array_equal(out, ref)
  assert dropped == ref_dropped and out.dtype == np.int32
  np.testing.assert_array_equal(out[masks < 0], -1)


def test_compact_orders_by_area():
  masks = np.array([[70000, 70000, 70000, 300], [70000, 300, 9, 9]])
  out, dropped = transforms.compact_segment_ids(masks, 2)
  # 70000 has 4 pixels, 300 and 9 have 2 each (tie -> smaller id 9 first).
  np.testing.assert_array_equal(out, [[0, 0, 0, -1], [0, -1, 1, 1]])
  assert dropped == 1


@pytest.mark.parametrize("grid", [(4, 4), (2, 3)])
def test_grid_masks(grid):
  m = transforms.grid_masks(24, 36, grid)
  ids, counts = np.unique(m, return_counts=True)
  np.testing.assert_array_equal(ids, np.arange(grid[0] * grid[1]))
  assert np.all(counts == 24 * 36 // (grid[0] * grid[1]))
  cell_h, cell_w = 24 // grid[0], 36 // grid[1]
  assert m[cell_h, 0] == grid[1] and m[0, cell_w] == 1 and m[-1, -1] == grid[0] * grid[1] - 1


def test_grid_masks_uneven_sizes_cover_all_ids():
  m = transforms.grid_masks(30, 31)
  assert set(np.unique(m)) == set(range(16))
  counts = np.bincount(m.ravel())
  assert counts.max() - counts.min() <= 8 + 8 + 1


@pytest.mark.parametrize("flip_a,flip_b", [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_project_box_round_trip_and_alignment(flip_a, flip_b):
  crop_a, crop_b = (4.0, 6.0, 30.0, 40.0), (10.0, 2.0, 36.0, 30.0)
  box = np.array([[3.0, 5.0, 12.0, 20.0], [0.0, 0.0, 32.0, 32.0]])
  b = transforms.project_box(box, crop_a, crop_b, flip_a, flip_b, 32, 24)
  back = transforms.project_box(b, crop_b, crop_a, flip_b, flip_a, 24, 32)
  np.testing.assert_allclose(back, box, atol=1e-4)
  assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
  # Reference by hand for the first box: original x of view-a column x is
  # left + (S - x if flipped else x) * w / S.
  xs = np.array([5.0, 20.0])
  xs = 32 - xs if flip_a else xs
  orig_x = np.sort(6.0 + xs * 40.0 / 32)
  vx = (orig_x - 2.0) * 24 / 30.0
  vx = np.sort(24 - vx) if flip_b else vx
  orig_y = 4.0 + np.array([3.0, 12.0]) * 30.0 / 32
  vy = (orig_y - 10.0) * 24 / 36.0
  np.testing.assert_allclose(b[0], [vy[0], vx[0], vy[1], vx[1]], atol=1e-4)


def test_original_to_view_matches_mask_bounding_box():
  rect = (10, 20, 30, 44)
  image, masks = painted(rect=rect)
  box, flip, size = (5.0, 12.0, 40.0, 44.0), True, 40
  _, out_masks = transforms.crop_flip_resize(image, box, flip, size, masks)
  rows, cols = np.nonzero(out_masks == 7)
  projected = transforms.original_to_view(np.array(rect, float), box, flip, size)
  # The mask's pixel bounding box lies within one output pixel of the projected rectangle.
  np.testing.assert_allclose([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1],
                             projected, atol=1.0)


def test_crop_intersection():
  assert transforms.crop_intersection((0, 0, 10, 10), (5, 6, 10, 10)) == (5, 6, 5, 4)
  assert transforms.crop_intersection((0, 0, 10, 10), (10, 0, 5, 5)) is None
