"""RoIAlign: against a brute-force NumPy RoIAlign written loop by loop (torchvision's kernel
semantics), edge cases of the out-of-range rule, gradients, the adaptive sampling ratio.

The comparison with `torchvision.ops.roi_align` itself is tests/test_torch_roi_align.py.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.ops.roi_align import roi_align


def _bilinear(feature: np.ndarray, y: np.float32, x: np.float32) -> np.ndarray:
  """feature: [H, W, C]; one sample, torchvision's bilinear_interpolate written out."""
  height, width = feature.shape[:2]
  if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
    return np.zeros(feature.shape[-1], np.float32)
  y, x = max(y, np.float32(0)), max(x, np.float32(0))
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = np.float32(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = np.float32(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx
  return (hy * hx * feature[y_low, x_low] + hy * lx * feature[y_low, x_high]
          + ly * hx * feature[y_high, x_low] + ly * lx * feature[y_high, x_high])


def roi_align_reference(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
  """features [B, H, W, C], boxes [B, K, 4] (y0, x0, y1, x1) -> [B, K, out_h, out_w, C].

  Scalar float32 arithmetic in torchvision's order, one sample at a time.
  """
  out_h, out_w = output_size
  f32 = np.float32
  b_, k_ = boxes.shape[:2]
  out = np.zeros((b_, k_, out_h, out_w, features.shape[-1]), np.float32)
  for b in range(b_):
    for k in range(k_):
      offset = f32(0.5) if aligned else f32(0.0)
      y0, x0, y1, x1 = (f32(v) * f32(spatial_scale) for v in boxes[b, k])
      start_h, start_w = y0 - offset, x0 - offset
      height, width = (y1 - offset) - start_h, (x1 - offset) - start_w
      if not aligned:
        height, width = max(height, f32(1)), max(width, f32(1))
      bin_h, bin_w = height / f32(out_h), width / f32(out_w)
      grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(height / f32(out_h))
      grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(width / f32(out_w))
      count = max(grid_h * grid_w, 1)
      for ph in range(out_h):
        for pw in range(out_w):
          total = np.zeros(features.shape[-1], np.float32)
          for iy in range(grid_h):
            y = start_h + f32(ph) * bin_h + f32(iy + 0.5) * bin_h / f32(grid_h)
            for ix in range(grid_w):
              x = start_w + f32(pw) * bin_w + f32(ix + 0.5) * bin_w / f32(grid_w)
              total += _bilinear(features[b], y, x)
          out[b, k, ph, pw] = total / count
  return out


@functools.lru_cache(maxsize=None)
def _jitted(output_size, spatial_scale, sampling_ratio, aligned, max_sampling_ratio=None):
  return jax.jit(functools.partial(
      roi_align, output_size=output_size, spatial_scale=spatial_scale,
      sampling_ratio=sampling_ratio, aligned=aligned, max_sampling_ratio=max_sampling_ratio))


def _features(b, h, w, c, seed=0):
  return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


def _boxes(kind, b, k, image_h, image_w, seed=1):
  """[B, K, 4] (y0, x0, y1, x1) input pixels of one kind."""
  rng = np.random.default_rng(seed)
  if kind == "inside":      # anywhere inside the image, any size
    ys = np.sort(rng.uniform(0, image_h, (b, k, 2)), -1)
    xs = np.sort(rng.uniform(0, image_w, (b, k, 2)), -1)
  elif kind == "outside":   # partly outside the image, the first box wholly outside
    ys = np.sort(rng.uniform(-1.5 * image_h, 2.5 * image_h, (b, k, 2)), -1)
    xs = np.sort(rng.uniform(-1.5 * image_w, 2.5 * image_w, (b, k, 2)), -1)
    ys[:, 0], xs[:, 0] = (1.3 * image_h, 1.8 * image_h), (-0.9 * image_w, -0.6 * image_w)
  elif kind == "tiny":      # much smaller than one feature cell, some zero-size
    y0 = rng.uniform(0, image_h, (b, k, 1))
    x0 = rng.uniform(0, image_w, (b, k, 1))
    side = rng.uniform(0, 3, (b, k, 1)) * (rng.random((b, k, 1)) < 0.7)
    ys, xs = np.concatenate([y0, y0 + side], -1), np.concatenate([x0, x0 + side], -1)
  elif kind == "border":    # touching the image borders (and the whole image)
    lo = rng.uniform(0, 0.5, (b, k, 2)) * np.array([image_h, image_w])
    hi = rng.uniform(0.5, 1, (b, k, 2)) * np.array([image_h, image_w])
    lo[..., 0, :] = 0
    hi[..., 0, :] = (image_h, image_w)
    if k > 1:
      lo[..., 1, 0] = 0
      hi[..., 1, 1] = image_w
    ys, xs = np.stack([lo[..., 0], hi[..., 0]], -1), np.stack([lo[..., 1], hi[..., 1]], -1)
  else:
    raise ValueError(kind)
  return np.stack([ys[..., 0], xs[..., 0], ys[..., 1], xs[..., 1]], -1).astype(np.float32)


# (boxes kind, batch, K, feature map H×W, stride, output size, sampling ratio, aligned)
CASES = [
    ("inside", 2, 3, (7, 7), 32, (7, 7), 2, True),       # ResNet-50 C5 at 224 px, MaskCo's use
    ("inside", 2, 3, (14, 14), 16, (7, 7), 2, True),     # dilated conv5 (stride 16)
    ("outside", 2, 5, (5, 6), 16, (7, 7), 1, True),
    ("outside", 1, 4, (5, 6), 32, (1, 1), 2, False),
    ("tiny", 2, 4, (6, 5), 16, (7, 7), 2, True),
    ("tiny", 1, 4, (6, 5), 32, (2, 3), 1, False),
    ("border", 2, 3, (7, 7), 32, (1, 1), 1, True),
    ("border", 1, 3, (4, 4), 16, (7, 7), 2, False),
    ("inside", 1, 1, (7, 7), 32, (1, 1), 2, True),       # batch 1, K = 1, one output cell
    ("inside", 2, 3, (6, 7), 16, (3, 2), 0, True),       # adaptive: ceil(roi / output) samples
    ("tiny", 2, 4, (6, 7), 16, (1, 1), 0, False),
    ("border", 1, 3, (7, 7), 32, (7, 7), -1, True),
]


@pytest.mark.parametrize("kind,b,k,hw,stride,out,ratio,aligned", CASES)
def test_roi_align_matches_the_brute_force_reference(kind, b, k, hw, stride, out, ratio, aligned):
  features = _features(b, *hw, 3)
  boxes = _boxes(kind, b, k, hw[0] * stride, hw[1] * stride)
  ours = np.asarray(_jitted(out, 1 / stride, ratio, aligned)(features, boxes))
  reference = roi_align_reference(features, boxes, out, 1 / stride, ratio, aligned)
  assert ours.shape == (b, k, *out, 3)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
  if kind == "outside":  # the case is meant to contain bins that are exactly zero
    assert np.any(np.all(reference == 0, axis=-1))


@pytest.mark.parametrize("aligned", [True, False])
def test_out_of_range_samples_exactly_as_torchvision(aligned):
  """One sample per box (1×1 output, ratio 1) at y = (y0 + y1)/2 − offset, stride 1, H = W = 3.

  y = −1 is kept (clamped to row 0), y just below −1 is zero; y = H is kept (clamped to row
  H−1), y just above H is zero; in between, rows are interpolated.
  """
  features = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1) + 1  # rows 1..3, 4..6, 7..9
  off = 0.5 if aligned else 0.0
  # Box of height 2 (>= 1, so aligned=False does not grow it), x centred on column 1.
  def box(y):
    return [y - 1 + off, 1 - 1 + off, y + 1 + off, 1 + 1 + off]
  ys = [-1.0, -1.25, 3.0, 3.25, 0.5, 2.5, -0.5]
  boxes = np.array([[box(y) for y in ys]], np.float32)
  ours = np.asarray(_jitted((1, 1), 1.0, 1, aligned)(features, boxes))[0, :, 0, 0, 0]
  column = features[0, :, 1, 0]                                     # 2, 5, 8
  expected = [column[0], 0.0, column[2], 0.0, (column[0] + column[1]) / 2, column[2], column[0]]
  np.testing.assert_allclose(ours, expected, rtol=1e-6)
  np.testing.assert_allclose(
      ours, roi_align_reference(features, boxes, (1, 1), 1.0, 1, aligned)[0, :, 0, 0, 0])


def test_gradient_wrt_features_is_the_references_adjoint():
  """RoIAlign is linear in the features: d<out, G>/dF[h, w] = Σ over outputs of the reference's
  weight of cell (h, w), found by feeding the reference one-hot feature maps."""
  h, w, stride, out = 4, 5, 16, (2, 3)
  boxes = np.concatenate([_boxes("outside", 1, 3, h * stride, w * stride, seed=3),
                          _boxes("border", 1, 2, h * stride, w * stride, seed=4)], axis=1)
  cotangent = np.random.default_rng(5).normal(size=(1, 5, *out, 1)).astype(np.float32)
  fn = _jitted(out, 1 / stride, 2, True)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(fn(f, boxes) * cotangent)))(_features(1, h, w, 1))
  expected = np.zeros((1, h, w, 1), np.float32)
  for i in range(h):
    for j in range(w):
      onehot = np.zeros((1, h, w, 1), np.float32)
      onehot[0, i, j] = 1
      expected[0, i, j] = np.sum(
          roi_align_reference(onehot, boxes, out, 1 / stride, 2, True) * cotangent)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_gradient_wrt_boxes_is_finite_and_matches_finite_differences():
  h, w, stride = 5, 6, 16
  features = _features(1, h, w, 2, seed=7)
  inside = _boxes("inside", 1, 3, h * stride, w * stride, seed=8)
  fn = _jitted((7, 7), 1 / stride, 2, True)

  def loss(b):
    return jnp.sum(fn(features, b) ** 2)

  grad_fn = jax.jit(jax.grad(loss))
  grad = np.asarray(grad_fn(inside))
  assert np.abs(grad).sum() > 0
  eps = 1e-2
  for k in range(3):
    for j in range(4):
      plus, minus = inside.copy(), inside.copy()
      plus[0, k, j] += eps
      minus[0, k, j] -= eps
      fd = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
      np.testing.assert_allclose(grad[0, k, j], fd, rtol=2e-2, atol=2e-3)
  # Degenerate boxes: outside, zero-size, inverted, NaN -> finite gradients.
  odd = np.array([[[-500, -500, -400, -400], [30, 30, 30, 30], [60, 60, 20, 20],
                   [np.nan, 10, 20, 30]]], np.float32)
  assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(loss))(odd))))


def test_nan_box_gives_zeros_not_nan():
  features = _features(1, 4, 4, 2)
  boxes = np.array([[[np.nan, 0, 10, 10]]], np.float32)
  np.testing.assert_array_equal(_jitted((2, 2), 1 / 8, 2, True)(features, boxes), 0.0)


def test_adaptive_ratio_cap():
  """Boxes taller than the feature map need more than the default cap ceil(H/out) samples:
  the default then differs from torchvision; a large enough `max_sampling_ratio` restores it."""
  features = _features(1, 4, 4, 2, seed=2)
  boxes = np.array([[[-60, -50, 130, 120], [0, 0, 64, 64]]], np.float32)  # 12 cells tall
  reference = roi_align_reference(features, boxes, (2, 2), 1 / 16, 0, True)
  capped = np.asarray(_jitted((2, 2), 1 / 16, 0, True)(features, boxes))
  uncapped = np.asarray(_jitted((2, 2), 1 / 16, 0, True, 6)(features, boxes))
  np.testing.assert_allclose(uncapped, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(capped[:, 1], reference[:, 1], rtol=1e-5, atol=1e-6)  # in the map
  assert not np.allclose(capped[:, 0], reference[:, 0], atol=1e-3)


def test_average_of_bins_equals_one_bin_with_more_samples():
  """mean over a P×P output of ratio g == a 1×1 output of ratio P·g (same sample points): the
  identity behind MaskCo's RoI feature → global average pool."""
  features = _features(2, 7, 7, 3, seed=4)
  boxes = _boxes("outside", 2, 3, 224, 224, seed=6)
  pooled = np.asarray(_jitted((7, 7), 1 / 32, 2, True)(features, boxes)).mean(axis=(2, 3))
  single = np.asarray(_jitted((1, 1), 1 / 32, 14, True)(features, boxes))[:, :, 0, 0]
  np.testing.assert_allclose(pooled, single, rtol=1e-5, atol=1e-6)


def test_bfloat16_features():
  features = _features(1, 7, 7, 4)
  boxes = _boxes("inside", 1, 2, 224, 224)
  fn = _jitted((7, 7), 1 / 32, 2, True)
  out = fn(jnp.asarray(features, jnp.bfloat16), boxes)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), fn(features, boxes), atol=0.05)


@pytest.mark.parametrize("kwargs,match", [
    (dict(features=np.zeros((7, 7, 4)), boxes=np.zeros((1, 1, 4))), "features must be NHWC"),
    (dict(boxes=np.zeros((1, 4))), r"boxes\[:, None\]"),
    (dict(boxes=np.zeros((1, 2, 5))), r"\[B, K, 4\]"),
    (dict(boxes=np.zeros((3, 2, 4))), "batch 3 != features batch 1"),
    (dict(output_size=0), "output_size"),
    (dict(spatial_scale=0.0), "spatial_scale"),
    (dict(sampling_ratio=1.5), "sampling_ratio"),
    (dict(sampling_ratio=0, max_sampling_ratio=0), "max_sampling_ratio"),
])
def test_bad_arguments_raise(kwargs, match):
  args = dict(features=np.zeros((1, 7, 7, 4), np.float32), boxes=np.zeros((1, 2, 4), np.float32),
              output_size=7, spatial_scale=1 / 32)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    roi_align(**args)
