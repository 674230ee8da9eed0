"""SimMIM (`methods/simmim.py`): the loss rebuilt from the network outputs with NumPy, the mask
token is the method's (gets gradient, not in the exported encoder), a tiny model fits a fixed
batch, configs and validation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import config_lib, parallel, train
from ssl_jax.methods import base, simmim
from tests.helpers import BlockSource, load_config

MODELS = {"vit": "test", "swin": "test,model=swin_tiny"}


@functools.lru_cache(maxsize=None)
def _setup(kind: str, lr: float = 0.0):
  config = load_config("simmim", MODELS[kind])
  with config.unlocked():
    config.train.total_steps = 100
    if lr:
      config.optim.lr_rule = "none"
      config.optim.base_lr = lr
      config.optim.warmup_steps = 0
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  local = next(train.make_data_iterator(setup))
  return setup, setup.device_batch(local)


def _numpy_masked_l1(pred, images, token_mask, patch):
  """SimMIM's official loss written out: mask.repeat_interleave(p) on both axes, l1 over masked
  pixels and channels, / (Σ mask + 1e-5) / C."""
  b, h, w, c = images.shape
  m = token_mask.reshape(b, h // patch, w // patch).astype(np.float64)
  m = np.repeat(np.repeat(m, patch, axis=1), patch, axis=2)
  err = np.abs(pred.astype(np.float64) - images.astype(np.float64))
  return float((err * m[..., None]).sum() / (m.sum() + 1e-5) / c)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_loss_rebuilt_from_network_outputs(kind):
  setup, batch = _setup(kind)
  config, method = setup.config, setup.method
  ts = setup.init_state(batch)
  params, state = ts["params"], ts["state"]
  rng = jax.random.PRNGKey(3)
  net = simmim.SimMIMNet(method.backbone)

  @jax.jit
  def both(params):
    loss, (_, metrics) = method.loss_and_aux(params, state, batch, rng, jnp.int32(0))
    # The step's own randomness (split order of `loss_and_aux`), then the network outputs.
    view_rng, mask_rng, _ = jax.random.split(rng, 3)
    x = base.augmented_views(view_rng, batch["image"], config.data.views)[:, 0]
    token_mask = simmim.random_mask(mask_rng, x.shape[0], config, method.backbone)
    out = net.apply({"params": params}, x, token_mask, train=True)
    return loss, metrics, x, token_mask, out["pred"]

  loss, metrics, x, token_mask, pred = jax.device_get(both(params))
  patch = method.backbone.patch_size
  b, size = x.shape[0], config.data.image_size
  assert pred.shape == x.shape == (b, size, size, 3)
  # SimMIM's generator: exactly ceil(T · 0.6) of the T mask patches, spread over model patches.
  t = (size // config.method_args.mask_patch_size) ** 2
  per_mask_patch = (config.method_args.mask_patch_size // patch) ** 2
  np.testing.assert_array_equal(token_mask.sum(1), int(np.ceil(t * 0.6)) * per_mask_patch)
  np.testing.assert_allclose(float(loss), _numpy_masked_l1(pred, x, token_mask, patch), rtol=1e-5)
  assert float(metrics["l1"]) == float(loss)
  assert metrics["features"].shape == (b, method.backbone.embed_dim * (
      2 ** (len(method.backbone.depths) - 1) if kind == "swin" else 1))


def test_mask_token_gets_gradient_and_stays_outside_the_encoder():
  setup, batch = _setup("vit")
  method = setup.method
  ts = setup.init_state(batch)
  params, state = ts["params"], ts["state"]
  assert set(params) == {"backbone", "mask_token", "decoder"}
  assert params["mask_token"].shape == (method.backbone.embed_dim,)
  grads = jax.jit(jax.grad(lambda p: method.loss_and_aux(
      p, state, batch, jax.random.PRNGKey(0), jnp.int32(0))[0]))(params)
  assert float(jnp.linalg.norm(grads["mask_token"])) > 0
  assert float(jnp.linalg.norm(grads["decoder"]["conv"]["kernel"])) > 0
  # The encoder (evaluation, export, init_from) is exactly the backbone: no mask token in it.
  encoder = method.encoder(params, state)
  assert set(encoder) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, encoder["params"], params["backbone"])
  token = np.asarray(params["mask_token"])
  assert not any(np.array_equal(np.asarray(leaf).ravel()[:token.size], token)
                 for leaf in jax.tree.leaves(encoder))
  # ...and the backbone runs without it (plain timm ViT).
  out = method.backbone.apply(encoder, jnp.zeros((2, 32, 32, 3)), train=False)
  assert out["pooled"].shape == (2, method.backbone.embed_dim)


def test_mask_token_replaces_masked_patches_only():
  """Only the masked positions see the token: with no patch masked, the token has no effect."""
  setup, batch = _setup("vit")
  backbone = setup.method.backbone
  net = simmim.SimMIMNet(backbone)
  params = setup.init_state(batch)["params"]
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  none = jnp.zeros((2, 16), bool)
  some = none.at[:, :5].set(True)

  @jax.jit
  def pred(params, mask):
    return net.apply({"params": params}, x, mask, train=False)["pred"]

  other = {**params, "mask_token": params["mask_token"] + 1.0}
  np.testing.assert_array_equal(np.asarray(pred(params, none)), np.asarray(pred(other, none)))
  assert not np.allclose(np.asarray(pred(params, some)), np.asarray(pred(other, some)))


def test_tiny_simmim_fits_a_fixed_batch():
  setup, batch = _setup("vit", lr=2e-3)
  method = setup.method
  ts = setup.init_state(batch)
  key, step0 = jax.random.PRNGKey(123), jnp.int32(0)
  fixed = jax.jit(lambda p, s: method.loss_and_aux(p, s, batch, key, step0)[0])
  before = float(fixed(ts["params"], ts["state"]))
  mask_token = np.asarray(ts["params"]["mask_token"]).copy()
  for _ in range(15):
    ts, metrics = setup.step(ts, batch)
    assert bool(metrics["finite"])
  after = float(fixed(ts["params"], ts["state"]))
  assert after < 0.9 * before, (before, after)
  assert not np.array_equal(np.asarray(ts["params"]["mask_token"]), mask_token)


def test_validation_names_the_field():
  config = load_config("simmim", "test")
  with config.unlocked():
    config.method_args.mask_patch_size = 12
  with pytest.raises(config_lib.ConfigError, match="mask_patch_size=12"):
    config_lib.validate(config, num_devices=1)
  config = load_config("simmim", "test")
  with config.unlocked():
    config.method_args.mask_ratio = 0.0
  with pytest.raises(config_lib.ConfigError, match="mask_ratio"):
    config_lib.validate(config, num_devices=1)
  config = load_config("simmim", "test")
  with config.unlocked():
    config.model = ml_collections.ConfigDict({"name": "resnet18", "width": 8})
  with pytest.raises(config_lib.ConfigError, match="ViT or Swin"):
    config_lib.validate(config, num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="model=vit_small"):
    load_config("simmim", "model=vit_small")


@pytest.mark.parametrize("arg", [None, "model=vit_base", "model=swin_tiny", "demo", "test",
                                 "test,model=swin_tiny", "demo,model=swin_tiny"])
def test_configs_validate(arg):
  config_lib.validate(load_config("simmim", arg), num_devices=1)


def test_paper_presets():
  swin_b, vit_b = load_config("simmim", None), load_config("simmim", "model=vit_base")
  # Official BASE_LR is per 512 images: 2e-4 (Swin-B 100 ep), 1e-4 (ViT-B 800 ep).
  assert swin_b.optim.base_lr * 2 == 2e-4 and vit_b.optim.base_lr * 2 == 1e-4
  assert (swin_b.data.image_size, swin_b.model.window_size, swin_b.train.num_epochs) == (192, 6,
                                                                                         100)
  assert (vit_b.data.image_size, vit_b.model.patch_size, vit_b.train.num_epochs) == (224, 16, 800)
  for c in (swin_b, vit_b):
    assert (c.optim.name, c.optim.weight_decay, c.optim.warmup_epochs, c.optim.grad_clip) == (
        "adamw", 0.05, 10, 5.0)
    assert (c.train.batch_size, c.method_args.mask_patch_size, c.method_args.mask_ratio) == (
        2048, 32, 0.6)
    assert c.data.views == "simmim"
  assert swin_b.optim.end_lr == pytest.approx(1e-5 * 2048 / 512)
