"""On-device colour augmentation vs independent NumPy references."""
import colorsys
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ssl_jax.data import augment
from ssl_jax.data import views


def rand_image(seed=0, shape=(8, 8, 3)):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def hsv_reference(image):
  return np.array([colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3)]).reshape(image.shape)


def rgb_reference(hsv):
  return np.array([colorsys.hsv_to_rgb(*p) for p in hsv.reshape(-1, 3)]).reshape(hsv.shape)


def test_grayscale_weights():
  x = rand_image()
  ref = x[..., 0] * 0.2989 + x[..., 1] * 0.5870 + x[..., 2] * 0.1140
  out = np.asarray(augment.to_grayscale(jnp.asarray(x)))
  np.testing.assert_allclose(out, np.repeat(ref[..., None], 3, -1), rtol=1e-6)


def test_solarize():
  x = rand_image()
  out = augment.solarize(jax.random.key(0), jnp.asarray(x), p=1.0)
  np.testing.assert_allclose(np.asarray(out), np.where(x < 0.5, x, 1.0 - x), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(augment.solarize(jax.random.key(0), x, p=0.0)), x)


def test_rgb_hsv_round_trip_and_reference():
  x = rand_image(1, (6, 6, 3))
  x[0, 0] = 0.5  # grey: zero chroma
  x[0, 1] = 0.0  # black
  x[0, 2] = [1.0, 0.0, 0.0]
  hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(x)))
  np.testing.assert_allclose(hsv, hsv_reference(x), atol=1e-5)
  np.testing.assert_allclose(np.asarray(augment.hsv_to_rgb(jnp.asarray(hsv))), x, atol=1e-5)


@pytest.mark.parametrize("delta", [0.0, 0.1, -0.2, 0.45])
def test_hue_shift(delta):
  x = rand_image(2)
  out = np.asarray(augment.adjust_hue(jnp.asarray(x), delta))
  hsv = hsv_reference(x)
  hsv[..., 0] = (hsv[..., 0] + delta) % 1.0
  np.testing.assert_allclose(out, rgb_reference(hsv), atol=1e-5)
  if delta == 0.0:
    np.testing.assert_allclose(out, x, atol=1e-6)


@pytest.mark.parametrize("style", ["byol", "simclr", "torchvision"])
@pytest.mark.parametrize("factor", [0.3, 1.0, 1.6])
def test_brightness_contrast_saturation_formulas(style, factor):
  x = rand_image(3)
  xj = jnp.asarray(x)
  grey = x @ np.array([0.2989, 0.5870, 0.1140])
  if style == "torchvision":
    ref_b = x * factor
    ref_c = (x - grey.mean()) * factor + grey.mean()
    ref_s = (x - grey[..., None]) * factor + grey[..., None]
  else:
    ref_b = x + factor  # TF adjust_brightness adds a delta
    mean = x.mean(axis=(0, 1), keepdims=True)
    ref_c = (x - mean) * factor + mean
    hsv = hsv_reference(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 1)
    ref_s = rgb_reference(hsv)
  np.testing.assert_allclose(np.asarray(augment.adjust_brightness(xj, factor, style)), ref_b,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(augment.adjust_contrast(xj, factor, style)), ref_c,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(augment.adjust_saturation(xj, factor, style)), ref_s,
                             atol=1e-5)


def test_kernel_size():
  assert augment.gaussian_kernel_size(224) == 23  # BYOL/SimCLR: 23 x 23 at 224 px
  assert augment.gaussian_kernel_size(32) == 3
  assert augment.gaussian_kernel_size(9) == 1


@pytest.mark.parametrize("padding,mode", [("reflect", "mirror"), ("zeros", "constant")])
@pytest.mark.parametrize("sigma", [0.1, 1.0, 2.0])
def test_blur_matches_scipy_separable_reference(padding, mode, sigma):
  x = rand_image(4, (12, 10, 3))
  kernel_size = 5
  taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * sigma**2))
  taps /= taps.sum()
  # scipy's "mirror" is numpy's "reflect" (edge pixel not repeated).
  ref = ndimage.correlate1d(x, taps, axis=0, mode=mode, cval=0.0)
  ref = ndimage.correlate1d(ref, taps, axis=1, mode=mode, cval=0.0)
  out = augment.blur_with_sigma(jnp.asarray(x), sigma, kernel_size, padding)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_random_blur_probability_and_sigma_range():
  x = rand_image(5, (20, 20, 3))
  same = augment.gaussian_blur(jax.random.key(0), jnp.asarray(x), p=0.0)
  np.testing.assert_array_equal(np.asarray(same), x)
  out = np.asarray(augment.gaussian_blur(jax.random.key(0), jnp.asarray(x), (1.0, 1.0), p=1.0))
  ref = np.asarray(augment.blur_with_sigma(jnp.asarray(x), 1.0, 3))
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_color_jitter_brightness_only_is_a_constant_shift():
  x = rand_image(6) * 0.5 + 0.25  # no clipping for |delta| <= 0.25
  for seed in range(5):
    out = np.asarray(augment.color_jitter(jax.random.key(seed), jnp.asarray(x), 0.25, 0, 0, 0))
    delta = out - x
    np.testing.assert_allclose(delta, delta.flat[0], atol=1e-6)
    assert 0 < abs(delta.flat[0]) <= 0.25


def test_color_jitter_probability():
  x = jnp.asarray(rand_image(7))
  off = augment.color_jitter(jax.random.key(0), x, 0.4, 0.4, 0.4, 0.1, p=0.0)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(x))
  for seed in range(5):
    on = augment.color_jitter(jax.random.key(seed), x, 0.4, 0.4, 0.4, 0.1, p=1.0)
    assert np.abs(np.asarray(on) - np.asarray(x)).max() > 1e-3


# jitter_p = 1 so that every example is jittered (distinct outputs per example below).
SPEC = views.ColorSpec(0.4, 0.4, 0.2, 0.1, jitter_p=1.0, grayscale_p=0.2, blur_p=0.5,
                       solarize_p=0.2)


@functools.lru_cache(maxsize=None)
def jitted(spec):
  return jax.jit(lambda k, x: augment.color_augment(k, x, spec))


def test_color_augment_range_determinism_and_independence():
  base = (rand_image(8, (16, 16, 3)) * 255).astype(np.uint8)
  images = jnp.asarray(np.stack([base] * 8))
  out = np.asarray(jitted(SPEC)(jax.random.key(0), images))
  again = np.asarray(jitted(SPEC)(jax.random.key(0), images))
  other = np.asarray(jitted(SPEC)(jax.random.key(1), images))
  assert out.shape == (8, 16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, other)
  # Same image, different per-example keys -> different results.
  assert len({o.tobytes() for o in out}) == 8
  # uint8 and float [0, 255] inputs agree.
  as_float = np.asarray(jitted(SPEC)(jax.random.key(0), images.astype(jnp.float32)))
  np.testing.assert_allclose(as_float, out, atol=1e-6)


@pytest.mark.parametrize("which", ["grayscale_p", "solarize_p"])
def test_probability_one_always_applies(which):
  spec = dataclasses.replace(views.ColorSpec(), **{which: 1.0})
  x = np.full((4, 6, 6, 3), 0.8 * 255, np.float32)
  x[..., 0] = 0.1 * 255
  out = np.asarray(jitted(spec)(jax.random.key(3), jnp.asarray(x)))
  unit = x / 255
  if which == "grayscale_p":
    grey = unit @ np.array([0.2989, 0.5870, 0.1140])
    ref = np.repeat(grey[..., None], 3, -1)
  else:
    ref = np.where(unit < 0.5, unit, 1 - unit)
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_grayscale_probability_rate():
  spec = views.ColorSpec(grayscale_p=0.2)
  x = jnp.asarray(np.tile(np.array([255.0, 0.0, 0.0], np.float32), (500, 2, 2, 1)))
  out = np.asarray(jitted(spec)(jax.random.key(0), x))
  rate = np.mean(np.abs(out[:, 0, 0, 0] - out[:, 0, 0, 1]) < 1e-6)
  assert 0.14 < rate < 0.26


def test_augment_views_shapes_normalisation_and_errors():
  images = (np.random.default_rng(9).random((3, 2, 8, 8, 3)) * 255).astype(np.uint8)
  plain = (views.ViewSpec(), views.ViewSpec())  # no colour: only scaling and normalisation
  out = np.asarray(jax.jit(lambda k, x: augment.augment_views(k, x, plain))(
      jax.random.key(0), jnp.asarray(images)))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out, (images / 255.0 - mean) / std, atol=1e-5)
  assert out.shape == images.shape and out.dtype == np.float32
  recipe = views.get_recipe("byol")
  aug = jax.jit(lambda k, x: augment.augment_views(k, x, recipe))(jax.random.key(0),
                                                                    jnp.asarray(images))
  assert aug.shape == images.shape
  lo, hi = (0 - mean) / std, (1 - mean) / std
  assert np.all(np.asarray(aug) >= lo - 1e-5) and np.all(np.asarray(aug) <= hi + 1e-5)
  with pytest.raises(ValueError, match="views"):
    augment.augment_views(jax.random.key(0), jnp.asarray(images), recipe[:1])
  with pytest.raises(ValueError, match="B, V, H, W, 3"):
    augment.augment_views(jax.random.key(0), jnp.asarray(images[:, 0]), recipe)


def test_ops_are_vmappable_and_jittable():
  x = jnp.asarray(np.stack([rand_image(s) for s in range(3)]))
  keys = jax.random.split(jax.random.key(0), 3)
  f = jax.jit(jax.vmap(lambda k, im: augment.gaussian_blur(k, augment.solarize(k, im, 0.5))))
  out = f(keys, x)
  assert out.shape == x.shape


# --- p = 0.5: rates, recovered parameters, op orders (issue 20 item 19) ------------------------

N_KEYS = 400  # binomial(400, 0.5): sd 0.025, so [0.4, 0.6] is 4 sd either side


def _keys(n=N_KEYS, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _impulse(side=40):
  x = np.zeros((side, side, 3), np.float32)
  x[side // 2, side // 2] = 1.0
  return x


@functools.lru_cache(maxsize=None)
def _blur_batch(sigma_range, p):
  return jax.jit(jax.vmap(lambda k, im: augment.gaussian_blur(k, im, sigma_range, p=p),
                          in_axes=(0, None)))


def _recovered_sigmas(out, side=40):
  """sigma of each blurred impulse: out[c, c+1] / out[c, c] = w1 / w0 = exp(-1 / (2 sigma^2))."""
  c = side // 2
  ratio = out[:, c, c + 1, 0].astype(np.float64) / out[:, c, c, 0]
  return np.sqrt(-1.0 / (2.0 * np.log(ratio)))


def test_random_blur_rate_and_recovered_sigma_at_p_half():
  x = _impulse()  # 40 px: a 5-tap kernel
  out = np.asarray(_blur_batch((0.5, 1.5), 0.5)(_keys(), jnp.asarray(x)))
  blurred = np.abs(out - x).reshape(N_KEYS, -1).max(axis=1) > 0
  assert 0.4 < blurred.mean() < 0.6
  np.testing.assert_array_equal(out[~blurred], np.broadcast_to(x, out[~blurred].shape))
  sigma = _recovered_sigmas(out[blurred])
  # sigma ~ U(0.5, 1.5): every draw inside, the extremes near the ends, mean and spread uniform's.
  assert sigma.min() >= 0.5 - 1e-3 and sigma.max() <= 1.5 + 1e-3
  assert sigma.min() < 0.55 and sigma.max() > 1.45
  assert abs(sigma.mean() - 1.0) < 0.06 and abs(sigma.std() - 1 / np.sqrt(12)) < 0.04
  # The default range (0.1, 2.0), BYOL/SimCLR's.
  sigma = _recovered_sigmas(np.asarray(_blur_batch((0.1, 2.0), 1.0)(_keys(seed=1),
                                                                    jnp.asarray(x))))
  assert sigma.min() >= 0.1 - 1e-3 and sigma.max() <= 2.0 + 1e-3
  assert sigma.min() < 0.2 and sigma.max() > 1.9 and abs(sigma.mean() - 1.05) < 0.1


@functools.lru_cache(maxsize=None)
def _jitter_batch(b, c, s, h, p, style):
  return jax.jit(jax.vmap(lambda k, im: augment.color_jitter(k, im, b, c, s, h, p=p,
                                                             style=style), in_axes=(0, None)))


def _mid_image(seed=11):
  """Values in [0.4, 0.6]: no op below clips (|factor - 1| <= 0.5, |delta| <= 0.2)."""
  return (0.4 + 0.2 * rand_image(seed)).astype(np.float32)


def _assert_uniform(values, lo, hi):
  assert values.min() >= lo - 1e-4 and values.max() <= hi + 1e-4
  span = hi - lo
  assert values.min() < lo + 0.05 * span and values.max() > hi - 0.05 * span
  assert abs(values.mean() - (lo + hi) / 2) < 0.06 * span


def test_color_jitter_rate_at_p_half():
  x = _mid_image()
  out = np.asarray(_jitter_batch(0.4, 0.4, 0.4, 0.1, 0.5, "byol")(_keys(), jnp.asarray(x)))
  changed = np.abs(out - x).reshape(N_KEYS, -1).max(axis=1) > 1e-6
  assert 0.4 < changed.mean() < 0.6
  np.testing.assert_array_equal(out[~changed], np.broadcast_to(x, out[~changed].shape))


@pytest.mark.parametrize("style", ["byol", "torchvision"])
def test_color_jitter_recovered_factor_ranges(style):
  """Each op alone at p = 1 over 400 keys; its factor recovered from the output: brightness
  delta ~ U[-b, b] (TF) / factor ~ U[1-b, 1+b] (torchvision), contrast and saturation factors
  ~ U[1-c, 1+c], hue delta ~ U[-h, h]."""
  x = _mid_image()
  keys, n = _keys(), N_KEYS
  out = np.asarray(_jitter_batch(0.2, 0, 0, 0, 1.0, style)(keys, jnp.asarray(x)), np.float64)
  if style == "torchvision":
    _assert_uniform((out / x).reshape(n, -1).mean(axis=1), 0.8, 1.2)
  else:
    _assert_uniform((out - x).reshape(n, -1).mean(axis=1), -0.2, 0.2)
  out = np.asarray(_jitter_batch(0, 0.5, 0, 0, 1.0, style)(keys, jnp.asarray(x)), np.float64)
  mean = (x @ np.array(augment.GRAYSCALE_WEIGHTS)).mean() if style == "torchvision" else \
      x.mean(axis=(0, 1))
  factor = ((out - mean) * (x - mean)).reshape(n, -1).sum(1) / ((x - mean)**2).sum()
  _assert_uniform(factor, 0.5, 1.5)
  out = np.asarray(_jitter_batch(0, 0, 0.5, 0, 1.0, style)(keys, jnp.asarray(x)), np.float64)
  if style == "torchvision":
    grey = (x @ np.array(augment.GRAYSCALE_WEIGHTS))[..., None]
    factor = ((out - grey) * (x - grey)).reshape(n, -1).sum(1) / ((x - grey)**2).sum()
  else:
    # HSV saturation scales by the factor (x's saturation <= 0.5 / 0.6 < 1 / 1.5: no clip).
    sat = lambda im: (im.max(-1) - im.min(-1)) / im.max(-1)
    factor = np.median(sat(out) / sat(x), axis=(1, 2))
  _assert_uniform(factor, 0.5, 1.5)
  out = np.asarray(_jitter_batch(0, 0, 0, 0.1, 1.0, style)(keys, jnp.asarray(x)), np.float64)
  hue_in = hsv_reference(x.astype(np.float64))[..., 0]
  delta = np.array([np.median((hsv_reference(o)[..., 0] - hue_in + 0.5) % 1.0 - 0.5)
                    for o in out[:80]])  # colorsys is slow: 80 draws
  assert delta.min() >= -0.1 - 1e-4 and delta.max() <= 0.1 + 1e-4
  assert delta.min() < -0.08 and delta.max() > 0.08


def test_color_jitter_applies_the_ops_in_both_orders():
  """Brightness and saturation (which do not commute) at p = 1: each draw equals exactly one
  of the two compositions of the single ops with the same key (the draws of an op do not depend
  on which others are on), and both orders occur about equally often."""
  x = jnp.asarray(rand_image(12))
  keys = _keys(200, seed=3)
  both = np.asarray(_jitter_batch(0.3, 0, 0.6, 0, 1.0, "byol")(keys, x))
  b_then_s = np.asarray(jax.jit(jax.vmap(lambda k: augment.color_jitter(
      k, augment.color_jitter(k, x, 0.3, 0, 0, 0), 0, 0, 0.6, 0)))(keys))
  s_then_b = np.asarray(jax.jit(jax.vmap(lambda k: augment.color_jitter(
      k, augment.color_jitter(k, x, 0, 0, 0.6, 0), 0.3, 0, 0, 0)))(keys))
  first = np.abs(both - b_then_s).reshape(200, -1).max(1) < 1e-5
  second = np.abs(both - s_then_b).reshape(200, -1).max(1) < 1e-5
  distinct = np.abs(b_then_s - s_then_b).reshape(200, -1).max(1) > 1e-3
  assert distinct.mean() > 0.9
  assert np.all(first | second) and not np.any(first & second & distinct)
  assert 0.35 < first[distinct].mean() < 0.65


def test_view_spec_probabilities_reach_the_ops():
  """Through `color_augment` (what the views run): `blur_p` = 0.5 with `blur_sigma` blurs about
  half the batch with sigma in that range, `jitter_p` = 0.5 jitters about half."""
  x = np.broadcast_to(_impulse() * 255, (N_KEYS, 40, 40, 3))
  spec = views.ColorSpec(blur_p=0.5, blur_sigma=(0.5, 1.5))
  out = np.asarray(jitted(spec)(jax.random.key(5), jnp.asarray(x)))
  blurred = np.abs(out - x / 255).reshape(N_KEYS, -1).max(axis=1) > 0
  assert 0.4 < blurred.mean() < 0.6
  sigma = _recovered_sigmas(out[blurred])
  assert sigma.min() >= 0.5 - 1e-3 and sigma.max() <= 1.5 + 1e-3
  assert sigma.min() < 0.55 and sigma.max() > 1.45
  spec = views.ColorSpec(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, jitter_p=0.5)
  mid = np.broadcast_to(_mid_image(13)[None] * 255, (N_KEYS, 8, 8, 3))
  out = np.asarray(jitted(spec)(jax.random.key(6), jnp.asarray(mid)))
  changed = np.abs(out - mid / 255).reshape(N_KEYS, -1).max(axis=1) > 1e-5
  assert 0.4 < changed.mean() < 0.6
