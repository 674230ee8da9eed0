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
