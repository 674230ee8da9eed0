"""The supervised loop shared by linear evaluation and fine-tuning: exact resume (after
`max_steps` and after SIGTERM), NaN stop, EMA, step-decay schedule, config errors."""
from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import checkpoint, loop
from ssl_jax.data import sources
from ssl_jax.evaluate import linear_eval, supervised
from ssl_jax.metrics import read_metrics
from ssl_jax.models import get_backbone
from tests.helpers import load_config

TRAIN = {"split": "train", "num_per_photo": 4, "crop_size": 40}   # 40 records
TEST = {"split": "probe", "num_per_photo": 2, "crop_size": 40}    # 20 records


@pytest.fixture(scope="module")
def backbone():
  module = get_backbone("resnet18", width=4, small_image_stem=True)
  variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.PRNGKey(3))
  return module, variables, {"name": "resnet18", "width": 4, "small_image_stem": True}


def _config(**train) -> ml_collections.ConfigDict:
  """linear_eval:test on 40 photo crops: batch 16, 2 steps per epoch, 3 epochs = 6 steps,
  evaluation every epoch, a checkpoint every 2 steps, EMA of the head on."""
  config = load_config("linear_eval", "test")
  with config.unlocked():
    config.data.train_args = ml_collections.ConfigDict(TRAIN)
    config.data.test_args = ml_collections.ConfigDict(TEST)
    config.train.update(num_epochs=3.0, checkpoint_every_steps=2, log_every_steps=1,
                        ema_decay=0.5, **train)
    config.eval.every_epochs = 1
  return config


@pytest.fixture(scope="module")
def uninterrupted(backbone, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, linear_eval.run(_config(), workdir, backbone=backbone)


def _assert_same_run(a: dict, b: dict) -> None:
  for key in a:
    if key.startswith("linear_eval"):
      assert a[key] == b[key], key
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a["state"]),
               jax.device_get(b["state"]))


def test_uninterrupted_run_writes_everything(uninterrupted):
  workdir, summary = uninterrupted
  assert summary["complete"] and summary["step"] == 6 and summary["epochs"] == 3
  assert 0.0 <= summary["linear_eval/top1"] <= summary["linear_eval/top5"] <= 1.0
  assert "linear_eval_ema/top1" in summary
  saved = json.load(open(os.path.join(workdir, "linear_eval_summary.json")))
  assert saved["linear_eval/top1"] == summary["linear_eval/top1"]
  lines = read_metrics(workdir)
  assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5, 6]
  assert [m["step"] for m in lines if "linear_eval/top1" in m] == [2, 4, 6]
  assert all({"lr", "epoch", "grad_norm", "img/s", "data/skipped"} <= m.keys()
             for m in lines if "loss" in m)
  recorded = json.load(open(os.path.join(workdir, "config.json")))
  assert recorded["train"]["batch_size"] == 16 and "provenance" in recorded


def test_resume_after_max_steps_equals_uninterrupted(backbone, uninterrupted, tmp_path):
  """Stop after 3 steps (between two checkpoints, as a kill would) and rerun the same call: the
  final accuracy, the head, its EMA and the optimizer state are bit-identical."""
  _, full = uninterrupted
  workdir = str(tmp_path)
  first = linear_eval.run(_config(), workdir, backbone=backbone, max_steps=3)
  assert first["step"] == 3 and not first["complete"]
  assert not os.path.exists(os.path.join(workdir, "linear_eval_summary.json"))
  resumed = linear_eval.run(_config(), workdir, backbone=backbone)
  assert resumed["complete"]
  _assert_same_run(full, resumed)
  lines = read_metrics(workdir)
  assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5, 6]
  # A run that finds the last checkpoint evaluates it again and trains nothing.
  again = linear_eval.run(_config(), workdir, backbone=backbone)
  assert again["linear_eval/top1"] == full["linear_eval/top1"] and again["step"] == 6


class _SigtermAfter(sources.Source):
  """The photos, sending SIGTERM to this process at the `after`-th record read (once)."""

  def __init__(self, after: int):
    self.inner = sources.BuiltinPhotos(**TRAIN)
    self.num_classes, self.after, self.reads = self.inner.num_classes, after, 0

  def __len__(self):
    return len(self.inner)

  def get(self, i, with_encoded=False):
    self.reads += 1
    if self.reads == self.after:
      os.kill(os.getpid(), signal.SIGTERM)
    return self.inner.get(i, with_encoded)


def test_sigterm_saves_and_the_rerun_finishes_identically(backbone, uninterrupted, tmp_path):
  _, full = uninterrupted
  workdir = str(tmp_path)
  stopped = linear_eval.run(_config(), workdir, backbone=backbone,
                            train_source=_SigtermAfter(after=36))
  assert not stopped["complete"] and 1 <= stopped["step"] < 6
  assert checkpoint.latest_step(workdir) == stopped["step"]  # saved at once, not at a multiple
  resumed = linear_eval.run(_config(), workdir, backbone=backbone)
  _assert_same_run(full, resumed)


def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(backbone, tmp_path):
  """An optimizer whose update turns NaN at the third step: the run stops naming step 3, the
  state is not updated by it, and the step-2 checkpoint stays the latest and finite."""

  def nan_at_third_update(config, data, backbone):
    protocol = linear_eval.make_protocol(config, data, backbone=backbone)
    poison = optax.scale_by_schedule(lambda count: jnp.where(count == 2, jnp.nan, 1.0))
    return dataclasses.replace(protocol, tx=optax.chain(protocol.tx, poison))

  workdir = str(tmp_path)
  with pytest.raises(loop.NonFiniteLossError, match="at step 3"):
    supervised.run(_config(), workdir, nan_at_third_update, linear_eval.backbone_of,
                   backbone=backbone)
  assert checkpoint.latest_step(workdir) == 2
  _, state = checkpoint.load_state(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_one_step_updates_the_ema_of_the_weights(backbone):
  """ξ ← d·ξ + (1 − d)·θ after the update (timm ModelEma), on params and BN statistics."""
  config = _config()
  setup = supervised.build(config, lambda c, d: linear_eval.make_protocol(c, d, backbone))
  ts = setup.init_state()
  before = jax.device_get(ts)
  rng = np.random.default_rng(0)
  local = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  after, metrics = setup.step(ts, setup.device_batch(local))
  after = jax.device_get(after)
  assert bool(metrics["finite"]) and int(after["step"]) == 1
  expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, before["ema"],
                          {"params": after["params"], "state": after["state"]})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               after["ema"], expected)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"], after["params"])
  assert all(jax.tree.leaves(moved))


def test_lr_drops_are_a_step_schedule_on_sgd():
  """`optim.lr_drops` (epochs): SGD with momentum and lr ×0.1 at each listed epoch, equal to the
  NumPy recursion v ← m·v + g, w ← w − lr(t)·v (torch's SGD, MoCo/OpenSelfSup)."""
  config = _config()
  with config.unlocked():
    config.optim.update(name="sgd", base_lr=0.5, lr_rule="none", schedule="piecewise",
                        lr_drops=(1.0, 2.0), momentum=0.9, weight_decay=0.0)
  data = supervised.Data(None, None, 10, total_steps=6, steps_per_epoch=2, warmup_steps=0)
  tx, schedule = supervised.make_optimizer(config, data)
  params = {"w": jnp.zeros((2, 2))}
  state = tx.init(params)
  w, v = np.zeros((2, 2)), np.zeros((2, 2))
  grad = np.array([[1.0, -2.0], [0.5, 3.0]])
  for t in range(6):
    lr = 0.5 * 0.1 ** (t >= 2) * 0.1 ** (t >= 4)
    assert float(schedule(t)) == pytest.approx(lr)
    v = 0.9 * v + grad
    w = w - lr * v
    updates, state = tx.update({"w": jnp.asarray(grad, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], w, rtol=1e-5, err_msg=f"step {t}")


@pytest.mark.parametrize("field, value, message", [
    ("train.batch_size", 12, "config.train.batch_size=12 must be a positive multiple of the 8"),
    ("eval.batch_size", 0, "config.eval.batch_size=0"),
    ("optim.schedule", "piecewise", "config.optim.lr_drops=\\(\\) .* goes with"),
    ("optim.name", "lars", None),
    ("data.randaugment", "rand-q9", "config.data.randaugment: RandAugment policy"),
    ("data.reprob", 1.5, "config.data.reprob=1.5"),
    ("data.interpolation", "lanczos", "config.data.interpolation='lanczos'"),
    ("train.ema_decay", 1.0, "config.train.ema_decay=1.0"),
    ("backbone.part", "both", "config.backbone.part='both'"),
])
def test_config_errors_name_the_field(field, value, message):
  config = load_config("linear_eval", "test")
  section, name = field.split(".")
  with config.unlocked():
    config[section][name] = value
    if field == "optim.name":  # LARS with the step schedule
      config.optim.update(schedule="piecewise", lr_drops=(1.0,))
      message = "config.optim.lr_drops: step decay is implemented for sgd and adamw"
  with pytest.raises(supervised.ConfigError, match=message):
    supervised.validate(config, num_devices=8)


def test_every_variant_validates():
  for name, variants in (("linear_eval", (None, "moco", "vit", "mae", "multilayer", "demo",
                                          "test", "multilayer,test")),
                         ("finetune", (None, "mae", "simmim", "mimco", "mimco,model=swin_base",
                                       "mae,model=vit_large", "demo", "test", "mimco,test"))):
    for arg in variants:
      supervised.validate(load_config(name, arg), num_devices=1)
  with pytest.raises(supervised.ConfigError, match="unknown; known variants"):
    load_config("linear_eval", "vit,demoo")
  with pytest.raises(supervised.ConfigError, match="model='swin_tiny'.*simmim"):
    load_config("finetune", "simmim,model=swin_tiny")


def test_documented_imagenet_subset_overrides_reach_the_source(monkeypatch):
  """The linear-eval docstring's 10 % and ImageNet-100 overrides are existing config fields
  (a locked config refuses new ones, as a command-line override of a missing field fails) that
  the tfds source takes (`--config.data.train_args.split='train[:10%]'`, `...classes=...`)."""
  from ssl_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  config = load_config("linear_eval", None)
  config.lock()
  config.data.train_args.split = "train[:10%]"
  config.data.train_args.classes = "imagenet100"
  config.data.num_classes = 100
  with pytest.raises(AttributeError):
    config.data.train_args.clases = "imagenet100"
  made = {}
  monkeypatch.setattr(tfds_source, "TfdsSource", lambda **kwargs: made.update(kwargs))
  linear_eval.supervised.registry.get_source(config.data.source,
                                             **config.data.train_args.to_dict())
  assert made == {"name": "imagenet2012", "split": "train[:10%]", "data_dir": "",
                  "classes": "imagenet100"}


def test_loop_device_batch_and_finite_guard():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  spec = {"image": jax.ShapeDtypeStruct((8, 4, 4, 3), jnp.uint8)}
  local = {"image": np.zeros((8, 4, 4, 3), np.uint8), "id": np.array(["a"] * 8)}
  assert set(loop.device_batch(local, mesh, spec)) == {"image"}
  with pytest.raises(ValueError, match="batch\\['image'\\] is float32"):
    loop.device_batch({"image": np.zeros((8, 4, 4, 3), np.float32)}, mesh, spec)
  with pytest.raises(ValueError, match="has no 'image'"):
    loop.device_batch({}, mesh, spec)
  old = {"w": jnp.zeros(2)}
  # (loss, grads, update, flag, state kept): a non-finite loss or gradient never applies the
  # update; a non-finite update from finite gradients is applied but flagged (the host stops).
  for loss, grads, update, finite, applied in ((1.0, 1.0, 1.0, True, True),
                                               (jnp.nan, 1.0, 1.0, False, False),
                                               (1.0, jnp.inf, 1.0, False, False),
                                               (1.0, -jnp.inf, 1.0, False, False),
                                               (1.0, 1.0, jnp.nan, False, True)):
    update = jnp.full(2, update, jnp.float32)
    state, flag, grad_norm = jax.jit(lambda l, g, u: loop.update_if_finite(
        lambda: ({"w": old["w"] + u}, {"w": u}), old, l, {"g": g}))(
            jnp.float32(loss), jnp.float32(grads), update)
    assert bool(flag) == finite
    assert float(grad_norm) == abs(grads) or not np.isfinite(grads)
    np.testing.assert_array_equal(state["w"], old["w"] + update if applied else old["w"])
