"""View recipes (paper tables) and the host view maker (joint masks, consistent ids, MaskCo)."""

import numpy as np
import pytest

from ssl_jax.data import transforms
from ssl_jax.data import views

# (crop_scale, flip_p, (b, c, s, h) or None, jitter_p, grayscale_p, blur_p, solarize_p) per view,
# written from the papers' tables / official recipes.
T = {
    # SimCLR v1 appendix A: strength 1.0 -> 0.8, 0.8, 0.8, 0.2; jitter 0.8, grey 0.2, blur 0.5.
    "simclr": [((0.08, 1.0), 0.5, (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5, 0.0)] * 2,
    # BYOL Table 6 / DetCon Table A.1 (DetCon_B columns T, T').
    "byol": [((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
             ((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)],
    "detcon_b": [((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
                 ((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)],
    # DetCon Table A.1, DetCon_S columns: blur 1.0 / 0.0, no solarization.
    "detcon_s": [((0.08, 1.0), 0.5, (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 1.0, 0.0),
                 ((0.08, 1.0), 0.5, (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.0, 0.0)],
    # MoCo v2 aug+: crop 0.2, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grey 0.2, blur 0.5.
    "mocov2": [((0.2, 1.0), 0.5, (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.0)] * 2,
    # MoCo v3: crop 0.08, BYOL's asymmetric blur / solarize.
    "mocov3": [((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
               ((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)],
    "masked_strong": [((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
                      ((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)],
    # Masked MoCo Sec. 4.1: light / medium use colour augmentation only.
    "masked_light": [((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.0, 0.0)] * 2,
    "masked_medium": [((0.08, 1.0), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.0, 0.0)] * 2,
    # MAE: RandomResizedCrop(0.2, 1) + flip; SimMIM: crop (0.67, 1) + flip; no colour.
    "mae": [((0.2, 1.0), 0.5, None, 0, 0, 0, 0)],
    "crop_only": [((0.2, 1.0), 0.0, None, 0, 0, 0, 0)],
    "simmim": [((0.67, 1.0), 0.5, None, 0, 0, 0, 0)],
    # MaskCo: MoCo v2's augmentation with crops >= 20 % area.
    "maskco": [((0.2, 1.0), 0.5, (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.0)] * 2,
    # Multi-crop local views (DINO `DataAugmentationDINO`): crop (0.05, 0.4), jitter p 0.8,
    # grey 0.2, blur 0.5.
    "multicrop_local": [((0.05, 0.4), 0.5, (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5, 0.0)],
}
STYLE = {"simclr": "simclr", "detcon_s": "simclr", "byol": "byol", "detcon_b": "byol"}


@pytest.mark.parametrize("name", sorted(T))
def test_recipe_matches_table(name):
  recipe = views.get_recipe(name)
  assert len(recipe) == len(T[name])
  for spec, (scale, flip_p, jitter, jp, gp, bp, sp) in zip(recipe, T[name]):
    assert spec.crop_scale == scale and spec.flip_p == flip_p
    np.testing.assert_allclose(spec.crop_ratio, (3 / 4, 4 / 3))
    if jitter is None:
      assert spec.color is None
      continue
    c = spec.color
    assert (c.brightness, c.contrast, c.saturation, c.hue) == jitter
    assert (c.jitter_p, c.grayscale_p, c.blur_p, c.solarize_p) == (jp, gp, bp, sp)
    assert c.blur_sigma == (0.1, 2.0)
    assert c.jitter_style == STYLE.get(name, "torchvision")


def test_recipe_names_cover_brief():
  assert set(views.recipe_names()) == set(T)


def test_unknown_recipe_lists_names():
  with pytest.raises(ValueError, match="detcon_b.*simclr|simclr.*detcon_b"):
    views.get_recipe("simclr_v9")


def test_bad_specs_raise_with_field_name():
  with pytest.raises(ValueError, match="jitter_style"):
    views.ColorSpec(jitter_style="keras")
  with pytest.raises(ValueError, match="blur_p"):
    views.ColorSpec(blur_p=1.5)
  with pytest.raises(ValueError, match="crop_mode"):
    views.ViewSpec(crop_mode="random")


def block_record(size=48, ids=(5, 300, 70000, 1234567), label=2):
  """A 2 x 2 block image, each block a distinct colour and id; ids above 255 included."""
  half = size // 2
  cells = np.zeros((size, size), np.int64)
  cells[:half, half:], cells[half:, :half], cells[half:, half:] = 1, 2, 3
  palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]], np.uint8)
  return {"image": palette[cells], "masks": np.asarray(ids, np.int32)[cells],
          "id": "blocks", "label": label}


def test_make_views_shapes_and_determinism():
  rec = block_record()
  recipe = views.get_recipe("detcon_b")
  a = views.make_views(rec, recipe, np.random.default_rng(7), 32, mask_type="fh")
  b = views.make_views(rec, recipe, np.random.default_rng(7), 32, mask_type="fh")
  c = views.make_views(rec, recipe, np.random.default_rng(8), 32, mask_type="fh")
  assert a["image"].shape == (2, 32, 32, 3) and a["image"].dtype == np.uint8
  assert a["masks"].shape == (2, 32, 32) and a["masks"].dtype == views.mask_dtype(64)
  assert a["crop"].shape == (2, 4) and a["crop"].dtype == np.float32
  assert a["flip"].shape == (2,) and a["flip"].dtype == bool
  assert a["label"] == 2
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["crop"], c["crop"])
  no_masks = views.make_views({"image": rec["image"], "id": "x"}, recipe,
                              np.random.default_rng(7), 32)
  assert set(no_masks) == {"image", "crop", "flip"}


def test_ids_consistent_across_views():
  rec = block_record()
  recipe = views.get_recipe("byol")
  for seed in range(30):
    out = views.make_views(rec, recipe, np.random.default_rng(seed), 16, mask_type="fh")
    pairs = set()
    for v in range(2):
      # Reference: the original ids under each output pixel, from the returned geometry.
      _, orig = transforms.crop_flip_resize(rec["image"], out["crop"][v], bool(out["flip"][v]),
                                            16, rec["masks"])
      pairs |= set(zip(orig.ravel().tolist(), out["masks"][v].ravel().tolist()))
    # One compact id per original id and vice versa, over *both* views.
    originals = [p[0] for p in pairs]
    compacts = [p[1] for p in pairs]
    assert len(set(originals)) == len(pairs) == len(set(compacts)), pairs
    assert set(compacts) == set(range(len(pairs)))


def test_max_segments_drops_smallest_jointly():
  rec = block_record()
  # Full-image views so every block has the same total area, except one made larger.
  rec["masks"][:30, :30] = 70000
  recipe = (views.ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0),) * 2
  out = views.make_views(rec, recipe, np.random.default_rng(0), 48, mask_type="fh",
                         max_segments=2)
  m = out["masks"]
  np.testing.assert_array_equal(m[:, :30, :30], 0)  # the largest segment gets id 0
  assert set(np.unique(m)) == {-1, 0, 1}
  # Next largest by area: id 300 (top right block, 24 x 24 minus the 70000 overlap) vs others.
  areas = {i: (rec["masks"] == i).sum() for i in np.unique(rec["masks"])}
  second = sorted((i for i in areas if i != 70000), key=lambda i: (-areas[i], i))[0]
  np.testing.assert_array_equal(m[0][rec["masks"] == second], 1)


def test_grid_masks_through_views():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  recipe = (views.ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0),)
  out = views.make_views({"image": image, "id": "g"}, recipe, np.random.default_rng(0), 16,
                         mask_type="grid")
  ids, counts = np.unique(out["masks"], return_counts=True)
  np.testing.assert_array_equal(ids, np.arange(16))
  assert np.all(counts == 16)  # 16 equal cells of a 16 x 16 view
  np.testing.assert_array_equal(out["masks"][0], transforms.grid_masks(16, 16))


def test_grid_masks_are_cropped_like_images():
  # The grid is laid on the original image (16 px cells), so a view shows only the ids of the
  # cells its crop window touches.
  image = np.zeros((64, 64, 3), np.uint8)
  for seed in range(20):
    out = views.make_views({"image": image, "id": "g"}, views.get_recipe("simclr"),
                           np.random.default_rng(seed), 16, mask_type="grid")
    for v in range(2):
      top, left, h, w = out["crop"][v]
      cells_y = len(range(int(top) // 16, (int(np.ceil(top + h)) - 1) // 16 + 1))
      cells_x = len(range(int(left) // 16, (int(np.ceil(left + w)) - 1) // 16 + 1))
      assert len(np.unique(out["masks"][v])) <= cells_y * cells_x


def test_gt_masks_keep_ignore_label():
  rec = block_record()
  seg = np.zeros((48, 48), np.int32)
  seg[:, :10] = -1
  seg[20:, 20:] = 15
  rec["segmentation"] = seg
  recipe = (views.ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0),)
  out = views.make_views(rec, recipe, np.random.default_rng(0), 48, mask_type="gt")
  np.testing.assert_array_equal(out["masks"][0][:, :10], -1)
  assert set(np.unique(out["masks"])) == {-1, 0, 1}


@pytest.mark.parametrize("mask_type,key", [("fh", "masks"), ("gt", "segmentation")])
def test_mask_errors_name_the_record(mask_type, key):
  rec = block_record()
  rec["segmentation"] = rec["masks"]
  bad = dict(rec)
  bad[key] = rec["masks"][:40]
  with pytest.raises(ValueError, match="blocks"):
    views.make_views(bad, views.get_recipe("byol"), np.random.default_rng(0), 16,
                     mask_type=mask_type)
  missing = {k: v for k, v in rec.items() if k != key}
  with pytest.raises(ValueError, match="blocks"):
    views.make_views(missing, views.get_recipe("byol"), np.random.default_rng(0), 16,
                     mask_type=mask_type)
  with pytest.raises(ValueError, match="mask_type"):
    views.make_views(rec, views.get_recipe("byol"), np.random.default_rng(0), 16,
                     mask_type="slic")


def test_greyscale_and_small_images():
  grey = {"image": np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8), "id": "g"}
  out = views.make_views(grey, views.get_recipe("mocov2"), np.random.default_rng(0), 32)
  assert out["image"].shape == (2, 32, 32, 3)
  assert np.all(out["image"][..., 0] == out["image"][..., 1])


def test_masked_light_shares_the_crop():
  rec = block_record()
  for seed in range(10):
    out = views.make_views(rec, views.get_recipe("masked_light"), np.random.default_rng(seed), 16)
    np.testing.assert_array_equal(out["crop"][0], out["crop"][1])
    assert out["flip"][0] == out["flip"][1]
    np.testing.assert_array_equal(out["image"][0], out["image"][1])


def test_masked_medium_diagonal_crops():
  image = np.zeros((200, 300, 3), np.uint8)
  distances = []
  for seed in range(50):
    out = views.make_views({"image": image, "id": "d"}, views.get_recipe("masked_medium"),
                           np.random.default_rng(seed), 32)
    (t0, l0, h0, w0), (t1, l1, h1, w1) = out["crop"]
    assert np.isclose(h0, h1) and np.isclose(w0, w1) and out["flip"][0] == out["flip"][1]
    # Same shift on both axes, in outer-crop pixels at 256 scale: h_inner = 224/256 h_outer.
    dy, dx = (t1 - t0) * 224 / h0, (l1 - l0) * 224 / w0
    assert np.isclose(dy, dx, atol=1e-3) and -1e-3 <= dy <= 32 + 1e-3
    assert np.isclose(dy, round(dy), atol=1e-3)  # integer pixel distance at 256 scale
    assert 0 <= t0 and t1 + h1 <= 200 + 1e-3 and 0 <= l0 and l1 + w1 <= 300 + 1e-3
    distances.append(dy)
  assert len(set(np.round(distances))) > 5


def iou(a, b):
  y0, x0 = max(a[0], b[0]), max(a[1], b[1])
  y1, x1 = min(a[2], b[2]), min(a[3], b[3])
  inter = max(0.0, y1 - y0) * max(0.0, x1 - x0)
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("shape", [(120, 160), (40, 40)])
def test_maskco_views(shape):
  image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
  size = 64
  for seed in range(20):
    out = views.make_maskco_views({"image": image, "id": "m", "label": 1},
                                  views.get_recipe("maskco"), np.random.default_rng(seed), size)
    assert out["image"].shape == (2, size, size, 3) and out["boxes"].shape == (17, 4)
    assert out["label"] == 1
    (q_crop, k_crop), (q_flip, k_flip) = out["crop"], out["flip"]
    for crop in (q_crop, k_crop):  # each view >= 20 % of the image (integer rounding aside)
      assert crop[2] * crop[3] >= 0.2 * shape[0] * shape[1] - (crop[2] + crop[3] + 1)
    boxes = out["boxes"]
    assert np.all(boxes >= -1e-4) and np.all(boxes <= size + 1e-4)
    sides = boxes[:, 2] - boxes[:, 0]
    np.testing.assert_allclose(sides, boxes[:, 3] - boxes[:, 1], rtol=1e-5)
    assert np.all(sides[1:] >= 32 / 224 * size - 1e-4) and np.all(sides <= 128 / 224 * size + 1e-4)
    for neg in boxes[1:]:
      assert iou(boxes[0], neg) < 0.2
    # The positive key box lies in both views: its projection into the query view is inside it
    # and equals the masked box.
    proj = transforms.project_box(boxes[0], k_crop, q_crop, k_flip, q_flip, size)
    assert np.all(proj >= -1e-3) and np.all(proj <= size + 1e-3)
    np.testing.assert_allclose(out["masked_box"], proj, atol=1e-3)
