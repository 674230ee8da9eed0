"""Per-method view recipes and the host-side view maker (geometry only; colour runs on device).

A recipe is a tuple of `ViewSpec`, one per view. The host (`make_views`, in grain workers) uses
each spec's crop / flip / interpolation fields; the jitted train step uses each spec's `color`
(`ssl_jax.data.augment.augment_views`). Values come from each paper's augmentation table or, where
FIDELITY.md says so, from the official code; each recipe's comment names its source.

Colour-jitter styles (`ColorSpec.jitter_style`), read from the official code:
- "simclr": SimCLR v1 (google-research/simclr, TF1 `color_jitter_rand` with v1 brightness):
  `tf.image` ops in a random order, brightness *additive* (delta ~ U[-b, b]; v2 changed it to a
  multiplicative factor), contrast around each channel's mean, saturation and hue in HSV, clip to
  [0, 1] after every op.
- "byol": BYOL/DetCon (deepmind-research `byol/utils/augmentations.py`): a JAX port of exactly
  those `tf.image` ops (additive brightness, random order, clip after each op). The two styles
  compute the same functions; both names are kept so a recipe states its lineage.
- "torchvision": MoCo v2/v3, MaskCo, Masked MoCo (PyTorch `ColorJitter`): brightness
  multiplicative (factor ~ U[max(0, 1-b), 1+b]), contrast blended with the mean of the greyscale
  image, saturation blended with the greyscale image, hue in HSV, random order.

Blur padding: SimCLR and BYOL/DetCon blur with `padding='SAME'` (zeros); PyTorch recipes use
PIL/torchvision blurs with edge extension, approximated here by reflect padding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from ssl_jax.data import transforms

JITTER_STYLES = ("simclr", "byol", "torchvision")
CROP_MODES = ("independent", "shared", "diagonal")
MASK_TYPES = ("fh", "grid", "gt")


@dataclasses.dataclass(frozen=True)
class ColorSpec:
  """Photometric augmentation of one view (applied on device, `augment.color_augment`).

  brightness/contrast/saturation/hue: jitter strengths ("adjustment max" in DetCon Table A.1).
  jitter_p: probability of colour jittering; grayscale_p: of colour dropping; blur_p: of the
  Gaussian blur with sigma ~ U(blur_sigma); solarize_p: of solarization (threshold 0.5).
  """
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  jitter_p: float = 0.0
  grayscale_p: float = 0.0
  blur_p: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize_p: float = 0.0
  jitter_style: str = "byol"
  blur_padding: str = "reflect"

  def __post_init__(self):
    if self.jitter_style not in JITTER_STYLES:
      raise ValueError(f"ColorSpec.jitter_style={self.jitter_style!r} is not one of "
                       f"{JITTER_STYLES}")
    if self.blur_padding not in ("reflect", "zeros"):
      raise ValueError(f"ColorSpec.blur_padding={self.blur_padding!r} is not 'reflect' or 'zeros'")
    for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"ColorSpec.{name}={p} is not a probability in [0, 1]")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """Geometry (host) and colour (device) of one view.

  crop_scale: area fraction range of the random resized crop; crop_ratio: its w/h range.
  crop_mode: "independent" (own crop), "shared" (reuse view 0's crop and flip: Masked MoCo's
    light augmentation), "diagonal" (two crops of side 224/256 of one outer crop, offset along
    the diagonal by 0-32 px at 256 scale: Masked MoCo's medium augmentation).
  interpolation: "bilinear" | "bicubic" for the image (masks are always nearest).
  """
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_p: float = 0.5
  color: Optional[ColorSpec] = None
  crop_mode: str = "independent"
  interpolation: str = "bilinear"

  def __post_init__(self):
    if self.crop_mode not in CROP_MODES:
      raise ValueError(f"ViewSpec.crop_mode={self.crop_mode!r} is not one of {CROP_MODES}")
    lo, hi = self.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"ViewSpec.crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1")


# SimCLR v1 (Chen et al. 2020, Appendix A; TF1 code): strength s = 1 -> 0.8s, 0.8s, 0.8s, 0.2s;
# blur p 0.5 on each view; bicubic resize (`tf.image.resize_bicubic` in `crop_and_resize`).
_SIMCLR_COLOR = ColorSpec(0.8, 0.8, 0.8, 0.2, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                          jitter_style="simclr", blur_padding="zeros")
# BYOL (Grill et al. 2020, Table 6) = DetCon-B (Hénaff et al. 2021, Table A.1).
_BYOL_COLOR = ColorSpec(0.4, 0.4, 0.2, 0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=1.0,
                        jitter_style="byol", blur_padding="zeros")
_BYOL_COLOR_2 = dataclasses.replace(_BYOL_COLOR, blur_p=0.1, solarize_p=0.2)
# MoCo v2 (Chen et al. 2020, `main_moco.py --aug-plus`): ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8,
# grayscale 0.2, blur p 0.5, symmetric.
_MOCOV2_COLOR = ColorSpec(0.4, 0.4, 0.4, 0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                          jitter_style="torchvision")
# MoCo v3 (`main_moco.py` augmentation1/2): BYOL's asymmetric recipe through torchvision ops.
_MOCOV3_COLOR = dataclasses.replace(_BYOL_COLOR, jitter_style="torchvision",
                                    blur_padding="reflect")
_MOCOV3_COLOR_2 = dataclasses.replace(_MOCOV3_COLOR, blur_p=0.1, solarize_p=0.2)
# Masked MoCo/BYOL light and medium: "apply color augmentation" only, which its strong recipe
# distinguishes from blur and solarization (Sec. 4.1) -> MoCo v3's jitter and greyscale only.
_MASKED_COLOR = dataclasses.replace(_MOCOV3_COLOR, blur_p=0.0, solarize_p=0.0)

_RECIPES: dict[str, tuple[ViewSpec, ...]] = {
    "simclr": (ViewSpec(color=_SIMCLR_COLOR, interpolation="bicubic"),) * 2,
    "byol": (ViewSpec(color=_BYOL_COLOR, interpolation="bicubic"),
             ViewSpec(color=_BYOL_COLOR_2, interpolation="bicubic")),
    "mocov2": (ViewSpec(crop_scale=(0.2, 1.0), color=_MOCOV2_COLOR),) * 2,
    "mocov3": (ViewSpec(color=_MOCOV3_COLOR), ViewSpec(color=_MOCOV3_COLOR_2)),
    # DetCon Table A.1: DetCon-B uses BYOL's pipeline unchanged (crop 0.08-1, bicubic).
    "detcon_b": (ViewSpec(color=_BYOL_COLOR, interpolation="bicubic"),
                 ViewSpec(color=_BYOL_COLOR_2, interpolation="bicubic")),
    # DetCon Table A.1 DetCon-S column: SimCLR's colour with blur 1.0 / 0.0 (FIDELITY row 4).
    "detcon_s": (ViewSpec(color=dataclasses.replace(_SIMCLR_COLOR, blur_p=1.0),
                          interpolation="bicubic"),
                 ViewSpec(color=dataclasses.replace(_SIMCLR_COLOR, blur_p=0.0),
                          interpolation="bicubic")),
    # MAE PRETRAIN recipe: RandomResizedCrop(scale=(0.2, 1), bicubic) + flip, no colour.
    "mae": (ViewSpec(crop_scale=(0.2, 1.0), interpolation="bicubic"),),
    # ccMIM's text (FIDELITY row 20, `:paper`): "only random resized crop", MAE's crop, no flip.
    "crop_only": (ViewSpec(crop_scale=(0.2, 1.0), flip_p=0.0, interpolation="bicubic"),),
    # SimMIM: RandomResizedCrop(scale=(0.67, 1), ratio=(3/4, 4/3)) + flip, no colour.
    "simmim": (ViewSpec(crop_scale=(0.67, 1.0)),),
    # Masked MoCo/BYOL (Sec. 4.1, Table 4): light = one shared crop, colour twice.
    "masked_light": (ViewSpec(color=_MASKED_COLOR),
                     ViewSpec(color=_MASKED_COLOR, crop_mode="shared")),
    # medium = two 224 crops on the diagonal of one 256 crop, 0-32 px apart, colour only.
    "masked_medium": (ViewSpec(color=_MASKED_COLOR, crop_mode="diagonal"),
                      ViewSpec(color=_MASKED_COLOR, crop_mode="diagonal")),
    # strong = MoCo v3's (crop 0.08, FIDELITY row 12).
    "masked_strong": (ViewSpec(color=_MOCOV3_COLOR), ViewSpec(color=_MOCOV3_COLOR_2)),
    # Multi-crop local views (DINO `DataAugmentationDINO`, torchvision ops): 96 px bicubic
    # crops of 5-40 % of the image, flip, colour jitter 0.8, greyscale 0.2, blur p 0.5; one spec
    # repeated `config.data.local_views` times.
    "multicrop_local": (ViewSpec(crop_scale=(0.05, 0.4),
                                 color=dataclasses.replace(_MOCOV3_COLOR, blur_p=0.5),
                                 interpolation="bicubic"),),
    # MaskCo (Sec. 4, "same as MoCo v2" with crops >= 20 % area, constrained to overlap:
    # `make_maskco_views`); view 0 = query, view 1 = key.
    "maskco": (ViewSpec(crop_scale=(0.2, 1.0), color=_MOCOV2_COLOR),) * 2,
}

# Masked MoCo medium: outer crop 256, inner 224, diagonal distance 0..32 px (at 256 scale).
_DIAGONAL_OUTER, _DIAGONAL_INNER, _DIAGONAL_MAX_SHIFT = 256, 224, 32


def mask_dtype(max_segments: int) -> np.dtype:
  """The smallest signed integer dtype that holds segment ids 0..max_segments-1 and −1 (ignored).

  Masks travel host -> device in it (a [B, 2, 224, 224] int32 mask batch is 4x an int8 one).
  """
  if max_segments < 1:
    raise ValueError(f"max_segments={max_segments} must be >= 1")
  for dtype in (np.int8, np.int16, np.int32):
    if max_segments - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"max_segments={max_segments} does not fit int32")


def recipe_names() -> tuple[str, ...]:
  return tuple(sorted(_RECIPES))


def get_recipe(name: str, num_views: Optional[int] = None) -> tuple[ViewSpec, ...]:
  """The view specs of a named recipe, one per view.

  `num_views` asks for that many views: a one-view recipe is repeated (multi-crop local views);
  any other recipe must already have that many.
  """
  if name not in _RECIPES:
    raise ValueError(f"unknown view recipe {name!r}; known recipes: {', '.join(recipe_names())}")
  recipe = _RECIPES[name]
  if num_views is None or num_views == len(recipe):
    return recipe
  if len(recipe) == 1 and num_views > 0:
    return recipe * num_views
  raise ValueError(f"view recipe {name!r} has {len(recipe)} views, not {num_views}")


def sample_geometry(recipe: Sequence[ViewSpec], rng: np.random.Generator, height: int,
                    width: int) -> list[tuple[tuple[float, float, float, float], bool]]:
  """One (crop window (top, left, h, w) in original pixels, flip) per view of `recipe`."""
  out = []
  if any(s.crop_mode == "diagonal" for s in recipe):
    if len(recipe) != 2 or any(s.crop_mode != "diagonal" for s in recipe):
      raise ValueError("crop_mode='diagonal' needs exactly two views, both 'diagonal'")
    spec = recipe[0]
    top, left, h, w = transforms.random_resized_crop_box(rng, height, width, spec.crop_scale,
                                                         spec.crop_ratio)
    flip = bool(rng.random() < spec.flip_p)
    distance = int(rng.integers(0, _DIAGONAL_MAX_SHIFT + 1))
    start = int(rng.integers(0, _DIAGONAL_MAX_SHIFT - distance + 1))
    frac = _DIAGONAL_INNER / _DIAGONAL_OUTER
    for offset in (start, start + distance):
      dy, dx = offset * h / _DIAGONAL_OUTER, offset * w / _DIAGONAL_OUTER
      out.append(((top + dy, left + dx, h * frac, w * frac), flip))
    return out
  for i, spec in enumerate(recipe):
    if spec.crop_mode == "shared":
      if i == 0:
        raise ValueError("crop_mode='shared' reuses view 0's crop, so view 0 cannot be shared")
      out.append(out[0])
      continue
    box = transforms.random_resized_crop_box(rng, height, width, spec.crop_scale, spec.crop_ratio)
    out.append((tuple(float(v) for v in box), bool(rng.random() < spec.flip_p)))
  return out


def _source_masks(record: dict, image: np.ndarray, mask_type: str, grid) -> np.ndarray:
  rid = record.get("id", "?")
  if mask_type == "grid":
    return transforms.grid_masks(image.shape[0], image.shape[1], grid)
  key = {"fh": "masks", "gt": "segmentation"}.get(mask_type)
  if key is None:
    raise ValueError(f"mask_type={mask_type!r} is not one of {MASK_TYPES} or None")
  if key not in record:
    raise ValueError(f"record {rid!r} has no {key!r} but mask_type={mask_type!r} needs it")
  masks = np.asarray(record[key])
  if masks.shape != image.shape[:2]:
    raise ValueError(f"record {rid!r}: {key!r} shape {masks.shape} differs from image shape "
                     f"{image.shape[:2]}")
  return masks


def make_views(record: dict, recipe: Sequence[ViewSpec], rng: np.random.Generator,
               image_size: int, mask_type: Optional[str] = None, max_segments: int = 64,
               grid: Sequence[int] = (4, 4)) -> dict[str, Any]:
  """Crops, flips and resizes one record into V fixed-size uint8 views (+ aligned masks).

  Args:
    record: {"image": uint8 [H, W, 3] (or greyscale / RGBA), "id": str, optional "label",
      "masks" [H, W] int (FH ids), "segmentation" [H, W] int (ground truth, -1 = ignore)}.
    recipe: one `ViewSpec` per view (`get_recipe`).
    rng: the element's generator (grain seeds it per element: deterministic).
    image_size: S.
    mask_type: "fh" (record["masks"]), "grid" (DetCon's spatial grid on the original image),
      "gt" (record["segmentation"]) or None.
    max_segments: ids kept after joint compaction (largest total area over the views first).
    grid: (rows, cols) of the grid masks.

  Returns:
    {"image": uint8 [V, S, S, 3], "crop": float32 [V, 4] (top, left, h, w) in original pixels,
     "flip": bool [V], "masks": [V, S, S] in `mask_dtype(max_segments)` (if mask_type; ids
     0..K-1 shared by the views of this image, -1 ignored), "segments_dropped": int32 (segments
     beyond max_segments, set to -1), "label": int32 (if the record has one)}.
  """
  image = transforms.to_rgb(record["image"])
  masks = None if mask_type is None else _source_masks(record, image, mask_type, grid)
  geometry = sample_geometry(recipe, rng, image.shape[0], image.shape[1])
  images, view_masks = [], []
  for spec, (box, flip) in zip(recipe, geometry):
    img, m = transforms.crop_flip_resize(image, box, flip, image_size, masks,
                                         resample=spec.interpolation,
                                         record_id=record.get("id", "?"))
    images.append(img)
    view_masks.append(m)
  out = {"image": np.stack(images),
         "crop": np.asarray([g[0] for g in geometry], np.float32),
         "flip": np.asarray([g[1] for g in geometry], bool)}
  if masks is not None:
    # Compact jointly over the views so one object keeps one id in every view.
    masks_out, dropped = transforms.compact_segment_ids(np.stack(view_masks), max_segments)
    out["masks"] = masks_out.astype(mask_dtype(max_segments))
    out["segments_dropped"] = np.int32(dropped)
  if "label" in record:
    out["label"] = np.int32(record["label"])
  return out


# ----------------------------------------------------------------------------------------------
# MaskCo (Zhao et al. 2021, Sec. 3.2 and 4): constrained overlapping crops and key boxes.


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one (y0, x0, y1, x1) box with [N, 4] boxes."""
  y0 = np.maximum(box[0], boxes[:, 0])
  x0 = np.maximum(box[1], boxes[:, 1])
  y1 = np.minimum(box[2], boxes[:, 2])
  x1 = np.minimum(box[3], boxes[:, 3])
  inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
  area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  return inter / (area(box) + area(boxes) - inter)


def _random_square_boxes(rng, n, side_range, limit_y, limit_x):
  """n square boxes with side ~ U(side_range), placed uniformly inside [y0,y1]x[x0,x1] limits."""
  sides = rng.uniform(side_range[0], side_range[1], n)
  y0 = limit_y[0] + rng.random(n) * np.maximum(limit_y[1] - limit_y[0] - sides, 0)
  x0 = limit_x[0] + rng.random(n) * np.maximum(limit_x[1] - limit_x[0] - sides, 0)
  return np.stack([y0, x0, y0 + sides, x0 + sides], axis=-1)


def make_maskco_views(record: dict, recipe: Sequence[ViewSpec], rng: np.random.Generator,
                      image_size: int, num_boxes: int = 17,
                      box_side: tuple[float, float] = (32 / 224, 128 / 224),
                      negative_iou_max: float = 0.2, max_tries: int = 50) -> dict[str, Any]:
  """MaskCo's query/key views with a masked box and key boxes.

  The two crops (each >= 20 % of the image via the recipe's crop_scale) are resampled until their
  overlap, seen in the key view, can hold the smallest box; after `max_tries` the query reuses the
  key's crop. The positive key box (first of `num_boxes`) lies inside the overlap, so its
  projection into the query view (the masked box) lies inside the query view; the other boxes
  are negatives anywhere in the key view with IoU < `negative_iou_max` to the positive.
  Boxes are square (the paper gives only sizes 32-128 px at 224, our choice), sides given as
  fractions of the view side.

  Two fallbacks keep every record usable, and each is counted in the output: when no pair of
  crops overlaps enough in `max_tries` draws (tiny or extreme images), the query reuses the key's
  crop ("crop_fallback" = 1); when fewer than num_boxes − 1 of 10 × 8·num_boxes candidates have
  IoU < `negative_iou_max` (only when boxes are large relative to the view, e.g. box_side near
  1), the least-overlapping candidates fill the gap ("negative_fallback" = how many negatives
  have IoU >= negative_iou_max). At the paper's box sizes neither happens on ordinary images.

  Returns:
    make_views' dict for 2 views (view 0 = query, view 1 = key) plus
    "boxes": float32 [num_boxes, 4] (y0, x0, y1, x1) key-view pixels, positive first,
    "masked_box": float32 [4] (y0, x0, y1, x1) query-view pixels, and the host counters
    "crop_fallback", "negative_fallback" (int32).
  """
  if len(recipe) != 2:
    raise ValueError(f"MaskCo needs a 2-view recipe, got {len(recipe)} views")
  image = transforms.to_rgb(record["image"])
  height, width = image.shape[:2]
  s = float(image_size)
  side_lo, side_hi = box_side[0] * s, box_side[1] * s
  geometry, crop_fallback = None, 0
  for _ in range(max_tries):
    geometry = sample_geometry(recipe, rng, height, width)
    inter = transforms.crop_intersection(geometry[0][0], geometry[1][0])
    if inter is None:
      continue
    key_crop = geometry[1][0]
    if (inter[2] * s / key_crop[2] >= side_lo and inter[3] * s / key_crop[3] >= side_lo):
      break
  else:
    geometry = [(geometry[1][0], bool(rng.random() < recipe[0].flip_p)), geometry[1]]
    crop_fallback = 1
  (q_crop, q_flip), (k_crop, k_flip) = geometry
  inter = transforms.crop_intersection(q_crop, k_crop)
  # The overlap window in key-view pixels (an identity box mapped from original pixels).
  region = transforms.original_to_view(
      np.array([inter[0], inter[1], inter[0] + inter[2], inter[1] + inter[3]]), k_crop, k_flip, s)
  region = np.clip(region, 0.0, s)
  max_side = max(min(side_hi, region[2] - region[0], region[3] - region[1]), 1.0)
  positive = _random_square_boxes(rng, 1, (min(side_lo, max_side), max_side),
                                  (region[0], region[2]), (region[1], region[3]))[0]
  negatives = np.zeros((0, 4))
  candidates = np.zeros((0, 4))
  for _ in range(10):
    cand = _random_square_boxes(rng, 8 * num_boxes, (side_lo, side_hi), (0.0, s), (0.0, s))
    candidates = np.concatenate([candidates, cand])
    negatives = np.concatenate([negatives, cand[_iou(positive, cand) < negative_iou_max]])
    if len(negatives) >= num_boxes - 1:
      break
  if len(negatives) < num_boxes - 1:  # tiny views: fall back to the least overlapping ones
    negatives = candidates[np.argsort(_iou(positive, candidates), kind="stable")]
  negatives = negatives[:num_boxes - 1]
  negative_fallback = int(np.sum(_iou(positive, negatives) >= negative_iou_max))
  boxes = np.concatenate([positive[None], negatives]).astype(np.float32)
  masked = transforms.project_box(positive, k_crop, q_crop, k_flip, q_flip, s)
  images = [transforms.crop_flip_resize(image, box, flip, image_size, resample=spec.interpolation,
                                        record_id=record.get("id", "?"))[0]
            for spec, (box, flip) in zip(recipe, geometry)]
  out = {"image": np.stack(images),
         "crop": np.asarray([g[0] for g in geometry], np.float32),
         "flip": np.asarray([g[1] for g in geometry], bool),
         "boxes": boxes,
         "masked_box": np.clip(masked, 0.0, s).astype(np.float32),
         "crop_fallback": np.int32(crop_fallback),
         "negative_fallback": np.int32(negative_fallback)}
  if "label" in record:
    out["label"] = np.int32(record["label"])
  return out
