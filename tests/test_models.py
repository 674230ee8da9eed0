"""Backbones and heads: shapes, torchvision/timm parameter counts, BN semantics, masking, attention.

NumPy references sit next to the assertions; full-size models are only shape-evaluated.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.models import heads, resnet, vit

# rbg keys: on this CPU XLA compiles threefry-based initialisers ~6x slower (20 s for a tiny
# ResNet); the models take any key, so the tests use the cheaper generator.
KEY = jax.random.key(0, impl="rbg")


def _n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _jit_apply(model, **static):
  """Jitted `model.apply` with static keyword arguments (eager Linen apply is slow on CPU)."""
  key = (id(model), tuple(sorted(static.items())))
  if key not in _JITTED:
    _JITTED[key] = (model, jax.jit(functools.partial(model.apply, **static)))
  return _JITTED[key][1]


_JITTED = {}


def _init(model, x):
  return jax.jit(functools.partial(model.init, train=False))(KEY, x)


def _images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


TINY_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


# ---------------------------------------------------------------- parameter counts


def _resnet_count(depth: int) -> int:
  """Independent count from the architecture (convs without bias, BN γ/β), fc excluded."""
  stages, bottleneck = resnet.STAGE_SIZES[depth], depth >= 50
  total = 7 * 7 * 3 * 64 + 2 * 64
  cin = 64
  for i, n in enumerate(stages):
    planes = 64 * 2**i
    cout = planes * (4 if bottleneck else 1)
    for j in range(n):
      if bottleneck:
        total += cin * planes + 9 * planes * planes + planes * cout + 2 * (2 * planes + cout)
      else:
        total += 9 * cin * planes + 9 * planes * planes + 2 * 2 * planes
      if j == 0 and cin != cout:
        total += cin * cout + 2 * cout
      cin = cout
  return total


def _vit_count(d: int, depth: int, p: int = 16, n: int = 196) -> int:
  block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
  return p * p * 3 * d + d + d + (1 + n) * d + depth * block + 2 * d


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_176_512),   # torchvision 11,689,512 − fc 513,000
    ("resnet34", 21_284_672),   # 21,797,672 − 513,000
    ("resnet50", 23_508_032),   # 25,557,032 − fc 2,049,000
    ("resnet101", 42_500_160),  # 44,549,160 − 2,049,000
    ("vit_tiny", 5_524_416),    # timm vit_tiny_patch16_224 5,717,416 − head 193,000
    ("vit_small", 21_665_664),  # 22,050,664 − 385,000
    ("vit_base", 85_798_656),   # 86,567,656 − 769,000
])
def test_full_size_parameter_count(name, expected):
  model = models.get_backbone(name)
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 224, 224, 3)), train=False))
  count = _n_params(variables["params"])
  if name.startswith("resnet"):
    reference = _resnet_count(int(name[6:]))
  else:
    reference = _vit_count(*vit._SIZES[name][:2])
  assert reference == expected
  assert count == expected


def test_sincos_pos_embed_is_not_a_parameter():
  model = models.get_backbone("vit_small", pos_embed="sincos")
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 224, 224, 3)), train=False))
  assert "pos_embed" not in variables["params"]
  assert _n_params(variables["params"]) == 21_665_664 - 197 * 384


# ---------------------------------------------------------------- ResNet

TINY_RESNETS = {  # one block per stage keeps compilation short
    "basic_small_stem": dict(stage_sizes=(1, 1, 1, 1), block="basic", small_image_stem=True,
                             zero_init_residual=True),
    "bottleneck_imagenet_stem": dict(stage_sizes=(1, 1, 1, 1), block="bottleneck"),
}


@functools.lru_cache(maxsize=None)
def _tiny_resnet(case):
  model = resnet.ResNet(width=8, **TINY_RESNETS[case])
  variables = _init(model, _images())
  return model, variables


@pytest.mark.parametrize("case", sorted(TINY_RESNETS))
def test_resnet_output_shapes(case):
  model, variables = _tiny_resnet(case)
  out = _jit_apply(model, train=False)(variables, _images())
  assert set(out) == {"pooled", "feature_map", "stages", "stem"}
  small = TINY_RESNETS[case].get("small_image_stem", False)
  expansion = 4 if model.block == "bottleneck" else 1
  size = 32 if small else 8
  assert out["stem"].shape == (2, size, size, 8)
  for i, stage in enumerate(out["stages"]):
    assert stage.shape == (2, size // 2**i, size // 2**i, 8 * 2**i * expansion)
  np.testing.assert_array_equal(out["feature_map"], out["stages"][-1])
  assert out["pooled"].dtype == jnp.float32
  np.testing.assert_allclose(out["pooled"], np.asarray(out["feature_map"]).mean(axis=(1, 2)),
                             rtol=1e-6, atol=1e-6)


def test_resnet_tree_is_torchvision_shaped():
  model = models.get_backbone("resnet50", width=8)
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 64, 64, 3)), train=False))
  p = variables["params"]
  assert set(p) == {"conv1", "bn1"} | {f"layer{i}_{j}" for i, n in
                                       zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)}
  assert set(p["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_0",
                                "downsample_1"}
  assert "downsample_0" not in p["layer1_1"]
  assert p["layer2_0"]["conv1"]["kernel"].shape == (1, 1, 32, 16)
  assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 16, 16)
  assert set(variables["batch_stats"]["bn1"]) == {"mean", "var"}


def test_resnet_stride_is_on_the_3x3_conv():
  # torchvision v1.5: a 1×1 conv with stride 2 would skip 3 of 4 pixels; check the stage-2 block.
  model, variables = _tiny_resnet("bottleneck_imagenet_stem")
  _, state = _jit_apply(model, train=False, capture_intermediates=True)(variables, _images())
  inter = state["intermediates"]["layer2_0"]
  assert inter["conv1"]["__call__"][0].shape[1:3] == (8, 8)
  assert inter["conv2"]["__call__"][0].shape[1:3] == (4, 4)


def _conv_reference(x, w, stride, pad):
  """NumPy NHWC conv with symmetric zero padding (PyTorch's Conv2d)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w.shape[0]
  ho = (x.shape[1] - k) // stride + 1
  wo = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for i in range(ho):
    for j in range(wo):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return out


def test_resnet_stem_uses_symmetric_padding():
  model, variables = _tiny_resnet("bottleneck_imagenet_stem")
  x = _images()
  _, state = _jit_apply(model, train=False, capture_intermediates=True)(variables, x)
  conv1 = state["intermediates"]["conv1"]["__call__"][0]
  expected = _conv_reference(np.asarray(x, np.float64),
                             np.asarray(variables["params"]["conv1"]["kernel"]), 2, 3)
  np.testing.assert_allclose(conv1, expected, rtol=1e-4, atol=1e-4)


def test_resnet_maxpool_pads_with_minus_infinity():
  # After the stem's ReLU padding by 0 or −inf is the same, so check the pool itself on
  # negative inputs, as the stem applies it: a border output must not be 0.
  from flax import linen as nn
  x = -jnp.arange(1, 1 + 16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  out = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  ref = np.full((1, 6, 6, 1), -np.inf)
  ref[:, 1:5, 1:5] = np.asarray(x)
  expected = np.array([[ref[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, 0].max() for j in range(2)]
                       for i in range(2)])
  np.testing.assert_array_equal(out[0, :, :, 0], expected)


def test_resnet_batch_stats_update_in_train_only():
  model, variables = _tiny_resnet("basic_small_stem")
  x = _images() * 3.0 + 1.0
  _, updated = _jit_apply(model, train=True, mutable=("batch_stats",))(variables, x)
  old, new = variables["batch_stats"]["bn1"], updated["batch_stats"]["bn1"]
  # Reference: torch-style update with momentum 0.1 of the biased batch statistics of conv1.
  _, state = _jit_apply(model, train=True, mutable=("batch_stats", "intermediates"),
                         capture_intermediates=True)(variables, x)
  h = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * mean,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * var,
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(new["var"], old["var"])
  # Eval: running statistics, nothing to update, deterministic.
  out1, same = _jit_apply(model, train=False, mutable=("batch_stats",))(variables, x)
  out2 = _jit_apply(model, train=False)(variables, x)
  jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])
  np.testing.assert_array_equal(out1["pooled"], out2["pooled"])


def test_resnet_zero_init_residual_gives_identity_blocks():
  model, variables = _tiny_resnet("basic_small_stem")
  assert not np.any(variables["params"]["layer1_0"]["bn2"]["scale"])
  out = _jit_apply(model, train=False)(variables, _images())
  _, default = _tiny_resnet("bottleneck_imagenet_stem")
  assert np.all(default["params"]["layer1_0"]["bn3"]["scale"] == 1)
  # layer1 blocks have identity shortcuts and their branch is zeroed: output == relu(stem).
  np.testing.assert_allclose(out["stages"][0], out["stem"], atol=1e-6)


def test_resnet_forward_and_grad_tiny():
  model, variables = _tiny_resnet("basic_small_stem")

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, _images(),
                         train=True, mutable=["batch_stats"])
    return jnp.mean(out["pooled"] ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["conv1"]["kernel"]).sum() > 0


def test_bf16_compute_keeps_f32_params():
  # Shapes and dtypes only: jax.eval_shape traces init/apply without compiling them.
  for model in (resnet.ResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=8,
                              small_image_stem=True, dtype=jnp.bfloat16),
                models.get_backbone("vit_tiny", **{**TINY_VIT, "dtype": jnp.bfloat16})):
    variables = jax.eval_shape(functools.partial(model.init, train=False), KEY, _images())
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, _images())
    assert out["feature_map"].dtype == jnp.bfloat16
    assert out["pooled"].dtype == jnp.float32


# ---------------------------------------------------------------- ViT

@functools.lru_cache(maxsize=None)
def _tiny_vit(**kw):
  model = models.get_backbone("vit_tiny", **{**TINY_VIT, **kw})
  return model, _init(model, _images())


@pytest.mark.parametrize("pool,pos_embed", [("cls", "learned"), ("mean", "sincos")])
def test_vit_output_shapes(pool, pos_embed):
  _, variables = _tiny_vit()  # the same tree, less the fixed sincos table
  model = models.get_backbone("vit_tiny", **TINY_VIT, pool=pool, pos_embed=pos_embed)
  if pos_embed == "sincos":
    variables = {"params": {k: v for k, v in variables["params"].items() if k != "pos_embed"}}
  out = _jit_apply(model, train=False)(variables, _images())
  assert set(out) == {"pooled", "tokens", "feature_map"}
  assert out["tokens"].shape == (2, 17, 32)
  assert out["feature_map"].shape == (2, 4, 4, 32)
  tokens = np.asarray(out["tokens"])
  expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(axis=1)
  np.testing.assert_allclose(out["pooled"], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out["feature_map"].reshape(2, 16, 32), tokens[:, 1:])


def test_vit_rejects_other_resolution_with_learned_pos_embed():
  model, variables = _tiny_vit()
  with pytest.raises(ValueError, match="pos_embed has 16 patch positions"):
    model.apply(variables, _images(size=48), train=False)
  with pytest.raises(ValueError, match="patch_size=8"):
    model.apply(variables, _images(size=36), train=False)


def test_vit_keep_all_permuted_equals_permuted_tokens():
  # Attention is permutation-equivariant once position embeddings are added, so keeping every
  # patch in a shuffled order must give the same tokens, shuffled.
  model, variables = _tiny_vit()
  x = _images()
  full = _jit_apply(model, train=False)(variables, x)
  perm = np.stack([np.random.default_rng(i).permutation(16) for i in range(2)]).astype(np.int32)
  kept = _jit_apply(model, train=False)(variables, x, keep_indices=jnp.asarray(perm))
  assert "feature_map" not in kept
  expected = np.take_along_axis(np.asarray(full["tokens"][:, 1:]), perm[:, :, None], axis=1)
  np.testing.assert_allclose(kept["tokens"][:, 1:], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(kept["pooled"], full["pooled"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_vit_keep_indices_subset_equals_manual_gather(k):
  # With no blocks, the kept tokens are exactly LayerNorm(patch_embed + pos) of the chosen patches.
  model = models.get_backbone("vit_tiny", **{**TINY_VIT, "depth": 0})
  variables = _init(model, _images())
  x = _images(seed=3)
  idx = np.stack([np.random.default_rng(i).choice(16, k, replace=False)
                  for i in range(2)]).astype(np.int32)
  full = _jit_apply(model, train=False)(variables, x)
  kept = _jit_apply(model, train=False)(variables, x, keep_indices=jnp.asarray(idx))
  assert kept["tokens"].shape == (2, 1 + k, 32)
  np.testing.assert_allclose(kept["tokens"][:, 1:],
                             np.take_along_axis(np.asarray(full["tokens"][:, 1:]),
                                                idx[:, :, None], axis=1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(kept["tokens"][:, 0], full["tokens"][:, 0], rtol=1e-6)


def _layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("keep", [None, 3])
def test_vit_cls_attention_matches_numpy(keep):
  model, variables = _tiny_vit()
  x = _images(seed=1)
  idx = None if keep is None else jnp.asarray(np.tile(np.arange(16)[::5][:keep], (2, 1)),
                                             jnp.int32)
  out = _jit_apply(model, train=False, return_attention=True)(variables, x, keep_indices=idx)
  k = 16 if keep is None else keep
  att = np.asarray(out["cls_attention"])
  assert att.shape == (2, 2, 2, k)  # [depth, B, heads, K]
  assert (att >= 0).all() and (att.sum(-1) <= 1 + 1e-6).all()

  # NumPy reference of block 0: tokens entering it, LN, fused qkv split as timm, softmax.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  patches = np.asarray(vit.patchify(x, 8), np.float64)
  w = p["patch_embed"]["kernel"].reshape(8 * 8 * 3, 32)
  tok = patches @ w + p["patch_embed"]["bias"] + p["pos_embed"][:, 1:]
  if idx is not None:
    tok = np.take_along_axis(tok, np.asarray(idx)[:, :, None], axis=1)
  cls = np.broadcast_to(p["cls_token"] + p["pos_embed"][:, :1], (2, 1, 32))
  tok = np.concatenate([cls, tok], axis=1)
  blk = p["blocks_0"]
  h = _layer_norm(tok, blk["norm1"]["scale"], blk["norm1"]["bias"])
  qkv = (h @ blk["attn"]["qkv"]["kernel"] + blk["attn"]["qkv"]["bias"]).reshape(2, 1 + k, 3, 2, 16)
  q, kk = qkv[:, :, 0], qkv[:, :, 1]
  logits = np.einsum("bhd,bkhd->bhk", q[:, 0], kk) / np.sqrt(16)
  soft = np.exp(logits - logits.max(-1, keepdims=True))
  soft /= soft.sum(-1, keepdims=True)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(att[0], soft[:, :, 1:], rtol=1e-4, atol=1e-6)
  # The CLS key's share is what is missing from a row.
  np.testing.assert_allclose(1 - att[0].sum(-1), soft[:, :, 0], rtol=1e-4, atol=1e-5)


def test_vit_drop_path_needs_rng_in_train_only():
  base, variables = _tiny_vit()  # drop_path_rate adds no parameters
  model = models.get_backbone("vit_tiny", **{**TINY_VIT, "drop_path_rate": 0.5})
  x = _images()
  evaluate, train = _jit_apply(base, train=False), _jit_apply(model, train=True)
  a = evaluate(variables, x)["pooled"]
  np.testing.assert_array_equal(a, evaluate(variables, x)["pooled"])  # eval is deterministic
  b = train(variables, x, rngs={"dropout": jax.random.key(1, impl="rbg")})["pooled"]
  c = train(variables, x, rngs={"dropout": jax.random.key(2, impl="rbg")})["pooled"]
  assert not np.allclose(b, c) and not np.allclose(a, b)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(functools.partial(model.apply, train=True), variables, x)


def test_vit_forward_and_grad_tiny():
  model, variables = _tiny_vit()

  def loss(params):
    return jnp.mean(model.apply({"params": params}, _images(), train=True)["pooled"] ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["patch_embed"]["kernel"]).sum() > 0


def test_patchify_matches_mae_layout_and_inverts():
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  p = 4
  out = np.asarray(vit.patchify(jnp.asarray(x), p))
  # MAE (NCHW): 'nchpwq->nhwpqc' then reshape; written here with explicit loops.
  expected = np.zeros((2, 6, p * p * 3), np.float32)
  for i in range(2):
    for j in range(3):
      expected[:, i * 3 + j] = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(2, -1)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(vit.unpatchify(jnp.asarray(out), p, (2, 3)), x)
  with pytest.raises(ValueError, match="patch_size=5"):
    vit.patchify(jnp.asarray(x), 5)


def test_sincos_pos_embed_matches_formula():
  d, grid = 16, (2, 3)
  table = vit.sincos_pos_embed(d, grid)
  assert table.shape == (1, 7, d)
  np.testing.assert_array_equal(table[0, 0], 0.0)
  for r in range(2):
    for c in range(3):
      row = table[0, 1 + r * 3 + c]
      for k in range(d // 4):
        omega = 10000.0 ** (-k / (d / 4))
        np.testing.assert_allclose(
            [row[k], row[d // 4 + k], row[d // 2 + k], row[3 * d // 4 + k]],
            [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)],
            rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- heads and registry


def _bn_train(x, eps, scale=1.0, bias=0.0):
  return (x - x.mean(0)) / np.sqrt(x.var(0) + eps) * scale + bias


@pytest.mark.parametrize("norm,last_norm,num_layers", [
    ("bn", "none", 2), ("bn", "bn_noaffine", 3), ("ln", "none", 2), ("none", "none", 2),
    ("bn", "bn", 1)])
def test_mlp_matches_numpy(norm, last_norm, num_layers):
  head = heads.MLP(hidden_dim=12, out_dim=5, num_layers=num_layers, norm=norm,
                   last_norm=last_norm)
  x = np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32)
  variables = head.init(KEY, x, train=True)
  # Random affine parameters so that BN/LN γ, β are exercised.
  leaves, treedef = jax.tree.flatten(variables["params"])
  rngs = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [rngs.normal(size=l.shape).astype(np.float32)
                                        for l in leaves])
  out, _ = head.apply({"params": params, "batch_stats": variables.get("batch_stats", {})}, x,
                      train=True, mutable=["batch_stats"])
  h = x.astype(np.float64)
  for i in range(num_layers - 1):
    h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
    n = params.get(f"norm_{i}")
    if norm == "bn":
      h = _bn_train(h, 1e-5, n["scale"], n["bias"])
    elif norm == "ln":
      h = _layer_norm(h, n["scale"], n["bias"], eps=1e-6)
    h = np.maximum(h, 0)
  last = params[f"dense_{num_layers - 1}"]
  h = h @ last["kernel"] + last["bias"]
  if last_norm == "bn":
    h = _bn_train(h, 1e-5, params["last_norm"]["scale"], params["last_norm"]["bias"])
  elif last_norm == "bn_noaffine":
    assert "last_norm" not in params
    h = _bn_train(h, 1e-5)
  assert out.shape == (6, 5)
  np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-4)


def test_mlp_without_bias_and_bad_norm():
  head = heads.MLP(hidden_dim=4, out_dim=3, use_bias=False)
  params = head.init(KEY, jnp.ones((2, 5)), train=False)["params"]
  assert "bias" not in params["dense_0"] and "bias" not in params["dense_1"]
  with pytest.raises(ValueError, match="MLP.norm='gn'"):
    heads.MLP(4, 3, norm="gn").init(KEY, jnp.ones((2, 5)), train=False)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_linear_classifier(batch_norm):
  clf = heads.LinearClassifier(num_classes=3, batch_norm=batch_norm)
  x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32) * 2 + 1
  variables = clf.init(KEY, x, train=False)
  assert "params" in variables and set(variables["params"]) == {"head"}
  logits, _ = clf.apply(variables, x, train=True, mutable=["batch_stats"])
  w, b = variables["params"]["head"]["kernel"], variables["params"]["head"]["bias"]
  h = _bn_train(x.astype(np.float64), 1e-6) if batch_norm else x
  np.testing.assert_allclose(logits, h @ w + b, rtol=1e-4, atol=1e-5)
  assert logits.dtype == jnp.float32


def test_get_backbone_errors():
  with pytest.raises(ValueError, match="known backbones.*resnet50"):
    models.get_backbone("resnet51")
  with pytest.raises(ValueError, match="patch_size"):
    models.get_backbone("resnet18", patch_size=8)
  assert set(models.BACKBONES) == {"resnet18", "resnet34", "resnet50", "resnet101", "vit_tiny",
                                   "vit_small", "vit_base", "swin_tiny", "swin_small",
                                   "swin_base"}
  assert models.get_backbone("vit_small", patch_size=8).patch_size == 8
