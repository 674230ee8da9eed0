"""MaskCo's Mask Prediction Head: shapes for N = 0..4, identity at N = 0, parameter count, training
(gradients on every parameter, batch-norm statistics), and its full-size (ResNet-50 C5) count.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models.mask_head import MaskPredictionHead

KEY = jax.random.key(0, impl="rbg")
C_IN = 16  # tiny C5: planes = 4


def _c5(b=2, h=4, w=4, c=C_IN, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, c)), jnp.float32)


def _n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _count(num_blocks: int, c_in: int, planes: int) -> int:
  """Independent count: per bottleneck, 1×1 c→p, 3×3 p→p, 1×1 p→4p (no bias) and three BNs
  (γ, β); a 1×1 projection + BN in the first block when 4p != c_in."""
  total, c = 0, c_in
  for _ in range(num_blocks):
    total += c * planes + 9 * planes * planes + planes * 4 * planes
    total += 2 * (planes + planes + 4 * planes)
    if c != 4 * planes:
      total += c * 4 * planes + 2 * 4 * planes
    c = 4 * planes
  return total


@functools.lru_cache(maxsize=None)
def _head(num_blocks, **kw):
  head = MaskPredictionHead(num_blocks=num_blocks, **kw)
  variables = jax.jit(functools.partial(head.init, train=False))(KEY, _c5())
  return head, variables


@pytest.mark.parametrize("num_blocks", [0, 1, 2, 3, 4])
def test_shapes_and_parameter_count(num_blocks):
  head, variables = _head(num_blocks)
  out = jax.jit(functools.partial(head.apply, train=False))(variables, _c5())
  assert out.shape == (2, 4, 4, C_IN)
  params = variables.get("params", {})
  assert sorted(params) == [f"block_{j}" for j in range(num_blocks)]
  assert _n_params(params) == _count(num_blocks, C_IN, C_IN // 4)
  assert all("downsample_0" not in block for block in params.values())  # identity shortcuts


def test_zero_blocks_is_the_identity_without_variables():
  head, variables = _head(0)
  assert not jax.tree.leaves(variables)
  x = _c5(seed=3)
  np.testing.assert_array_equal(head.apply(variables, x, train=True), x)
  np.testing.assert_array_equal(head.apply({}, x, train=False), x)


def test_full_size_on_resnet50_c5():
  """The paper's default: 3 blocks on a 2048-wide C5 (planes 512), as conv5's last two blocks."""
  head = MaskPredictionHead()
  x = jnp.zeros((2, 7, 7, 2048))
  variables = jax.eval_shape(functools.partial(head.init, train=False), KEY, x)
  per_block = 2048 * 512 + 9 * 512 * 512 + 512 * 2048 + 2 * (512 + 512 + 2048)
  assert _n_params(variables["params"]) == _count(3, 2048, 512) == 3 * per_block
  # = sum(p.numel() for p in torchvision.models.resnet50().layer4[1].parameters())
  assert per_block == 4_462_592
  out = jax.eval_shape(functools.partial(head.apply, train=False), variables, x)
  assert out.shape == (2, 7, 7, 2048)


def test_other_width_projects_in_the_first_block_and_dilation_keeps_the_resolution():
  head, variables = _head(2, planes=8, dilation=2)
  params = variables["params"]
  assert "downsample_0" in params["block_0"] and "downsample_0" not in params["block_1"]
  assert _n_params(params) == _count(2, C_IN, 8)
  out = jax.jit(functools.partial(head.apply, train=False))(variables, _c5())
  assert out.shape == (2, 4, 4, 32)


def test_it_trains_and_updates_batch_stats():
  head, variables = _head(3)
  x = _c5(seed=1)
  target = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, C_IN)), jnp.float32)

  def loss(params, batch_stats):
    out, updates = head.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
    return jnp.mean((out - target) ** 2), updates

  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"], variables["batch_stats"])
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)
  # Train mode: running statistics move towards the batch's (momentum 0.9); block_0/bn1 sees a
  # 1×1 conv of x, whose batch mean/var we recompute in NumPy.
  kernel = np.asarray(variables["params"]["block_0"]["conv1"]["kernel"][0, 0])
  y = np.asarray(x) @ kernel
  old = variables["batch_stats"]["block_0"]["bn1"]
  new = updates["batch_stats"]["block_0"]["bn1"]
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * y.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * y.var((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), updates["batch_stats"],
                       variables["batch_stats"])
  assert all(jax.tree.leaves(moved)), moved  # every BN of every block
  # Eval mode uses the running statistics and changes nothing.
  _, same = head.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])


def test_zero_init_residual_makes_each_block_the_identity():
  head, variables = _head(3, zero_init_residual=True)
  for block in variables["params"].values():
    assert not np.any(block["bn3"]["scale"])
  x = jax.nn.relu(_c5(seed=4))  # C5 is a ReLU output
  np.testing.assert_allclose(head.apply(variables, x, train=False), x, atol=1e-6)


@pytest.mark.parametrize("kwargs,shape,match", [
    (dict(num_blocks=5), (2, 4, 4, C_IN), "0..4"),
    (dict(num_blocks=-1), (2, 4, 4, C_IN), "0..4"),
    (dict(), (2, 16, C_IN), r"\[B, h, w, C\]"),
    (dict(), (2, 4, 4, 3), "planes"),
])
def test_bad_arguments_raise(kwargs, shape, match):
  head = MaskPredictionHead(**kwargs)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(functools.partial(head.init, train=False), KEY, jnp.zeros(shape))
