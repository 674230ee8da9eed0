"""The method interface (Spine v2): a method declares its batch, frozen constants stay out of the
state and the checkpoint, `init_from` starts a backbone from trained weights, and the CLI turns
user mistakes into one line with exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from ssl_jax import checkpoint, config_lib, parallel, registry, train, weights
from ssl_jax.data import pipeline, views
from ssl_jax.methods import base
from tests.helpers import ROOT, BlockSource, load_config

# A value that cannot occur by chance in a trained state: finding it means the teacher leaked.
TEACHER_FILL = 7.125


@pytest.fixture
def toy_registered(monkeypatch):
  monkeypatch.setitem(registry.METHODS, "toy", "tests.toy_method")


def _teacher_file(path, fill=TEACHER_FILL):
  teacher = np.full((8, 4), fill, np.float32)
  teacher[0] = np.arange(4)  # not constant: a wrong axis order would show
  save_file({"teacher": teacher}, str(path))
  return str(path), teacher


def _toy_config(teacher_path, **train_overrides):
  config = load_config("byol", "test")
  with config.unlocked():
    config.method = "toy"
    config.method_args = ml_collections.ConfigDict({"teacher": teacher_path})
    config.data.views = "maskco"
    config.data.num_boxes = 5
    config.train.update({"total_steps": 4, "checkpoint_every_steps": 2, "log_every_steps": 1,
                         **train_overrides})
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_toy_method_with_extra_keys_and_a_frozen_constant(toy_registered, tmp_path):
  """An unchanged trainer trains a method with extra batch keys and a frozen constant; resume is
  exact; the checkpoint holds no copy of the constant; config.json records it with its sha256,
  and a changed constant is refused on resume."""
  teacher_path, teacher = _teacher_file(tmp_path / "teacher.safetensors")
  full = train.run(_toy_config(teacher_path), str(tmp_path / "full"), source=BlockSource())
  part = str(tmp_path / "part")
  first = train.run(_toy_config(teacher_path), part, max_steps=2, source=BlockSource())
  assert first["step"] == 2 and np.isfinite(first["loss"])
  resumed = train.run(_toy_config(teacher_path), part, source=BlockSource())
  assert resumed["step"] == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full["state"]),
               jax.device_get(resumed["state"]))

  # The constant is not in the train state nor in any saved checkpoint.
  for tree in (jax.device_get(resumed["state"]), checkpoint.load_state(part, 2)[1],
               checkpoint.load_state(part)[1]):
    assert not any(x.shape == teacher.shape and np.array_equal(x, teacher) for x in _leaves(tree))
    assert not any(np.any(x == np.float32(TEACHER_FILL)) for x in _leaves(tree)
                   if x.dtype == np.float32)
  # ...and the loss really used it: another teacher gives another loss at the same step.
  setup = train.build(_toy_config(teacher_path), source=BlockSource())
  batch = setup.device_batch(next(train.make_data_iterator(setup)))
  assert set(batch) == {"image", "boxes", "masked_box", "label"}
  ts = setup.init_state(batch)
  loss_fn = jax.jit(lambda p, s, c: setup.method.loss_and_aux(
      p, s, batch, jax.random.PRNGKey(0), 0, c)[0])
  other = {"teacher": np.zeros_like(teacher)}
  assert float(loss_fn(ts["params"], ts["state"], setup.constants)) != pytest.approx(
      float(loss_fn(ts["params"], ts["state"], other)))

  recorded = json.load(open(os.path.join(part, "config.json")))["provenance"]["constants"]
  assert recorded["teacher"]["sha256"] == weights.fingerprint(teacher_path)
  assert recorded["teacher"]["source"] == os.path.abspath(teacher_path)
  _teacher_file(teacher_path, fill=1.0)  # the file changes under the run
  with pytest.raises(config_lib.ConfigError, match="teacher.*changed since this run started"):
    train.run(_toy_config(teacher_path, total_steps=6), part, source=BlockSource())


def test_batch_spec_per_method():
  """DetCon's masks travel in the smallest integer dtype; MaskCo-style keys, one-view recipes and
  multi-crop local views come from config.data alone."""
  config = load_config("detcon_b", "test")
  spec = registry.get_method("detcon_b").batch_spec(config)
  b, s = config.train.batch_size, config.data.image_size
  assert spec["image"].shape == (b, 2, s, s, 3) and spec["image"].dtype == np.uint8
  assert spec["masks"].shape == (b, 2, s, s) and spec["masks"].dtype == np.int8
  with config.unlocked():
    config.data.max_segments = 256
  assert registry.get_method("detcon_b").batch_spec(config)["masks"].dtype == np.int16
  for n, dtype in ((1, np.int8), (128, np.int8), (129, np.int16), (32768, np.int16),
                   (32769, np.int32)):
    assert views.mask_dtype(n) == dtype, n

  # What the views make, per example, for MaskCo boxes, one view (MAE) and multi-crop.
  maskco = pipeline.MakeViews("maskco", 32, num_boxes=17).output_spec()
  assert maskco["boxes"] == ((17, 4), np.float32) and maskco["masked_box"] == ((4,), np.float32)
  assert pipeline.MakeViews("mae", 32).output_spec()["image"][0] == (1, 32, 32, 3)
  multi = pipeline.MakeViews("byol", 32, local_recipe="multicrop_local", local_views=3,
                             local_image_size=16)
  assert multi.output_spec()["local_image"] == ((3, 16, 16, 3), np.uint8)
  record = BlockSource()[0]
  out = multi.random_map(record, np.random.default_rng(0))
  assert out["image"].shape == (2, 32, 32, 3) and out["local_image"].shape == (3, 16, 16, 3)
  cfg = load_config("byol", "test")
  with cfg.unlocked():
    cfg.data.local_views, cfg.data.local_image_size = 3, 16
  assert base.view_batch_spec(cfg, 2)["local_image"].shape == (cfg.train.batch_size, 3, 16, 16, 3)


def test_views_that_do_not_fit_the_method_are_refused_before_compile():
  config = load_config("byol", "test")
  with config.unlocked():
    config.data.views = "mae"  # one view; BYOL needs two
  with pytest.raises(config_lib.ConfigError, match=r"consumes image \[2, 32, 32, 3\].*gives image"
                                                   r" \[1, 32, 32, 3\]"):
    train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  config = load_config("detcon_b", "test")
  with config.unlocked():
    config.data.masks = None
  with pytest.raises(config_lib.ConfigError, match="masks"):
    train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())


def test_init_from_a_workdir_and_a_safetensors_export(tmp_path):
  """`config.init_from` starts the online backbone and its target copy from trained weights
  (a workdir of another method, or an exported file); a mismatched source names the keys."""
  from ssl_jax.export import __main__ as export_cli  # pylint: disable=import-outside-toplevel
  donor = str(tmp_path / "simclr")
  train.run(_byol_like("simclr", total_steps=2), donor, source=BlockSource())
  _, donor_backbone = weights.workdir_encoder(donor)
  exported = str(tmp_path / "donor.safetensors")
  export_cli.export(donor_backbone, weights.model_config_of_workdir(donor), exported)
  for source in (donor, exported):
    config = _byol_like("byol", total_steps=2)
    with config.unlocked():
      config.init_from.source = source
    out = train.run(config, str(tmp_path / f"byol_{os.path.basename(source)}"), max_steps=0,
                    source=BlockSource())
    ts = jax.device_get(out["state"])
    for got in (ts["params"]["backbone"], ts["state"]["target"]["params"]["backbone"]):
      jax.tree.map(np.testing.assert_array_equal, got, donor_backbone["params"])
    jax.tree.map(np.testing.assert_array_equal, ts["state"]["batch_stats"]["backbone"],
                 donor_backbone["batch_stats"])
  config = _byol_like("byol", total_steps=2)
  with config.unlocked():
    config.init_from.source = donor
    config.model.width = 16  # another architecture
  with pytest.raises(weights.WeightsError, match="does not fit the model"):
    train.run(config, str(tmp_path / "mismatch"), max_steps=0, source=BlockSource())


def _byol_like(name, **overrides):
  config = load_config(name, "test")
  with config.unlocked():
    config.train.update(overrides)
  return config


def _cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ssl_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/byol.py:test", "--config.train.batch_size=-3"],
     "error: config.train.batch_size=-3 must be positive"),
    (["--config=configs/detcon_b.py:demoo"],
     "error: config variant 'demoo' is unknown; known variants: coco, demo, epochs, fh_scale, grid, test"),
    (["--config=configs/byol.py", "--config.data.source_args.data_dir=/nonexistent_ssl_jax"],
     "error: tfds dataset 'imagenet2012' is not prepared"),
    (["--config=configs/detcon_b.py"], "error: config.data.source='fh_masks':"),
    (["--config=configs/byol.py:test", "--config.train.batchsize=3"],
     "error: unknown config field in the command line: batchsize"),
    (["--config=configs/nope.py"], "error: --config: cannot load config file 'configs/nope.py'"),
])
def test_cli_user_errors_are_one_line_exit_2(args, message, tmp_path):
  run = _cli(*args, f"--workdir={tmp_path / 'w'}")
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(message), lines
  assert "Traceback" not in run.stdout + run.stderr


def test_trainable_except_freezes_only_the_named_subtrees():
  params = {"backbone": {"patch_embed": {"kernel": 1, "bias": 2}, "blocks": {"w": 3}},
            "projector": {"w": 4}}
  mask = base.trainable_except(params, ("backbone", "patch_embed"), ("absent", "x"))
  assert mask == {"backbone": {"patch_embed": {"kernel": False, "bias": False},
                               "blocks": {"w": True}}, "projector": {"w": True}}
  assert params["backbone"]["patch_embed"] == {"kernel": 1, "bias": 2}  # input untouched
  assert base.trainable_except(params) == jax.tree.map(lambda _: True, params)


@pytest.mark.parametrize("name,variant,frozen", [
    ("mocov3", "test", True), ("masked_mocov3", "test", False)])
def test_patch_embed_frozen_as_the_method_config_says(name, variant, frozen):
  # MoCo v3 freezes its random patch projection (Sec. 4.1); Masked MoCo v3 trains it (Table 1).
  config = load_config(name, variant)
  method = registry.get_method(config.method).make(config)
  spec = method.batch_spec(config)
  params, _ = jax.eval_shape(method.init, jax.random.key(0), spec)
  mask = method.trainable_mask(params)
  flags = {"/".join(str(getattr(k, "key", k)) for k in path): v
           for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any("patch_embed" in p for p in flags)
  assert all(v == (not frozen) for p, v in flags.items() if "patch_embed" in p)
  assert all(v for p, v in flags.items() if "patch_embed" not in p)
