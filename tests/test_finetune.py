"""Fine-tuning: layer-wise lr decay through the optimizer, MAE's global pool, label smoothing,
mixup/cutmix, the papers' recipes, and a tiny ViT trained with every recipe switch (resumable)."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax.evaluate import finetune, supervised
from ssl_jax.metrics import read_metrics
from ssl_jax.models import get_backbone
from tests.helpers import load_config

DEPTH = 3
FIELDS = {"patch_size": 8, "embed_dim": 32, "depth": DEPTH, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny_vit():
  module = get_backbone("vit_tiny", drop_path_rate=0.1, **FIELDS)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(0))
  return module, variables


def _layer_id_reference(path: str, num_layers: int) -> int:
  """BEiT/MAE `get_layer_id_for_vit`, written against our parameter names."""
  if any(t in path for t in ("cls_token", "pos_embed", "patch_embed")):
    return 0
  m = re.search(r"blocks_(\d+)", path)
  return int(m.group(1)) + 1 if m else num_layers + 1


def _optimizer(**optim):
  config = load_config("finetune", "test")
  with config.unlocked():
    config.optim.update(warmup_epochs=0.0, schedule="constant", lr_rule="none", base_lr=1e-2,
                        **optim)
  data = supervised.Data(None, None, 10, total_steps=10, steps_per_epoch=5, warmup_steps=0)
  return supervised.make_optimizer(config, data)[0]


def _params(tiny_vit, features="global_pool"):
  module, variables = tiny_vit
  net = finetune.FineTuneModel(module, 10, features)
  return jax.jit(lambda k: net.init(k, variables, 32)[0])(jax.random.PRNGKey(1))


@pytest.mark.parametrize("decay", [0.65, 0.75, 1.0])
def test_layer_decay_multipliers_through_the_optimizer(tiny_vit, decay):
  """First AdamW step with unit gradients and no weight decay moves every element by
  lr · decay^(L + 1 − layer_id): Adam's first step is ±lr per element, layer decay scales it."""
  params = _params(tiny_vit)
  tx = _optimizer(weight_decay=0.0, layer_decay=decay)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  seen = set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    layer = _layer_id_reference(name, DEPTH)
    seen.add(layer)
    np.testing.assert_allclose(np.asarray(u), -1e-2 * decay ** (DEPTH + 1 - layer), rtol=1e-5,
                               err_msg=name)
  assert seen == set(range(DEPTH + 2))  # embeddings, every block, and norm/fc_norm/head


def test_weight_decay_skips_bias_norm_and_tokens(tiny_vit):
  """Zero gradients: AdamW's update is −lr · mult · wd · w on matrices only."""
  params = _params(tiny_vit)
  wd, decay = 0.05, 0.5
  tx = _optimizer(weight_decay=wd, layer_decay=decay)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat_p = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    w = np.asarray(flat_p[path])
    decayed = w.ndim > 1 and not any(t in name for t in ("cls_token", "pos_embed"))
    mult = decay ** (DEPTH + 1 - _layer_id_reference(name, DEPTH))
    expected = -1e-2 * mult * wd * w if decayed else np.zeros_like(w)
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, atol=1e-12, err_msg=name)


def _layer_norm(x, scale, bias, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_global_pool_is_maes(tiny_vit):
  """MAE's global pool: the mean of the last block's patch tokens BEFORE the final norm, then the
  head's own LayerNorm (fc_norm) and Dense. The tokens read are exactly the final norm's input
  (NumPy LayerNorm with the backbone's norm parameters gives the backbone's output tokens)."""
  module, variables = tiny_vit
  net = finetune.FineTuneModel(module, 10, "global_pool")
  params = _params(tiny_vit)
  params = jax.tree.map(lambda p: p + 0.1 * np.random.default_rng(0).normal(size=p.shape),
                        params)  # fc_norm and head away from their init
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  last, tokens, (logits, _) = jax.jit(lambda p, x: (
      finetune.last_block_tokens(module, {"params": p["backbone"]}, x)[0],
      module.apply({"params": p["backbone"]}, x, train=False)["tokens"],
      net.apply(p, {}, x, train=False)))(params, x)
  norm = params["backbone"]["norm"]
  np.testing.assert_allclose(_layer_norm(np.asarray(last, np.float64), norm["scale"],
                                         norm["bias"]), tokens, atol=1e-4)
  head = params["head"]
  pooled = np.asarray(last, np.float64)[:, 1:].mean(axis=1)
  ref = (_layer_norm(pooled, head["fc_norm"]["scale"], head["fc_norm"]["bias"])
         @ np.asarray(head["head"]["kernel"]) + np.asarray(head["head"]["bias"]))
  np.testing.assert_allclose(logits, ref, atol=1e-4)
  with pytest.raises(ValueError, match="global_pool.*needs a ViT"):
    finetune.FineTuneModel(get_backbone("resnet18", width=4), 10, "global_pool")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_smoothed_one_hot(smoothing):
  labels = np.array([0, 3, 9])
  ref = np.full((3, 10), smoothing / 10)
  ref[np.arange(3), labels] += 1.0 - smoothing
  out = np.asarray(finetune.smoothed_one_hot(jnp.asarray(labels), 10, smoothing))
  np.testing.assert_allclose(out, ref, atol=1e-7)
  np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-6)


def _distinct_batch(b=4, h=8, w=8):
  # Image i is the constant i + 1: every pixel says which image it came from.
  images = jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None], (b, h, w, 3))
  targets = finetune.smoothed_one_hot(jnp.arange(b), b, 0.0)
  return images, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_is_a_convex_combination_with_the_reversed_batch(seed):
  images, targets = _distinct_batch()
  x, y = finetune.mixup_cutmix(jax.random.PRNGKey(seed), images, targets, 0.8, 0.0)
  lam = float(y[0, 0])  # weight of image 0's own label
  ref = lam * np.asarray(images) + (1 - lam) * np.asarray(images)[::-1]
  np.testing.assert_allclose(np.asarray(x), ref, atol=1e-5)
  ref_y = lam * np.eye(4) + (1 - lam) * np.eye(4)[::-1]
  np.testing.assert_allclose(np.asarray(y), ref_y, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_label_weight_is_the_kept_area(seed):
  images, targets = _distinct_batch(h=16, w=16)
  x, y = finetune.mixup_cutmix(jax.random.PRNGKey(seed), images, targets, 0.0, 1.0)
  x = np.asarray(x)[..., 0]
  for i in range(4):
    own = np.mean(x[i] == i + 1)
    other = np.mean(x[i] == 4 - i)
    assert own + other == pytest.approx(1.0)  # pixels are either kept or pasted, never blended
    assert float(y[i, i]) == pytest.approx(own, abs=1e-6)
    assert float(y[i, 3 - i]) == pytest.approx(other, abs=1e-6)


def test_mixup_off_is_identity():
  images, targets = _distinct_batch()
  x, y = finetune.mixup_cutmix(jax.random.PRNGKey(0), images, targets, 0.0, 0.0)
  assert x is images and y is targets


@pytest.mark.parametrize("arg, model, features, decay, drop_path, epochs, lr, batch", [
    (None, "vit_base", "global_pool", 0.65, 0.1, 100, 5e-4, 1024),       # MAE FINETUNE.md
    ("mae,model=vit_large", "vit_large", "global_pool", 0.75, 0.2, 50, 1e-3, 1024),
    ("simmim", "swin_base", "pooled", 0.9, 0.1, 100, 6.25e-4, 2048),     # SimMIM Swin-B yaml
    ("mimco", "swin_tiny", "pooled", 0.75, 0.1, 100, 5e-4, 1024),        # MimCo Sec. 4.2
    ("mimco,model=swin_base", "swin_base", "pooled", 0.75, 0.2, 100, 5e-4, 1024),
    ("mimco,model=vit_small", "vit_small", "cls", 0.75, 0.1, 300, 5e-4, 1024),
    ("mimco,model=vit_base", "vit_base", "cls", 0.65, 0.1, 100, 5e-4, 1024),
])
def test_recipes_are_the_papers(arg, model, features, decay, drop_path, epochs, lr, batch):
  config = load_config("finetune", arg)
  del model  # the architecture comes from the weights; the preset only sets the recipe
  assert (config.model.features, config.optim.layer_decay, config.model.drop_path_rate) == (
      features, decay, drop_path)
  assert (config.train.num_epochs, config.optim.base_lr, config.train.batch_size) == (
      epochs, lr, batch)
  assert config.data.randaugment == "rand-m9-mstd0.5-inc1" and config.data.reprob == 0.25
  assert (config.train.mixup_alpha, config.train.cutmix_alpha,
          config.train.label_smoothing) == (0.8, 1.0, 0.1)
  assert config.optim.name == "adamw" and config.optim.weight_decay == 0.05
  assert config.optim.exclude_from_decay == "bias_norm_and_tokens"
  assert config.data.interpolation == "bicubic" and config.train.ema_decay == 0.0
  if arg == "simmim":
    assert config.optim.grad_clip == 5.0 and config.data.image_size == 192
    assert config.optim.warmup_epochs == 20.0


def test_drop_path_reaches_the_loaded_backbone(tiny_vit, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from ssl_jax.export.torch import to_torch_state_dict  # pylint: disable=import-outside-toplevel
  _, variables = tiny_vit
  path = str(tmp_path / "vit.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in to_torch_state_dict(
      jax.device_get(variables), {"name": "vit_tiny", **FIELDS}).items()}, path)
  config = load_config("finetune", "test")
  with config.unlocked():
    config.backbone.safetensors = path
    config.backbone.model.update(name="vit_tiny", **FIELDS)
    config.model.drop_path_rate = 0.3
  module, loaded, model = finetune.backbone_of(config)
  assert module.drop_path_rate == 0.3 and model["drop_path_rate"] == 0.3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(variables))


# ---------------------------------------------------------------------------------------------
# A tiny ViT fine-tuned with every switch of the recipe on

def _every_switch_config() -> ml_collections.ConfigDict:
  """finetune:test: RandAugment, random erasing, mixup + cutmix, label smoothing, layer decay,
  drop path (in the backbone), MAE global pool, EMA of the weights; 40 photo crops, batch 16,
  2 epochs = 4 steps."""
  config = load_config("finetune", "test")
  with config.unlocked():
    config.data.train_args = ml_collections.ConfigDict(
        {"split": "train", "num_per_photo": 4, "crop_size": 40})
    config.data.test_args = ml_collections.ConfigDict(
        {"split": "probe", "num_per_photo": 2, "crop_size": 32})
    config.train.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope="module")
def finetuned(tiny_vit, tmp_path_factory):
  module, variables = tiny_vit
  workdir = str(tmp_path_factory.mktemp("ft"))
  summary = finetune.run(_every_switch_config(), workdir,
                         backbone=(module, variables, {"name": "vit_tiny", **FIELDS}))
  return workdir, summary


def test_every_recipe_switch_trains_a_tiny_vit(tiny_vit, finetuned):
  config = _every_switch_config()
  assert config.data.randaugment and config.data.reprob > 0 and config.train.mixup_alpha > 0
  assert config.train.cutmix_alpha > 0 and config.train.label_smoothing > 0
  assert config.optim.layer_decay and config.train.ema_decay and tiny_vit[0].drop_path_rate > 0
  workdir, summary = finetuned
  assert summary["complete"] and summary["features"] == "global_pool"
  for name in ("finetune", "finetune_ema"):
    assert 0.0 <= summary[f"{name}/top1"] <= summary[f"{name}/top5"] <= 1.0
  saved = json.load(open(f"{workdir}/finetune_summary.json"))
  assert saved["finetune/top1"] == summary["finetune/top1"]
  losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))  # logged every 2 of 4 steps
  # Every backbone tensor moved (layer decay scales, never freezes) except the final norm, which
  # MAE's global pool bypasses (MAE deletes it); the EMA differs from the weights.
  ts = jax.device_get(summary["state"])
  start = dict(jax.device_get(tiny_vit[1]["params"]))
  trained = dict(ts["params"]["backbone"])
  jax.tree.map(np.testing.assert_array_equal, start.pop("norm"), trained.pop("norm"))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), start, trained)
  assert all(jax.tree.leaves(moved))
  ema_k = np.asarray(ts["ema"]["params"]["backbone"]["patch_embed"]["kernel"])
  assert not np.array_equal(ema_k, ts["params"]["backbone"]["patch_embed"]["kernel"])


def test_finetune_resumes_exactly(tiny_vit, finetuned, tmp_path):
  """Every random choice (crop, RandAugment and the erasing box on the host; erasing noise,
  mixup/cutmix and drop path on device) replays after a resume: same weights, same accuracy."""
  module, variables = tiny_vit
  backbone = (module, variables, {"name": "vit_tiny", **FIELDS})
  first = finetune.run(_every_switch_config(), str(tmp_path), backbone=backbone, max_steps=1)
  assert first["step"] == 1 and not first["complete"]
  resumed = finetune.run(_every_switch_config(), str(tmp_path), backbone=backbone)
  _, full = finetuned
  assert resumed["finetune/top1"] == full["finetune/top1"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"]),
               jax.device_get(full["state"]))
