"""The generic trainer: every method trains, sharding is transparent, resume is exact."""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

from ssl_jax import checkpoint, parallel, train, weights
from ssl_jax.metrics import read_metrics
from tests.helpers import BlockSource, load_config

METHODS = ["simclr", "byol", "mocov2", "mocov3", "detcon_b", "detcon_s"]


def _config(name, **train_overrides):
  config = load_config(name, "test")
  with config.unlocked():
    for k, v in train_overrides.items():
      config.train[k] = v
  return config


# Learning rates that move a tiny model visibly in a few steps (the papers' rates, scaled by
# batch 16 / 256, barely move it: LARS changes each weight by ~lr * 1e-3 of its norm per step).
FIT_LR = {"lars": 2.0, "sgd": 0.05, "adamw": 2e-3}


@functools.lru_cache(maxsize=None)
def _fixed_batch(name):
  # One device: per-method fitting is about the method; sharding has its own test below.
  config = _config(name, total_steps=100)
  with config.unlocked():
    config.optim.lr_rule = "none"
    config.optim.base_lr = FIT_LR[config.optim.name]
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  return setup, next(train.make_data_iterator(setup))


@pytest.mark.parametrize("name", METHODS)
def test_method_fits_a_fixed_batch(name):
  """Steps on one fixed batch: finite losses, and the loss at a fixed key (same augmentations,
  same sampled masks) is lower after training than at init."""
  setup, local = _fixed_batch(name)
  batch = setup.device_batch(local)
  ts = setup.init_state(batch)
  queue = ts["state"].get("queue")
  key, step0 = jax.random.PRNGKey(123), jax.numpy.int32(0)
  fixed_loss = jax.jit(lambda p, s: setup.method.loss_and_aux(p, s, batch, key, step0)[0])
  before = float(fixed_loss(ts["params"], ts["state"]))
  losses = []
  for _ in range(12):
    if queue is not None:
      # MoCo v2: on a fixed batch the queue fills with keys of these very images (negatives
      # that are copies of the positives), so the loss rises by construction; fitting is
      # checked against the fixed initial queue.
      ts["state"]["queue"] = queue.copy()
    ts, metrics = setup.step(ts, batch)
    assert bool(metrics["finite"]), name
    losses.append(float(metrics["loss"]))
  if queue is not None:
    ts["state"]["queue"] = queue.copy()
  after = float(fixed_loss(ts["params"], ts["state"]))
  assert np.all(np.isfinite(losses)) and np.isfinite(before)
  assert after < before, (name, before, after, losses)
  assert int(ts["step"]) == 12
  feats = setup.method.encode(ts["params"], ts["state"], np.asarray(local["image"][:, 0]))
  assert feats.ndim == 2 and feats.shape[0] == local["image"].shape[0]
  assert np.all(np.isfinite(feats))


@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_step_equals_single_device(fsdp):
  """One step on an 8-device mesh equals the same step on one device (global BN, global loss),
  with params replicated (data parallel) or sharded over the devices too (FSDP).

  Compared: the loss, and each parameter's update (relative to its size: reductions run in a
  different order on 8 shards, so only float rounding may differ).
  """
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    config = _config("byol")
    with config.unlocked():
      config.sharding.fsdp = fsdp and len(devices) > 1
    setup = train.build(config, mesh=parallel.make_mesh(devices), source=BlockSource())
    if config.sharding.fsdp:  # the big kernels really are split over the 8 devices
      specs = [s.spec for s in jax.tree.leaves(setup.state_sharding["params"])]
      assert any("data" in tuple(spec) for spec in specs)
    assert setup.config.train.batch_size % 8 == 0
    local = next(train.make_data_iterator(setup))
    batch = setup.device_batch(local)
    ts = setup.init_state(batch)
    init = jax.device_get(ts["params"])
    ts, metrics = setup.step(ts, batch)
    update = jax.tree.map(lambda new, old: new - old, jax.device_get(ts["params"]), init)
    results.append((update, float(metrics["loss"]), jax.device_get(ts["state"]["batch_stats"]),
                    init))
  (u1, l1, s1, p1), (u8, l8, s8, _) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)

  def close(a, b, p):
    # Updates are new - old in float32: allow the rounding of the parameter itself (~1e-7 |p|)
    # and float noise on parameters whose gradient is zero (a bias followed by BN).
    tol = 2e-3 * np.linalg.norm(a) + 1e-6 * np.linalg.norm(p) + 1e-8
    assert np.linalg.norm(a - b) <= tol, (np.linalg.norm(a - b), np.linalg.norm(a))

  jax.tree.map(close, u1, u8, p1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1, s8)


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
