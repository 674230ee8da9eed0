"""RandAugment as timm implements it (`rand-m9-mstd0.5-inc1`: the fine-tuning recipe of DeiT, BEiT,
MAE, SimMIM, iBOT and the papers that follow MAE's recipe: ccMIM, MimCo, Masked MoCo).

RandAugment (Cubuk et al., 2020) applies N ops drawn uniformly *with replacement* from a fixed
list, each at magnitude M on a 0…10 scale. timm's variant (`timm.data.auto_augment`), which the
official fine-tuning code of those papers calls, adds:
  * each chosen op is applied with probability p = 0.5 (`AugmentOp.prob`);
  * `mstd0.5`: the magnitude of every application is drawn ~ N(M, 0.5), clipped to [0, mmax = 10];
  * `inc1`: the "increasing" op list, in which a larger magnitude always means a stronger change
    (posterize keeps fewer bits, solarize has a lower threshold, the enhance ops move further from
    1). The 15 ops and their argument at magnitude m (level ℓ = m / 10), as `OPS` below:
        AutoContrast, Equalize, Invert              no argument
        Rotate                                      ±30ℓ degrees
        PosterizeIncreasing                         keep 4 − ⌊4ℓ⌋ bits
        SolarizeIncreasing                          threshold 256 − ⌊256ℓ⌋ (x ≥ t → 255 − x)
        SolarizeAdd                                 +⌊110ℓ⌋ (capped at 128) to pixels < 128
        Color/Contrast/Brightness/SharpnessIncreasing   PIL enhance factor max(0.1, 1 ± 0.9ℓ)
        ShearX, ShearY                              ±0.3ℓ (PIL affine shear)
        TranslateXRel, TranslateYRel                ±0.45ℓ of the width / height
    with the sign (±) drawn with probability 1/2. `inc0` gives timm's original list (Posterize
    keeps ⌊4ℓ⌋ bits, Solarize threshold ⌊256ℓ⌋, enhance factor 0.1 + 1.8ℓ).
  * Geometric ops resample with the pipeline's interpolation (bicubic in MAE/SimMIM, which pass
    `interpolation="bicubic"`) and fill uncovered pixels with the ImageNet mean colour
    (124, 116, 104) (timm's `img_mean` hparam).

Why on the host (NumPy/PIL in the grain workers) and not on device in JAX: the ops *are* PIL
operations in timm (histogram equalisation, PIL's enhance filters, affine resampling with a fill
colour); reproducing them in JAX would mean re-deriving each, and picking one of 15 ops per image
under `vmap` evaluates all 15 branches for every image. On the host each op costs well under a
millisecond on a 224 px image in a worker process, overlapped with the device step, and the
per-element generator that grain derives from the pipeline seed and the element's position keeps
a resumed run's augmentation identical.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are on a 0…10 scale
FILL = (124, 116, 104)  # round(255 · ImageNet mean), timm's `img_mean` for ImageNet
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST}

# The op lists in timm's order (`_RAND_INCREASING_TRANSFORMS`, `_RAND_TRANSFORMS`).
OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                  "TranslateXRel", "TranslateYRel")
OPS_ORIGINAL = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                "TranslateXRel", "TranslateYRel")
# Ops whose argument takes a random sign.
SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
                    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                    "SharpnessIncreasing"})


def op_argument(name: str, magnitude: float, negate: bool = False,
                translate_pct: float = 0.45) -> float | int | None:
  """The argument timm's level function gives op `name` at `magnitude` (0…10, already clipped).

  Args:
    name: an entry of OPS_INCREASING / OPS_ORIGINAL.
    magnitude: m; the level is ℓ = m / 10.
    negate: the sign draw of the signed ops (ignored by the others).
    translate_pct: the largest translation, as a fraction of the side (timm default 0.45).

  Returns:
    None (no argument), an int (bits, threshold, addend) or a float (degrees, factor, shear,
    translation fraction).
  """
  level = magnitude / MAX_LEVEL
  sign = -1.0 if negate else 1.0
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":
    return sign * 30.0 * level
  if name == "Posterize":
    return int(level * 4)
  if name == "PosterizeIncreasing":
    return 4 - int(level * 4)
  if name == "Solarize":
    return min(256, int(level * 256))
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(level * 256))
  if name == "SolarizeAdd":
    return min(128, int(level * 110))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return level * 1.8 + 0.1
  if name.endswith("Increasing"):  # the four enhance ops
    return max(0.1, 1.0 + sign * 0.9 * level)
  if name in ("ShearX", "ShearY"):
    return sign * 0.3 * level
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * translate_pct * level
  raise ValueError(f"unknown RandAugment op {name!r}; known: {OPS_INCREASING + OPS_ORIGINAL}")


def _affine(im: Image.Image, coeffs, resample, fill) -> Image.Image:
  return im.transform(im.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _solarize_add(im: Image.Image, add: int, threshold: int = 128) -> Image.Image:
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return im.point(lut * 3)


_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def apply_op(image: np.ndarray, name: str, arg, *, interpolation: str = "bicubic",
             fill: tuple[int, int, int] = FILL) -> np.ndarray:
  """One RandAugment op on a uint8 RGB image [H, W, 3] with the argument of `op_argument`."""
  im = Image.fromarray(np.asarray(image, np.uint8))
  resample = INTERPOLATIONS[interpolation]
  w, h = im.size
  if name == "AutoContrast":
    out = ImageOps.autocontrast(im)
  elif name == "Equalize":
    out = ImageOps.equalize(im)
  elif name == "Invert":
    out = ImageOps.invert(im)
  elif name == "Rotate":
    out = im.rotate(arg, resample=resample, fillcolor=fill)
  elif name in ("Posterize", "PosterizeIncreasing"):
    if arg >= 8:
      out = im
    elif arg <= 0:
      # Keeping 0 bits is a black image (what Pillow < 11, which the papers used, returns for
      # `posterize(im, 0)`; current Pillow refuses 0, and timm then fails at magnitude 10).
      out = Image.new("RGB", im.size)
    else:
      out = ImageOps.posterize(im, int(arg))
  elif name in ("Solarize", "SolarizeIncreasing"):
    out = ImageOps.solarize(im, arg)
  elif name == "SolarizeAdd":
    out = _solarize_add(im, int(arg))
  elif name.replace("Increasing", "") in _ENHANCERS:
    out = _ENHANCERS[name.replace("Increasing", "")](im).enhance(arg)
  elif name == "ShearX":
    out = _affine(im, (1, arg, 0, 0, 1, 0), resample, fill)
  elif name == "ShearY":
    out = _affine(im, (1, 0, 0, arg, 1, 0), resample, fill)
  elif name == "TranslateXRel":
    out = _affine(im, (1, 0, arg * w, 0, 1, 0), resample, fill)
  elif name == "TranslateYRel":
    out = _affine(im, (1, 0, 0, 0, 1, arg * h), resample, fill)
  else:
    raise ValueError(f"unknown RandAugment op {name!r}")
  return np.asarray(out, np.uint8)


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment as a function of (image, generator) (picklable for grain workers).

  Attributes:
    num_ops: N ops per image, drawn uniformly with replacement.
    magnitude: M (0…10).
    magnitude_std: σ of the per-application magnitude N(M, σ); 0 = fixed M, inf = U(0, M).
    magnitude_max: clip bound of the drawn magnitude.
    prob: probability of applying each drawn op.
    increasing: the "inc1" op list (OPS_INCREASING) or timm's original one.
    interpolation: resampling of the geometric ops ("bicubic" as MAE/SimMIM).
    fill: colour of pixels a geometric op uncovers.
    translate_pct: largest translation as a fraction of the side.
  """
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5
  magnitude_max: float = MAX_LEVEL
  prob: float = 0.5
  increasing: bool = True
  interpolation: str = "bicubic"
  fill: tuple[int, int, int] = FILL
  translate_pct: float = 0.45

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"RandAugment interpolation={self.interpolation!r} must be one of "
                       f"{sorted(INTERPOLATIONS)}")
    if self.num_ops < 0 or not 0.0 <= self.prob <= 1.0 or self.magnitude < 0:
      raise ValueError(f"RandAugment needs num_ops >= 0, 0 <= prob <= 1 and magnitude >= 0; got "
                       f"{self.num_ops}, {self.prob}, {self.magnitude}")

  @property
  def ops(self) -> tuple[str, ...]:
    return OPS_INCREASING if self.increasing else OPS_ORIGINAL

  @classmethod
  def from_policy(cls, policy: str, **kwargs) -> "RandAugment":
    """Parses timm's policy string `rand-m9-n2-mstd0.5-mmax10-inc1-p0.5` (any subset of the
    fields after `rand`; defaults m 10, n 2, mstd 0, inc 0, p 0.5 as timm's parser).

    Args:
      policy: e.g. "rand-m9-mstd0.5-inc1" (MAE, SimMIM, DeiT).
      **kwargs: interpolation, fill, translate_pct.
    """
    parts = policy.split("-")
    if parts[0] != "rand":
      raise ValueError(f"RandAugment policy {policy!r} must start with 'rand-' (timm syntax, "
                       "e.g. 'rand-m9-mstd0.5-inc1')")
    fields = {"magnitude": MAX_LEVEL, "num_ops": 2, "magnitude_std": 0.0,
              "magnitude_max": MAX_LEVEL, "increasing": False, "prob": 0.5}
    for part in parts[1:]:
      match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([0-9.]+|inf)", part)
      if not match:
        raise ValueError(f"RandAugment policy {policy!r}: cannot read {part!r} (fields: m<M>, "
                         "n<N>, mstd<S>, mmax<X>, inc<0|1>, p<P>)")
      key, value = match.groups()
      if key == "mstd":
        fields["magnitude_std"] = float(value)
      elif key == "mmax":
        fields["magnitude_max"] = float(value)
      elif key == "inc":
        fields["increasing"] = bool(int(value))
      elif key == "m":
        fields["magnitude"] = float(value)
      elif key == "n":
        fields["num_ops"] = int(value)
      else:
        fields["prob"] = float(value)
    return cls(**fields, **kwargs)

  def draw_magnitude(self, rng: np.random.Generator) -> float:
    """The magnitude of one application: N(M, σ) (σ = inf: U(0, M)), clipped to [0, mmax]."""
    m = self.magnitude
    if self.magnitude_std == math.inf:
      m = rng.uniform(0.0, m)
    elif self.magnitude_std > 0:
      m = rng.normal(m, self.magnitude_std)
    return float(min(max(m, 0.0), self.magnitude_max))

  def plan(self, rng: np.random.Generator) -> list[tuple[str, float | int | None]]:
    """The (op, argument) pairs applied to one image, in order (skipped ops left out)."""
    out = []
    for k in rng.integers(0, len(self.ops), size=self.num_ops):
      name = self.ops[int(k)]
      if rng.random() > self.prob:  # timm: `random.random() > prob` skips the op
        continue
      magnitude = self.draw_magnitude(rng)
      negate = bool(rng.random() > 0.5) if name in SIGNED else False
      out.append((name, op_argument(name, magnitude, negate, self.translate_pct)))
    return out

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    for name, arg in self.plan(rng):
      image = apply_op(image, name, arg, interpolation=self.interpolation, fill=self.fill)
    return image

