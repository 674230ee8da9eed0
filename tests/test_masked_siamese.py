"""Masked MoCo-v3 / Masked BYOL (`methods/masked_siamese.py`), its heads and configs.

Most checks run the method's own `loss_and_aux` eagerly (no jit: tiny shapes, no 5-15 s compile)
and rebuild what it computes from the network outputs with NumPy written out here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import config_lib, registry
from ssl_jax.methods import base, byol, masked_siamese, moco
from ssl_jax.models import heads
from ssl_jax.ops import patches
from tests.helpers import load_config

B, S = 8, 32           # batch, image size; `:test` ViT: patch 8 -> N = 16 patches, D = 32
N_PATCHES, PATCH = 16, 8
KEY = jax.random.PRNGKey(0)
RNG = jax.random.PRNGKey(3)
TAU = 0.2


def _config(name: str, arg: str = "test", **method_args):
  c = load_config(name, arg)
  with c.unlocked():
    c.train.batch_size = B
    c.train.total_steps = 100
    for k, v in method_args.items():
      c.method_args[k] = v
  return c


def _batch(seed: int = 0) -> dict:
  images = np.random.default_rng(seed).integers(0, 256, (B, 2, S, S, 3), dtype=np.uint8)
  return {"image": images}


def _init(method, batch):
  return method.init(KEY, {k: jnp.asarray(v) for k, v in batch.items()})


# ---------------------------------------------------------------- NumPy references


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _np_info_nce(q, k, tau):
  """Mean over rows of −log softmax(q̄ k̄ᵀ/τ)[i, i]."""
  logits = _np_normalize(q) @ _np_normalize(k).T / tau
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  return float(np.mean(lse - np.diag(logits)))


def _np_byol(p, z):
  return float(np.mean(np.sum((_np_normalize(p) - _np_normalize(z)) ** 2, axis=-1)))


def _np_spherical_mean(z):
  """z: [B, m, E] -> [B, E]: normalised sum of the normalised members."""
  return _np_normalize(_np_normalize(z).sum(axis=1))


def _np_kappa(x):
  """x: [B, n, D] -> mean over B of Banerjee's κ = R̄(D − R̄²)/(1 − R̄²)."""
  d = x.shape[-1]
  r = np.linalg.norm(_np_normalize(x).mean(axis=1), axis=-1)
  return float(np.mean(r * (d - r**2) / (1 - r**2)))


def _np_layer_norm(x, scale=1.0, bias=0.0, eps=1e-6):
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


_erf = np.vectorize(math.erf)


def _np_gelu(x):
  return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------- spies


class Spy:
  """Records the outputs of the method's augmentation and chunking, in call order."""

  def __init__(self, monkeypatch, deterministic_views: bool = False):
    self.views, self.chunks, self.info_nce = [], [], []
    aug, chunk, nce = base.augmented_views, patches.chunk_indices, masked_siamese.losses.info_nce

    def views(rng, images, recipe, normalize=True):
      out = base.normalized(images) if deterministic_views else aug(rng, images, recipe,
                                                                    normalize=normalize)
      self.views.append(np.asarray(out))
      return out

    def chunks(*args, **kwargs):
      idx, dropped = chunk(*args, **kwargs)
      self.chunks.append((np.asarray(idx), dropped))
      return idx, dropped

    def info_nce(*args, **kwargs):
      value = nce(*args, **kwargs)
      self.info_nce.append(float(value))
      return value

    monkeypatch.setattr(base, "augmented_views", views)
    monkeypatch.setattr(masked_siamese.patches, "chunk_indices", chunks)
    monkeypatch.setattr(masked_siamese.losses, "info_nce", info_nce)


# ---------------------------------------------------------------- n = m = 1 is MoCo v3 / BYOL


def _assert_same_step(ours, theirs, params, state, batch):
  (l1, (s1, m1)), g1 = jax.value_and_grad(ours.loss_and_aux, has_aux=True)(
      params, state, batch, RNG, jnp.int32(0))
  (l2, (s2, m2)), g2 = jax.value_and_grad(theirs.loss_and_aux, has_aux=True)(
      params, state, batch, RNG, jnp.int32(0))
  # Same ops in the same order: equal to the last bit, not only to a tolerance.
  assert float(l1) == float(l2)
  for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  return m1


def test_one_chunk_equals_mocov3(monkeypatch):
  """n = m = 1 with MoCo v3's heads: same loss, gradients and BN/target state as methods/moco."""
  theirs_cfg = _config("mocov3")
  ours_cfg = _config("masked_mocov3", "test,n=1")
  with ours_cfg.unlocked():
    ours_cfg.data.views = theirs_cfg.data.views = "masked_light"
  monkeypatch.setattr(masked_siamese, "_heads", lambda c: moco._heads(theirs_cfg))
  ours, theirs = masked_siamese.make(ours_cfg), moco.make(theirs_cfg)
  batch = _batch()
  params, state = _init(theirs, batch)
  metrics = _assert_same_step(ours, theirs, params, state, batch)
  assert "kappa/rep" not in metrics and float(metrics["chunks/dropped"]) == 0.0


def test_one_chunk_equals_byol(monkeypatch):
  """n = m = 1 with BYOL's heads: same loss, gradients and state as methods/byol."""
  theirs_cfg = _config("byol")
  with theirs_cfg.unlocked():
    theirs_cfg.model = load_config("masked_byol").model
    theirs_cfg.method_args.ema_base = 0.99
  ours_cfg = _config("masked_byol", "test,n=1")
  with ours_cfg.unlocked():
    ours_cfg.data.views = theirs_cfg.data.views = "masked_light"
  made = []

  def recording_mlp(*args, **kwargs):
    made.append(heads.MLP(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(byol, "MLP", recording_mlp)
  theirs = byol.make(theirs_cfg)
  monkeypatch.setattr(masked_siamese, "_heads", lambda c: tuple(made))
  ours = masked_siamese.make(ours_cfg)
  batch = _batch()
  params, state = _init(theirs, batch)
  _assert_same_step(ours, theirs, params, state, batch)
  # The EMA update is BYOL's too.
  moved = jax.tree.map(lambda p: p + 1.0, params)
  for a, b in zip(jax.tree.leaves(ours.after_update(state, moved, jnp.int32(7))),
                  jax.tree.leaves(theirs.after_update(state, moved, jnp.int32(7)))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------- chunking is really used


def test_a_patch_of_chunk_j_changes_only_query_j(monkeypatch):
  """Perturb one patch of view 1 lying in online chunk j: among the view-1 query terms of Eq. 3
  only term j changes; every view-2 term changes (its key, the target's full view 1, moved)."""
  cfg = _config("masked_mocov3", "test,n=4")
  spy = Spy(monkeypatch, deterministic_views=True)
  method = masked_siamese.make(cfg)
  batch = _batch()
  params, state = _init(method, batch)
  method.loss_and_aux(params, state, batch, RNG, jnp.int32(0))
  idx, dropped = spy.chunks[0]                         # online chunks of view 1
  assert idx.shape == (B, 4, 4) and dropped == 0
  np.testing.assert_array_equal(np.sort(idx.reshape(B, -1), axis=1),
                                np.broadcast_to(np.arange(N_PATCHES), (B, N_PATCHES)))
  before = list(spy.info_nce)
  assert len(before) == 8                              # 4 queries x 2 directions
  j = 2
  patch = int(idx[0, j, 0])
  row, col = divmod(patch, S // PATCH)
  perturbed = {"image": batch["image"].copy()}
  tile = perturbed["image"][0, 0, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]
  perturbed["image"][0, 0, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = (
      255 - tile)
  spy.info_nce.clear()
  method.loss_and_aux(params, state, perturbed, RNG, jnp.int32(0))
  after = spy.info_nce
  np.testing.assert_array_equal(spy.chunks[-2][0], idx)  # same shuffle: keys do not see pixels
  for i in range(4):
    if i == j:
      assert abs(after[i] - before[i]) > 1e-6
    else:
      assert after[i] == before[i], (i, after[i], before[i])
  for i in range(4, 8):
    assert abs(after[i] - before[i]) > 1e-6


# ---------------------------------------------------------------- the loss and κ rebuilt


def _rebuild(cfg, method, params, state, batch, spy):
  """Runs the method once; returns (its loss, metrics, the NumPy loss and κ from the networks)."""
  spy.views.clear()
  spy.chunks.clear()
  loss, (_, metrics) = method.loss_and_aux(params, state, batch, RNG, jnp.int32(0))
  a = cfg.method_args
  n, m = a.num_chunks, a.target_chunks
  net = masked_siamese.build_net(cfg)
  x = spy.views[0]
  calls = iter(spy.chunks)
  online, keys, target_h = [], [], []
  target = state["target"]
  for v in range(2):
    # Train mode: BN heads normalise with the statistics of these rows (the running statistics
    # the apply also returns play no part in the outputs).
    idx = jnp.asarray(next(calls)[0]) if n > 1 else None
    out, _ = net.apply({"params": params, "batch_stats": state["batch_stats"]}, x[:, v],
                       train=True, keep_indices=idx, mutable=["batch_stats"])
    online.append({k: np.asarray(out[k], np.float64) for k in ("rep", "z", "p")})
    tidx = jnp.asarray(next(calls)[0]) if m > 1 else None
    t, _ = net.apply(target, x[:, v], train=True, keep_indices=tidx,
                     method=masked_siamese.MaskedSiameseNet.project, mutable=["batch_stats"])
    z = np.asarray(t["z"], np.float64)
    keys.append(_np_spherical_mean(z) if m > 1 else z[:, 0])
    target_h.append(np.asarray(t["h"]))
  if cfg.method == "masked_mocov3":
    def term(q, k):
      return np.mean([_np_info_nce(q[:, i], k, a.temperature) for i in range(n)])
    scale = 2 * a.temperature
  else:
    def term(q, k):
      return np.mean([_np_byol(q[:, i], k) for i in range(n)])
    scale = 1.0
  expected = scale * (term(online[0]["p"], keys[1]) + term(online[1]["p"], keys[0]))
  kappa = {name: 0.5 * (_np_kappa(online[0][k]) + _np_kappa(online[1][k]))
           for name, k in (("rep", "rep"), ("proj", "z"), ("pred", "p"))} if n > 1 else {}
  z_unit = _np_normalize(online[0]["z"]).reshape(-1, online[0]["z"].shape[-1])
  kappa["z_std"] = float(np.mean(np.std(z_unit, axis=0)))
  full_h = np.asarray(net.apply({"params": target["params"]}, x[:, 0],
                                method=masked_siamese.MaskedSiameseNet.encode))
  return float(loss), metrics, expected, kappa, full_h


@pytest.mark.parametrize("name,n,m,blocks,norm", [
    # 16 % 3: one patch dropped; keys: spherical mean of 2 target chunks. BN heads: the LN
    # projector's outputs all have norm √E at init, which would hide a mean without normalising.
    ("masked_mocov3", 3, 2, 0, "bn"),
    ("masked_byol", 4, 1, 1, "ln"),     # full target view; one cross-attention block
])
def test_loss_and_kappa_rebuilt_from_network_outputs(monkeypatch, name, n, m, blocks, norm):
  cfg = _config(name, f"test,n={n},m={m}", cross_attention_blocks=blocks, head_norm=norm)
  spy = Spy(monkeypatch)
  method = masked_siamese.make(cfg)
  batch = _batch()
  params, state = _init(method, batch)
  loss, metrics, expected, kappa, full_h = _rebuild(cfg, method, params, state, batch, spy)
  np.testing.assert_allclose(loss, expected, rtol=2e-5)
  for key, value in kappa.items():
    got = metrics["z_std"] if key == "z_std" else metrics[f"kappa/{key}"]
    np.testing.assert_allclose(float(got), value, rtol=2e-3)
  assert float(metrics["chunks/dropped"]) == N_PATCHES % n
  assert [c[0].shape for c in spy.chunks] == (
      [(B, n, N_PATCHES // n), (B, m, N_PATCHES // m)] * 2 if m > 1 else [(B, n, N_PATCHES // n)] * 2)
  # The probe's features: the target's pooled output of the full view 1.
  np.testing.assert_allclose(np.asarray(metrics["features"]), full_h, rtol=1e-5, atol=1e-6)


def test_no_gradient_reaches_the_target_and_ema_update(monkeypatch):
  cfg = _config("masked_mocov3", "test,n=4,m=2", cross_attention_blocks=1)
  method = masked_siamese.make(cfg)
  batch = _batch()
  params, state = _init(method, batch)
  assert set(state["target"]["params"]) == {"backbone", "cross_attention", "projector"}

  def loss_fn(p, target_params):
    s = {**state, "target": {**state["target"], "params": target_params}}
    return method.loss_and_aux(p, s, batch, RNG, jnp.int32(0))[0]

  g_online, g_target = jax.grad(loss_fn, argnums=(0, 1))(params, state["target"]["params"])
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_target))
  for part in ("backbone", "cross_attention", "projector", "predictor"):
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_online[part])), part
  # After an update: ξ ← τξ + (1 − τ)θ, τ = 1 − (1 − 0.99)(cos(πk/K) + 1)/2 (BYOL Eq. 1).
  moved = jax.tree.map(lambda p: p + 1.0, params)
  step, total = 30, cfg.train.total_steps
  tau = 1 - (1 - 0.99) * (math.cos(math.pi * step / total) + 1) / 2
  new = method.after_update(state, moved, jnp.int32(step))
  for part in ("backbone", "cross_attention", "projector"):
    for old, online, got in zip(jax.tree.leaves(state["target"]["params"][part]),
                                jax.tree.leaves(moved[part]),
                                jax.tree.leaves(new["target"]["params"][part])):
      np.testing.assert_allclose(got, tau * np.asarray(old) + (1 - tau) * np.asarray(online),
                                 rtol=1e-5, atol=1e-6)
  assert "predictor" not in new["target"]["params"]


def test_fits_a_fixed_batch(monkeypatch):
  """A tiny Masked BYOL fits one batch (AdamW + EMA, jitted); the trained loss still equals the
  NumPy rebuild from the networks, and the target moved as the EMA says."""
  import optax  # pylint: disable=import-outside-toplevel
  cfg = _config("masked_byol", "test,n=4")
  method = masked_siamese.make(cfg)
  batch = _batch()
  params, state = _init(method, batch)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, state, opt, k):
    (loss, (state, _)), grads = jax.value_and_grad(method.loss_and_aux, has_aux=True)(
        params, state, batch, RNG, k)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    return params, method.after_update(state, params, k), opt, loss

  losses = []
  for k in range(25):
    params, state, opt, loss = step(params, state, opt, jnp.int32(k))
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  spy = Spy(monkeypatch)
  loss, _, expected, _, _ = _rebuild(cfg, method, params, state, batch, spy)
  np.testing.assert_allclose(loss, expected, rtol=2e-5)


# ---------------------------------------------------------------- heads


def test_mlp_last_layer_norm_matches_numpy():
  head = heads.MLP(hidden_dim=12, out_dim=5, num_layers=3, norm="ln", last_norm="ln",
                   use_bias=False)
  x = np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32)
  variables = head.init(KEY, x, train=True)
  leaves, treedef = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [rng.normal(size=l.shape).astype(np.float32)
                                        for l in leaves])
  out = head.apply({"params": params}, x, train=True)
  h = x.astype(np.float64)
  for i in range(2):
    n = params[f"norm_{i}"]
    h = np.maximum(_np_layer_norm(h @ params[f"dense_{i}"]["kernel"], n["scale"], n["bias"]), 0)
  h = _np_layer_norm(h @ params["dense_2"]["kernel"], params["last_norm"]["scale"],
                     params["last_norm"]["bias"])
  np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-4)


def _np_class_attention(p, x_cls, x, num_heads):
  """CaiT class attention + MLP (one block), written out."""
  s, t, d = x.shape
  hd = d // num_heads
  u = _np_layer_norm(np.concatenate([x_cls, x], axis=1), p["norm1"]["scale"], p["norm1"]["bias"])

  def dense(name, y):
    return y @ p[name]["kernel"] + p[name]["bias"]

  q = dense("q", u[:, :1]).reshape(s, 1, num_heads, hd)
  k = dense("k", u).reshape(s, 1 + t, num_heads, hd)
  v = dense("v", u).reshape(s, 1 + t, num_heads, hd)
  out = np.zeros((s, 1, num_heads, hd))
  for i in range(s):
    for h in range(num_heads):
      a = _np_softmax(q[i, :, h] @ k[i, :, h].T / math.sqrt(hd))   # [1, 1+t]
      out[i, :, h] = a @ v[i, :, h]
  x_cls = x_cls + p["gamma_1"] * dense("proj", out.reshape(s, 1, d))
  y = _np_layer_norm(x_cls, p["norm2"]["scale"], p["norm2"]["bias"])
  mlp = p["mlp"]
  y = _np_gelu(y @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]) @ mlp["fc2"]["kernel"] + (
      mlp["fc2"]["bias"])
  return x_cls + p["gamma_2"] * y


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_cross_attention_head_matches_numpy(num_blocks):
  head = heads.CrossAttentionHead(num_blocks=num_blocks, num_heads=2, mlp_ratio=2.0)
  tokens = np.random.default_rng(0).normal(size=(3, 1 + 5, 8)).astype(np.float32)
  variables = head.init(KEY, tokens)
  assert float(variables["params"]["blocks_0"]["gamma_1"][0]) == pytest.approx(0.1)
  leaves, treedef = jax.tree.flatten(variables["params"])
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [rng.normal(size=l.shape).astype(np.float32) * 0.5
                                        for l in leaves])
  out = head.apply({"params": params}, tokens)
  x_cls, x = tokens[:, :1].astype(np.float64), tokens[:, 1:].astype(np.float64)
  for i in range(num_blocks):
    x_cls = _np_class_attention(params[f"blocks_{i}"], x_cls, x, num_heads=2)
  expected = _np_layer_norm(x_cls[:, 0], params["norm"]["scale"], params["norm"]["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  # The patch tokens are never updated: changing the CLS input changes the output, and the
  # output does not depend on patch order (attention over a set).
  perm = tokens[:, [0, 3, 1, 5, 2, 4]]
  np.testing.assert_allclose(head.apply({"params": params}, perm), out, rtol=1e-5, atol=1e-5)


def test_heads_follow_head_norm():
  for name, pred_last in (("masked_mocov3", "ln"), ("masked_byol", "none")):
    projector, predictor = masked_siamese._heads(_config(name))
    assert (projector.num_layers, projector.norm, projector.last_norm) == (3, "ln", "ln")
    assert (predictor.num_layers, predictor.norm, predictor.last_norm) == (2, "ln", pred_last)
    projector, predictor = masked_siamese._heads(_config(name, head_norm="bn"))
    assert (projector.norm, projector.last_norm) == ("bn", "bn_noaffine")
    assert predictor.last_norm == ("bn_noaffine" if name == "masked_mocov3" else "none")
    assert not projector.use_bias and not predictor.use_bias


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["masked_mocov3", "masked_byol"])
@pytest.mark.parametrize("arg", [None, "demo", "test", "in100", "in100,n=2,m=4,aug=strong",
                                 "epochs=800,aug=medium", "test,n=3"])
def test_configs_load_and_validate(name, arg):
  c = load_config(name, arg)
  config_lib.validate(c, num_devices=8 if arg and arg.startswith("test") else 1)
  assert registry.get_method(c.method) is masked_siamese


def test_paper_settings():
  c = load_config("masked_mocov3", None)
  assert (c.model.name, c.model.patch_size, c.train.batch_size) == ("vit_base", 16, 4096)
  assert (c.optim.name, c.optim.base_lr, c.optim.b2, c.optim.weight_decay) == (
      "adamw", 1.5e-4, 0.95, 0.1)
  assert (c.train.num_epochs, c.optim.warmup_epochs) == (300, 20)
  assert load_config("masked_mocov3", "epochs=800").optim.warmup_epochs == 40
  a = c.method_args
  assert (a.num_chunks, a.target_chunks, a.head_norm, a.cross_attention_blocks) == (8, 1, "ln", 0)
  assert (a.temperature, a.momentum, a.projector_hidden, a.projector_dim) == (0.2, 0.99, 4096, 256)
  assert c.data.views == "masked_light"
  b = load_config("masked_byol", "in100,n=2,aug=medium")
  assert (b.model.name, b.train.batch_size, b.train.num_epochs, b.data.source) == (
      "vit_small", 1024, 200, "image_folder")
  assert (b.method_args.num_chunks, b.data.views, b.method_args.momentum) == (
      2, "masked_medium", 0.99)


@pytest.mark.parametrize("field,value,message", [
    ("method_args.num_chunks", 17, r"config.method_args.num_chunks=17 must be an integer in \[1, 16\]"),
    ("method_args.target_chunks", 0, r"config.method_args.target_chunks=0"),
    ("method_args.head_norm", "gn", r"config.method_args.head_norm='gn'"),
    ("method_args.cross_attention_blocks", -1, r"config.method_args.cross_attention_blocks=-1"),
    ("method_args.momentum", 1.0, r"config.method_args.momentum=1.0"),
    ("method_args.temperature", 0.0, r"config.method_args.temperature=0.0"),
    ("model", config_lib.ConfigDict({"name": "resnet18"}), r"needs a ViT backbone"),
])
def test_invalid_values_name_the_field(field, value, message):
  c = load_config("masked_mocov3", "test")
  section, _, key = field.rpartition(".")
  with c.unlocked():
    (c[section] if section else c)[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c, num_devices=8)


def test_unknown_augmentation_is_refused():
  with pytest.raises(config_lib.ConfigError, match="aug='heavy' must be one of"):
    load_config("masked_byol", "aug=heavy")
