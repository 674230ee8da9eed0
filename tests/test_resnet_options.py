"""ResNet options that keep torchvision's parameter tree: `zero_init_residual` (issue 20 item 4)
and `replace_stride_with_dilation`.

The torchvision comparisons (same C5 as `torchvision.models.resnet50(replace_stride_with_dilation=
...)`, same zero-initialised BN weights as `zero_init_residual=True`) are in
tests/test_torch_resnet_options.py.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.export import torch as torch_export
from ssl_jax.models import resnet

KEY = jax.random.key(0, impl="rbg")  # rbg: much cheaper to compile on CPU than threefry


def _images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _init(block, zero_init_residual):
  # Two blocks in stage 1 (identity shortcuts) and one per later stage (projection shortcuts).
  model = resnet.ResNet(stage_sizes=(2, 1, 1, 1), block=block, width=8, small_image_stem=True,
                        zero_init_residual=zero_init_residual)
  return model, jax.jit(functools.partial(model.init, train=False))(KEY, _images())


def _bn_scales(params):
  """{"layer1_0/bn3": scale, "bn1": scale, ...} for every BatchNorm of the tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path[:-1]): np.asarray(v) for path, v in flat
          if path[-1].key == "scale"}


# ---------------------------------------------------------------- zero_init_residual


@pytest.mark.parametrize("block,last", [("bottleneck", "bn3"), ("basic", "bn2")])
def test_zero_init_residual_zeroes_exactly_the_last_bn_of_each_block(block, last):
  _, variables = _init(block, True)
  scales = _bn_scales(variables["params"])
  blocks = ["layer1_0", "layer1_1", "layer2_0", "layer3_0", "layer4_0"]
  zeroed = {f"{b}/{last}" for b in blocks}
  assert zeroed <= set(scales)
  for name, scale in scales.items():
    expected = 0.0 if name in zeroed else 1.0  # incl. the stem bn1 and downsample_1
    np.testing.assert_array_equal(scale, expected, err_msg=name)
  # BN shifts and the other initialisers are untouched by the option.
  _, default = _init(block, False)
  assert all(np.all(s == 1) for s in _bn_scales(default["params"]).values())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    if path[-1].key != "scale":
      np.testing.assert_array_equal(leaf, _get(default, path), err_msg=str(path))


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def _block_apply(block, zero_init_residual, x, stride, planes, train):
  module = resnet.ResidualBlock(planes=planes, stride=stride, bottleneck=block == "bottleneck",
                                norm=resnet.batch_norm(train),
                                zero_init_residual=zero_init_residual, dtype=jnp.float32)
  variables = jax.jit(module.init)(KEY, x)
  apply = jax.jit(functools.partial(module.apply, mutable=["batch_stats"]) if train
                  else module.apply)
  out = apply(variables, x)
  return np.asarray(out[0] if train else out), jax.device_get(variables)


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
@pytest.mark.parametrize("train", [False, True])
def test_zero_init_block_is_relu_of_its_shortcut(block, train):
  x = np.random.default_rng(3).normal(size=(2, 8, 8, 8)).astype(np.float32) * 2.0
  # Identity shortcut: out == relu(x).
  planes = 2 if block == "bottleneck" else 8
  out, _ = _block_apply(block, True, x, 1, planes, train)
  np.testing.assert_allclose(out, np.maximum(x, 0), atol=1e-6)
  off, _ = _block_apply(block, False, x, 1, planes, train)
  assert not np.allclose(off, np.maximum(x, 0), atol=1e-2)  # the branch is live without it
  # Projection shortcut (stride 2, wider): out == relu(BN(1×1 conv stride 2 of x)), in NumPy.
  out, variables = _block_apply(block, True, x, 2, 4, train)
  kernel = variables["params"]["downsample_0"]["kernel"][0, 0]             # [C_in, C_out]
  shortcut = x[:, ::2, ::2] @ kernel
  if train:  # batch statistics (biased variance), γ = 1, β = 0
    mean, var = shortcut.mean(axis=(0, 1, 2)), shortcut.var(axis=(0, 1, 2))
  else:      # fresh running statistics: mean 0, var 1
    mean, var = 0.0, 1.0
  expected = np.maximum((shortcut - mean) / np.sqrt(var + 1e-5), 0)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_zero_init_network_identity_blocks_pass_their_input():
  """In a fresh zero-init ResNet, a block with an identity shortcut returns relu(input) = input
  (its input is a ReLU output): here layer1_1, after layer1_0 widened 8 -> 32 channels."""
  model, variables = _init("bottleneck", True)
  _, state = model.apply(variables, _images(), train=False,
                         capture_intermediates=lambda m, _: m.name in ("layer1_0", "layer1_1"),
                         mutable=["intermediates"])
  inter = state["intermediates"]
  np.testing.assert_allclose(inter["layer1_1"]["__call__"][0], inter["layer1_0"]["__call__"][0],
                             atol=1e-6)


# ---------------------------------------------------------------- replace_stride_with_dilation

DILATIONS = [(False, False, False), (False, False, True), (False, True, True), (True, True, True)]


def _conv_calls(model, x):
  """[(block name, conv name, stride, dilation)] of every 3×3 conv the model applies."""
  calls = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == "__call__" and \
        module.kernel_size == (3, 3) and module.parent is not None and \
        isinstance(module.parent, resnet.ResidualBlock):
      calls.append((module.parent.name, module.name, module.strides[0],
                    module.kernel_dilation[0], module.padding[0][0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
  return calls


@pytest.mark.parametrize("replace", DILATIONS[1:])
def test_dilation_schedule_is_torchvisions(replace):
  """The 3×3 conv of each block of a ResNet-50: torchvision's `_make_layer` keeps the previous
  dilation in the first block of a dilated stage and uses the new one from the second block."""
  model = models.get_backbone("resnet50", replace_stride_with_dilation=replace)
  calls = _conv_calls(model, jnp.zeros((1, 64, 64, 3)))
  expected = []
  dilation = 1
  for i, n in enumerate(resnet.STAGE_SIZES[50]):
    dilate = i > 0 and replace[i - 1]
    first = (1 if dilate or i == 0 else 2, dilation)  # (stride, dilation) of block 0
    if dilate:
      dilation *= 2
    expected += [(f"layer{i + 1}_{j}", "conv2") + (first if j == 0 else (1, dilation))
                 for j in range(n)]
  expected = [e + (e[3],) for e in expected]  # padding == dilation
  assert calls == expected
  # Spelled out for the MaskCo case (stride-16 C5):
  if replace == (False, False, True):
    assert [c[2:4] for c in calls[-3:]] == [(1, 1), (1, 2), (1, 2)]


@pytest.mark.parametrize("replace", DILATIONS)
def test_dilation_keeps_the_tree_and_shrinks_the_output_stride(replace):
  size = 64
  x = jnp.zeros((1, size, size, 3))
  plain = models.get_backbone("resnet50")
  model = models.get_backbone("resnet50", replace_stride_with_dilation=replace)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
  plain_shapes = jax.eval_shape(functools.partial(plain.init, train=False), KEY, x)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, plain_shapes)
  stride = 32 // 2 ** sum(replace)
  assert model.output_stride == stride
  out = jax.eval_shape(functools.partial(model.apply, train=False), shapes, x)
  assert out["feature_map"].shape == (1, size // stride, size // stride, 2048)
  stage_strides = [4, 8, 16, 32]
  for i, d in enumerate(replace):
    if d:
      for j in range(i + 1, 4):
        stage_strides[j] //= 2
  assert [s.shape[1] for s in out["stages"]] == [size // s for s in stage_strides]


def test_dilated_model_shares_weights_and_early_stages_with_the_plain_one():
  """Same variables: stages before the first dilated one are identical; C5 differs."""
  model = resnet.ResNet(stage_sizes=(1, 1, 2, 2), block="bottleneck", width=8,
                        replace_stride_with_dilation=(False, False, True))
  plain = resnet.ResNet(stage_sizes=(1, 1, 2, 2), block="bottleneck", width=8)
  x = _images(2, 64, seed=5)
  variables = jax.jit(functools.partial(plain.init, train=False))(KEY, x)
  ours = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  base = jax.jit(functools.partial(plain.apply, train=False))(variables, x)
  for i in range(3):
    np.testing.assert_array_equal(ours["stages"][i], base["stages"][i])
  assert ours["feature_map"].shape == (2, 4, 4, 256) and base["feature_map"].shape == (2, 2, 2, 256)


def test_dilated_export_is_a_plain_torchvision_tree():
  """Export ignores the option: the state dict of a dilated ResNet-50 has exactly the keys and
  shapes of a plain one (a plain torchvision resnet50 loads it strictly)."""
  arch = {"name": "resnet50", "replace_stride_with_dilation": (False, False, True)}
  model = models.get_backbone(**arch)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), KEY,
                          jnp.zeros((1, 224, 224, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  dilated = torch_export.to_torch_state_dict(variables, arch)
  plain = torch_export.to_torch_state_dict(variables, "resnet50")
  assert dilated.keys() == plain.keys()
  for k in plain:
    np.testing.assert_array_equal(dilated[k], plain[k])
  back = torch_export.from_torch_state_dict(dilated, arch)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


@pytest.mark.parametrize("kwargs,match", [
    (dict(block="basic", replace_stride_with_dilation=(False, False, True)), "bottleneck"),
    (dict(block="bottleneck", replace_stride_with_dilation=(False, True)), "3 entries"),
])
def test_bad_dilation_raises(kwargs, match):
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=8, **kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(functools.partial(model.init, train=False), KEY, _images())
