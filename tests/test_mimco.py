"""MimCo (`methods/mimco.py`): its losses against NumPy, the step rebuilt from the network outputs
(patch + image InfoNCE, queues of per-image means, masked positions only), the frozen teacher
(no gradient, bit-identical, never checkpointed, recorded in config.json), the EMA projectors,
fitting a fixed batch, the ablation switches and the teacher sources."""
from __future__ import annotations

import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import checkpoint, config_lib, losses, optim, parallel, registry, train, weights
from ssl_jax.methods import base, mimco, simmim
from tests.helpers import BlockSource, load_config


# ---------------------------------------------------------------------------------------------
# Losses against NumPy

def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _numpy_masked_info_nce(q, k, mask, negatives, tau):
  """Eq. 1 written out per position: −log e^{q·k⁺/τ} / (e^{q·k⁺/τ} + Σ_j e^{q·n_j/τ})."""
  q, k, n = _unit(q), _unit(k), _unit(negatives)
  total, count = 0.0, 0
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      if not mask[b, i]:
        continue
      pos = q[b, i] @ k[b, i] / tau
      neg = n @ q[b, i] / tau
      total += -(pos - np.log(np.exp(pos) + np.exp(neg).sum()))
      count += 1
  return total / max(count, 1)


@pytest.mark.parametrize("b,n,kq", [(3, 5, 7), (1, 1, 1), (2, 4, 16)])
def test_masked_info_nce_matches_numpy(b, n, kq):
  rng = np.random.default_rng(b * 100 + n)
  q, k = rng.normal(size=(2, b, n, 6)).astype(np.float32) * 3
  negatives = rng.normal(size=(kq, 6)).astype(np.float32)
  mask = rng.random((b, n)) < 0.6
  mask[0, 0] = True
  got = losses.masked_info_nce(q, k, mask, negatives, 0.2)
  np.testing.assert_allclose(float(got), _numpy_masked_info_nce(q, k, mask, negatives, 0.2),
                             rtol=1e-5)
  # Only masked positions count: changing a visible position's prediction changes nothing.
  visible = np.argwhere(~mask)
  if len(visible):
    q2 = q.copy()
    q2[tuple(visible[0])] += 5.0
    assert float(losses.masked_info_nce(q2, k, mask, negatives, 0.2)) == float(got)
  q3 = q.copy()
  q3[0, 0] += 5.0
  assert float(losses.masked_info_nce(q3, k, mask, negatives, 0.2)) != float(got)
  # An all-visible mask gives 0; bf16 inputs compute in float32.
  assert float(losses.masked_info_nce(q, k, np.zeros((b, n), bool), negatives, 0.2)) == 0.0
  got16 = losses.masked_info_nce(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                                 mask, jnp.asarray(negatives, jnp.bfloat16), 0.2)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(float(got16), float(got), rtol=0.05)


def test_masked_feature_l1_matches_numpy():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 2, 5, 3)).astype(np.float32)
  mask = np.array([[True, False, True, False, False], [False, False, False, False, True]])
  want = np.abs(pred - target).mean(-1)[mask].mean()
  np.testing.assert_allclose(float(losses.masked_feature_l1(pred, target, mask)), want, rtol=1e-6)
  pred[0, 1] += 10.0  # a visible position
  np.testing.assert_allclose(float(losses.masked_feature_l1(pred, target, mask)), want, rtol=1e-6)
  assert float(losses.masked_feature_l1(pred, target, np.zeros((2, 5)))) == 0.0
  with pytest.raises(ValueError, match="mask"):
    losses.masked_feature_l1(pred, target, mask[:, :3])


def test_mask_at_stride():
  """A feature-map cell of a Swin (stride s·p) is masked when its s×s model patches are."""
  rng = np.random.default_rng(0)
  coarse = rng.random((2, 3, 3)) < 0.5
  fine = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).reshape(2, 144)
  np.testing.assert_array_equal(np.asarray(mimco.mask_at_stride(jnp.asarray(fine), 12, 4)),
                                coarse.reshape(2, 9))
  np.testing.assert_array_equal(np.asarray(mimco.mask_at_stride(jnp.asarray(fine), 12, 1)), fine)


# ---------------------------------------------------------------------------------------------
# The method

@functools.lru_cache(maxsize=None)
def _setup(arg: str = "test", lr: float = 0.0, **method_args):
  config = load_config("mimco", arg)
  with config.unlocked():
    config.train.total_steps = 100
    config.method_args.update(method_args)
    if lr:
      config.optim.lr_rule, config.optim.base_lr, config.optim.warmup_steps = "none", lr, 0
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  return setup, setup.device_batch(next(train.make_data_iterator(setup)))


def _teacher_module(config):
  model = mimco.teacher_model_config(config)
  return registry.get_backbone(model.pop("name"), **model)


def test_step_rebuilt_from_network_outputs():
  """The loss equals Eq. 1 + Eq. 3 recomputed with NumPy from the student's predictions, the
  teacher's features through the momentum projectors, the mask and the queues; the queues
  receive the normalised per-image means / image keys at the pointer. The teacher gets no
  gradient, yet another teacher gives another loss."""
  setup, batch = _setup()
  config, method = setup.config, setup.method
  a = config.method_args
  ts = setup.init_state(batch)
  params, state = ts["params"], ts["state"]
  assert set(params) == {"backbone", "mask_token", "patch_projector", "patch_predictor",
                         "image_projector", "image_predictor"}
  # The momentum projectors are not trained by gradient: they live in the state.
  assert set(state["target"]["params"]) == {"patch_projector", "image_projector"}
  b = config.train.batch_size
  state = {**state, "patch_queue_ptr": jnp.int32(b), "image_queue_ptr": jnp.int32(3 * b)}
  nets = mimco.networks(config)
  teacher = _teacher_module(config)
  rng = jax.random.PRNGKey(7)

  def loss_fn(params, consts):
    return method.loss_and_aux(params, state, batch, rng, jnp.int32(0), consts)

  @jax.jit
  def run(params, consts):
    (loss, (new_state, metrics)), grads = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                             has_aux=True)(params, consts)
    view_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)  # the step's split order
    x = base.augmented_views(view_rng, batch["image"], config.data.views)[:, 0]
    token_mask = simmim.random_mask(mask_rng, b, config, method.backbone)
    out, _ = base.apply_train(nets["net"], params, state["batch_stats"], x, token_mask,
                              rngs={"dropout": dropout_rng})
    fmap = teacher.apply(consts["teacher"], x, train=False)["feature_map"]
    target = state["target"]
    kp, _ = base.apply_train(nets["patch_projector"], target["params"]["patch_projector"],
                             target["batch_stats"]["patch_projector"],
                             fmap.reshape(-1, fmap.shape[-1]))
    ki, _ = base.apply_train(nets["image_projector"], target["params"]["image_projector"],
                             target["batch_stats"]["image_projector"], fmap.mean(axis=(1, 2)))
    return (loss, new_state, metrics, out, token_mask, kp.reshape(b, -1, kp.shape[-1]), ki,
            grads)

  loss, new_state, metrics, out, token_mask, kp, ki, grads = jax.device_get(
      run(params, setup.constants))
  # ViT: the feature map is the patch grid, so the masked positions are the masked tokens.
  patch_np = _numpy_masked_info_nce(out["patch"], kp, token_mask, state["patch_queue"],
                                    a.temperature)
  qi, kin, neg = _unit(out["image"]), _unit(ki), _unit(state["image_queue"])
  pos = (qi * kin).sum(-1) / a.temperature
  logits = np.concatenate([pos[:, None], qi @ neg.T / a.temperature], axis=1)
  image_np = np.mean(np.log(np.exp(logits).sum(1)) - pos)
  np.testing.assert_allclose(float(metrics["patch_loss"]), patch_np, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["image_loss"]), image_np, rtol=1e-5)
  np.testing.assert_allclose(float(loss), patch_np + image_np, rtol=1e-5)
  assert float(metrics["masked_fraction"]) == pytest.approx(10 / 16)
  # Queues: the per-image mean over ALL positions of p₃ᵖ(f'(x)), and p₃ᴵ(avg f'(x)).
  np.testing.assert_allclose(new_state["patch_queue"][b:2 * b], _unit(kp.mean(axis=1)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["image_queue"][3 * b:4 * b], _unit(ki), rtol=1e-5,
                             atol=1e-6)
  for name, ptr in (("patch", b), ("image", 3 * b)):
    old, new = np.asarray(state[f"{name}_queue"]), new_state[f"{name}_queue"]
    np.testing.assert_array_equal(np.delete(new, np.s_[ptr:ptr + b], 0),
                                  np.delete(old, np.s_[ptr:ptr + b], 0))
    assert int(new_state[f"{name}_queue_ptr"]) == (ptr + b) % a.queue_size
  # No gradient reaches the teacher; the student and its heads get one.
  params_grads, teacher_grads = grads
  assert all(not np.any(g) for g in jax.tree.leaves(teacher_grads))
  for name in ("backbone", "mask_token", "patch_predictor", "image_predictor"):
    assert any(np.any(g) for g in jax.tree.leaves(params_grads[name])), name
  # The teacher matters: another teacher, another loss.
  other = jax.tree.map(lambda t: t * 1.5, setup.constants)
  assert float(run(params, other)[0]) != float(loss)


def test_tiny_mimco_fits_a_fixed_batch_with_ema_projectors():
  setup, batch = _setup(lr=2e-3)
  method, a = setup.method, setup.config.method_args
  ts = setup.init_state(batch)
  queues = {k: v.copy() for k, v in ts["state"].items() if k.endswith("_queue")}
  key, step0 = jax.random.PRNGKey(123), jnp.int32(0)
  fixed = jax.jit(lambda p, s: method.loss_and_aux(p, s, batch, key, step0, setup.constants)[0])
  before = float(fixed(ts["params"], ts["state"]))
  teacher = jax.device_get(setup.constants)
  for i in range(12):
    # On one batch the queues would fill with these very images (negatives that are the
    # positives): fitting is checked against the fixed initial queues, as MoCo v2's test.
    ts["state"].update({k: v.copy() for k, v in queues.items()})
    old_target = jax.device_get(ts["state"]["target"]["params"])
    ts, metrics = setup.step(ts, batch)
    assert bool(metrics["finite"])
    # p₃ ← m·p₃ + (1 − m)·p₁ with m cosine from 0.99 (after the optimizer step).
    m = float(optim.ema_momentum(jnp.int32(i), setup.config.train.total_steps, a.momentum))
    new = jax.device_get(ts["params"])
    jax.tree.map(lambda t, o, p: np.testing.assert_allclose(t, m * o + (1 - m) * p, rtol=1e-5,
                                                            atol=1e-7),
                 jax.device_get(ts["state"]["target"]["params"]),
                 old_target, {k: new[k] for k in old_target})
  ts["state"].update(queues)
  after = float(fixed(ts["params"], ts["state"]))
  assert after < before - 0.5, (before, after)
  # The teacher is bit-identical after the steps.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(setup.constants), teacher)


def test_teacher_is_a_recorded_constant_never_checkpointed(tmp_path):
  config = copy.deepcopy(_setup(lr=2e-3)[0].config)  # the fitting test's step: compiled once
  with config.unlocked():
    config.train.update(checkpoint_every_steps=1, log_every_steps=1)
  workdir = str(tmp_path / "run")
  train.run(config, workdir, max_steps=2, source=BlockSource(),
            mesh=parallel.make_mesh(jax.devices()[:1]))
  src = mimco.teacher_source(config)
  variables, _ = weights.load_backbone(src)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    recorded = json.load(f)["provenance"]["constants"]["teacher"]
  assert recorded == {"source": os.path.abspath(src), "sha256": weights.fingerprint(src)}
  leaves = [np.asarray(x) for x in jax.tree.leaves(variables)]
  big = [x for x in leaves if x.size >= 64]
  for step in (1, 2):
    _, state = checkpoint.load_state(workdir, step)
    for x in jax.tree.leaves(state):
      x = np.asarray(x)
      assert not any(x.shape == t.shape and np.array_equal(x, t) for t in big)
  # The student exports as a plain backbone without the teacher or the mask token.
  _, state = checkpoint.load_state(workdir)
  method = registry.get_method("mimco").make(load_config("mimco", "test"))
  assert set(method.encoder(state["params"], state["state"])["params"]) == set(
      variables["params"])


def test_random_test_teacher_is_deterministic(tmp_path):
  model = {"name": "vit_tiny", "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
  one = mimco.random_teacher_file(model, 0, 32, cache_dir=str(tmp_path / "a"))
  two = mimco.random_teacher_file(model, 0, 32, cache_dir=str(tmp_path / "b"))
  other = mimco.random_teacher_file(model, 1, 32, cache_dir=str(tmp_path / "a"))
  assert os.path.basename(one) == os.path.basename(two) != os.path.basename(other)
  assert weights.fingerprint(one) == weights.fingerprint(two) != weights.fingerprint(other)
  variables, arch = weights.load_backbone(one)
  assert arch["name"] == "vit_tiny" and arch["embed_dim"] == 16


@pytest.mark.parametrize("arg,overrides", [
    ("test", {"patch_loss": "l1", "image_weight": 0.0, "masking": False}),
    ("test,model=swin_tiny", {}),
])
def test_ablations_and_swin(arg, overrides):
  setup, batch = _setup(arg, **overrides)
  method, config = setup.method, setup.config
  ts = setup.init_state(batch)
  params, state = ts["params"], ts["state"]
  rng = jax.random.PRNGKey(1)
  nets, teacher = mimco.networks(config), _teacher_module(config)

  @jax.jit
  def run(params, consts):
    (loss, (_, metrics)), teacher_grads = jax.value_and_grad(
        lambda c: method.loss_and_aux(params, state, batch, rng, jnp.int32(0), c),
        has_aux=True)(consts)
    view_rng, _, dropout_rng = jax.random.split(rng, 3)
    x = base.augmented_views(view_rng, batch["image"], config.data.views)[:, 0]
    out, _ = base.apply_train(nets["net"], params, state["batch_stats"], x, None,
                              rngs={"dropout": dropout_rng})
    fmap = teacher.apply(consts["teacher"], x, train=False)["feature_map"]
    return loss, metrics, out, fmap, teacher_grads

  loss, metrics, out, fmap, teacher_grads = jax.device_get(run(params, setup.constants))
  assert np.isfinite(float(loss))
  assert all(not np.any(g) for g in jax.tree.leaves(teacher_grads))
  if overrides:
    # Distillation (no mask, no mask token: every position counts) with the ℓ1 patch loss on
    # the teacher's per-position standardised features; no image loss, queues or EMA heads.
    assert set(params) == {"backbone", "patch_projector", "patch_predictor"}
    assert not any(k.endswith("queue") for k in state) and not state["target"]["params"]
    assert float(metrics["masked_fraction"]) == 1.0
    t = np.asarray(fmap, np.float64).reshape(fmap.shape[0], -1, fmap.shape[-1])
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    err = np.abs(np.asarray(out["patch"], np.float64) - t).mean(-1)
    np.testing.assert_allclose(float(loss), err.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["patch_loss"]), float(loss), rtol=1e-6)
  else:  # Swin: the mask is taken at the stride-8 final grid (4×4 cells, 10 masked).
    assert float(metrics["masked_fraction"]) == pytest.approx(10 / 16)
    assert metrics["features"].shape == (config.train.batch_size, 32)


def test_teacher_from_a_mocov3_workdir(tmp_path):
  """Stage 1 → stage 2: a MoCo v3 run of ours is the teacher (online or target network), its
  architecture read from the workdir; provenance names the step and part."""
  moco = load_config("mocov3", "test")
  with moco.unlocked():
    moco.train.update(total_steps=1, checkpoint_every_steps=1)
  workdir = str(tmp_path / "mocov3")
  train.run(moco, workdir, source=BlockSource(), mesh=parallel.make_mesh(jax.devices()[:1]))
  config = load_config("mimco", "test")
  with config.unlocked():
    config.method_args.teacher = workdir
    config.method_args.teacher_part = "target"
  method = registry.get_method("mimco").make(config)
  constants = method.load_constants(config)
  _, want = weights.workdir_encoder(workdir, None, "target")
  jax.tree.map(np.testing.assert_array_equal, constants.tree["teacher"], want)
  assert constants.sources["teacher"] == {"source": workdir, "step": None, "part": "target"}
  assert mimco.teacher_model_config(config)["name"] == "vit_tiny"


def test_demo_without_its_teacher_gives_the_command(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = load_config("mimco", "demo")
  method = registry.get_method("mimco").make(config)
  with pytest.raises(weights.WeightsError) as info:
    method.load_constants(config)
  message = str(info.value)
  assert "\n" not in message and isinstance(info.value, config_lib.UserError)
  assert ("python -m ssl_jax.main --config=configs/mocov3.py:demo "
          "--workdir=workdirs/mocov3_demo") in message


def test_a_teacher_of_another_shape_is_refused(tmp_path):
  config = load_config("mimco", "test")
  with config.unlocked():
    config.method_args.teacher_model.embed_dim = 16
  method = registry.get_method("mimco").make(config)
  with pytest.raises(weights.WeightsError, match="same width and grid"):
    method.load_constants(config)


@pytest.mark.parametrize("field,value,message", [
    ("teacher", "", "teacher is empty"),
    ("patch_loss", "mse", "patch_loss"),
    ("queue_size", 40, "queue_size=40"),
    ("image_weight", -1.0, "image_weight"),
    ("teacher_part", "ema", "teacher_part"),
])
def test_validation_names_the_field(field, value, message):
  config = load_config("mimco", "test")
  with config.unlocked():
    config.method_args[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, num_devices=1)


def test_swin_mask_patch_must_cover_whole_cells():
  config = load_config("mimco", "test,model=swin_tiny")
  with config.unlocked():
    config.method_args.mask_patch_size = 4
  with pytest.raises(config_lib.ConfigError, match="multiple of the encoder stride 8"):
    config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize("arg", ["test", "test,model=swin_tiny", "demo"])
def test_configs_validate(arg):
  config_lib.validate(load_config("mimco", arg), num_devices=1)


def test_paper_presets():
  for arg, name, teacher in ((None, "vit_small", "vit_small"), ("model=swin_tiny", "swin_tiny",
                                                                 "swin_tiny")):
    c = load_config("mimco", arg)
    assert c.model.name == name and c.method_args.teacher_model.name == teacher
    assert (c.optim.name, c.optim.base_lr, c.optim.lr_rule, c.optim.weight_decay) == (
        "adamw", 5e-4, "linear", 0.05)
    # lr = 1e-3 × bs/512 (paper) = 5e-4 × bs/256.
    assert optim.scale_lr(c.optim.base_lr, 2048) == pytest.approx(1e-3 * 2048 / 512)
    assert (c.train.batch_size, c.train.num_epochs, c.optim.warmup_epochs) == (2048, 100, 10)
    assert (c.method_args.queue_size, c.method_args.temperature, c.method_args.mask_ratio,
            c.method_args.mask_patch_size) == (4096, 0.2, 0.6, 32)
    assert c.data.views == "simmim" and c.data.image_size == 224
    with pytest.raises(config_lib.ConfigError, match="teacher is empty"):
      config_lib.validate(c, num_devices=1)
