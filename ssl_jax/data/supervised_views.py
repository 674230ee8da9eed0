"""Training views of the supervised protocols (linear evaluation, fine-tuning).

Host (grain workers, per image, `TrainView`): random-resized crop (torchvision's sampler, scale
`crop_scale`, ratio 3/4–4/3) resized with `interpolation`, horizontal flip (p 0.5), then
optionally RandAugment (`ssl_jax.data.randaugment`) and the *box* of random erasing. That is
timm's `create_transform(is_training=True)` order, which the MAE/SimMIM/DeiT fine-tuning code
uses: crop → flip → RandAugment → ToTensor → Normalize → RandomErasing.

Device (inside the jitted step, `device_images`): uint8 → [0, 1] → optional colour jitter
(`ssl_jax.data.augment`, torchvision semantics) and AlexNet PCA lighting (OpenSelfSup's
multi-layer linear protocol) → ImageNet normalisation → random erasing filled in *normalised*
space. timm erases after `Normalize`, with per-pixel N(0, 1) values in 'pixel' mode; those values
map to pixels outside [0, 255], so the fill cannot happen on the uint8 host image: the host draws
the box with timm's distribution and the device fills it.

Random erasing (Zhong et al. 2020, timm `RandomErasing(probability, mode="pixel", count 1)`): with
probability p, up to 10 attempts draw an area fraction a ~ U(min_area, max_area) = U(0.02, 1/3) of
the image and an aspect ratio r with log r ~ U(log 0.3, log 1/0.3); h = round(√(a·H·W·r)),
w = round(√(a·H·W/r)); the first attempt with h < H and w < W is placed with top ~ U{0…H−h},
left ~ U{0…W−w} (inclusive); if none fits, nothing is erased.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.data import augment, transforms
from ssl_jax.data.randaugment import RandAugment
from ssl_jax.data.views import ColorSpec

ERASE_MODES = ("pixel", "rand", "const")
# AlexNet's PCA of ImageNet RGB (Krizhevsky et al. 2012), as fb.resnet.torch and OpenSelfSup's
# `Lighting` hold it: eigenvalues and eigenvectors (columns) of the pixel covariance in [0, 1].
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))


@dataclasses.dataclass(frozen=True)
class RandomErasing:
  """timm's RandomErasing box sampler (module docstring); `mode` says how the device fills it."""
  probability: float = 0.25
  min_area: float = 0.02
  max_area: float = 1 / 3
  min_aspect: float = 0.3
  max_aspect: float = 0.0  # 0: 1 / min_aspect
  mode: str = "pixel"

  def __post_init__(self):
    if self.mode not in ERASE_MODES:
      raise ValueError(f"random erasing mode={self.mode!r} must be one of {ERASE_MODES}")
    if not 0.0 <= self.probability <= 1.0 or not 0.0 < self.min_area <= self.max_area:
      raise ValueError(f"random erasing needs 0 <= probability <= 1 and 0 < min_area <= max_area;"
                       f" got {self.probability}, {self.min_area}, {self.max_area}")

  def box(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(top, left, h, w) int32 [4]; all zeros when nothing is erased."""
    if rng.random() >= self.probability:
      return np.zeros(4, np.int32)
    area = height * width
    log_ratio = (math.log(self.min_aspect), math.log(self.max_aspect or 1.0 / self.min_aspect))
    for _ in range(10):
      target = rng.uniform(self.min_area, self.max_area) * area
      aspect = math.exp(rng.uniform(*log_ratio))
      h = int(round(math.sqrt(target * aspect)))
      w = int(round(math.sqrt(target / aspect)))
      if w < width and h < height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return np.asarray([top, left, h, w], np.int32)
    return np.zeros(4, np.int32)


@dataclasses.dataclass(frozen=True)
class TrainView(grain.transforms.RandomMap):
  """record -> {"image" [S, S, 3] uint8, "label" int32, "erase" [4] int32 (with `erasing`)}.

  Attributes:
    image_size: S.
    crop_scale: random-resized-crop area range (torchvision's sampler, ratio 3/4–4/3).
    interpolation: "bilinear" (MoCo's linear protocol) or "bicubic" (MAE, SimMIM, timm).
    randaugment: applied after crop and flip, or None.
    erasing: box sampler whose boxes the device fills (`erase`), or None.
  """
  image_size: int
  crop_scale: tuple[float, float] = (0.08, 1.0)
  interpolation: str = "bilinear"
  randaugment: RandAugment | None = None
  erasing: RandomErasing | None = None

  def output_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (per-example shape, dtype)} of what the device consumes."""
    s = self.image_size
    spec = {"image": ((s, s, 3), np.dtype(np.uint8)), "label": ((), np.dtype(np.int32))}
    if self.erasing is not None:
      spec["erase"] = ((4,), np.dtype(np.int32))
    return spec

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "error" in record:
      return record
    try:
      image = transforms.to_rgb(record["image"])
      box = transforms.random_resized_crop_box(rng, image.shape[0], image.shape[1],
                                               self.crop_scale)
      flip = bool(rng.random() < 0.5)
      image, _ = transforms.crop_flip_resize(image, box, flip, self.image_size,
                                             resample=self.interpolation,
                                             record_id=str(record.get("id", "?")))
      if self.randaugment is not None:
        image = self.randaugment(image, rng)
    except ValueError as e:  # a malformed record: dropped and counted by the pipeline
      return {"id": record.get("id", "?"), "error": str(e)}
    out = {"image": image, "label": np.int32(record.get("label", -1))}
    if self.erasing is not None:
      out["erase"] = self.erasing.box(rng, self.image_size, self.image_size)
    return out


def erase(key: jax.Array, images: jax.Array, boxes: jax.Array, mode: str = "pixel") -> jax.Array:
  """Fills each image's box: "pixel" with per-pixel N(0, 1) values, "rand" one N(0, 1) colour per
  image, "const" zeros (timm's modes; the images are normalised, so 0 is the mean colour).

  Args:
    key: PRNG key.
    images: [B, H, W, C] float (normalised).
    boxes: [B, 4] int (top, left, h, w); h = 0 or w = 0 erases nothing.
    mode: one of ERASE_MODES.

  Returns:
    [B, H, W, C] of images' dtype.
  """
  if mode not in ERASE_MODES:
    raise ValueError(f"erase mode={mode!r} must be one of {ERASE_MODES}")
  b, h, w, c = images.shape
  top, left, bh, bw = (boxes[:, i, None, None] for i in range(4))
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)  # [B, H, W]
  if mode == "pixel":
    fill = jax.random.normal(key, images.shape, images.dtype)
  elif mode == "rand":
    fill = jnp.broadcast_to(jax.random.normal(key, (b, 1, 1, c), images.dtype), images.shape)
  else:
    fill = jnp.zeros_like(images)
  return jnp.where(inside[..., None], fill, images)


def pca_lighting(key: jax.Array, images: jax.Array, alpha_std: float) -> jax.Array:
  """AlexNet PCA lighting noise: x + Σ_j v_j α_j λ_j per image, α ~ N(0, alpha_std²) [3].

  Args:
    key: PRNG key.
    images: [B, H, W, 3] float in [0, 1] (before normalisation, as OpenSelfSup's `Lighting`
      after `ToTensor`; no clipping afterwards, as there).
    alpha_std: σ of α (0.1 in OpenSelfSup's linear-classification benchmarks).
  """
  alpha = alpha_std * jax.random.normal(key, (images.shape[0], 3), jnp.float32)
  vec = jnp.asarray(IMAGENET_PCA_EIGVEC, jnp.float32)
  val = jnp.asarray(IMAGENET_PCA_EIGVAL, jnp.float32)
  rgb = jnp.einsum("ij,bj->bi", vec, alpha * val)  # [B, 3]
  return images + rgb[:, None, None, :].astype(images.dtype)


def device_images(rng: jax.Array, batch: dict[str, jax.Array], *, color: ColorSpec | None = None,
                  lighting: float = 0.0, erase_mode: str = "pixel") -> jax.Array:
  """The device half of a train view: uint8 batch -> normalised float32 images [B, H, W, 3].

  Args:
    rng: the step's key for these images.
    batch: {"image" [B, H, W, 3] uint8, "erase" [B, 4] int32 (optional: erase those boxes)}.
    color: colour jitter spec (`augment.color_augment`), or None.
    lighting: σ of the PCA lighting noise (0: off).
    erase_mode: fill of the erased boxes.
  """
  k_color, k_light, k_erase = jax.random.split(rng, 3)
  x = augment.color_augment(k_color, batch["image"], color)
  if lighting:
    x = pca_lighting(k_light, x, lighting)
  x = augment.normalize(x)
  if "erase" in batch:
    x = erase(k_erase, x, batch["erase"], erase_mode)
  return x


def eval_images(images: jax.Array) -> jax.Array:
  """Evaluation input: uint8 [B, H, W, 3] -> ImageNet-normalised float32."""
  return augment.normalize(augment.to_unit_float(images))
