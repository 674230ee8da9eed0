"""RandAugment (timm `rand-m9-mstd0.5-inc1`), random erasing, PCA lighting and the train view,
each checked against its definition: timm's op table written out, every op against a NumPy
reference, the sampling distributions over many draws."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.data import randaugment as ra
from ssl_jax.data import supervised_views as sv

# timm 0.4-1.0 `_RAND_INCREASING_TRANSFORMS` and `_RAND_TRANSFORMS`, written out.
TIMM_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                   "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                   "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                   "TranslateXRel", "TranslateYRel"]
TIMM_ORIGINAL = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                 "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                 "TranslateXRel", "TranslateYRel"]
# timm's level functions at magnitude 9 (level 0.9), positive sign / negated sign.
TIMM_ARGS_M9 = {
    "AutoContrast": (None, None), "Equalize": (None, None), "Invert": (None, None),
    "Rotate": (27.0, -27.0),                      # 30·ℓ
    "PosterizeIncreasing": (1, 1),                # 4 − ⌊4ℓ⌋
    "SolarizeIncreasing": (26, 26),               # 256 − ⌊256ℓ⌋
    "SolarizeAdd": (99, 99),                      # ⌊110ℓ⌋
    "ColorIncreasing": (1.81, 0.19), "ContrastIncreasing": (1.81, 0.19),  # 1 ± 0.9ℓ
    "BrightnessIncreasing": (1.81, 0.19), "SharpnessIncreasing": (1.81, 0.19),
    "ShearX": (0.27, -0.27), "ShearY": (0.27, -0.27),  # 0.3ℓ
    "TranslateXRel": (0.405, -0.405), "TranslateYRel": (0.405, -0.405),  # 0.45ℓ
    "Posterize": (3, 3), "Solarize": (230, 230),  # ⌊4ℓ⌋, ⌊256ℓ⌋ (original list)
    "Color": (1.72, 1.72), "Contrast": (1.72, 1.72), "Brightness": (1.72, 1.72),
    "Sharpness": (1.72, 1.72),                    # 1.8ℓ + 0.1
}


def test_op_lists_and_arguments_are_timms():
  assert list(ra.OPS_INCREASING) == TIMM_INCREASING
  assert list(ra.OPS_ORIGINAL) == TIMM_ORIGINAL
  for name, (pos, neg) in TIMM_ARGS_M9.items():
    for negate, want in ((False, pos), (True, neg)):
      got = ra.op_argument(name, 9.0, negate)
      assert (got is None) == (want is None), name
      if want is not None:
        assert got == pytest.approx(want, abs=1e-12), (name, negate)
        assert isinstance(got, int) == isinstance(want, int), name
  # The ends of the magnitude range: no change at 0; at 10 posterize keeps 0 bits, solarize
  # flips every pixel (threshold 0), the enhance factors reach 0.1 / 1.9.
  assert ra.op_argument("PosterizeIncreasing", 0.0) == 4
  assert ra.op_argument("SolarizeIncreasing", 0.0) == 256
  assert ra.op_argument("Rotate", 0.0) == 0.0
  assert ra.op_argument("PosterizeIncreasing", 10.0) == 0
  assert ra.op_argument("SolarizeIncreasing", 10.0) == 0
  assert ra.op_argument("ColorIncreasing", 10.0, True) == pytest.approx(0.1)
  assert ra.op_argument("ColorIncreasing", 10.0, False) == pytest.approx(1.9)


def test_policy_string():
  p = ra.RandAugment.from_policy("rand-m9-mstd0.5-inc1")
  assert (p.num_ops, p.magnitude, p.magnitude_std, p.increasing, p.prob, p.magnitude_max) == (
      2, 9.0, 0.5, True, 0.5, 10.0)
  q = ra.RandAugment.from_policy("rand-m7-n3-mstd0-mmax12-p0.3")
  assert (q.num_ops, q.magnitude, q.magnitude_std, q.increasing, q.prob, q.magnitude_max) == (
      3, 7.0, 0.0, False, 0.3, 12.0)
  assert ra.RandAugment.from_policy("rand-mstdinf").magnitude_std == math.inf
  for bad in ("augmix-m9", "rand-x9", "rand-m9-foo"):
    with pytest.raises(ValueError, match="RandAugment policy"):
      ra.RandAugment.from_policy(bad)


# ---------------------------------------------------------------------------------------------
# Each op against a NumPy reference of its definition

def _image(seed=0, h=23, w=29):
  rng = np.random.default_rng(seed)
  img = rng.integers(40, 200, (h, w, 3)).astype(np.uint8)
  img[: h // 3, :, 0] = 250  # structure: a bright red band and a dark corner
  img[-4:, -5:] = 3
  return img


def _gray(img):
  """PIL's L conversion: ITU-R 601-2 luma, R·299/1000 + G·587/1000 + B·114/1000, rounded."""
  x = img.astype(np.int64)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _blend(degenerate, img, factor):
  return np.clip(degenerate + factor * (img.astype(np.float64) - degenerate), 0, 255)


def _autocontrast(img):
  """Per channel x -> ⌊x·s + o⌋ with s = 255 / (max − min), o = −min·s (PIL's float formula,
  whose rounding maps the maximum to 254 or 255), clipped to [0, 255]."""
  out = np.empty_like(img)
  for c in range(3):
    x = img[..., c].astype(np.float64)
    lo, hi = x.min(), x.max()
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    offset = -lo * scale if hi > lo else 0.0
    out[..., c] = np.clip(np.floor(x * scale + offset), 0, 255)
  return out


def _equalize(img):
  """Histogram equalisation as PIL defines it: lut[i] = (step // 2 + Σ_{j<i} h[j]) // step with
  step = (N − count of the last non-empty bin) // 255, per channel."""
  out = np.empty_like(img)
  for c in range(3):
    h = np.bincount(img[..., c].ravel(), minlength=256)
    nonzero = h[h > 0]
    step = (h.sum() - nonzero[-1]) // 255 if nonzero.size > 1 else 0
    if not step:
      out[..., c] = img[..., c]
      continue
    lut = (step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step
    out[..., c] = np.clip(lut, 0, 255)[img[..., c]]
  return out


def _sharpen_degenerate(img):
  """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13), border pixels unchanged."""
  x = img.astype(np.float64)
  out = x.copy()
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13
  acc = sum(k[i, j] * x[i:i + x.shape[0] - 2, j:j + x.shape[1] - 2]
            for i in range(3) for j in range(3))
  out[1:-1, 1:-1] = np.floor(acc + 0.5)
  return out


def _affine_nearest(img, coeffs, fill):
  """PIL AFFINE with NEAREST: output pixel (x, y) reads input (a·x' + b·y' + c, d·x' + e·y' + f)
  at the pixel centre x' = x + 0.5, y' = y + 0.5; outside the image: fill."""
  a, b, c, d, e, f = coeffs
  h, w = img.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w] + 0.5
  xin, yin = a * xx + b * yy + c, d * xx + e * yy + f
  xi, yi = np.floor(xin).astype(int), np.floor(yin).astype(int)
  inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
  out = np.broadcast_to(np.asarray(fill, np.uint8), img.shape).copy()
  out[inside] = img[yi[inside], xi[inside]]
  return out


def _rotation_coeffs(degrees, w, h):
  """Inverse map of a counter-clockwise rotation by `degrees` about the image centre."""
  t = -math.radians(degrees)
  cx, cy = w / 2.0, h / 2.0
  a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
  return (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)


@pytest.mark.parametrize("name, arg, reference, atol", [
    ("Invert", None, lambda x: 255 - x, 0),
    ("PosterizeIncreasing", 1, lambda x: x & 0b10000000, 0),
    ("Posterize", 3, lambda x: x & 0b11100000, 0),
    ("PosterizeIncreasing", 0, lambda x: np.zeros_like(x), 0),
    ("SolarizeIncreasing", 128, lambda x: np.where(x >= 128, 255 - x, x), 0),
    ("Solarize", 26, lambda x: np.where(x >= 26, 255 - x, x), 0),
    ("SolarizeAdd", 99, lambda x: np.where(x < 128, np.minimum(255, x.astype(int) + 99), x), 0),
    ("AutoContrast", None, _autocontrast, 0),
    ("Equalize", None, _equalize, 0),
    ("BrightnessIncreasing", 1.81, lambda x: _blend(0.0, x, 1.81), 1),
    ("ColorIncreasing", 0.19, lambda x: _blend(_gray(x)[..., None], x, 0.19), 1),
    ("ContrastIncreasing", 1.81,
     lambda x: _blend(np.floor(_gray(x).mean() + 0.5), x, 1.81), 1),
    ("SharpnessIncreasing", 1.81, lambda x: _blend(_sharpen_degenerate(x), x, 1.81), 1),
])
def test_photometric_op_matches_reference(name, arg, reference, atol):
  img = _image()
  got = ra.apply_op(img, name, arg).astype(int)
  np.testing.assert_allclose(got, reference(img).astype(int), atol=atol, rtol=0, err_msg=name)
  assert got.shape == img.shape


@pytest.mark.parametrize("name, arg", [("ShearX", 0.27), ("ShearY", -0.27),
                                       ("TranslateXRel", 0.405), ("TranslateYRel", -0.405),
                                       ("Rotate", 27.0), ("Rotate", -27.0)])
def test_geometric_op_matches_reference(name, arg):
  img = _image(1)
  h, w = img.shape[:2]
  coeffs = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * w, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, arg * h),
            "Rotate": _rotation_coeffs(arg, w, h)}[name]
  got = ra.apply_op(img, name, arg, interpolation="nearest")
  ref = _affine_nearest(img, coeffs, ra.FILL)
  # Nearest neighbour at exact half-pixel ties may round either way: allow a handful.
  assert np.mean(np.any(got != ref, axis=-1)) < 0.01, name
  assert np.any(np.all(got == ra.FILL, axis=-1)), "uncovered pixels get the fill colour"


# ---------------------------------------------------------------------------------------------
# Sampling: ops uniform with replacement, p 0.5, magnitude N(9, 0.5) clipped to [0, 10]

def test_rand_augment_sampling_matches_timm_semantics():
  rng = np.random.default_rng(0)
  always = ra.RandAugment(prob=1.0)
  n = 6000
  plans = [always.plan(rng) for _ in range(n)]
  names = [name for plan in plans for name, _ in plan]
  counts = np.array([names.count(op) for op in ra.OPS_INCREASING])
  assert len(names) == 2 * n
  assert np.abs(counts / (2 * n) - 1 / 15).max() < 0.01  # uniform over the 15 ops
  same = np.mean([plan[0][0] == plan[1][0] for plan in plans])
  assert same == pytest.approx(1 / 15, abs=0.012)  # with replacement: twice the same op
  half = ra.RandAugment()
  applied = np.mean([len(half.plan(rng)) for _ in range(n)]) / 2
  assert applied == pytest.approx(0.5, abs=0.02)
  mags = np.array([half.draw_magnitude(rng) for _ in range(20000)])
  assert mags.max() == 10.0 and mags.min() > 6.0
  assert np.mean(mags == 10.0) == pytest.approx(0.02275, abs=0.004)  # P(N(9, .5) > 10)
  inner = mags[mags < 10.0]
  assert inner.mean() == pytest.approx(8.97, abs=0.02)  # E[N(9,.5) | < 10] = 9 − .5·φ(2)/Φ(2)
  fixed = ra.RandAugment(magnitude_std=0.0)
  assert {fixed.draw_magnitude(rng) for _ in range(10)} == {9.0}
  uniform = ra.RandAugment(magnitude_std=math.inf)
  u = np.array([uniform.draw_magnitude(rng) for _ in range(5000)])
  assert u.min() >= 0 and u.max() <= 9 and u.mean() == pytest.approx(4.5, abs=0.15)


def test_rand_augment_applies_its_plan():
  img = _image(2)
  policy = ra.RandAugment(prob=1.0)
  out = policy(img, np.random.default_rng(5))
  plan = policy.plan(np.random.default_rng(5))
  ref = img
  for name, arg in plan:
    ref = ra.apply_op(ref, name, arg)
  np.testing.assert_array_equal(out, ref)
  assert out.dtype == np.uint8 and out.shape == img.shape
  nothing = ra.RandAugment(prob=0.0)
  np.testing.assert_array_equal(nothing(img, np.random.default_rng(0)), img)


# ---------------------------------------------------------------------------------------------
# Random erasing: the box distribution, then the fill on device

def _accepted_marginals(grid=1200):
  """CDFs of the accepted area fraction a and log aspect ratio of timm's sampler on a large
  square image, from the definition: a ~ U(0.02, 1/3), log r ~ U(log .3, log 1/.3), accepted
  when the box fits (a·r < 1 and a/r < 1); retries redraw, so accepted = proposal | fits."""
  a = np.linspace(0.02, 1 / 3, grid)
  log_r = np.linspace(math.log(0.3), -math.log(0.3), grid)
  aa, rr = np.meshgrid(a, np.exp(log_r), indexing="ij")
  fits = (aa * rr < 1) & (aa / rr < 1)
  pa = fits.sum(1).astype(float)
  pr = fits.sum(0).astype(float)
  return a, np.cumsum(pa) / pa.sum(), log_r, np.cumsum(pr) / pr.sum()


def test_erasing_box_distribution():
  side = 2048  # large enough that rounding h, w to pixels does not matter
  sampler = sv.RandomErasing()
  rng = np.random.default_rng(0)
  boxes = np.stack([sampler.box(rng, side, side) for _ in range(20000)])
  erased = boxes[:, 2] > 0
  assert np.mean(erased) == pytest.approx(0.25, abs=0.012)
  assert np.all(boxes[~erased] == 0)
  top, left, h, w = boxes[erased].T.astype(float)
  assert np.all((top >= 0) & (left >= 0) & (top + h <= side) & (left + w <= side))
  assert np.all((h < side) & (w < side) & (h > 0) & (w > 0))
  area, log_ratio = h * w / side**2, np.log(h / w)
  a, cdf_a, lr, cdf_r = _accepted_marginals()
  ks_area = np.abs(np.searchsorted(np.sort(area), a, side="right") / area.size - cdf_a).max()
  ks_ratio = np.abs(np.searchsorted(np.sort(log_ratio), lr, side="right") / area.size
                    - cdf_r).max()
  assert ks_area < 0.03 and ks_ratio < 0.03, (ks_area, ks_ratio)
  # Placement uniform over the free range: the relative offset has mean 1/2 and variance 1/12.
  rel = top / np.maximum(side - h, 1)
  assert rel.mean() == pytest.approx(0.5, abs=0.02) and rel.var() == pytest.approx(1 / 12,
                                                                                  abs=0.01)


def test_erasing_box_placement_is_inclusive_and_rejects_misfits():
  rng = np.random.default_rng(1)
  sampler = sv.RandomErasing(probability=1.0, min_area=0.2, max_area=0.2, min_aspect=1.0)
  # 10x10, area 20: h = w = round(√20) = 4, top and left uniform over {0, …, 6} inclusive.
  boxes = np.stack([sampler.box(rng, 10, 10) for _ in range(3000)])
  assert set(boxes[:, 2]) == {4} and set(boxes[:, 3]) == {4}
  assert set(boxes[:, 0]) == set(range(7)) and set(boxes[:, 1]) == set(range(7))
  too_big = sv.RandomErasing(probability=1.0, min_area=0.9, max_area=0.99, min_aspect=3.0,
                             max_aspect=3.0)
  assert not np.any(too_big.box(rng, 10, 10))  # no attempt fits: nothing erased


@pytest.fixture(scope="module")
def erase_fn():
  return jax.jit(sv.erase, static_argnames="mode")


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erase_fills_only_the_box(erase_fn, mode):
  images = jnp.full((3, 40, 40, 3), 7.0)
  boxes = jnp.asarray([[2, 3, 30, 20], [0, 0, 0, 0], [39, 39, 1, 1]], jnp.int32)
  out = np.asarray(erase_fn(jax.random.PRNGKey(0), images, boxes, mode=mode))
  inside = np.zeros((3, 40, 40), bool)
  inside[0, 2:32, 3:23] = True
  inside[2, 39, 39] = True
  np.testing.assert_array_equal(out[~inside], 7.0)
  fill = out[0][inside[0]]  # [600, 3]
  if mode == "pixel":
    assert abs(fill.mean()) < 0.1 and fill.std() == pytest.approx(1.0, abs=0.1)
  elif mode == "rand":
    np.testing.assert_array_equal(fill, np.broadcast_to(fill[0], fill.shape))
    assert np.all(fill[0] != 7.0)
  else:
    np.testing.assert_array_equal(fill, 0.0)


def test_pca_lighting_adds_one_eigen_combination_per_image():
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4000, 2, 2, 3)), jnp.float32)
  out = np.asarray(jax.jit(sv.pca_lighting, static_argnums=2)(jax.random.PRNGKey(1), images,
                                                              0.1))
  delta = out - np.asarray(images)
  np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1, :1], delta.shape), atol=1e-6)
  vec = np.asarray(sv.IMAGENET_PCA_EIGVEC)
  val = np.asarray(sv.IMAGENET_PCA_EIGVAL)
  alpha = np.linalg.solve(vec, delta[:, 0, 0].T).T / val  # offset = V · (α ⊙ λ)
  assert alpha.std(axis=0) == pytest.approx([0.1, 0.1, 0.1], rel=0.06)
  assert np.abs(alpha.mean(axis=0)).max() < 0.01


# ---------------------------------------------------------------------------------------------
# The train view

def test_train_view_output_and_determinism():
  img = _image(3, 60, 80)
  view = sv.TrainView(32, interpolation="bicubic", randaugment=ra.RandAugment(prob=1.0),
                      erasing=sv.RandomErasing(probability=1.0))
  spec = view.output_spec()
  assert set(spec) == {"image", "label", "erase"} and spec["erase"][0] == (4,)
  a = view.random_map({"image": img, "label": 4}, np.random.default_rng(9))
  b = view.random_map({"image": img, "label": 4}, np.random.default_rng(9))
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["erase"], b["erase"])
  assert a["image"].shape == (32, 32, 3) and a["label"] == 4 and a["erase"][2] > 0
  plain = sv.TrainView(32, interpolation="bicubic").random_map(
      {"image": img, "label": 4}, np.random.default_rng(9))
  assert set(plain) == {"image", "label"}
  # Same crop (drawn first from the same generator), then RandAugment changed the pixels.
  assert not np.array_equal(plain["image"], a["image"])
  assert view.random_map({"id": "x", "error": "bad"}, np.random.default_rng(0))["error"] == "bad"


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="mode"):
    sv.RandomErasing(mode="noise")
  with pytest.raises(ValueError, match="interpolation"):
    ra.RandAugment(interpolation="lanczos3")
