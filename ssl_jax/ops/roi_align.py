"""RoIAlign (He et al., 2017, "Mask R-CNN" §3) with `torchvision.ops.roi_align`'s semantics, in JAX.

Each box is divided into out_h × out_w bins; each bin averages `sampling_ratio`² bilinearly
interpolated samples at the centres of a regular sub-grid. With `aligned=True` (Detectron2's
"ROIAlignV2") the box is shifted by −0.5 feature cells so that pixel centres line up; with
`aligned=False` it is not shifted and boxes smaller than one cell are grown to one cell, as
torchvision. A sample at y < −1 or y > H (x < −1 or x > W) contributes zero; otherwise y is
clamped to [0, H−1] (x to [0, W−1]) before interpolation. All exactly as torchvision's kernel.

How it is computed (jit-, grad- and TPU-friendly): the sample grid of a box is a product of its
y positions and its x positions, and bilinear weights and the in-range test factor the same way,
so RoIAlign is two small matrix products per box:

    out[b, k, p, q, c] = Σ_h Σ_w  Wy[b, k, p, h] · Wx[b, k, q, w] · features[b, h, w, c]

with Wy[p, h] = (1/g_y) Σ_{samples i of row-bin p} (bilinear weight of feature row h at y_i)
(the same for Wx). No gathers or scatters: the gradient w.r.t. the features is another matmul,
and the gradient w.r.t. the boxes flows through the bilinear weights (finite everywhere; zero
through floor/clamp, as torchvision's formula). The products run at `precision=HIGHEST` by
default: the interpolation weights are not bf16 numbers, and on TPUs (and TF32 GPUs) DEFAULT
precision would round them; the cost is negligible beside the backbone.

Sampling ratio. torchvision's default (`sampling_ratio <= 0`) takes ceil(box side / output side)
samples per bin: a data-dependent count. Here it is supported with a static maximum,
`max_sampling_ratio` (default ceil(H / out_h), resp. ceil(W / out_w), which is exact for every
box inside the feature map); a box larger than that gets the maximum instead of torchvision's
count. The fixed ratio (default 2, Mask R-CNN's; Detectron2's default config uses the adaptive 0)
has no such caveat.

Coordinates. Boxes are (y0, x0, y1, x1) in input-image pixels (the order of
`data.views.make_maskco_views`); torchvision takes (x1, y1, x2, y2). `spatial_scale` maps them to
feature cells: 1 / (feature stride), e.g. 1/32 for ResNet-50's C5, 1/16 with a dilated conv5.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp


def _axis_weights(start: jax.Array, end: jax.Array, out: int, size: int, sampling_ratio: int,
                  max_sampling_ratio: int, aligned: bool) -> jax.Array:
  """Interpolation-and-averaging matrix along one axis.

  Args:
    start, end: [B, K] float32 box edges in input pixels already multiplied by spatial_scale.
    out: number of output bins along the axis.
    size: feature map size along the axis (H or W).
    sampling_ratio: samples per bin (> 0), or <= 0 for ceil(roi length / out) capped at
      max_sampling_ratio.

  Returns:
    [B, K, out, size] float32: row p holds the mean over bin p's samples of their bilinear
    weights on feature rows 0..size-1 (zero for out-of-range samples).
  """
  offset = 0.5 if aligned else 0.0
  # Same operation order as torchvision's kernel, so that float32 sample positions agree.
  roi_start = start - offset
  roi_length = (end - offset) - roi_start
  if not aligned:
    roi_length = jnp.maximum(roi_length, 1.0)
  bin_size = roi_length / out                                          # [B, K]
  if sampling_ratio > 0:
    num_samples = sampling_ratio
    grid = jnp.full_like(bin_size, float(sampling_ratio))
  else:
    num_samples = max_sampling_ratio
    # ceil of a non-positive length is <= 0: no sample, the bin is zero (as torchvision).
    grid = jnp.clip(jnp.ceil(roi_length / out), 0.0, float(max_sampling_ratio))
  grid = jax.lax.stop_gradient(grid)
  p = jnp.arange(out, dtype=jnp.float32)[:, None]                      # [out, 1]
  i = jnp.arange(num_samples, dtype=jnp.float32)[None, :]              # [1, n]
  roi_start, bin_size, grid_ = (a[..., None, None] for a in (roi_start, bin_size, grid))
  pos = roi_start + p * bin_size + (i + 0.5) * bin_size / jnp.maximum(grid_, 1.0)  # [B,K,out,n]
  # Written as "in range" so that NaN positions count as out of range (as torchvision).
  valid = (pos >= -1.0) & (pos <= size) & (i < grid_)
  pos = jnp.maximum(jnp.where(valid, pos, 0.0), 0.0)
  low = jax.lax.stop_gradient(jnp.floor(pos))
  at_edge = low >= size - 1
  low = jnp.where(at_edge, float(size - 1), low)
  pos = jnp.where(at_edge, low, pos)
  high = jnp.where(at_edge, low, low + 1.0)
  frac = pos - low                                                     # ly (resp. lx)
  rows = jnp.arange(size, dtype=jnp.float32)
  weights = ((1.0 - frac)[..., None] * (low[..., None] == rows)
             + frac[..., None] * (high[..., None] == rows))            # [B, K, out, n, size]
  weights = jnp.where(valid[..., None], weights, 0.0)
  # Averaging per axis: count = g_y·g_x in torchvision, and its max(·, 1) only matters when a
  # grid is empty, where the sum is empty too.
  return weights.sum(axis=-2) / jnp.maximum(grid, 1.0)[..., None, None]


def roi_align(features: jax.Array, boxes: jax.Array, output_size: Union[int, tuple[int, int]],
              spatial_scale: float, sampling_ratio: int = 2, aligned: bool = True,
              max_sampling_ratio: Optional[int] = None,
              precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
  """RoIAlign of K boxes per image, as `torchvision.ops.roi_align` (see the module docstring).

  Args:
    features: [B, H, W, C] feature map (NHWC), any float dtype.
    boxes: [B, K, 4] float (y0, x0, y1, x1) in input-image pixels, box k of image b pooled from
      features[b]. (One box per image: pass `box[:, None]`.)
    output_size: out_h = out_w, or (out_h, out_w).
    spatial_scale: feature cells per input pixel, 1 / stride (1/32 for ResNet-50 C5).
    sampling_ratio: samples per bin along each axis (> 0; default 2), or <= 0 for torchvision's
      adaptive ceil(roi size / output size), capped at `max_sampling_ratio`.
    aligned: shift boxes by −0.5 cell (torchvision `aligned=True`, Detectron2's ROIAlignV2).
    max_sampling_ratio: static cap of the adaptive mode (default ceil(H / out_h) and
      ceil(W / out_w): exact for boxes inside the feature map). Ignored for sampling_ratio > 0.
    precision: of the two interpolation matmuls (HIGHEST: float32-exact on every backend).

  Returns:
    [B, K, out_h, out_w, C] in features.dtype (computed in float32).
  """
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  out_h, out_w = (int(s) for s in output_size)
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"roi_align output_size={output_size} must be positive")
  if features.ndim != 4:
    raise ValueError(f"roi_align features must be NHWC [B, H, W, C], got shape {features.shape}")
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"roi_align boxes must be [B, K, 4] (y0, x0, y1, x1), got shape "
                     f"{boxes.shape}; for one box per image pass boxes[:, None]")
  if boxes.shape[0] != features.shape[0]:
    raise ValueError(f"roi_align boxes batch {boxes.shape[0]} != features batch "
                     f"{features.shape[0]}")
  if not spatial_scale > 0:
    raise ValueError(f"roi_align spatial_scale={spatial_scale} must be > 0 (1 / feature stride)")
  if int(sampling_ratio) != sampling_ratio:
    raise ValueError(f"roi_align sampling_ratio={sampling_ratio} must be an integer")
  sampling_ratio = int(sampling_ratio)
  _, height, width, _ = features.shape
  if max_sampling_ratio is not None and int(max_sampling_ratio) < 1:
    raise ValueError(f"roi_align max_sampling_ratio={max_sampling_ratio} must be >= 1")
  max_h = int(max_sampling_ratio) if max_sampling_ratio else max(math.ceil(height / out_h), 1)
  max_w = int(max_sampling_ratio) if max_sampling_ratio else max(math.ceil(width / out_w), 1)

  scaled = boxes.astype(jnp.float32) * jnp.float32(spatial_scale)
  y0, x0, y1, x1 = (scaled[..., j] for j in range(4))
  wy = _axis_weights(y0, y1, out_h, height, sampling_ratio, max_h, aligned)  # [B, K, out_h, H]
  wx = _axis_weights(x0, x1, out_w, width, sampling_ratio, max_w, aligned)   # [B, K, out_w, W]
  f = features.astype(jnp.float32)
  rows = jnp.einsum("bkph,bhwc->bkpwc", wy, f, precision=precision)
  out = jnp.einsum("bkqw,bkpwc->bkpqc", wx, rows, precision=precision)
  return out.astype(features.dtype)
