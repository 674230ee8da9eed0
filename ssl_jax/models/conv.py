"""`conv_general_dilated` with the convolutions XLA:CPU runs slowly rewritten as one matmul.

A drop-in for `lax.conv_general_dilated` (pass it as `nn.Conv(..., conv_general_dilated=...)`:
same parameters, same initialisation, same output up to float summation order). Two cases of a
2-D NHWC × HWIO convolution (no input dilation, one feature group) become a `dot_general` of
the kernel, reshaped to [kh·kw·Cin, Cout], with the stacked shifted views of the padded input
("im2col", [B, Ho, Wo, kh·kw·Cin] in the kernel's (row, column, channel) order):

- 1×1 kernels: the im2col is just a strided slice, and the product is a plain matmul. XLA:CPU
  runs a 1×1 convolution and its two gradients up to 2× (ResNet-18 shapes) and on other shapes
  up to 8× slower than the same matmul (bench/README.md, "1×1 convolutions").
- Kernels with more taps than the input or the output (kh·kw > H·W or > Ho·Wo, e.g. a 3×3 conv
  on ResNet-18's 2×2 last stage at 64 px, or a 16×16 patch embedding with fewer than 256
  patches): XLA's algebraic simplifier then swaps the convolution's operands
  (`AlgebraicSimplifierVisitor::SwapConvOperands`), and XLA:CPU has no library call for the
  swapped form (a window-reversed kernel): it emits naive loops, 0.4–5 GFLOP/s instead of ~150.
  The forward and the input gradient (a convolution whose input is the Ho×Wo output gradient)
  are both hit. As a matmul all three products (forward, input and weight gradient) are GEMMs.

Every other convolution goes to `lax.conv_general_dilated` unchanged. Autodiff handles the
rewritten form (pad, strided slices, concatenate, dot), so no gradient is hand-written.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs/rhs/out specs of NHWC, HWIO, NHWC


def _is_nhwc_hwio(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    dn = dimension_numbers
  else:
    try:
      dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers)
    except (TypeError, ValueError):
      return False
  return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC


def use_matmul(kernel_hw: tuple[int, int], in_hw: tuple[int, int],
               out_hw: tuple[int, int]) -> bool:
  """True when a convolution with this kernel, input and output size runs as one matmul: a 1×1
  kernel, or a kernel with more taps than the input (XLA swaps the forward's operands) or than
  the output (it swaps those of the input gradient, whose input is the output gradient)."""
  kh, kw = kernel_hw
  taps = kh * kw
  return taps == 1 or taps > in_hw[0] * in_hw[1] or taps > out_hw[0] * out_hw[1]


def conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   padding: Sequence[tuple[int, int]], dilation: Sequence[int] = (1, 1),
                   precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """x: [B, H, W, Cin], kernel: [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout] (im2col + matmul).

  The same function as `lax.conv_general_dilated(x, kernel, strides, padding,
  rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))` (zero padding; padding
  pairs must be non-negative).
  """
  kh, kw, cin, cout = kernel.shape
  b, h, w, c = x.shape
  if c != cin:
    raise ValueError(f"conv_as_matmul: x has {c} channels, the kernel expects {cin}")
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  dh, dw = dilation
  ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
  wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"conv_as_matmul: empty output {ho}x{wo} for input {h}x{w}")
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  cols = [lax.slice(x, (0, i * dh, j * dw, 0),
                    (b, i * dh + sh * (ho - 1) + 1, j * dw + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  # A 2-D product: its weight gradient is then a 2-D dot contracting dimension 0 of both
  # operands, which XLA:CPU runs as is; from the 4-D form XLA first copies the output gradient
  # into a transposed layout, fused with its producer (bench/README.md, "weight gradients").
  y = lax.dot_general(patches.reshape(b * ho * wo, kh * kw * cin),
                      kernel.reshape(kh * kw * cin, cout), (((1,), (0,)), ((), ())),
                      precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(b, ho, wo, cout)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, computed by `conv_as_matmul` when `use_matmul` says so."""
  if isinstance(padding, str) and padding.upper() == "VALID":
    padding = ((0, 0), (0, 0))
  eligible = (lhs.ndim == 4 and rhs.ndim == 4 and _is_nhwc_hwio(dimension_numbers)
              and feature_group_count == 1 and batch_group_count == 1
              and not isinstance(padding, str) and len(padding) == 2
              and all(lo >= 0 and hi >= 0 for lo, hi in padding)
              and tuple(lhs_dilation or (1, 1)) == (1, 1))
  if eligible:
    kh, kw = rhs.shape[:2]
    dilation = tuple(rhs_dilation or (1, 1))
    (pt, pb), (pl, pr) = padding
    ho = (lhs.shape[1] + pt + pb - dilation[0] * (kh - 1) - 1) // window_strides[0] + 1
    wo = (lhs.shape[2] + pl + pr - dilation[1] * (kw - 1) - 1) // window_strides[1] + 1
    if ho >= 1 and wo >= 1 and use_matmul((kh, kw), lhs.shape[1:3], (ho, wo)):
      return conv_as_matmul(lhs, rhs, window_strides, padding, dilation, precision,
                            preferred_element_type)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count,
                                  batch_group_count=batch_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)
