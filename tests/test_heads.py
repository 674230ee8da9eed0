"""Projector / predictor heads as the official code builds them (issue 20 items 1-3).

Each method's heads are checked through the method itself (`make(config).init`, shape-evaluated:
no compile) against the layer list of its official code, and the MLP options they use against a
NumPy forward pass.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import registry
from ssl_jax.models import heads
from tests.helpers import load_config

KEY = jax.random.key(0, impl="rbg")


def _bn_train(x, eps=1e-5, scale=1.0, bias=0.0):
  return (x - x.mean(0)) / np.sqrt(x.var(0) + eps) * scale + bias


def _random_params(params, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.normal(size=l.shape).astype(np.float32)
                                      for l in leaves])


@pytest.mark.parametrize("use_bias,output_bias,last_norm", [
    (False, None, "bn_scale"),   # SimCLR v1
    (True, False, "none"),       # BYOL / DetCon-B
    (False, None, "bn_noaffine"),  # MoCo v3 ViT predictor
    (True, None, "bn"),
])
def test_mlp_options_match_numpy(use_bias, output_bias, last_norm):
  head = heads.MLP(hidden_dim=12, out_dim=5, num_layers=2, norm="bn", last_norm=last_norm,
                   use_bias=use_bias, output_bias=output_bias)
  x = np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32)
  variables = head.init(KEY, x, train=True)
  params = _random_params(variables["params"])
  out, _ = head.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                      mutable=["batch_stats"])
  h = x.astype(np.float64) @ params["dense_0"]["kernel"]
  h = h + params["dense_0"]["bias"] if use_bias else h
  h = np.maximum(_bn_train(h, 1e-5, params["norm_0"]["scale"], params["norm_0"]["bias"]), 0)
  h = h @ params["dense_1"]["kernel"]
  if use_bias if output_bias is None else output_bias:
    h = h + params["dense_1"]["bias"]
  else:
    assert "bias" not in params["dense_1"]
  if last_norm == "bn_scale":
    assert set(params["last_norm"]) == {"scale"}
    h = _bn_train(h, 1e-5, params["last_norm"]["scale"])
  elif last_norm == "bn_noaffine":
    assert "last_norm" not in params and "last_norm" in variables["batch_stats"]
    h = _bn_train(h)
  elif last_norm == "bn":
    h = _bn_train(h, 1e-5, params["last_norm"]["scale"], params["last_norm"]["bias"])
  np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-4)


def test_mlp_rejects_unknown_last_norm():
  with pytest.raises(ValueError, match="MLP.last_norm='bn_center'"):
    heads.MLP(4, 3, last_norm="bn_center").init(KEY, jnp.ones((2, 5)), train=False)


# ---------------------------------------------------------------- the heads each method builds


def _layers(params, stats, name):
  """The head's layers as the official code lists them: ("linear", has_bias) and
  ("bn", has_scale, has_bias) for every BN (batch statistics present), in order."""
  p, s = params[name], stats.get(name, {})
  num = sum(k.startswith("dense_") for k in p)
  out = []

  def norm(key):
    if key in s:
      out.append(("bn", "scale" in p.get(key, {}), "bias" in p.get(key, {})))

  for i in range(num):
    out.append(("linear", "bias" in p[f"dense_{i}"]))
    norm(f"norm_{i}" if i < num - 1 else "last_norm")
  return out


def _head_layers(config_name, model=None):
  config = load_config(config_name, "test")
  if model is not None:
    with config.unlocked():
      config.model = model
  method = registry.get_method(config.method).make(config)
  spec = method.batch_spec(config)
  params, state = jax.eval_shape(method.init, KEY, spec)
  return {h: _layers(params, state["batch_stats"], h) for h in ("projector", "predictor")
          if h in params}


LIN, LIN_BIAS = ("linear", False), ("linear", True)
BN, BN_SCALE, BN_NOAFFINE = ("bn", True, True), ("bn", True, False), ("bn", False, False)
# google-research/simclr (v1) `projection_head`: `linear_layer(use_bias=True, use_bn=True)` ->
# dense without bias + BN(center=True), ReLU; then `linear_layer(use_bias=False, use_bn=True)` ->
# dense without bias + BN(center=False).
SIMCLR = [LIN, BN, LIN, BN_SCALE]
# deepmind byol / detcon `networks.MLP`: Linear(with_bias=True), BatchNorm, relu,
# Linear(with_bias=False).
BYOL = [LIN_BIAS, BN, LIN]


@pytest.mark.parametrize("name,want", [
    ("simclr", {"projector": SIMCLR}),
    ("detcon_s", {"projector": SIMCLR}),
    ("byol", {"projector": BYOL, "predictor": BYOL}),
    ("detcon_b", {"projector": BYOL, "predictor": BYOL}),
    # moco-v3 builder.py `MoCo_ViT`: _build_mlp(3, ...) and _build_mlp(2, ...), last_bn=True:
    # Linear(bias=False) everywhere, BatchNorm1d between, BatchNorm1d(affine=False) at the end.
    ("mocov3", {"projector": [LIN, BN, LIN, BN, LIN, BN_NOAFFINE],
                "predictor": [LIN, BN, LIN, BN_NOAFFINE]}),
    # MoCo v2: 2-layer MLP head without BN (Linear with bias, ReLU, Linear).
    ("mocov2", {"projector": [LIN_BIAS, LIN_BIAS]}),
])
def test_method_heads_are_the_official_layers(name, want):
  assert _head_layers(name) == want


def test_mocov3_resnet_heads_are_moco_resnet():
  # `MoCo_ResNet`: a 2-layer projector with the affine-free BN, the predictor without it.
  got = _head_layers("mocov3", {"name": "resnet18", "width": 8, "small_image_stem": True})
  assert got == {"projector": [LIN, BN, LIN, BN_NOAFFINE], "predictor": [LIN, BN, LIN]}


def test_masked_mocov3_bn_heads_follow_mocov3():
  config = load_config("masked_mocov3", "test")
  with config.unlocked():
    config.method_args.head_norm = "bn"
  method = registry.get_method(config.method).make(config)
  params, state = jax.eval_shape(method.init, KEY, method.batch_spec(config))
  got = {h: _layers(params, state["batch_stats"], h) for h in ("projector", "predictor")}
  assert got == {"projector": [LIN, BN, LIN, BN, LIN, BN_NOAFFINE],
                 "predictor": [LIN, BN, LIN, BN_NOAFFINE]}
