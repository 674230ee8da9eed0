"""The generic trainer: every method trains, sharding is transparent, resume is exact."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import checkpoint, losses, parallel, train, weights
from ssl_jax.methods import base
from ssl_jax.metrics import read_metrics
from ssl_jax.models import heads
from ssl_jax.ops import mask_pooling
from tests.helpers import BlockSource, load_config

METHODS = ["simclr", "byol", "mocov2", "mocov3", "detcon_b", "detcon_s"]


def _config(name, **train_overrides):
  config = load_config(name, "test")
  with config.unlocked():
    for k, v in train_overrides.items():
      config.train[k] = v
  return config


# Learning rates that move a tiny model visibly in one step (the papers' rates, scaled by
# batch 16 / 256, barely move it: LARS changes each weight by ~lr * 1e-3 of its norm per step).
FIT_LR = {"lars": 2.0, "sgd": 0.05, "adamw": 2e-3}
# The EMA / momentum coefficient at step 0 in these tests: far from 0, 1/2 and 1, so a missing,
# swapped or copied update is visible.
TAU = 0.75
# Methods whose official ResNet zeroes the last BN γ of each residual block.
ZERO_INIT = {"simclr", "byol", "detcon_b", "detcon_s"}


def _deterministic_views(rng, images, recipe_name, *, normalize=True):
  """`base.augmented_views` without the random colour ops (the loss is then a function of the
  parameters and the batch alone, and the test can rebuild it)."""
  del rng, recipe_name
  x = images.astype(jnp.float32) / 255.0
  return base.normalized_views(x) if normalize else x


@functools.lru_cache(maxsize=None)
def _fixed_batch(name):
  # One device: the method's definition is checked here; sharding has its own tests below.
  config = _config(name, total_steps=100)
  with config.unlocked():
    config.optim.lr_rule = "none"
    config.optim.base_lr = FIT_LR[config.optim.name]
    for field in ("ema_base", "momentum"):
      if field in config.method_args:
        config.method_args[field] = TAU
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  return setup, next(train.make_data_iterator(setup))


def _mlp(config, role):
  """The head `role` of `config.method` as its official code builds it (tests/test_heads.py
  checks the layer lists), written here independently of the method files."""
  a = config.method_args
  hidden = a.projector_hidden if role == "projector" else a.get("predictor_hidden")
  if config.method in ("simclr", "detcon_s"):
    return heads.MLP(hidden, a.projector_dim, 2, norm="bn", last_norm="bn_scale",
                     use_bias=False)
  if config.method in ("byol", "detcon_b"):
    return heads.MLP(hidden, a.projector_dim, 2, norm="bn", output_bias=False)
  if config.method == "mocov2":
    return heads.MLP(hidden, a.projector_dim, 2, norm="none")
  return heads.MLP(hidden, a.projector_dim, 3 if role == "projector" else 2, norm="bn",
                   last_norm="bn_noaffine", use_bias=False)


def _apply(module, params, stats, x):
  """Train-mode forward (batch statistics), as every method runs its networks."""
  variables = {"params": params, **({"batch_stats": stats} if stats else {})}
  return module.apply(variables, x, train=True, mutable=["batch_stats"])[0]


def _np_grid(masks, g):
  """Official DetCon grid: one-hot at full resolution, average pool to g x g, argmax."""
  b, h, w = masks.shape
  ids = np.unique(masks[masks >= 0])
  onehot = (masks[..., None] == ids).reshape(b, g, h // g, g, w // g, len(ids)).mean((2, 4))
  return np.where(onehot.max(-1) > 0, ids[onehot.argmax(-1)], -1).reshape(b, g * g)


def _np_mask_pool(fmap, grid, sample):
  """Mean feature over the cells of each sampled id ([B, R, C]; zero where it has none)."""
  b, h, w, c = fmap.shape
  flat = np.asarray(fmap, np.float64).reshape(b, h * w, c)
  out = np.zeros(sample.shape + (c,))
  for i in range(b):
    for r, m in enumerate(sample[i]):
      cells = grid[i] == m
      if m >= 0 and cells.any():
        out[i, r] = flat[i, cells].mean(0)
  return out


def _reference_loss(setup, params, state, batch, sampled):
  """The method's loss rebuilt from its networks' outputs with `losses.*` (deterministic views):
  which outputs are compared with which, through which heads, with which negatives."""
  config, a = setup.config, setup.config.method_args
  backbone, name = setup.method.backbone, setup.config.method
  x = np.asarray(batch["image"], np.float32) / 255.0
  x = np.asarray(base.normalized_views(jnp.asarray(x)))
  stats = state["batch_stats"]
  target = state.get("target", {})
  projector, predictor = _mlp(config, "projector"), _mlp(config, "predictor")

  def project(p, s, images, key="pooled", pool=None):
    out = _apply(backbone, p["backbone"], s.get("backbone"), images)
    h = out[key] if pool is None else pool(out[key])
    return _apply(projector, p["projector"], s.get("projector"), h)

  def predict(z):
    return _apply(predictor, params["predictor"], stats.get("predictor"), z)

  views = [x[:, 0], x[:, 1]]
  if name == "simclr":  # both views in one batch of 2B (v1 concatenates them)
    z = project(params, stats, np.concatenate(views))
    b = x.shape[0]
    return 2.0 * losses.nt_xent(z[:b], z[b:], a.temperature)
  if name == "byol":
    p = [predict(project(params, stats, v)) for v in views]
    z = [project(target["params"], target["batch_stats"], v) for v in views]
    return losses.byol_loss(p[0], z[1]) + losses.byol_loss(p[1], z[0])
  if name == "mocov2":
    q = project(params, stats, views[0])
    k = project(target["params"], target["batch_stats"], views[1])
    return losses.info_nce(q, k, a.temperature, negatives=state["queue"])
  if name == "mocov3":
    q = [predict(project(params, stats, v)) for v in views]
    k = [project(target["params"], target["batch_stats"], v) for v in views]
    return 2 * a.temperature * (losses.info_nce(q[0], k[1], a.temperature)
                                + losses.info_nce(q[1], k[0], a.temperature))
  # DetCon: ROIs = the sampled ids of each view (captured from the method), pooled over the
  # cells they win on the feature grid, through projector (and predictor) row by row.
  masks = np.asarray(batch["masks"]).astype(np.int32)
  ids = [np.asarray(sampled[v]) for v in range(2)]

  def rois(p, s, v):
    def pool(fmap):
      g = fmap.shape[1]
      pooled = _np_mask_pool(fmap, _np_grid(masks[:, v], g), ids[v])
      return jnp.asarray(pooled.reshape(-1, pooled.shape[-1]), jnp.float32)
    return project(p, s, views[v], key="feature_map", pool=pool).reshape(ids[v].shape + (-1,))

  z = [rois(params, stats, v) for v in range(2)]
  if name == "detcon_s":  # the online projections are predictions and targets
    preds, targets = z, z
  else:
    preds = [predict(zv.reshape(-1, zv.shape[-1])).reshape(zv.shape) for zv in z]
    targets = [rois(target["params"], target["batch_stats"], v) for v in range(2)]
  return losses.detcon_loss(preds[0], preds[1], targets[0], targets[1], ids[0], ids[1], ids[0],
                            ids[1], temperature=a.temperature)


@pytest.mark.parametrize("name", METHODS)
def test_method_step_is_its_definition(name, monkeypatch):
  """Per method, on one fixed batch with deterministic views:
  - the loss equals the loss rebuilt from the networks' outputs with `losses.*` (right positives,
    heads, predictor, negatives);
  - no gradient reaches the target network (stop-gradient), the online one gets some;
  - one optimizer step: target = τ·old target + (1 − τ)·new online on backbone and projector
    (τ = τ_base at step 0), MoCo v2's queue rows [ptr, ptr + B) hold the L2-normalised keys
    and ptr advanced by B (the rest untouched), the step's loss is the same loss;
  - the ResNet starts with the last BN γ of each block at 0 where the official code does."""
  monkeypatch.setattr(base, "augmented_views", _deterministic_views)
  sampled = []
  if name.startswith("detcon"):
    pool = mask_pooling.mask_pool

    def spy(features, grid_ids, sample_ids):
      jax.debug.callback(lambda s: sampled.append(np.asarray(s)), sample_ids, ordered=True)
      return pool(features, grid_ids, sample_ids)
    monkeypatch.setattr(mask_pooling, "mask_pool", spy)
  setup, local = _fixed_batch(name)
  method, batch = setup.method, setup.device_batch(local)
  ts = setup.init_state(batch)
  if setup.config.model.name.startswith("resnet"):  # :test ResNets have basic blocks
    for block in ("layer1_0", "layer4_1"):
      bn = ts["params"]["backbone"][block]
      assert np.all(np.asarray(bn["bn2"]["scale"]) == (0.0 if name in ZERO_INIT else 1.0))
      assert np.all(np.asarray(bn["bn1"]["scale"]) == 1.0)
  has_target = "target" in ts["state"]
  if has_target:  # a target that differs from the online network, so the EMA is visible
    target = ts["state"]["target"]
    target = {**target, "params": jax.tree.map(lambda t: t * 1.5 + 0.01, target["params"])}
    ts["state"] = {**ts["state"], "target": target}
  b = local["image"].shape[0]
  if "queue_ptr" in ts["state"]:  # write in the middle of the queue, not at row 0
    ts["state"] = {**ts["state"], "queue_ptr": ts["state"]["queue_ptr"] + b}
  before = jax.device_get(ts)
  key = jax.random.fold_in(jax.random.PRNGKey(setup.config.train.seed), 0)  # the step's key

  def loss_fn(params, target_params, state):
    if target_params is not None:
      state = {**state, "target": {**state["target"], "params": target_params}}
    return method.loss_and_aux(params, state, batch, key, jnp.int32(0))

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  target_params = ts["state"]["target"]["params"] if has_target else None
  sampled.clear()  # init traced the pooling too
  (loss, _), (g_online, g_target) = grad_fn(ts["params"], target_params, ts["state"])
  jax.effects_barrier()
  want = _reference_loss(setup, before["params"], before["state"], local, sampled)
  np.testing.assert_allclose(float(loss), float(want), rtol=2e-4, atol=1e-5)
  assert any(np.any(g != 0) for g in jax.tree.leaves(g_online))
  if has_target:
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_target)), name

  ts, metrics = setup.step(ts, batch)
  assert bool(metrics["finite"]) and int(ts["step"]) == 1
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  after = jax.device_get(ts)
  if has_target:
    for key_ in ("backbone", "projector"):
      jax.tree.map(
          lambda new, old, online: np.testing.assert_allclose(
              new, TAU * np.float64(old) + (1 - TAU) * np.float64(online), rtol=1e-5,
              atol=1e-6),
          after["state"]["target"]["params"][key_], before["state"]["target"]["params"][key_],
          after["params"][key_])
    assert "predictor" not in after["state"]["target"]["params"]
  if name == "mocov2":
    x = base.normalized(jnp.asarray(local["image"][:, 1]))
    t = before["state"]["target"]
    keys = _apply(setup.method.backbone, t["params"]["backbone"], t["batch_stats"]["backbone"], x)
    keys = _apply(_mlp(setup.config, "projector"), t["params"]["projector"], {},
                  keys["pooled"])
    queue0, queue1 = before["state"]["queue"], after["state"]["queue"]
    assert int(before["state"]["queue_ptr"]) == b and int(after["state"]["queue_ptr"]) == 2 * b
    np.testing.assert_allclose(queue1[b:2 * b], keys / np.linalg.norm(keys, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(queue1[:b], queue0[:b])
    np.testing.assert_array_equal(queue1[2 * b:], queue0[2 * b:])
  feats = method.encode(ts["params"], ts["state"], np.asarray(local["image"][:, 0]))
  assert feats.shape[0] == local["image"].shape[0] and np.all(np.isfinite(feats))


def _simulated_process_array(locals_, mesh, global_shape):
  """The global array `jax.make_array_from_process_local_data` assembles when process p holds
  `locals_[p]` and owns the mesh devices that a P-process run lists p-th (JAX lists the devices
  of a multi-process run process by process). Its documented rule: the rows of the global
  array a process's devices hold, in increasing order, are filled from consecutive rows of that
  process's local batch."""
  sharding = parallel.batch_sharding(mesh)
  order = list(jax.devices())
  per_process = len(order) // len(locals_)
  rows = sharding.devices_indices_map(global_shape)
  shards = {}
  for p, local in enumerate(locals_):
    mine = [d for d in mesh.devices.flat if order.index(d) // per_process == p]
    offset = 0
    for d in sorted(mine, key=lambda d: rows[d][0].start):
      n = rows[d][0].stop - rows[d][0].start
      shards[d] = jax.device_put(local[offset:offset + n], d)
      offset += n
    assert offset == local.shape[0], "a process's local batch must fill exactly its devices"
  return jax.make_array_from_single_device_arrays(
      global_shape, sharding, [shards[d] for d in mesh.devices.flat])


def test_two_processes_form_the_one_process_global_batch(monkeypatch):
  """Simulated 2 processes x 4 devices (`launch/local_multiprocess.sh`'s layout): each process's
  local batches from the trainer's own iterator, placed on its devices as
  `make_array_from_process_local_data` does, form the 1-process global batch row for row, at
  step 0 on and from a resume step on. (A permutation would change nothing in most losses but
  the data each step sees at another process count, and so the resume guarantee.)"""
  setup = train.build(_config("detcon_b"), mesh=parallel.make_mesh(jax.devices()[:8]),
                      source=BlockSource())
  b = setup.config.train.batch_size
  for start in (0, 3):
    it = train.make_data_iterator(setup, start)
    one = [next(it) for _ in range(2)]
    per_process = []
    for p in range(2):
      with monkeypatch.context() as m:
        m.setattr(jax, "process_index", lambda p=p: p)
        m.setattr(jax, "process_count", lambda: 2)
        it = train.make_data_iterator(setup, start)
        per_process.append([next(it) for _ in range(2)])
    for k in range(2):
      want = setup.device_batch(one[k])
      for key, spec in setup.batch_spec.items():
        parts = [per_process[p][k][key] for p in range(2)]
        assert all(part.shape[0] == b // 2 for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), one[k][key], err_msg=key)
        got = _simulated_process_array(parts, setup.mesh, spec.shape)
        assert got.sharding == want[key].sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want[key]), err_msg=key)
        np.testing.assert_array_equal(np.asarray(want[key]), one[k][key], err_msg=key)
    assert not np.array_equal(one[0]["image"], one[1]["image"])


def test_fsdp_step_shards_the_kernels():
  """FSDP (`config.sharding.fsdp`): the big kernels and their optimizer state are split over the
  8 devices, stay split after a step, and the step is the 1-device step (float rounding only).
  (The sharding rules are what this checks; the data layout across processes is the test
  above.)"""
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    config = _config("byol")
    with config.unlocked():
      config.sharding.fsdp = len(devices) > 1
    setup = train.build(config, mesh=parallel.make_mesh(devices), source=BlockSource())
    local = next(train.make_data_iterator(setup))
    batch = setup.device_batch(local)
    ts = setup.init_state(batch)
    init = jax.device_get(ts["params"])
    ts, metrics = setup.step(ts, batch)
    if config.sharding.fsdp:
      split = [x for x in jax.tree.leaves(ts["params"]) if "data" in tuple(x.sharding.spec)]
      assert split and all(x.addressable_shards[0].data.size * 8 == x.size for x in split)
      assert any("data" in tuple(x.sharding.spec) for x in jax.tree.leaves(ts["opt_state"])
                 if hasattr(x, "sharding"))
    update = jax.tree.map(lambda new, old: new - old, jax.device_get(ts["params"]), init)
    results.append((update, float(metrics["loss"]), init))
  (u1, l1, p1), (u8, l8, _) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)

  def close(a, b, p):
    # Updates are new - old in float32: allow the rounding of the parameter itself (~1e-7 |p|)
    # and float noise on parameters whose gradient is zero (a bias followed by BN).
    tol = 2e-3 * np.linalg.norm(a) + 1e-6 * np.linalg.norm(p) + 1e-8
    assert np.linalg.norm(a - b) <= tol, (np.linalg.norm(a - b), np.linalg.norm(a))

  jax.tree.map(close, u1, u8, p1)


def test_resume_is_bit_identical(tmp_path):
  """Stop after 3 steps and rerun: the same params and losses as one uninterrupted run (the
  resumed run reads the data from its step on: `tests/test_pipeline.py` checks the stream)."""
  overrides = dict(total_steps=6, checkpoint_every_steps=2, log_every_steps=1)
  full = train.run(_config("byol", **overrides), str(tmp_path / "full"), source=BlockSource())
  part = str(tmp_path / "part")
  first = train.run(_config("byol", **overrides), part, max_steps=3, source=BlockSource())
  assert first["step"] == 3
  resumed = train.run(_config("byol", **overrides), part, source=BlockSource())
  assert resumed["step"] == 6
  a, b = jax.device_get(full["state"]), jax.device_get(resumed["state"])
  jax.tree.map(np.testing.assert_array_equal, a, b)
  losses = lambda w: [m["loss"] for m in read_metrics(w) if "loss" in m]  # noqa: E731
  assert losses(part) == losses(str(tmp_path / "full"))
  lines = read_metrics(part)
  assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5, 6]
  for m in lines:
    if "loss" in m:
      assert {"lr", "img/s", "img/s/core", "data/skipped"} <= m.keys()
  assert os.path.exists(os.path.join(part, "config.json"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  from ssl_jax.methods import byol  # pylint: disable=import-outside-toplevel
  make = byol.make

  def make_nan_after_3(config):
    method = make(config)

    def loss_and_aux(params, state, batch, rng, step, constants=None):
      loss, aux = method.loss_and_aux(params, state, batch, rng, step, constants)
      return loss * jax.numpy.where(step >= 3, jax.numpy.nan, 1.0), aux

    return method.__class__(**{**method.__dict__, "loss_and_aux": loss_and_aux})

  monkeypatch.setattr(byol, "make", make_nan_after_3)
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError, match="at step 4"):
    train.run(_config("byol", total_steps=8, checkpoint_every_steps=2), workdir,
              source=BlockSource())
  manager = checkpoint.make_manager(workdir, keep=3, async_save=False)
  assert manager.latest_step() == 2
  manager.close()
  _, state = checkpoint.load_state(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_export_from_a_training_workdir(tmp_path):
  """`python -m ssl_jax.export` path: a workdir's checkpoint -> safetensors -> same variables."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from ssl_jax.export import __main__ as export_cli  # pylint: disable=import-outside-toplevel
  from ssl_jax.export import torch as torch_export  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  result = train.run(_config("byol", total_steps=2, checkpoint_every_steps=2), workdir,
                     source=BlockSource())
  for part, tree in (("online", result["state"]["params"]["backbone"]),
                     ("target", result["state"]["state"]["target"]["params"]["backbone"])):
    variables, arch, step = export_cli.load_from_workdir(workdir, None, part)
    assert step == 2 and arch["name"] == "resnet18"
    out = str(tmp_path / f"{part}.safetensors")
    export_cli.export(variables, arch, out, metadata=export_cli.run_metadata(workdir))
    back = torch_export.from_torch_state_dict(load_file(out), arch)
    jax.tree.map(np.testing.assert_array_equal, back["params"], jax.device_get(tree))
  heads = str(tmp_path / "heads.safetensors")
  assert export_cli.export_heads(workdir, None, heads) > 0
  assert {k.split(".")[0] for k in load_file(heads)} == {"projector", "predictor"}
  simclr_dir = str(tmp_path / "simclr")
  train.run(_config("simclr", total_steps=1, checkpoint_every_steps=1), simclr_dir,
            source=BlockSource())
  with pytest.raises(weights.WeightsError, match="no target"):
    export_cli.load_from_workdir(simclr_dir, None, "target")


def test_sigterm_saves_before_exit(tmp_path):
  """Preemption: SIGTERM to `python -m ssl_jax.main` saves the current step and exits cleanly."""
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from tests.helpers import ROOT  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "sigterm"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
  cmd = [sys.executable, "-m", "ssl_jax.main", "--config=configs/byol.py:test",
         f"--workdir={workdir}", "--config.train.total_steps=100000",
         "--config.train.checkpoint_every_steps=100000", "--config.train.log_every_steps=1"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines()):
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM received" in out
  logged = max(m["step"] for m in read_metrics(str(workdir)) if "loss" in m)
  manager = checkpoint.make_manager(str(workdir), keep=3, async_save=False)
  saved = manager.latest_step()
  manager.close()
  assert saved is not None and saved >= logged >= 1
