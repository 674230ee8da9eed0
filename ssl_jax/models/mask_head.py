"""MaskCo's Mask Prediction Head (MPH; Zhao et al., 2021, "Self-Supervised Visual Representations
Learning by Contrastive Mask Prediction", §3.2, §3.3 and Table 4).

The MPH sits between the backbone's C5 and RoIAlign, in both the online (query) and the momentum
(key) network (Algorithm 1: `net_q` = backbone + MPH). It "bridges the domain gap" between
features of masked and unmasked regions, so that the backbone itself need not learn to fill in
the blank: linear evaluation and export use the plain ResNet-50 without it.

What the paper says (§3.3 "Model details", §4.4):
- "three 3-layer blocks of residual layers (1x1 conv-3x3 conv-1x1 conv), which is the same as
  conv5 layer in the ResNet-50" (so bottleneck blocks with batch norm, as in the backbone);
  Table 4 varies the number of blocks over {0, 1, 2, 3, 4}: 0 (no MPH) drops conv5 linear
  accuracy from 63.1 to 41.9; 3 is the default and 4 is no better.

Choices of ours (the paper does not state them; no official code exists):
- Width: conv5's, i.e. bottleneck width `planes` = C_in / 4 (512 on ResNet-50's 2048-wide C5),
  output planes·4 = C_in, so every block's shortcut is the identity. conv5's own first block has
  a 1×1 projection shortcut only because it changes width (1024 → 2048) and stride; on C5 nothing
  changes, so no block gets one (torchvision's rule: project iff stride or width changes). A
  different `planes` makes the first block project (1×1 conv + BN), as torchvision would.
- Stride 1 in every block: the head keeps C5's resolution (7×7 at 224 px; a stride would leave
  RoIAlign a 4×4 map). `dilation` (default 1) dilates the 3×3 convs, e.g. 2 to continue a backbone
  whose conv5 is dilated (`replace_stride_with_dilation=(False, False, True)`), as conv5's later
  blocks are there.
- Initialisation as the backbone's (Kaiming-normal fan_out convs, BN γ=1, β=0); the last-BN
  zero-init is the `zero_init_residual` switch (default off, as the backbone's).
- BN statistics in train mode come from the batch (global under jit, like the backbone's).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.resnet import ResidualBlock, batch_norm


class MaskPredictionHead(nn.Module):
  """`num_blocks` bottleneck blocks like ResNet-50's conv5, applied to the C5 feature map.

  Keep its variables apart from the backbone's (`params["mask_head"]`,
  `batch_stats["mask_head"]`), so that export and linear evaluation see a plain ResNet-50.
  With `num_blocks=0` the head is the identity and has no variables at all (`init` returns an
  empty dict; `apply({}, x, train=...)` returns x).

  Attributes:
    num_blocks: N in 0..4 (the paper's Table 4), default 3 (the paper's choice).
    planes: bottleneck width; None = C_in // 4 (conv5's 512 on a 2048-wide C5). The output
      has planes·4 channels.
    dilation: dilation of the 3×3 convs (1; 2 after a dilated conv5).
    zero_init_residual: γ of each block's last BN initialised to 0.
    dtype: compute dtype; parameters and batch statistics stay float32.
    bn_momentum, bn_epsilon: as the backbone's (flax 0.9 == torch momentum 0.1; 1e-5).

  Parameter tree: `block_0` … `block_{N-1}`, each `conv1/bn1/conv2/bn2/conv3/bn3` (+
  `downsample_0/1` in block_0 when planes·4 != C_in), as a torchvision `Bottleneck`.
  """
  num_blocks: int = 3
  planes: Optional[int] = None
  dilation: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, *, train: bool):
    """x: [B, h, w, C_in] (C5) -> [B, h, w, planes·4] (C_in with the default planes)."""
    if not 0 <= self.num_blocks <= 4:
      raise ValueError(f"MaskPredictionHead.num_blocks={self.num_blocks} must be in 0..4 "
                       "(the paper's Table 4)")
    if x.ndim != 4:
      raise ValueError(f"MaskPredictionHead input must be a feature map [B, h, w, C], got shape "
                       f"{x.shape}")
    if self.num_blocks == 0:
      return x
    planes = self.planes if self.planes is not None else x.shape[-1] // 4
    if planes <= 0:
      raise ValueError(f"MaskPredictionHead.planes={planes} must be positive (C_in={x.shape[-1]}"
                       "; pass planes= for inputs narrower than 4 channels)")
    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype)
    x = jnp.asarray(x, self.dtype)
    for j in range(self.num_blocks):
      x = ResidualBlock(planes=planes, stride=1, bottleneck=True, norm=norm,
                        zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                        dilation=self.dilation, name=f"block_{j}")(x)
    return x
