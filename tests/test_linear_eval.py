"""Periodic evaluators in the trainer, and the image-level linear protocols (linear_eval):
single-head and multi-layer against NumPy, the papers' variants, the command line."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import train, weights
from ssl_jax.data import pipeline
from ssl_jax.data import supervised_views as views
from ssl_jax.evaluate import evaluators, linear, linear_eval, supervised
from ssl_jax.metrics import read_metrics
from ssl_jax.models import get_backbone
from tests.helpers import ROOT, BlockSource, load_config

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
  """The protocol's reported accuracy equals top-1/top-5 recomputed in NumPy from the trained
  head and independently extracted centre-crop features of the frozen checkpoint backbone."""
  config = _test_config(pretrain_workdir)
  summary = linear_eval.run(config, str(tmp_path))
  saved = json.load(open(tmp_path / "linear_eval_summary.json"))
  assert saved["linear_eval/top1"] == pytest.approx(summary["linear_eval/top1"])
  assert saved["features"] == "pooled" and saved["head_batch_norm"] is True
  lines = read_metrics(str(tmp_path))
  assert lines[-1]["linear_eval/top1"] == pytest.approx(summary["linear_eval/top1"])
  assert any("loss" in r for r in lines)
  recorded = json.load(open(tmp_path / "config.json"))["provenance"]["backbone"]
  assert recorded["sha256"] == weights.fingerprint(pretrain_workdir)

  # Independent reference: backbone from the checkpoint, features of centre crops, NumPy head.
  _, variables = weights.workdir_encoder(pretrain_workdir)
  module = get_backbone("resnet18", **{k: v for k, v in summary["model"].items() if k != "name"})
  test_source = linear_eval.supervised.registry.get_source("builtin_photos",
                                                           **config.data.test_args)
  batch = next(pipeline.eval_batches(test_source, image_size=32, batch_size=1000,
                                     crop_fraction=config.data.crop_fraction))
  batch = {k: v[batch["valid"]] for k, v in batch.items()}
  x = np.asarray(module.apply(variables, views.eval_images(jnp.asarray(batch["image"])),
                              train=False)["pooled"], np.float64)
  ts = jax.device_get(summary["state"])
  mean, var = (np.asarray(ts["state"]["batch_stats"]["bn"][k], np.float64) for k in ("mean", "var"))
  logits = ((x - mean) / np.sqrt(var + 1e-6)) @ np.asarray(ts["params"]["head"]["kernel"]) \
      + np.asarray(ts["params"]["head"]["bias"])
  order = np.argsort(-logits, axis=1, kind="stable")
  ref_top1 = np.mean(order[:, 0] == batch["label"])
  ref_top5 = np.mean((order[:, :5] == batch["label"][:, None]).any(axis=1))
  assert summary["linear_eval/top1"] == pytest.approx(ref_top1, abs=1e-6)
  assert summary["linear_eval/top5"] == pytest.approx(ref_top5, abs=1e-6)


def test_load_backbone_from_exported_safetensors(pretrain_workdir, tmp_path):
  from safetensors.numpy import save_file
  from ssl_jax.export.torch import to_torch_state_dict
  _, variables = weights.workdir_encoder(pretrain_workdir)
  model = weights.model_config_of_workdir(pretrain_workdir)
  path = str(tmp_path / "backbone.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in to_torch_state_dict(variables, model).items()},
            path)
  cfg = ml_collections.ConfigDict({"workdir": "", "safetensors": path, "model": model})
  _, loaded, _ = supervised.load_backbone(cfg)
  flat_a = jax.tree_util.tree_leaves_with_path(variables)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(loaded))
  assert len(flat_a) == len(flat_b)
  for path_, leaf in flat_a:
    np.testing.assert_allclose(np.asarray(flat_b[path_]), leaf, rtol=0, atol=0)


@pytest.mark.parametrize("cfg, match", [
    ({"workdir": "", "safetensors": ""}, "set config.backbone.workdir"),
    ({"workdir": "/nonexistent_ssl_jax", "safetensors": ""}, "does not exist"),
    ({"workdir": "", "safetensors": "FOREIGN", "model": {}}, "architecture is unknown"),
    ({"workdir": "", "safetensors": "FOREIGN", "model": {"name": None}},
     "architecture is unknown"),
    ({"workdir": "NOT_A_RUN", "safetensors": ""}, "not a pretraining workdir"),
])
def test_load_backbone_errors(cfg, match, tmp_path):
  """Every bad backbone source is a one-line user error (`weights.WeightsError`); unset
  `model` placeholders (None) are ignored."""
  from safetensors.numpy import save_file
  foreign = str(tmp_path / "foreign.safetensors")  # a torchvision-style file: no arch metadata
  save_file({"conv1.weight": np.zeros((2, 3, 1, 1), np.float32)}, foreign)
  (tmp_path / "not_a_run").mkdir()
  paths = {"FOREIGN": foreign, "NOT_A_RUN": str(tmp_path / "not_a_run")}
  cfg = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in cfg.items()}
  with pytest.raises(weights.WeightsError, match=match):
    supervised.load_backbone(ml_collections.ConfigDict(cfg))


def test_train_view_full_crop_is_resize_and_flip():
  """With scale (1, 1) on a square image the random-resized crop is the whole image: every view
  is the bilinear resize or its mirror, and both occur over seeds."""
  yy, xx = np.mgrid[0:40, 0:40]
  image = np.stack([xx * 6, yy * 6, np.zeros_like(xx)], -1).astype(np.uint8)
  resized = np.asarray(views.transforms.Image.fromarray(image).resize(
      (20, 20), views.transforms.Image.Resampling.BILINEAR)).astype(int)
  view = views.TrainView(20, crop_scale=(1.0, 1.0))
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
  view = views.TrainView(16, crop_scale=(0.01, 0.02))
  single = 0
  for seed in range(10):
    out = view.random_map({"image": image, "label": 0}, np.random.default_rng(seed))["image"]
    single += int((out[..., 0] > 128).all() or (out[..., 2] > 128).all())
  assert single >= 7  # a crop of ~1-2 % of the area rarely straddles the boundary


def test_vit_features_cls_and_avg():
  module = get_backbone("vit_tiny", patch_size=8, embed_dim=32, depth=1, num_heads=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(
      jax.random.PRNGKey(0))
  # One compiled program for all three (eager op-by-op dispatch is what costs time on CPU).
  tokens, cls, avg = jax.jit(lambda v, x: (
      module.apply(v, x, train=False)["tokens"],
      linear_eval.backbone_features(module, v, x, "cls"),
      linear_eval.backbone_features(module, v, x, "avg")))(variables, x)
  np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-6)
  np.testing.assert_allclose(avg, np.asarray(tokens)[:, 1:].mean(axis=1), atol=1e-6)
  resnet = get_backbone("resnet18", width=4, small_image_stem=True)
  rv = jax.eval_shape(lambda: resnet.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                          train=False))
  with pytest.raises(ValueError, match="needs a ViT"):
    jax.eval_shape(lambda v: linear_eval.backbone_features(resnet, v, x, "cls"), rv)


@pytest.mark.parametrize("arg, optimizer, schedule, batch, bn, interpolation", [
    (None, "sgd", "piecewise", 256, False, "bilinear"),   # MoCo v1/v2 main_lincls
    ("moco", "sgd", "piecewise", 256, False, "bilinear"),
    ("vit", "sgd", "cosine", 1024, False, "bilinear"),    # MoCo v3: no BN before the head
    ("mae", "lars", "cosine", 16384, True, "bicubic"),     # MAE main_linprobe: BN, no affine
    ("multilayer", "sgd", "piecewise", 256, True, "bilinear"),
])
def test_config_variants_are_the_papers(arg, optimizer, schedule, batch, bn, interpolation):
  config = load_config("linear_eval", arg)
  assert config.protocol == "linear" and config.optim.name == optimizer
  assert config.optim.schedule == schedule and config.train.batch_size == batch
  assert config.head.batch_norm is bn and config.data.interpolation == interpolation
  assert (config.optim.base_lr, config.optim.lr_rule) == {
      None: (30.0, "none"), "moco": (30.0, "none"), "vit": (3.0, "linear"),
      "mae": (0.1, "linear"), "multilayer": (0.01, "none")}[arg]
  assert tuple(config.optim.lr_drops) == {"moco": (60.0, 80.0), None: (60.0, 80.0),
                                          "multilayer": (30.0, 60.0)}.get(arg, ())
  assert config.train.num_epochs == (100.0 if arg in (None, "moco") else 90.0)
  assert config.optim.weight_decay == (1e-4 if arg == "multilayer" else 0.0)
  if arg == "multilayer":
    assert config.head.kind == "multilayer" and config.head.pool == "specified"
    assert config.optim.nesterov and tuple(config.data.color_jitter) == (0.4, 0.4, 0.4, 0.0)
    assert config.data.lighting == 0.1
  if arg == "mae":
    assert config.optim.warmup_epochs == 10.0
  assert linear_eval.resolve_features(config, {"name": "resnet50"}) == "pooled"
  assert linear_eval.resolve_features(config, {"name": "vit_base"}) == "cls"


# ---------------------------------------------------------------------------------------------
# The multi-layer protocol (MaskCo / OpenSelfSup r50_multihead)

def _torch_avg_pool(x, k, s, p):
  """AvgPool2d(k, s, p), count_include_pad, on NHWC, written out."""
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  oh, ow = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
  out = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = xp[:, i * s:i * s + k, j * s:j * s + k].sum(axis=(1, 2)) / k**2
  return out


def test_specified_pool_is_openselfsups_at_224px():
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 3))
  for layer, (k, s, p) in linear.OPENSELFSUP_POOLS.items():
    if k <= 28 + 2 * p:
      np.testing.assert_allclose(linear.specified_avg_pool(jnp.asarray(x), k, s, p),
                                 _torch_avg_pool(x, k, s, p), atol=1e-5, err_msg=layer)
  # ResNet-50 at 224 px: conv1 (pre-max-pool) 112², conv2..conv5 56², 28², 14², 7² give
  # 12², 6², 4², 3², 2² cells: 64·144, 256·36, 512·16, 1024·9, 2048·4 ≈ 9k dims (OpenSelfSup).
  r50 = get_backbone("resnet50")
  v = jax.eval_shape(lambda: r50.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                      train=False))
  maps = jax.eval_shape(lambda v, x: linear.resnet_stage_maps(r50, v, x), v,
                        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  dims = {k: int(np.prod(jax.eval_shape(lambda m, k=k: linear.specified_avg_pool(
      m, *linear.OPENSELFSUP_POOLS[k]), m).shape)) for k, m in maps.items()}
  assert dims == {"conv1": 9216, "conv2": 9216, "conv3": 8192, "conv4": 9216, "conv5": 8192}
  with pytest.raises(ValueError, match="adaptive pool"):
    linear.specified_avg_pool(jnp.zeros((1, 4, 4, 2)), 13, 5, 0)


def test_conv1_is_the_stem_before_max_pool():
  module = get_backbone("resnet18", width=4)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  maps, out = jax.jit(lambda v, x: (linear.resnet_stage_maps(module, v, x),
                                    module.apply(v, x, train=False)))(variables, x)
  conv1 = np.asarray(maps["conv1"])
  assert conv1.shape == (2, 16, 16, 4) and conv1.min() >= 0  # a ReLU output at H/2
  padded = np.pad(conv1, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  pooled = np.max([padded[:, i:i + 16:2, j:j + 16:2] for i in range(3) for j in range(3)], 0)
  np.testing.assert_allclose(pooled, out["stem"], atol=1e-6)  # max-pool 3x3/2 gives the stem
  for i in range(4):
    np.testing.assert_array_equal(maps[f"conv{i + 2}"], out["stages"][i])


def test_multilayer_loss_matches_numpy_reference():
  """The multi-layer protocol's loss on one batch: per stage, adaptive pool -> BN with the
  batch's statistics (no affine) -> flatten -> linear; the sum of the five cross-entropies."""
  module = get_backbone("resnet18", width=4, small_image_stem=True)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(0))
  config = load_config("linear_eval", "multilayer,test")
  data = supervised.Data(None, None, 10, total_steps=4, steps_per_epoch=2, warmup_steps=0)
  protocol = linear_eval.make_protocol(config, data, backbone=(module, variables,
                                                               {"name": "resnet18"}))
  params, state = jax.jit(protocol.init)(jax.random.PRNGKey(1))
  params = jax.tree.map(lambda p: p + 0.05 * np.random.default_rng(2).normal(size=p.shape),
                        params)  # non-zero biases
  rng = np.random.default_rng(3)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (6, 32, 32, 3)), jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 10, 6), jnp.int32)}
  # The device view (colour jitter, lighting) with the step key, then the frozen maps.
  key = jax.random.PRNGKey(4)
  loss, (new_state, metrics), images = jax.jit(lambda p, s, c, b, k: (
      *protocol.loss_fn(p, s, c, b, k), supervised.train_images(config, k, b)))(
          params, state, variables, batch, key)
  maps = jax.jit(lambda v, x: linear.resnet_stage_maps(module, v, x))(variables, images)
  total = 0.0
  labels = np.asarray(batch["label"])
  for layer, fmap in maps.items():
    pooled = np.asarray(linear.adaptive_avg_pool(fmap, linear.RESNET50_POOL_SIZES[layer]),
                        np.float64)
    mean, var = pooled.mean(axis=(0, 1, 2)), pooled.var(axis=(0, 1, 2))
    x = ((pooled - mean) / np.sqrt(var + 1e-5)).reshape(6, -1)
    z = x @ np.asarray(params[f"fc_{layer}"]["kernel"]) + np.asarray(params[f"fc_{layer}"]["bias"])
    z = z - z.max(axis=1, keepdims=True)
    ce = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(6), labels])
    assert float(metrics[f"loss/{layer}"]) == pytest.approx(ce, rel=1e-4), layer
    total += ce
    np.testing.assert_allclose(new_state["batch_stats"][f"bn_{layer}"]["mean"],
                               0.1 * mean, rtol=1e-4, atol=1e-6)  # momentum 0.1 from 0
  assert float(loss) == pytest.approx(total, rel=1e-4)
  assert not np.allclose(images, views.eval_images(batch["image"]))  # jitter/lighting applied


# ---------------------------------------------------------------------------------------------
# The command line

def _cli(args, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"),
             TFDS_DATA_DIR=str(tmp_path / "no_tfds"), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ssl_jax.evaluate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_linear_eval_of_a_pretraining_workdir(pretrain_workdir, tmp_path):
  """`python -m ssl_jax.evaluate --config=configs/linear_eval.py:test
  --config.backbone.workdir=W --workdir=OUT` trains, prints the accuracy; rerun, it resumes at
  the end and prints the same."""
  out = tmp_path / "out"
  args = ["--config=configs/linear_eval.py:test", f"--config.backbone.workdir={pretrain_workdir}",
          f"--workdir={out}", "--config.train.num_epochs=1"]
  first = _cli(args, tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  line = [ln for ln in first.stdout.splitlines() if ln.startswith("linear_eval: top1=")]
  assert line and os.path.exists(out / "linear_eval_summary.json")
  again = _cli(args, tmp_path)
  assert again.returncode == 0 and "resuming at step" in again.stdout
  assert line[0] in again.stdout


def test_cli_documented_foreign_file_command_parses(tmp_path):
  """The docstring's command for a foreign safetensors file with `--config.backbone.model.*`
  overrides gets past flag parsing (issue 20 item 8): a missing file is a one-line error; a
  real timm-layout file loads, and the run stops at the missing ImageNet, exit 2."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from ssl_jax.export.torch import to_torch_state_dict  # pylint: disable=import-outside-toplevel
  documented = ["--config=configs/linear_eval.py:vit",
                f"--config.backbone.safetensors={tmp_path / 'vit_b.safetensors'}",
                "--config.backbone.model.name=vit_base", "--config.backbone.model.patch_size=16",
                f"--workdir={tmp_path / 'out'}"]
  missing = _cli(documented, tmp_path)
  assert missing.returncode == 2, missing.stderr[-2000:]
  assert missing.stderr.count("\n") == 1 and "vit_b.safetensors' does not exist" in missing.stderr
  fields = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
  module = get_backbone("vit_tiny", **fields)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 32, 32, 3)), train=False))
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
  path = tmp_path / "tiny.safetensors"  # timm layout, no metadata: the flags name it
  save_file(to_torch_state_dict(variables, {"name": "vit_tiny", **fields}), str(path))
  tiny = ["--config=configs/linear_eval.py:vit", f"--config.backbone.safetensors={path}",
          "--config.backbone.model.name=vit_tiny", "--config.data.image_size=32",
          *[f"--config.backbone.model.{k}={v}" for k, v in fields.items()],
          f"--workdir={tmp_path / 'out2'}"]
  loaded = _cli(tiny, tmp_path)
  assert loaded.returncode == 2, loaded.stderr[-2000:]
  assert loaded.stderr.startswith("error: ") and "imagenet2012" in loaded.stderr
  assert loaded.stderr.count("\n") == 1
