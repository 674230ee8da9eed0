"""MaskCo's host-side views (`views.make_maskco_views`): box invariants over thousands of draws,
the counted fallbacks, and the masked box's projection checked on the pixels themselves."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ssl_jax.data import views

RECIPE = views.get_recipe("maskco")
PAPER_SIDE = (32 / 224, 128 / 224)


def np_iou(box, boxes):
  """IoU of one (y0, x0, y1, x1) box with [N, 4] boxes, written out."""
  out = []
  for b in boxes:
    h = max(0.0, min(box[2], b[2]) - max(box[0], b[0]))
    w = max(0.0, min(box[3], b[3]) - max(box[1], b[1]))
    inter = h * w
    union = (box[2] - box[0]) * (box[3] - box[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    out.append(inter / union)
  return np.asarray(out)


def to_original(box, crop, flip, size):
  """A view-pixel box -> original-image pixels (crop (top, left, h, w), then the flip), written
  independently of `transforms`."""
  top, left, h, w = (float(v) for v in crop)
  y0, x0, y1, x1 = (float(v) for v in box)
  if flip:  # view column x shows the unflipped column size - x
    x0, x1 = size - x1, size - x0
  return np.array([top + y0 * h / size, left + x0 * w / size,
                   top + y1 * h / size, left + x1 * w / size])


def check_draw(out, size, side=PAPER_SIDE, eps=1e-3):
  """Every invariant of one draw; returns the number of negatives with IoU >= 0.2."""
  boxes = out["boxes"].astype(np.float64)
  assert boxes.shape == (17, 4) and out["masked_box"].shape == (4,)
  sides = boxes[:, 2] - boxes[:, 0]
  np.testing.assert_allclose(sides, boxes[:, 3] - boxes[:, 1], rtol=1e-5, atol=1e-4)  # square
  lo, hi = side[0] * size, side[1] * size
  assert np.all(sides >= lo - eps) and np.all(sides <= hi + eps), sides
  assert np.all(boxes >= -eps) and np.all(boxes <= size + eps)     # all inside the key view
  ious = np_iou(boxes[0], boxes[1:])
  high = int(np.sum(ious >= 0.2))
  assert high == int(out["negative_fallback"]), (ious, out["negative_fallback"])
  (q_crop, k_crop), (q_flip, k_flip) = out["crop"], out["flip"]
  # The positive lies in both views: its original footprint is inside the query crop, and the
  # masked box is exactly that footprint seen from the query view.
  footprint = to_original(boxes[0], k_crop, k_flip, size)
  q_top, q_left, q_h, q_w = (float(v) for v in q_crop)
  assert footprint[0] >= q_top - eps and footprint[2] <= q_top + q_h + eps
  assert footprint[1] >= q_left - eps and footprint[3] <= q_left + q_w + eps
  np.testing.assert_allclose(to_original(out["masked_box"], q_crop, q_flip, size), footprint,
                             atol=2e-3 * max(q_h, q_w, 1.0))
  return high


@pytest.mark.parametrize("shape,size,draws", [((375, 500), 224, 400), ((120, 160), 64, 1500),
                                              ((40, 40), 32, 1500), ((6, 9), 32, 600)])
def test_box_invariants_over_many_draws(shape, size, draws):
  """Sizes within box_side, squares inside the key view, IoU < 0.2 for every negative (no
  fallback at the paper's sizes, even on tiny images), the positive inside both views and the
  masked box its exact projection; every view >= 20 % of the image."""
  image = np.zeros(shape + (3,), np.uint8)
  rng = np.random.default_rng(0)
  fallbacks, crop_fallbacks = 0, 0
  for _ in range(draws):
    out = views.make_maskco_views({"image": image, "id": "m"}, RECIPE, rng, size)
    fallbacks += check_draw(out, size)
    crop_fallbacks += int(out["crop_fallback"])
    for crop in out["crop"]:  # torchvision rounds the crop to integers: allow its rounding
      assert crop[2] * crop[3] >= 0.2 * shape[0] * shape[1] - (crop[2] + crop[3] + 1)
  assert fallbacks == 0
  assert crop_fallbacks <= 0.01 * draws, crop_fallbacks


def test_negative_fallback_is_counted():
  """Boxes nearly as large as the view cannot all keep IoU < 0.2: the least-overlapping
  candidates fill in, and `negative_fallback` counts exactly the negatives at IoU >= 0.2."""
  image = np.zeros((64, 64, 3), np.uint8)
  rng = np.random.default_rng(1)
  side = (0.6, 0.9)
  total, draws_with = 0, 0
  for _ in range(300):
    out = views.make_maskco_views({"image": image}, RECIPE, rng, 32, box_side=side)
    high = check_draw(out, 32, side=side)
    total += high
    draws_with += high > 0
  assert draws_with > 100 and total > 0, (draws_with, total)


def test_crop_fallback_is_counted():
  """Tiny crops of a large image rarely overlap: after 50 tries the query reuses the key's crop
  (flagged), and the positive still lies in both views."""
  recipe = tuple(dataclasses.replace(s, crop_scale=(0.01, 0.01)) for s in RECIPE)
  image = np.zeros((500, 500, 3), np.uint8)
  rng = np.random.default_rng(2)
  flagged = 0
  for _ in range(200):
    out = views.make_maskco_views({"image": image}, recipe, rng, 32)
    check_draw(out, 32)
    if out["crop_fallback"]:
      flagged += 1
      np.testing.assert_array_equal(out["crop"][0], out["crop"][1])
  assert 10 <= flagged <= 100, flagged  # ~16 % expected: (1 - 0.036)^50


@pytest.mark.parametrize("flips", [(False, False), (True, False), (False, True), (True, True)])
def test_projection_on_the_pixels_under_flip_and_scale(flips):
  """On an image whose red channel is x and green is y (original pixels), the positive box in
  the key view and the masked box in the query view show the same original region: same
  centre and same extent, whatever the flips and the crops' different scales."""
  h, w = 200, 250
  ys, xs = np.mgrid[0:h, 0:w]
  image = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8)  # values 0..249 fit uint8
  recipe = tuple(dataclasses.replace(s, flip_p=float(f)) for s, f in zip(RECIPE, flips))
  rng = np.random.default_rng(3)
  size = 64
  scales = []
  for _ in range(25):
    out = views.make_maskco_views({"image": image}, recipe, rng, size)
    assert tuple(out["flip"]) == flips
    regions = []
    for view, box in ((out["image"][1], out["boxes"][0]), (out["image"][0], out["masked_box"])):
      centres = np.arange(size) + 0.5
      rows = (centres >= box[0]) & (centres < box[2])
      cols = (centres >= box[1]) & (centres < box[3])
      pixels = view[rows][:, cols].astype(np.float64)
      regions.append((pixels[..., 1].mean(), pixels[..., 0].mean(),   # centre (y, x)
                      np.ptp(pixels[..., 1]), np.ptp(pixels[..., 0])))  # extent (y, x)
    (key_region, query_region) = regions
    # One view pixel in original pixels, for each view: the discretisation of the box.
    tol = max(out["crop"][0][2:].max(), out["crop"][1][2:].max()) / size + 1.5
    np.testing.assert_allclose(query_region[:2], key_region[:2], atol=tol)
    np.testing.assert_allclose(query_region[2:], key_region[2:], atol=2 * tol)
    footprint = to_original(out["boxes"][0], out["crop"][1], flips[1], size)
    np.testing.assert_allclose(key_region[:2], [(footprint[0] + footprint[2]) / 2 - 0.5,
                                                (footprint[1] + footprint[3]) / 2 - 0.5],
                               atol=tol)
    scales.append(out["crop"][0][2] / out["crop"][1][2])
  assert max(scales) / min(scales) > 1.5  # the two views really differ in scale
