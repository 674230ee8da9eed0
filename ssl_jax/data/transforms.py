"""Joint image + mask geometry on the host (numpy/PIL): random resized crop, flip, resize.

Every function is pure given an explicit `np.random.Generator`. A view is described by its crop
window `(top, left, h, w)` in original-image pixels (floats allowed) and a horizontal flip flag;
the image is resampled once from that window (bilinear/bicubic with antialiasing, PIL) and the
segment-id mask by nearest neighbour with the *same* pixel-centre geometry, so a painted object's
mask follows its pixels exactly (DetCon, Hénaff et al. 2021, Sec. 3.1: "we transform each mask
using the same cropping and resizing as used for the underlying RGB image").

Coordinates: pixel k covers [k, k + 1); output pixel i of a window (top, h) resized to S samples
the original at y = top + (i + 0.5) * h / S (PIL's convention).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def to_rgb(array: np.ndarray) -> np.ndarray:
  """Any image array -> uint8 [H, W, 3] RGB.

  Args:
    array: [H, W] greyscale, [H, W, 1], [H, W, 3] RGB or [H, W, 4] RGBA (alpha dropped, as PIL's
      `convert("RGB")`); uint8, bool, integer in [0, 255], or float in [0, 1].
  """
  a = np.asarray(array)
  if a.ndim == 2:
    a = a[:, :, None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image of shape {a.shape} is not [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  elif a.shape[-1] == 4:
    a = a[..., :3]
  if a.dtype == np.uint8:
    return np.ascontiguousarray(a)
  if a.dtype == bool:
    return a.astype(np.uint8) * 255
  if np.issubdtype(a.dtype, np.floating):
    a = np.round(np.clip(a, 0.0, 1.0) * 255.0)
  return np.clip(a, 0, 255).astype(np.uint8)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Samples a crop window as torchvision's `RandomResizedCrop.get_params`.

  Up to 10 attempts draw an area fraction ~ U(scale) and an aspect ratio w/h log-uniform in
  `ratio`; the first window that fits is placed uniformly. Otherwise the fallback is the centre
  crop of the whole image clamped to the ratio range.

  Returns:
    (top, left, h, w) integers with 0 <= top, top + h <= height (same for width).
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def detcon_crop_box(rng: np.random.Generator, height: int, width: int,
                    scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Samples a crop window as the official DetCon code (`tf_image_ops.get_random_crop_window`).

  One draw: area fraction ~ U(scale), aspect ratio w/h log-uniform in `ratio`,
  w = round(√(area·aspect)), h = round(√(area/aspect)), each then clipped to the image side (so
  a draw that does not fit becomes a full-height or full-width window with another ratio, never
  a retry or a centre crop), offsets uniform over the positions that fit.

  Returns:
    (top, left, h, w) integers with 1 <= h <= height, 1 <= w <= width, inside the image.
  """
  area = height * width * rng.uniform(scale[0], scale[1])
  aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
  w = min(max(1, int(round(math.sqrt(area * aspect)))), width)
  h = min(max(1, int(round(math.sqrt(area / aspect)))), height)
  top = int(rng.integers(0, height - h + 1))
  left = int(rng.integers(0, width - w + 1))
  return top, left, h, w


def _nearest_indices(start: float, length: float, out: int, limit: int) -> np.ndarray:
  """Source pixel under each output pixel centre (same convention as PIL's resize with box)."""
  centres = start + (np.arange(out) + 0.5) * (length / out)
  return np.clip(np.floor(centres).astype(np.int64), 0, limit - 1)


def crop_flip_resize(image: np.ndarray, box: Sequence[float], flip: bool, out_size: int,
                     masks: Optional[np.ndarray] = None, resample: str = "bilinear",
                     record_id: str = "?") -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Crops `box`, resizes to `out_size` in one resampling, then flips; masks follow exactly.

  Args:
    image: [H, W, 3] uint8 (other layouts go through `to_rgb`).
    box: (top, left, h, w) in original pixels; may be fractional and may be smaller than
      `out_size` (then the crop is upsampled).
    flip: horizontal flip of the output view.
    out_size: S, the side of the square output.
    masks: optional [H, W] integer segment ids (any range, e.g. above 255), resampled by nearest
      neighbour with the image's pixel-centre geometry.
    resample: "bilinear" | "bicubic" (PIL, antialiased when downscaling).
    record_id: names the record in errors.

  Returns:
    (image [S, S, 3] uint8, masks [S, S] int32 or None).
  """
  image = to_rgb(image)
  height, width = image.shape[:2]
  if masks is not None and np.shape(masks) != (height, width):
    raise ValueError(f"record {record_id!r}: mask shape {np.shape(masks)} differs from image "
                     f"shape {(height, width)}")
  if resample not in _RESAMPLE:
    raise ValueError(f"resample={resample!r} is not one of {sorted(_RESAMPLE)}")
  top, left, h, w = (float(v) for v in box)
  if h <= 0 or w <= 0:
    raise ValueError(f"record {record_id!r}: empty crop box {tuple(box)}")
  # PIL resamples from the fractional box directly: crop and resize are one interpolation.
  pil = Image.fromarray(image).resize((out_size, out_size), _RESAMPLE[resample],
                                      box=(left, top, left + w, top + h))
  out = np.asarray(pil, dtype=np.uint8)
  out_masks = None
  if masks is not None:
    rows = _nearest_indices(top, h, out_size, height)
    cols = _nearest_indices(left, w, out_size, width)
    out_masks = np.asarray(masks)[rows[:, None], cols[None, :]].astype(np.int32)
  if flip:
    out = out[:, ::-1]
    out_masks = None if out_masks is None else out_masks[:, ::-1]
  out = np.ascontiguousarray(out)
  if out_masks is not None:
    out_masks = np.ascontiguousarray(out_masks)
  return out, out_masks


def compact_segment_ids(masks: np.ndarray, max_segments: int) -> tuple[np.ndarray, int]:
  """Relabels segment ids to 0..K-1 by descending area; the rest become -1 (ignored).

  Pass all views of one image stacked ([V, S, S]) so ids stay consistent across views (DetCon
  needs the same object to carry the same id in both views to find its positive).

  Args:
    masks: integer array of any shape; -1 marks ignored pixels and stays -1.
    max_segments: K, the number of ids kept (largest total area first; ties by smaller id).

  Returns:
    (int32 array of the same shape, number of segments dropped).
  """
  masks = np.asarray(masks)
  valid = masks >= 0
  ids, counts = np.unique(masks[valid], return_counts=True)
  # Descending area, ties broken by the smaller original id (np.unique sorts ids ascending and
  # a stable sort keeps that order).
  order = np.argsort(-counts, kind="stable")
  ranked = ids[order]
  new_ids = np.full(ranked.shape, -1, np.int32)
  keep = min(max_segments, len(ranked))
  new_ids[:keep] = np.arange(keep, dtype=np.int32)
  out = np.full(masks.shape, -1, np.int32)
  if len(ranked):
    # searchsorted over the sorted unique ids maps every pixel to its rank.
    rank_of_id = np.empty(len(ids), np.int32)
    rank_of_id[order] = np.arange(len(ids), dtype=np.int32)
    pos = np.searchsorted(ids, masks[valid])
    out[valid] = new_ids[rank_of_id[pos]]
  return out, int(len(ranked) - keep)


def grid_masks(height: int, width: int, grid: Sequence[int] = (4, 4)) -> np.ndarray:
  """DetCon's spatial-grid baseline mask on the original image: ids 0..gh*gw-1, row-major.

  Returns:
    [height, width] int32; cell (r, c) has id r * gw + c.
  """
  gh, gw = grid
  rows = (np.arange(height) * gh) // height
  cols = (np.arange(width) * gw) // width
  return (rows[:, None] * gw + cols[None, :]).astype(np.int32)


def view_to_original(box: np.ndarray, crop: Sequence[float], flip: bool, size: float) -> np.ndarray:
  """Boxes [..., 4] (y0, x0, y1, x1) in a view's output pixels -> original-image pixels.

  Args:
    crop: the view's window (top, left, h, w) in original pixels; flip: its flip flag;
    size: its output side S.
  """
  box = np.asarray(box, np.float64)
  top, left, h, w = (float(v) for v in crop)
  xs = box[..., [1, 3]]
  if flip:  # undo the flip first: view x -> S - x, which swaps the box's left and right edges
    xs = size - xs[..., ::-1]
  y = top + box[..., [0, 2]] * (h / size)
  x = left + xs * (w / size)
  return np.stack([y[..., 0], x[..., 0], y[..., 1], x[..., 1]], axis=-1)


def original_to_view(box: np.ndarray, crop: Sequence[float], flip: bool, size: float) -> np.ndarray:
  """Boxes [..., 4] (y0, x0, y1, x1) in original pixels -> a view's output pixels (unclipped)."""
  box = np.asarray(box, np.float64)
  top, left, h, w = (float(v) for v in crop)
  y = (box[..., [0, 2]] - top) * (size / h)
  xs = (box[..., [1, 3]] - left) * (size / w)
  if flip:
    xs = size - xs[..., ::-1]
  return np.stack([y[..., 0], xs[..., 0], y[..., 1], xs[..., 1]], axis=-1)


def project_box(box_in_a: np.ndarray, crop_a: Sequence[float], crop_b: Sequence[float],
                flip_a: bool, flip_b: bool, size_a: float,
                size_b: Optional[float] = None) -> np.ndarray:
  """Maps boxes from view a's pixel coordinates to view b's (MaskCo's masked box).

  Args:
    box_in_a: [..., 4] float (y0, x0, y1, x1) in view a's output pixels [0, size_a].
    crop_a, crop_b: (top, left, h, w) crop windows in original-image pixels.
    flip_a, flip_b: whether each view was flipped horizontally after resizing.
    size_a, size_b: output sides of the views (size_b defaults to size_a).

  Returns:
    [..., 4] float32 (y0, x0, y1, x1) in view b's pixels; may extend beyond [0, size_b].
  """
  size_b = size_a if size_b is None else size_b
  original = view_to_original(box_in_a, crop_a, bool(flip_a), size_a)
  return original_to_view(original, crop_b, bool(flip_b), size_b).astype(np.float32)


def crop_intersection(crop_a: Sequence[float], crop_b: Sequence[float]) -> Optional[tuple]:
  """Overlap of two crop windows (top, left, h, w) in original pixels, or None if disjoint."""
  top = max(crop_a[0], crop_b[0])
  left = max(crop_a[1], crop_b[1])
  bottom = min(crop_a[0] + crop_a[2], crop_b[0] + crop_b[2])
  right = min(crop_a[1] + crop_a[3], crop_b[1] + crop_b[3])
  if bottom <= top or right <= left:
    return None
  return top, left, bottom - top, right - left
