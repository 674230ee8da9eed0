"""ViT fine-tuning: layer-wise lr decay through the optimizer, label smoothing, mixup/cutmix."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax.evaluate import finetune
from ssl_jax.metrics import read_metrics
from ssl_jax.models import get_backbone
from tests.helpers import load_config

DEPTH = 3


@pytest.fixture(scope="module")
def tiny_vit():
  module = get_backbone("vit_tiny", patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2,
                        drop_path_rate=0.1)
  net = finetune.FineTuneModel(module, num_classes=10)
  params = jax.jit(lambda k: net.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(0))["params"]
  return module, net, params


def _layer_id_reference(path: str, num_layers: int) -> int:
  """BEiT/MAE `get_layer_id_for_vit`, written against our parameter names."""
  if any(t in path for t in ("cls_token", "pos_embed", "patch_embed")):
    return 0
  m = re.search(r"blocks_(\d+)", path)
  return int(m.group(1)) + 1 if m else num_layers + 1


def _config(**optim):
  config = load_config("finetune", "test")
  with config.unlocked():
    config.optim.warmup_epochs = 0.0
    config.optim.schedule = "constant"
    config.optim.lr_rule = "none"
    config.optim.base_lr = 1e-2
    config.optim.update(optim)
  return config


@pytest.mark.parametrize("decay", [0.65, 0.75, 1.0])
def test_layer_decay_multipliers_through_the_optimizer(tiny_vit, decay):
  """First AdamW step with unit gradients and no weight decay moves every element by
  lr · decay^(L + 1 − layer_id): Adam's first step is ±lr per element, layer decay scales it."""
  _, _, params = tiny_vit
  config = _config(weight_decay=0.0, layer_decay=decay)
  tx, _ = finetune.make_finetune_optimizer(config, DEPTH, total_steps=10,
                                         steps={"warmup_steps": 0})
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  seen = set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    layer = _layer_id_reference(name, DEPTH)
    seen.add(layer)
    expected = -1e-2 * decay ** (DEPTH + 1 - layer)
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, err_msg=name)
  assert seen == set(range(DEPTH + 2))  # embeddings, every block, and norm/head all present


def test_weight_decay_skips_bias_norm_and_tokens(tiny_vit):
  """Zero gradients: AdamW's update is −lr · mult · wd · w on matrices only."""
  _, _, params = tiny_vit
  wd, decay = 0.05, 0.5
  config = _config(weight_decay=wd, layer_decay=decay)
  tx, _ = finetune.make_finetune_optimizer(config, DEPTH, total_steps=10,
                                         steps={"warmup_steps": 0})
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat_p = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = jax.tree_util.keystr(path)
    w = np.asarray(flat_p[path])
    decayed = w.ndim > 1 and not any(t in name for t in ("cls_token", "pos_embed"))
    mult = decay ** (DEPTH + 1 - _layer_id_reference(name, DEPTH))
    expected = -1e-2 * mult * wd * w if decayed else np.zeros_like(w)
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, atol=1e-12, err_msg=name)


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


def test_finetune_run_writes_metrics_and_summary(tiny_vit, tmp_path):
  module, _, _ = tiny_vit
  init = jax.jit(lambda k: module.init(k, jnp.zeros((1, 32, 32, 3)), train=False))
  variables = {"params": init(jax.random.PRNGKey(1))["params"]}
  config = load_config("finetune", "test")
  with config.unlocked():
    config.data.train_args = ml_collections.ConfigDict(
        {"split": "train", "num_per_photo": 4, "crop_size": 32})
    config.data.test_args = ml_collections.ConfigDict(
        {"split": "probe", "num_per_photo": 2, "crop_size": 32})
  summary = finetune.run(config, str(tmp_path),
                         backbone=(module, variables, {"name": "vit_tiny", "depth": DEPTH}))
  assert summary["num_layers"] == DEPTH and summary["features"] == "cls"
  assert 0.0 <= summary["top1"] <= summary["top5"] <= 1.0
  saved = json.load(open(tmp_path / finetune.SUMMARY_FILE))
  assert saved["top1"] == pytest.approx(summary["top1"])
  lines = read_metrics(str(tmp_path))
  losses = [r["finetune/train_loss"] for r in lines if "finetune/train_loss" in r]
  # 40 images, batch 16, 2 epochs: 4 steps, logged every 2.
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert lines[-1]["finetune/top1"] == pytest.approx(summary["top1"])
