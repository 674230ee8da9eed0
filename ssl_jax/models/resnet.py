"""ResNet (He et al., 2016) laid out like torchvision, so PyTorch export is a rename.

torchvision "v1.5" details we follow: the stride of a bottleneck sits on its 3×3 conv; padding is
explicit and symmetric (7×7 pad 3, 3×3 pad 1, max-pool 3×3/2 pad 1 with −inf padding), never
'SAME', whose asymmetric padding at stride 2 would give different outputs from the exported model;
convs have no bias and are initialised Kaiming-normal (fan_out, ReLU gain).

Options that leave the parameter tree (and so the export) unchanged:
- `replace_stride_with_dilation` (torchvision's): stages conv3..conv5 keep their resolution and
  dilate their 3×3 convs instead, as torchvision does it: the first block of a dilated stage uses
  the *previous* dilation and the later blocks the new one (the 1×1 projection shortcut stays, with
  stride 1). `(False, False, True)` gives a stride-16 C5 (14×14 at 224 px), DeepLab-style.
  A torchvision `resnet50(replace_stride_with_dilation=[...])` loads our export and gives the same
  features (tests/test_torch_resnet_options.py).
- `zero_init_residual`: the γ of the last BN of every residual branch starts at 0, so each block
  starts as relu(shortcut) (Goyal et al., 2017). The official BYOL/DetCon Haiku ResNet
  (`scale_init=jnp.zeros` on the block's last BN) and SimCLR v1 (`init_zero` on the last BN) do
  it; torchvision's `zero_init_residual=True` is the same. The downsample BN is never zeroed.
  Basic blocks (ResNet-18/34) get it too, as torchvision's (bn2); Haiku's `hk.nets.ResNet` zeroes
  only bottleneck blocks, so a Haiku ResNet-18 starts with γ = 1 there.

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
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models import conv as conv_lib

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any,
          dilation: int = 1) -> nn.Conv:
  pad = dilation * (kernel // 2)  # PyTorch's symmetric padding (= dilation for a 3×3 conv)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=False, kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32,
                 conv_general_dilated=conv_lib.conv_general_dilated, name=name)


def batch_norm(train: bool, momentum: float = 0.9, epsilon: float = 1e-5,
               dtype: Any = jnp.float32) -> Callable[..., nn.BatchNorm]:
  """The BatchNorm constructor the ResNet blocks take as `norm` (call it with `name=`,
  `scale_init=`): batch statistics when `train`, running averages otherwise; f32 parameters."""
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                           epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32)


class ResidualBlock(nn.Module):
  """One residual block, torchvision's `BasicBlock` / `Bottleneck` (v1.5: stride on the 3×3).

  "basic": 3×3 (stride) → 3×3; "bottleneck": 1×1 → 3×3 (stride, dilation) → 1×1 (×4 channels).
  The shortcut is a 1×1 conv + BN (`downsample_0/1`) when the stride or the channel count
  changes, the identity otherwise. Used by `ResNet` and by MaskCo's `MaskPredictionHead`.

  Attributes:
    planes: width of the block's inner convs; the output has planes·4 (bottleneck) or planes.
    stride: stride of the 3×3 conv (and of the projection shortcut).
    bottleneck: bottleneck (True) or basic (False) block.
    norm: BatchNorm constructor, `batch_norm(train, ...)`.
    zero_init_residual: γ of the branch's last BN (bn3 / bn2) initialised to 0 instead of 1.
    dtype: compute dtype.
    dilation: dilation (and padding) of the bottleneck's 3×3 conv; basic blocks need 1
      (as torchvision, which raises for a dilated BasicBlock).
  """
  planes: int
  stride: int
  bottleneck: bool
  norm: Any
  zero_init_residual: bool
  dtype: Any
  dilation: int = 1

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C] -> [B, H/stride, W/stride, planes·expansion]."""
    if self.dilation != 1 and not self.bottleneck:
      raise ValueError(f"dilation={self.dilation} needs bottleneck blocks (torchvision's "
                       "BasicBlock has no dilation); use ResNet-50/101 for dilated stages")
    expansion = 4 if self.bottleneck else 1
    out_features = self.planes * expansion
    # zero-init of the last BN's γ makes each block start as the identity (Goyal et al., 2017).
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    if self.bottleneck:
      y = nn.relu(self.norm(name="bn1")(_conv(self.planes, 1, 1, "conv1", self.dtype)(x)))
      y = nn.relu(self.norm(name="bn2")(_conv(self.planes, 3, self.stride, "conv2", self.dtype,
                                              dilation=self.dilation)(y)))
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
    zero_init_residual: initialise the last BN γ of every block to 0 (see the module docstring).
    replace_stride_with_dilation: for stages conv3, conv4, conv5, dilate instead of striding
      (torchvision's option; bottleneck blocks only). Each True halves the output stride:
      (False, False, True) gives C5 at stride 16, (False, True, True) at stride 8.
  """
  stage_sizes: Sequence[int]
  block: str
  width: int = 64
  small_image_stem: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_residual: bool = False
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)

  @property
  def output_stride(self) -> int:
    """Input pixels per cell of `feature_map` (32 by default; 8 with the small stem)."""
    stride = 1 if self.small_image_stem else 4
    for dilate in tuple(self.replace_stride_with_dilation):
      stride *= 1 if dilate else 2
    return stride

  @nn.compact
  def __call__(self, x, *, train: bool) -> dict:
    """x: [B, H, W, 3] float -> dict(
      pooled [B, C] float32 (global average of the last stage),
      feature_map [B, h, w, C] (last stage, h = H/output_stride: H/32, H/8 with the small
        stem, halved by each dilated stage),
      stages (4 stage outputs conv2..conv5), stem [B, H/4, W/4, width] (after the stem)).
    """
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"ResNet.block={self.block!r} must be 'basic' or 'bottleneck'")
    if len(self.stage_sizes) != 4:
      raise ValueError(f"ResNet.stage_sizes={tuple(self.stage_sizes)} must have 4 entries")
    replace = tuple(bool(d) for d in self.replace_stride_with_dilation)
    if len(replace) != 3:
      raise ValueError(f"ResNet.replace_stride_with_dilation={replace} must have 3 entries "
                       "(stages conv3, conv4, conv5)")
    if any(replace) and self.block != "bottleneck":
      raise ValueError(f"ResNet.replace_stride_with_dilation={replace} needs bottleneck blocks "
                       "(ResNet-50/101), as torchvision's")
    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    x = jnp.asarray(x, self.dtype)
    if self.small_image_stem:
      x = nn.relu(norm(name="bn1")(_conv(self.width, 3, 1, "conv1", self.dtype)(x)))
    else:
      x = nn.relu(norm(name="bn1")(_conv(self.width, 7, 2, "conv1", self.dtype)(x)))
      # Padding with −inf (flax's pool init value) as torch's MaxPool2d(3, 2, padding=1).
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stem = x
    stages = []
    dilation = 1
    for i, num_blocks in enumerate(self.stage_sizes):
      stride = 1 if i == 0 else 2
      # torchvision's _make_layer: the first block keeps the previous dilation.
      previous_dilation = dilation
      if i > 0 and replace[i - 1]:
        dilation, stride = dilation * stride, 1
      for j in range(num_blocks):
        x = ResidualBlock(planes=self.width * 2**i, stride=stride if j == 0 else 1,
                          bottleneck=self.block == "bottleneck", norm=norm,
                          zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                          dilation=previous_dilation if j == 0 else dilation,
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
