"""ResNet (He et al., 2016) laid out like torchvision, so PyTorch export is a rename.

torchvision "v1.5" details we follow: the stride of a bottleneck sits on its 3×3 conv; padding is
explicit and symmetric (7×7 pad 3, 3×3 pad 1, max-pool 3×3/2 pad 1 with −inf padding), never
'SAME', whose asymmetric padding at stride 2 would give different outputs from the exported model;
convs have no bias and are initialised Kaiming-normal (fan_out, ReLU gain).

Parameter tree: `conv1`, `bn1`, `layer{i}_{j}` with `conv1/bn1/conv2/bn2[/conv3/bn3]` and, where
the shape changes, `downsample_0` (1×1 conv) / `downsample_1` (BN). Batch-norm statistics live in
the `batch_stats` collection.

Batch norm: flax momentum 0.9 equals torch momentum 0.1. The running variance is updated with the
*biased* batch variance (flax, and Haiku in the official BYOL/DetCon JAX code); torch uses the
unbiased one. The difference is a factor n/(n−1) with n = batch·height·width (≥ 10⁴ at the
papers' settings) and only affects eval-mode statistics, so we keep the library's BatchNorm.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
  pad = kernel // 2  # PyTorch's symmetric padding for odd kernels
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=conv_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


class _Block(nn.Module):
  """One residual block ("basic": 2×3×3, "bottleneck": 1×1 → 3×3 (stride) → 1×1 ×4)."""
  planes: int
  stride: int
  bottleneck: bool
  norm: Any
  zero_init_residual: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C] -> [B, H/stride, W/stride, planes·expansion]."""
    expansion = 4 if self.bottleneck else 1
    out_features = self.planes * expansion
    # zero-init of the last BN's γ makes each block start as the identity (Goyal et al., 2017).
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    if self.bottleneck:
      y = nn.relu(self.norm(name="bn1")(_conv(self.planes, 1, 1, "conv1", self.dtype)(x)))
      y = nn.relu(self.norm(name="bn2")(_conv(self.planes, 3, self.stride, "conv2", self.dtype)(y)))
      y = self.norm(name="bn3", scale_init=last_scale)(
          _conv(out_features, 1, 1, "conv3", self.dtype)(y))
    else:
      y = nn.relu(self.norm(name="bn1")(_conv(self.planes, 3, self.stride, "conv1", self.dtype)(x)))
      y = self.norm(name="bn2", scale_init=last_scale)(
          _conv(out_features, 3, 1, "conv2", self.dtype)(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      x = self.norm(name="downsample_1")(
          _conv(out_features, 1, self.stride, "downsample_0", self.dtype)(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet backbone without the classifier.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101).
    width: base width (64 in torchvision); stage i has width·2^i planes.
    small_image_stem: 3×3 stride-1 conv and no max-pool, for 32 px images (CIFAR-style). The
      exported `conv1.weight` is then 3×3, so torchvision needs its `conv1`/`maxpool` replaced.
    dtype: compute dtype; parameters and batch statistics stay float32.
    bn_momentum: flax decay of the running statistics (0.9 == torch momentum 0.1).
    bn_epsilon: batch-norm ε (torch default 1e-5).
    zero_init_residual: initialise the last BN γ of every block to 0.
  """
  stage_sizes: Sequence[int]
  block: str
  width: int = 64
  small_image_stem: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool) -> dict:
    """x: [B, H, W, 3] float -> dict(
      pooled [B, C] float32 (global average of the last stage),
      feature_map [B, h, w, C] (last stage, h = H/32 or H/8 with the small stem),
      stages (4 stage outputs conv2..conv5), stem [B, H/4, W/4, width] (after the stem)).
    """
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"ResNet.block={self.block!r} must be 'basic' or 'bottleneck'")
    if len(self.stage_sizes) != 4:
      raise ValueError(f"ResNet.stage_sizes={tuple(self.stage_sizes)} must have 4 entries")
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, param_dtype=jnp.float32)
    x = jnp.asarray(x, self.dtype)
    if self.small_image_stem:
      x = nn.relu(norm(name="bn1")(_conv(self.width, 3, 1, "conv1", self.dtype)(x)))
    else:
      x = nn.relu(norm(name="bn1")(_conv(self.width, 7, 2, "conv1", self.dtype)(x)))
      # Padding with −inf (flax's pool init value) as torch's MaxPool2d(3, 2, padding=1).
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stem = x
    stages = []
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = _Block(planes=self.width * 2**i, stride=2 if (i > 0 and j == 0) else 1,
                   bottleneck=self.block == "bottleneck", norm=norm,
                   zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                   name=f"layer{i + 1}_{j}")(x)
      stages.append(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return {"pooled": pooled, "feature_map": x, "stages": tuple(stages), "stem": stem}


def _resnet(depth: int, **kwargs) -> ResNet:
  block = "basic" if depth < 50 else "bottleneck"
  return ResNet(stage_sizes=STAGE_SIZES[depth], block=block, **kwargs)


resnet18 = functools.partial(_resnet, 18)
resnet34 = functools.partial(_resnet, 34)
resnet50 = functools.partial(_resnet, 50)
resnet101 = functools.partial(_resnet, 101)
