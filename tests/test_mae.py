"""MAE method: the loss reaches only masked-patch predictions, equals a NumPy rebuild from the
network outputs, fits a fixed batch, and the workdir's encoder is a plain ViT that fine-tunes."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import config_lib, parallel, registry, train, weights
from ssl_jax.evaluate import finetune
from ssl_jax.methods import base, mae
from ssl_jax.models.decoder import MAEDecoder
from tests.helpers import load_config

B = 8


def _config(**method_args):
  config = load_config("mae", "test")
  with config.unlocked():
    config.train.batch_size = B
    config.train.total_steps = 10
    config.method_args.update(method_args)
  return config


def _batch(seed=0, size=32):
  """Per-image sinusoid gratings: every patch is predictable from the visible ones, so a tiny
  encoder/decoder can fit the batch in a hundred steps (random blocks would need memorising)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  freq = rng.uniform(0.1, 0.4, (B, 2, 1, 1, 3))
  phase = rng.uniform(0, 2 * np.pi, (B, 1, 1, 3))
  image = 128 + 100 * np.sin(freq[:, 0] * xx[None, :, :, None] + freq[:, 1] * yy[None, :, :, None]
                             + phase)
  return {"image": jnp.asarray(image[:, None].astype(np.uint8))}


def _patchify_np(x, p):
  """[B, H, W, C] -> [B, N, p·p·C], row-major patches, (row, col, channel) inside: MAE's order."""
  b, h, w, c = x.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c), np.float64)
  for i in range(h // p):
    for j in range(w // p):
      out[:, i * (w // p) + j] = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
  return out


def _mae_loss_np(pred, x, mask, p):
  t = _patchify_np(np.asarray(x, np.float64), p)
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
  per_patch = ((np.asarray(pred, np.float64) - t) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum()


@pytest.fixture(scope="module")
def setup():
  config = _config()
  method = registry.get_method("mae").make(config)
  forward, _, _ = mae.make_forward(config)
  batch = _batch()
  params, state = jax.jit(method.init)(jax.random.PRNGKey(0), batch)
  return config, method, forward, batch, params, state


def test_loss_reaches_only_masked_predictions(setup):
  """d loss / d pred through the method's own loss_and_aux: zero on visible patches, non-zero on
  every masked one."""
  config, method, forward, batch, params, state = setup
  rng = jax.random.PRNGKey(3)
  n = (config.data.image_size // config.model.patch_size) ** 2
  p = config.model.patch_size

  def loss_with_offset(delta):
    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, MAEDecoder) and context.method_name == "__call__":
        out = out + delta
      return out
    with nn.intercept_methods(add):
      return method.loss_and_aux(params, state, batch, rng, 0)[0]

  @jax.jit
  def run(delta):
    return jax.grad(loss_with_offset)(delta), forward(params, batch, rng)["masking"].mask

  grad, mask = map(np.asarray, run(jnp.zeros((B, n, p * p * 3))))
  assert mask.sum(1).tolist() == [n - int(n * 0.25)] * B
  assert (grad[~mask] == 0).all()
  assert (np.abs(grad[mask]).sum(-1) > 0).all()


def test_loss_rebuilt_from_outputs_and_fits_a_fixed_batch(setup):
  """The method's loss equals a NumPy MSE on the masked patches of the outputs; visible and masked
  index sets split the patches; the probe features are the visible-only encoding; 100 AdamW steps
  on one batch (fixed masks) bring the loss below 60 % of its start (~1, the norm-pix variance).
  """
  config, method, forward, batch, params, state = setup
  p = config.model.patch_size
  n = (config.data.image_size // p) ** 2
  rng = jax.random.PRNGKey(5)

  @jax.jit
  def both(params):
    loss, (_, metrics) = method.loss_and_aux(params, state, batch, rng, 0)
    return loss, metrics, forward(params, batch, rng)

  loss, metrics, out = both(params)
  m = out["masking"]
  keep, masked = np.asarray(m.keep_indices), np.asarray(m.mask_indices)
  expected = np.zeros((B, n), bool)
  for b in range(B):
    assert sorted(keep[b].tolist() + masked[b].tolist()) == list(range(n))
    expected[b, masked[b]] = True
  np.testing.assert_array_equal(np.asarray(m.mask), expected)
  want = _mae_loss_np(out["pred"], out["x"], np.asarray(m.mask, np.float64), p)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics["reconstruction"]) == pytest.approx(float(loss))
  # The probe features are the visible-only encoding: the ViT applied to keep_indices.
  vis = method.backbone.apply({"params": params["backbone"]}, out["x"], train=False,
                              keep_indices=m.keep_indices)
  np.testing.assert_allclose(metrics["features"], vis["pooled"], rtol=1e-5, atol=1e-6)

  tx = optax.adamw(3e-3, b2=0.95)

  @jax.jit
  def step(params, opt):
    (loss, _), grads = jax.value_and_grad(method.loss_and_aux, has_aux=True)(
        params, state, batch, rng, 0)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  opt, history = tx.init(params), []
  for _ in range(100):
    params, opt, value = step(params, opt)
    history.append(float(value))
  assert history[-1] < 0.6 * history[0], history[::10]


def test_validation_names_the_field():
  config = _config()
  with config.unlocked():
    config.model = ml_collections.ConfigDict({"name": "resnet18", "width": 8})
  with pytest.raises(ValueError, match="config.model.name='resnet18'.*ViT"):
    mae.validate(config)
  with pytest.raises(ValueError, match=r"mask_ratio=0.99 keeps 0 of the 16"):
    mae.validate(_config(mask_ratio=0.99))
  with pytest.raises(ValueError, match="mask_ratio=1.0 must be in"):
    mae.validate(_config(mask_ratio=1.0))
  with pytest.raises(ValueError, match="decoder_dim=30 must be divisible"):
    mae.validate(_config(decoder_dim=30))
  with pytest.raises(config_lib.ConfigError, match="decoder_depth=0"):
    config_lib.validate(_config(decoder_depth=0), num_devices=1)


def test_paper_recipe_config():
  c = load_config("mae", None)
  assert (c.model.name, c.model.patch_size, c.model.pos_embed) == ("vit_base", 16, "sincos")
  assert (c.optim.name, c.optim.base_lr, c.optim.b2, c.optim.weight_decay) == (
      "adamw", 1.5e-4, 0.95, 0.05)
  assert (c.train.batch_size, c.train.num_epochs, c.optim.warmup_epochs) == (4096, 800, 40)
  assert c.method_args.to_dict() == {"mask_ratio": 0.75, "norm_pix_loss": True,
                                     "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}
  assert c.data.views == "mae" and c.optim.exclude_from_decay == "bias_and_norm"
  for arg in (None, "demo", "test", "epochs=1600"):
    config_lib.validate(load_config("mae", arg), num_devices=8 if arg == "test" else 1)


def test_workdir_encoder_is_a_plain_vit_that_fine_tunes(tmp_path):
  """A :test MAE workdir gives exactly the ViT's variables (no decoder) and the fine-tuning
  protocol (`configs/finetune.py:test`) runs from it."""
  workdir = str(tmp_path / "mae")
  config = load_config("mae", "test")
  with config.unlocked():
    config.train.total_steps = 2
  mesh = parallel.make_mesh(jax.devices()[:1])
  train.run(config, workdir, mesh=mesh)
  _, variables = weights.workdir_encoder(workdir)
  backbone = base.make_backbone(config)
  fresh = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
  assert set(variables) == {"params"}
  weights.check_fits(variables, {"params": fresh["params"]}, "MAE workdir encoder")
  ft = load_config("finetune", "test")
  with ft.unlocked():
    ft.backbone.workdir = workdir
    ft.data.train_args = ml_collections.ConfigDict(
        {"split": "train", "num_per_photo": 2, "crop_size": 32})
    ft.data.test_args = ml_collections.ConfigDict(
        {"split": "probe", "num_per_photo": 1, "crop_size": 32})
  summary = finetune.run(ft, str(tmp_path / "ft"), mesh=mesh)
  assert 0.0 <= summary["finetune/top1"] <= summary["finetune/top5"] <= 1.0
