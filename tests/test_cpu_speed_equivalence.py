"""The CPU-speed rewrites compute the same function: `ssl_jax.models.conv` (issue 16).

`conv.conv_general_dilated` runs some convolutions as an im2col matmul; each case is checked
against `lax.conv_general_dilated` (forward, input gradient and weight gradient, with a random
cotangent), including the edge cases of the rewrite (1×1 output, batch 1, stride 2, dilation,
odd sizes, bf16) and the fallbacks, which must be exactly lax's. A ResNet whose last stages hit
the rewrite gives the same outputs, parameters and gradients as one with plain convolutions.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ssl_jax.models import conv, resnet

NHWC = ("NHWC", "HWIO", "NHWC")


def _rand(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _lax(x, w, strides, padding, dilation):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=NHWC)


def _ours(x, w, strides, padding, dilation):
  return conv.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                   dimension_numbers=NHWC)


@functools.lru_cache(maxsize=None)
def _value_and_grads(impl, strides, padding, dilation):
  """jit(x, w, cotangent -> (y, dx, dw)) of one implementation."""
  fn = _ours if impl == "ours" else _lax

  def f(x, w, ct):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, strides, padding, dilation), x, w)
    return (y, *vjp(ct))

  return jax.jit(f)


# (input [B, H, W, Cin], kernel [kh, kw, Cin, Cout], strides, padding, dilation, rewritten)
CASES = {
    "1x1": ((2, 5, 5, 3), (1, 1, 3, 4), (1, 1), ((0, 0), (0, 0)), (1, 1), True),
    "1x1 stride 2, odd size": ((2, 5, 7, 3), (1, 1, 3, 4), (2, 2), ((0, 0), (0, 0)), (1, 1), True),
    "3x3 on 2x2 (ResNet-18 conv5 at 64 px)": ((2, 2, 2, 6), (3, 3, 6, 5), (1, 1),
                                              ((1, 1), (1, 1)), (1, 1), True),
    "3x3 stride 2, 4x4 -> 2x2": ((1, 4, 4, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), (1, 1),
                                 True),
    "3x3 on 1x1, batch 1": ((1, 1, 1, 4), (3, 3, 4, 2), (1, 1), ((1, 1), (1, 1)), (1, 1), True),
    "7x7 stride 2 stem on 6x5": ((2, 6, 5, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), (1, 1),
                                 True),
    "2x2 dilation 2 on 3x3 -> 1x1": ((2, 3, 3, 4), (2, 2, 4, 3), (1, 1), ((0, 0), (0, 0)), (2, 2),
                                     True),
    "3x3 pad 2 on 2x2 -> 4x4 (fewer input than kernel taps)": ((1, 2, 2, 3), (3, 3, 3, 2), (1, 1),
                                                               ((2, 2), (2, 2)), (1, 1), True),
    "asymmetric padding 2x3 kernel": ((2, 1, 2, 2), (2, 3, 2, 3), (1, 1), ((0, 1), (2, 0)),
                                      (1, 1), True),
    "3x3 on 8x8 (lax)": ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conv_general_dilated_matches_lax_forward_and_gradients(name):
  xs, ws, strides, padding, dilation, rewritten = CASES[name]
  x, w = _rand(xs, 0), _rand(ws, 1)
  want = _value_and_grads("lax", strides, padding, dilation)
  y_ref = jax.eval_shape(lambda: _lax(x, w, strides, padding, dilation))
  ct = _rand(y_ref.shape, 2)
  assert conv.use_matmul(ws[:2], xs[1:3], y_ref.shape[1:3]) == rewritten
  got = _value_and_grads("ours", strides, padding, dilation)(x, w, ct)
  ref = want(x, w, ct)
  for g, r, what in zip(got, ref, ("output", "input gradient", "weight gradient")):
    assert g.shape == r.shape and g.dtype == r.dtype, what
    if rewritten:
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))),
                                 err_msg=f"{name}: {what}")
    else:  # the fallback is lax itself
      np.testing.assert_array_equal(g, r, err_msg=f"{name}: {what}")


def test_conv_as_matmul_bf16_and_valid_padding_string():
  x, w = _rand((2, 4, 4, 8), 0, jnp.bfloat16), _rand((4, 4, 8, 3), 1, jnp.bfloat16)
  got = conv.conv_general_dilated(x, w, (4, 4), "VALID", dimension_numbers=NHWC)  # patchify
  want = lax.conv_general_dilated(x, w, (4, 4), "VALID", dimension_numbers=NHWC)
  assert got.dtype == want.dtype == jnp.bfloat16 and got.shape == want.shape == (2, 1, 1, 3)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want))))


def test_unsupported_forms_fall_back_to_lax():
  x, w = _rand((2, 3, 3, 4), 0), _rand((1, 1, 4, 6), 1)
  # NCHW layouts, feature groups, SAME padding and input dilation are lax's.
  nchw = conv.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1)),
                                   (1, 1), ((0, 0), (0, 0)))
  np.testing.assert_array_equal(nchw, lax.conv_general_dilated(
      jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1)), (1, 1), ((0, 0), (0, 0))))
  grouped = conv.conv_general_dilated(x, _rand((1, 1, 2, 6), 1), (1, 1), ((0, 0), (0, 0)),
                                      dimension_numbers=NHWC, feature_group_count=2)
  assert grouped.shape == (2, 3, 3, 6)
  same = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  np.testing.assert_array_equal(same, lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                               dimension_numbers=NHWC))
  dil = conv.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), lhs_dilation=(2, 2),
                                  dimension_numbers=NHWC)
  assert dil.shape == (2, 5, 5, 6)


def test_conv_as_matmul_rejects_mismatched_channels():
  with pytest.raises(ValueError, match="channels"):
    conv.conv_as_matmul(_rand((1, 2, 2, 3), 0), _rand((1, 1, 4, 2), 1), (1, 1), ((0, 0), (0, 0)))


def test_rewritten_convs_leave_no_swapped_convolution_in_the_compiled_step():
  """The reason for the rewrite: XLA swaps the operands of a convolution whose kernel is larger
  than its input (a window-reversed kernel, which XLA:CPU runs as naive loops)."""
  x, w, ct = _rand((2, 2, 2, 4), 0), _rand((3, 3, 4, 4), 1), _rand((2, 2, 2, 4), 2)
  pad = ((1, 1), (1, 1))
  ours = _value_and_grads("ours", (1, 1), pad, (1, 1)).lower(x, w, ct).compile().as_text()
  assert " convolution(" not in ours
  plain = _value_and_grads("lax", (1, 1), pad, (1, 1)).lower(x, w, ct).compile().as_text()
  assert "rhs_reversal" in plain  # XLA still does this: if not, the rewrite may be dropped


# ---------------------------------------------------------------- a whole ResNet


def _resnet_value_and_grads(model, variables, images):
  def loss(params):
    out, updates = model.apply({**variables, "params": params}, images, train=True,
                               mutable=["batch_stats"])
    return jnp.sum(out["pooled"] ** 2), (out["pooled"], updates["batch_stats"])
  return jax.value_and_grad(loss, has_aux=True)(variables["params"])


def test_resnet_with_rewritten_convs_matches_plain_convolutions(monkeypatch):
  # ResNet-18's blocks at 64 px with the ImageNet stem: conv5 is 2x2, so its 3x3 convs (and
  # the stride-2 one leading to it) and the 1x1 shortcuts are rewritten. (Much smaller maps
  # make train-mode batch norm ill-conditioned: a 1x1 map of 2 images normalises 2 values.)
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=8)
  images = _rand((4, 64, 64, 3), 0)
  key = jax.random.key(0, impl="rbg")
  fast_vars = jax.jit(functools.partial(model.init, train=True))(key, images)
  fast = jax.jit(functools.partial(_resnet_value_and_grads, model))(fast_vars, images)
  monkeypatch.setattr(conv, "use_matmul", lambda *_: False)
  plain_vars = jax.jit(functools.partial(model.init, train=True))(key, images)
  plain = jax.jit(functools.partial(_resnet_value_and_grads, model))(plain_vars, images)
  jax.tree.map(np.testing.assert_array_equal, fast_vars, plain_vars)  # same init
  (fast_loss, (fast_out, fast_stats)), fast_grads = fast
  (plain_loss, (plain_out, plain_stats)), plain_grads = plain
  np.testing.assert_allclose(fast_out, plain_out, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), fast_stats,
               plain_stats)
  for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(fast_grads)[0],
                          jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(g, p, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(p))) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
