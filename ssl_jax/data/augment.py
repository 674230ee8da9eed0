"""Photometric augmentation on device, in JAX (runs inside the jitted train step).

Every op is a pure function of an explicit key and ONE image `[H, W, 3] float32` in [0, 1];
batches get one key per example through `jax.vmap`. The order of a view's augmentation is the
official BYOL/DetCon one (deepmind-research `byol/utils/augmentations.py`), which SimCLR and
MoCo share: colour jitter (p = jitter_p, the four ops in random order) -> greyscale
(p = grayscale_p) -> Gaussian blur (p = blur_p) -> solarize (p = solarize_p) -> clip to [0, 1].
Host-side geometry (crop, flip, resize) already happened in `ssl_jax.data.views`.

Random choices use `jnp.where` rather than `lax.cond`: under `vmap` a cond becomes a select of
both branches anyway, and `where` keeps the code shape-static and simple.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ssl_jax.data.views import ColorSpec, ViewSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma as `tf.image.rgb_to_grayscale` (and BYOL's `_to_grayscale`, torchvision).
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)


# ---------------------------------------------------------------------------------------------
# Deterministic building blocks (fixed factors): tested against NumPy references.


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """[..., 3] RGB in [0, 1] -> [..., 3] HSV with hue in [0, 1) (TF's adjust_saturation kernel)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), b)
  chroma = v - jnp.minimum(jnp.minimum(r, g), b)
  s = jnp.where(v > 0, chroma / jnp.where(v > 0, v, 1.0), 0.0)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hr = (g - b) / (6.0 * safe)
  hg = (b - r) / (6.0 * safe) + 2.0 / 6.0
  hb = (r - g) / (6.0 * safe) + 4.0 / 6.0
  h = jnp.where(r == v, hr, jnp.where(g == v, hg, hb))
  h = jnp.where(chroma > 0, h, 0.0)
  h = jnp.where(h < 0, h + 1.0, h)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """[..., 3] HSV (hue in [0, 1), wrapped) -> [..., 3] RGB."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  c = s * v
  m = v - c
  dh = (h % 1.0) * 6.0
  x = c * (1.0 - jnp.abs(dh % 2.0 - 1.0))
  sector = jnp.floor(dh).astype(jnp.int32)
  r = jnp.select([(sector == 0) | (sector == 5), (sector == 1) | (sector == 4)], [c, x], 0.0)
  g = jnp.select([(sector == 1) | (sector == 2), (sector == 0) | (sector == 3)], [c, x], 0.0)
  b = jnp.select([(sector == 3) | (sector == 4), (sector == 2) | (sector == 5)], [c, x], 0.0)
  return jnp.stack([r + m, g + m, b + m], axis=-1)


def grayscale(image: jax.Array) -> jax.Array:
  """[..., 3] -> [...] luma with `GRAYSCALE_WEIGHTS`."""
  return jnp.tensordot(image, jnp.asarray(GRAYSCALE_WEIGHTS, image.dtype), axes=(-1, -1))


def to_grayscale(image: jax.Array) -> jax.Array:
  """[H, W, 3] -> [H, W, 3] with the luma replicated in the three channels (colour dropping)."""
  return jnp.repeat(grayscale(image)[..., None], 3, axis=-1)


def adjust_brightness(image: jax.Array, factor: jax.Array, style: str = "byol") -> jax.Array:
  """simclr/byol (TF `adjust_brightness`): x + delta; torchvision: x * factor."""
  return image * factor if style == "torchvision" else image + factor


def adjust_contrast(image: jax.Array, factor: jax.Array, style: str = "byol") -> jax.Array:
  """(x - mean) * factor + mean; the mean is per channel over H, W for TF (simclr/byol) and the
  mean of the greyscale image for torchvision."""
  if style == "torchvision":
    mean = jnp.mean(grayscale(image))
  else:
    mean = jnp.mean(image, axis=(-3, -2), keepdims=True)
  return (image - mean) * factor + mean


def adjust_saturation(image: jax.Array, factor: jax.Array, style: str = "byol") -> jax.Array:
  """TF (simclr/byol): scale HSV saturation, clipped to [0, 1]; torchvision: blend with grey."""
  if style == "torchvision":
    return (image - to_grayscale(image)) * factor + to_grayscale(image)
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0))
  return hsv_to_rgb(hsv)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates the HSV hue by `delta` (a fraction of the colour wheel, wrapped)."""
  hsv = rgb_to_hsv(image)
  return hsv_to_rgb(hsv.at[..., 0].set((hsv[..., 0] + delta) % 1.0))


def gaussian_kernel_size(side: int) -> int:
  """BYOL/SimCLR: kernel of size side / 10, made odd as 2 * int(size / 2) + 1 (23 at 224 px)."""
  return 2 * int(side / 10 / 2) + 1


def blur_with_sigma(image: jax.Array, sigma: jax.Array, kernel_size: int,
                    padding: str = "reflect") -> jax.Array:
  """Separable Gaussian blur of [H, W, C] with a normalised (2r+1)-tap kernel.

  padding: "reflect" (mirror without repeating the edge, as `np.pad(mode="reflect")`) or
    "zeros" (BYOL/SimCLR's `padding='SAME'` depthwise conv, which darkens borders).
  """
  radius = kernel_size // 2
  if radius == 0:
    return image
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-x**2 / (2.0 * sigma**2))
  kernel = kernel / jnp.sum(kernel)
  mode = "reflect" if padding == "reflect" else "constant"
  h, w = image.shape[:2]
  # Reflect padding needs radius < side; clamp so tiny test images still work.
  ry, rx = min(radius, h - 1), min(radius, w - 1)
  if mode == "constant":
    ry, rx = radius, radius
  out = jnp.pad(image, ((ry, ry), (0, 0), (0, 0)), mode=mode)
  taps_y = kernel[radius - ry:radius + ry + 1]
  out = sum(taps_y[i] * out[i:i + h] for i in range(2 * ry + 1))
  out = jnp.pad(out, ((0, 0), (rx, rx), (0, 0)), mode=mode)
  taps_x = kernel[radius - rx:radius + rx + 1]
  return sum(taps_x[i] * out[:, i:i + w] for i in range(2 * rx + 1))


# ---------------------------------------------------------------------------------------------
# Random ops: pure functions of (key, image [H, W, 3] float32 in [0, 1]).


def _coin(key: jax.Array, p: float) -> jax.Array:
  return jax.random.uniform(key, ()) < p


def color_jitter(key: jax.Array, image: jax.Array, brightness: float, contrast: float,
                 saturation: float, hue: float, p: float = 1.0,
                 style: str = "byol") -> jax.Array:
  """Brightness, contrast, saturation and hue jitter in a random order, with probability p.

  Each op is followed by a clip to [0, 1], as in SimCLR's `color_jitter_rand` and BYOL's
  `_color_transform_single_image` (torchvision clamps inside each op too). Strengths of 0 skip
  the op. Factors: brightness delta ~ U[-b, b] (TF) or factor ~ U[max(0, 1-b), 1+b]
  (torchvision); contrast and saturation ~ U[1-c, 1+c] (TF) or U[max(0, 1-c), 1+c]
  (torchvision); hue delta ~ U[-h, h].
  """
  k_apply, k_perm, kb, kc, ks, kh = jax.random.split(key, 6)
  tv = style == "torchvision"
  lo = (lambda s: max(0.0, 1.0 - s)) if tv else (lambda s: 1.0 - s)
  b = (jax.random.uniform(kb, (), minval=lo(brightness), maxval=1.0 + brightness) if tv else
       jax.random.uniform(kb, (), minval=-brightness, maxval=brightness))
  c = jax.random.uniform(kc, (), minval=lo(contrast), maxval=1.0 + contrast)
  s = jax.random.uniform(ks, (), minval=lo(saturation), maxval=1.0 + saturation)
  h = jax.random.uniform(kh, (), minval=-hue, maxval=hue)
  ops = [lambda x: adjust_brightness(x, b, style), lambda x: adjust_contrast(x, c, style),
         lambda x: adjust_saturation(x, s, style), lambda x: adjust_hue(x, h)]
  enabled = [brightness > 0, contrast > 0, saturation > 0, hue > 0]
  branches = [(lambda x, f=f: jnp.clip(f(x), 0.0, 1.0)) if on else (lambda x: x)
               for f, on in zip(ops, enabled)]
  order = jax.random.permutation(k_perm, 4)
  # A loop (not 4 unrolled switches) traces each op once: 4x less to compile.
  out = jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(order[i], branches, x), image)
  return jnp.where(_coin(k_apply, p), out, image)


def random_grayscale(key: jax.Array, image: jax.Array, p: float) -> jax.Array:
  """Colour dropping with probability p."""
  return jnp.where(_coin(key, p), to_grayscale(image), image)


def gaussian_blur(key: jax.Array, image: jax.Array, sigma_range: Sequence[float] = (0.1, 2.0),
                  p: float = 1.0, padding: str = "reflect") -> jax.Array:
  """Gaussian blur with sigma ~ U(sigma_range), kernel 10 % of the image height, probability p."""
  k_apply, k_sigma = jax.random.split(key)
  sigma = jax.random.uniform(k_sigma, (), minval=sigma_range[0], maxval=sigma_range[1])
  blurred = blur_with_sigma(image, sigma, gaussian_kernel_size(image.shape[0]), padding)
  return jnp.where(_coin(k_apply, p), blurred, image)


def solarize(key: jax.Array, image: jax.Array, p: float = 1.0,
             threshold: float = 0.5) -> jax.Array:
  """x -> x if x < threshold else 1 - x (DetCon A.1), with probability p."""
  out = jnp.where(image < threshold, image, 1.0 - image)
  return jnp.where(_coin(key, p), out, image)


def _augment_one(key: jax.Array, image: jax.Array, spec: ColorSpec) -> jax.Array:
  k_jit, k_gray, k_blur, k_sol = jax.random.split(key, 4)
  x = image
  if spec.jitter_p > 0:
    x = color_jitter(k_jit, x, spec.brightness, spec.contrast, spec.saturation, spec.hue,
                     spec.jitter_p, spec.jitter_style)
  if spec.grayscale_p > 0:
    x = random_grayscale(k_gray, x, spec.grayscale_p)
  if spec.blur_p > 0:
    x = gaussian_blur(k_blur, x, spec.blur_sigma, spec.blur_p, spec.blur_padding)
  if spec.solarize_p > 0:
    x = solarize(k_sol, x, spec.solarize_p)
  return jnp.clip(x, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Batched entry points.


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 or float in [0, 255] -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def color_augment(rng: jax.Array, images: jax.Array, spec: ColorSpec | None) -> jax.Array:
  """Augments a batch with independent randomness per example.

  Args:
    rng: one PRNG key (split into B per-example keys).
    images: [B, H, W, 3] uint8 or float in [0, 255].
    spec: the view's colour spec; None means no colour augmentation.

  Returns:
    [B, H, W, 3] float32 in [0, 1] (not normalised: see `normalize`).
  """
  x = to_unit_float(images)
  if spec is None:
    return x
  keys = jax.random.split(rng, x.shape[0])
  return jax.vmap(lambda k, im: _augment_one(k, im, spec))(keys, x)


def normalize(x: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """[..., 3] float in [0, 1] -> (x - mean) / std per channel."""
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def color_views(rng: jax.Array, images: jax.Array,
                recipe: Sequence[ViewSpec | ColorSpec | None]) -> jax.Array:
  """Colour-augments every view: [B, V, H, W, 3] uint8 -> float32 [B, V, H, W, 3] in [0, 1].

  Args:
    rng: one PRNG key; views and examples get independent keys.
    images: [B, V, H, W, 3] uint8 or float in [0, 255] (host geometry done).
    recipe: V entries, each a `ViewSpec` (its `.color` is used), a `ColorSpec` or None.
  """
  if images.ndim != 5 or images.shape[-1] != 3:
    raise ValueError(f"augmented views need images [B, V, H, W, 3], got {images.shape}")
  if len(recipe) != images.shape[1]:
    raise ValueError(f"the recipe has {len(recipe)} views but the batch has {images.shape[1]}")
  keys = jax.random.split(rng, len(recipe))
  out = []
  for v, entry in enumerate(recipe):
    spec = entry.color if isinstance(entry, ViewSpec) else entry
    out.append(color_augment(keys[v], images[:, v], spec))
  return jnp.stack(out, axis=1)


def augment_views(rng: jax.Array, images: jax.Array,
                  recipe: Sequence[ViewSpec | ColorSpec | None]) -> jax.Array:
  """`color_views` then ImageNet normalisation: [B, V, H, W, 3] -> float32 [B, V, H, W, 3]."""
  return normalize(color_views(rng, images, recipe))
