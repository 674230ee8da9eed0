"""Periodic evaluators in the trainer, and the image-level linear protocol (linear_eval)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import train, weights
from ssl_jax.data import pipeline
from ssl_jax.evaluate import evaluators, linear_eval
from ssl_jax.metrics import read_metrics
from ssl_jax.models import get_backbone
from tests.helpers import BlockSource, load_config

PHOTOS_TRAIN = {"split": "train", "num_per_photo": 2, "crop_size": 32}
PHOTOS_TEST = {"split": "probe", "num_per_photo": 1, "crop_size": 32}


def _eval_section(kind: str, every_steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "kind": kind, "every_steps": every_steps, "source": "builtin_photos",
      "train_args": PHOTOS_TRAIN, "test_args": PHOTOS_TEST, "image_size": 0,
      "batch_size": 16, "max_train": 0, "epochs": 2, "probe_batch_size": 10, "lr": 0.1})


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory):
  """A BYOL :test run of 4 steps: a linear probe every 2 steps, a multi-layer probe every 4."""
  config = load_config("byol", "test")
  with config.unlocked():
    config.eval = ml_collections.ConfigDict({"linear": _eval_section("linear", 2),
                                             "probe_ml": _eval_section("multilayer", 4)})
  workdir = str(tmp_path_factory.mktemp("byol"))
  train.run(config, workdir, source=BlockSource(), max_steps=4)
  return workdir


def test_periodic_evaluators_write_metrics_lines(pretrain_workdir):
  lines = read_metrics(pretrain_workdir)
  linear_steps = [r["step"] for r in lines if "linear/top1" in r]
  ml_lines = [r for r in lines if any(k.startswith("probe_ml/") for k in r)]
  assert linear_steps == [0, 2, 4]
  assert [r["step"] for r in ml_lines] == [0, 4]
  for r in ml_lines:
    # One result per ResNet stage: the stem (conv1) and the four residual stages.
    assert sorted(k for k in r if k != "step") == [
        f"probe_ml/conv{i}/top1" for i in range(1, 6)]
    assert all(0.0 <= r[k] <= 1.0 for k in r if k != "step")
  for r in lines:
    if "linear/top1" in r:
      assert 0.0 <= r["linear/top1"] <= r["linear/top5"] <= 1.0


def test_unknown_evaluator_names_the_field():
  config = load_config("byol", "test")
  with config.unlocked():
    config.eval = ml_collections.ConfigDict({"probe": {"kind": "nope", "every_steps": 1}})
  with pytest.raises(ValueError, match=r"config.eval.probe: unknown evaluator 'nope'"):
    evaluators.make_evaluators(config, predict_fn=None)


def _test_config(workdir: str) -> ml_collections.ConfigDict:
  config = load_config("linear_eval", "test")
  with config.unlocked():
    config.backbone.workdir = workdir
    config.data.train_args = ml_collections.ConfigDict(PHOTOS_TRAIN)
    config.data.test_args = ml_collections.ConfigDict({**PHOTOS_TEST, "num_per_photo": 2})
  return config


def test_linear_eval_from_workdir_matches_numpy_reference(pretrain_workdir, tmp_path):
  """The protocol's reported accuracy equals top-1/top-5 recomputed in NumPy from the returned
  head and independently extracted centre-crop features of the frozen checkpoint backbone."""
  config = _test_config(pretrain_workdir)
  summary = linear_eval.run(config, str(tmp_path))
  saved = json.load(open(tmp_path / linear_eval.SUMMARY_FILE))
  assert saved["top1"] == pytest.approx(summary["top1"])
  assert saved["features"] == "pooled" and saved["head_batch_norm"] is True
  lines = read_metrics(str(tmp_path))
  assert lines[-1]["linear_eval/top1"] == pytest.approx(summary["top1"])
  assert any("linear_eval/train_loss" in r for r in lines)

  # Independent reference: backbone from the checkpoint, features of centre crops, NumPy head.
  _, variables = weights.workdir_encoder(pretrain_workdir)
  module = get_backbone("resnet18", **{k: v for k, v in summary["model"].items() if k != "name"})
  test_source = linear_eval.registry.get_source("builtin_photos", **config.data.test_args)
  batch = next(pipeline.eval_batches(test_source, image_size=32, batch_size=1000,
                                     crop_fraction=config.data.crop_fraction))
  batch = {k: v[batch["valid"]] for k, v in batch.items()}
  x = np.asarray(module.apply(
      variables, linear_eval.normalize(jnp.asarray(batch["image"], jnp.float32) / 255.0),
      train=False)["pooled"], np.float64)
  head = summary["head"]
  mean, var = (np.asarray(head["batch_stats"]["bn"][k], np.float64) for k in ("mean", "var"))
  logits = ((x - mean) / np.sqrt(var + 1e-6)) @ np.asarray(head["params"]["head"]["kernel"]) \
      + np.asarray(head["params"]["head"]["bias"])
  order = np.argsort(-logits, axis=1, kind="stable")
  ref_top1 = np.mean(order[:, 0] == batch["label"])
  ref_top5 = np.mean((order[:, :5] == batch["label"][:, None]).any(axis=1))
  assert summary["top1"] == pytest.approx(ref_top1, abs=1e-6)
  assert summary["top5"] == pytest.approx(ref_top5, abs=1e-6)


def test_load_backbone_from_exported_safetensors(pretrain_workdir, tmp_path):
  from safetensors.numpy import save_file
  from ssl_jax.export.torch import to_torch_state_dict
  _, variables = weights.workdir_encoder(pretrain_workdir)
  model = weights.model_config_of_workdir(pretrain_workdir)
  path = str(tmp_path / "backbone.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in to_torch_state_dict(variables, model).items()},
            path)
  cfg = ml_collections.ConfigDict({"workdir": "", "safetensors": path, "model": model})
  _, loaded, _ = linear_eval.load_backbone(cfg)
  flat_a = jax.tree_util.tree_leaves_with_path(variables)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(loaded))
  assert len(flat_a) == len(flat_b)
  for path_, leaf in flat_a:
    np.testing.assert_allclose(np.asarray(flat_b[path_]), leaf, rtol=0, atol=0)


@pytest.mark.parametrize("cfg, match", [
    ({"workdir": "", "safetensors": ""}, "set config.backbone.workdir"),
    ({"workdir": "/nonexistent_ssl_jax", "safetensors": ""}, "does not exist"),
    ({"workdir": "", "safetensors": "FOREIGN", "model": {}}, "architecture is unknown"),
    ({"workdir": "NOT_A_RUN", "safetensors": ""}, "not a pretraining workdir"),
])
def test_load_backbone_errors(cfg, match, tmp_path):
  """Every bad backbone source is a one-line user error (`weights.WeightsError`)."""
  from safetensors.numpy import save_file
  foreign = str(tmp_path / "foreign.safetensors")  # a torchvision-style file: no arch metadata
  save_file({"conv1.weight": np.zeros((2, 3, 1, 1), np.float32)}, foreign)
  (tmp_path / "not_a_run").mkdir()
  paths = {"FOREIGN": foreign, "NOT_A_RUN": str(tmp_path / "not_a_run")}
  cfg = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in cfg.items()}
  with pytest.raises(weights.WeightsError, match=match):
    linear_eval.load_backbone(ml_collections.ConfigDict(cfg))


def test_train_view_full_crop_is_resize_and_flip():
  """With scale (1, 1) on a square image the random-resized crop is the whole image: every view
  is the bilinear resize or its mirror, and both occur over seeds."""
  yy, xx = np.mgrid[0:40, 0:40]
  image = np.stack([xx * 6, yy * 6, np.zeros_like(xx)], -1).astype(np.uint8)
  resized = np.asarray(linear_eval.transforms.Image.fromarray(image).resize(
      (20, 20), linear_eval.transforms.Image.Resampling.BILINEAR)).astype(int)
  view = linear_eval.RandomResizedCropFlip(20, scale=(1.0, 1.0))
  flips = []
  for seed in range(12):
    out = view.random_map({"image": image, "label": 3}, np.random.default_rng(seed))
    assert out["image"].shape == (20, 20, 3) and out["label"] == 3
    got = out["image"].astype(int)
    flipped = np.abs(got - resized[:, ::-1]).max() <= 1
    assert flipped or np.abs(got - resized).max() <= 1
    flips.append(flipped)
  assert any(flips) and not all(flips)


def test_train_view_crops_inside_the_image():
  """A small-scale crop of a two-colour image (left red, right blue) is mostly one colour."""
  image = np.zeros((64, 64, 3), np.uint8)
  image[:, :32, 0] = 255
  image[:, 32:, 2] = 255
  view = linear_eval.RandomResizedCropFlip(16, scale=(0.01, 0.02))
  single = 0
  for seed in range(10):
    out = view.random_map({"image": image, "label": 0}, np.random.default_rng(seed))["image"]
    single += int((out[..., 0] > 128).all() or (out[..., 2] > 128).all())
  assert single >= 7  # a crop of ~1-2 % of the area rarely straddles the boundary


def test_vit_features_cls_and_avg():
  module = get_backbone("vit_tiny", patch_size=8, embed_dim=32, depth=1, num_heads=2)
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(
      jax.random.PRNGKey(0))
  tokens = np.asarray(jax.jit(lambda v, x: module.apply(
      v, linear_eval.normalize(jnp.asarray(x, jnp.float32) / 255.0), train=False)["tokens"])(
          variables, images))
  # One compiled program for both (eager op-by-op dispatch is what costs time on CPU).
  cls, avg = jax.jit(lambda v, x: (linear_eval.backbone_features(module, v, x, "cls"),
                                   linear_eval.backbone_features(module, v, x, "avg")))(
                                       variables, images)
  np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-6)
  np.testing.assert_allclose(avg, tokens[:, 1:].mean(axis=1), atol=1e-6)
  resnet = get_backbone("resnet18", width=4, small_image_stem=True)
  rv = jax.eval_shape(lambda: resnet.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                          train=False))
  with pytest.raises(ValueError, match="needs a ViT"):
    jax.eval_shape(lambda v: linear_eval.backbone_features(resnet, v, images, "cls"), rv)


@pytest.mark.parametrize("arg, name, vit_bn, resnet_bn", [
    (None, "sgd", True, False), ("vit", "sgd", True, False), ("mae", "lars", True, False)])
def test_config_variants_and_head_defaults(arg, name, vit_bn, resnet_bn):
  config = load_config("linear_eval", arg)
  assert config.optim.name == name and config.protocol == "linear"
  assert config.train.num_epochs in (90.0, 100.0)
  assert linear_eval.resolve_head_batch_norm(config, {"name": "vit_base"}) is vit_bn
  assert linear_eval.resolve_head_batch_norm(config, {"name": "resnet50"}) is resnet_bn
  assert linear_eval.resolve_features(config, {"name": "resnet50"}) == "pooled"
  assert linear_eval.resolve_features(config, {"name": "vit_base"}) == "cls"
