"""Config files load in every variant, and invalid values fail before compile, naming the field."""
from __future__ import annotations

import pytest

from ssl_jax import config_lib
from tests.helpers import load_config

CONFIGS = ["simclr", "byol", "mocov2", "mocov3", "detcon_b", "detcon_s", "maskco", "mae", "ccmim",
           "simmim", "mimco", "masked_mocov3", "masked_byol"]
# Variants beyond demo/test that each config documents.
VARIANTS = {"detcon_b": ["epochs=300", "coco", "grid", "coco,grid", "coco,fh_scale=500",
                         "grid,test"],
            "detcon_s": ["coco", "grid", "epochs=200", "coco,fh_scale=1500"],
            "maskco": ["plus_in", "wd=1e-4"],
            "ccmim": ["paper"], "simmim": ["model=swin_tiny", "model=vit_base"],
            "mocov3": ["model=vit_small"], "byol": ["epochs=40", "epochs=100", "epochs=300"],
            "masked_mocov3": ["in100", "n=4", "aug=strong", "aug=medium"],
            "masked_byol": ["in100", "aug=strong"]}
# MimCo's paper setting has no teacher until the user names one (refused on purpose).
NEEDS_USER_INPUT = {("mimco", None)}


@pytest.mark.parametrize("name,arg", [(n, a) for n in CONFIGS for a in [None, "demo", "test"]
                                      + VARIANTS.get(n, []) if (n, a) not in NEEDS_USER_INPUT])
def test_configs_load_and_validate(name, arg):
  config = load_config(name, arg)
  config_lib.validate(config, num_devices=8 if arg == "test" else 1)


def test_paper_presets():
  b300, b1000 = load_config("detcon_b", "epochs=300"), load_config("detcon_b", None)
  assert (b300.optim.base_lr, b300.optim.weight_decay, b300.method_args.ema_base) == (0.3, 1e-6, 0.99)
  assert (b1000.optim.base_lr, b1000.optim.weight_decay, b1000.method_args.ema_base) == (
      0.2, 1.5e-6, 0.996)
  assert b1000.train.num_epochs == 1000  # the default the docstring names
  assert b1000.train.batch_size == 4096 and b1000.optim.warmup_epochs == 10
  s = load_config("detcon_s", None)
  assert (s.optim.base_lr, s.optim.weight_decay, s.method_args.projector_dim) == (0.3, 1e-6, 128)
  assert load_config("detcon_b", "coco").optim.schedule == "piecewise"
  assert load_config("detcon_b", "grid").data.masks == "grid"
  m3 = load_config("mocov3", None)
  assert (m3.optim.name, m3.optim.base_lr, m3.optim.weight_decay, m3.optim.warmup_epochs) == (
      "adamw", 1.5e-4, 0.1, 40)
  m2 = load_config("mocov2", None)
  assert (m2.method_args.queue_size, m2.method_args.momentum, m2.method_args.temperature) == (
      65536, 0.999, 0.2)


# deepmind-research byol/configs/byol.py: _LR_PRESETS = {40: 0.45, 100: 0.45, 300: 0.3,
# 1000: 0.2}, _WD_PRESETS = {40: 1e-6, 100: 1e-6, 300: 1e-6, 1000: 1.5e-6},
# _EMA_PRESETS = {40: 0.97, 100: 0.99, 300: 0.99, 1000: 0.996}.
BYOL_TABLE = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
              1000: (0.2, 1.5e-6, 0.996)}


@pytest.mark.parametrize("epochs", sorted(BYOL_TABLE))
def test_byol_epoch_presets_are_the_official_table(epochs):
  c = load_config("byol", None if epochs == 1000 else f"epochs={epochs}")
  assert (c.optim.base_lr, c.optim.weight_decay, c.method_args.ema_base) == BYOL_TABLE[epochs]
  assert c.train.num_epochs == epochs and c.optim.warmup_epochs == 10


@pytest.mark.parametrize("name,arg", [("byol", "epochs=200"), ("byol", "epochs=500"),
                                      ("detcon_b", "epochs=100"), ("detcon_b", "epochs=500"),
                                      ("detcon_b", "coco,epochs=1296")])
def test_epochs_without_an_official_row_are_refused(name, arg):
  with pytest.raises(config_lib.ConfigError, match=r"official presets for .* epochs only"):
    load_config(name, arg)


@pytest.mark.parametrize("name", ["simclr", "byol", "detcon_b", "detcon_s"])
@pytest.mark.parametrize("arg", [None, "test", "demo"])
def test_zero_init_residual_is_on_where_the_official_code_does_it(name, arg):
  assert load_config(name, arg).model.zero_init_residual is True


@pytest.mark.parametrize("name", ["mocov2", "maskco"])
def test_zero_init_residual_stays_off_elsewhere(name):
  assert not load_config(name, None).model.get("zero_init_residual", False)


def test_mocov3_vit_small_has_mocov3s_twelve_heads():
  from ssl_jax import models  # pylint: disable=import-outside-toplevel
  c = load_config("mocov3", "model=vit_small")
  assert c.model.name == "vit_small" and c.model.num_heads == 12
  backbone = models.get_backbone(**c.model.to_dict())
  assert (backbone.embed_dim, backbone.depth, backbone.num_heads) == (384, 12, 12)
  assert models.get_backbone("vit_small").num_heads == 6  # timm's vit_small stays timm's
  assert load_config("mocov3", None).model.num_heads == 12
  with pytest.raises(config_lib.ConfigError, match="model='vit_tiny'"):
    load_config("mocov3", "model=vit_tiny")


def test_detcon_data_variants():
  """:coco reads COCO images (an image folder) with FH masks at the paper's COCO scales, :grid
  reads the plain image source (no FH precompute), 256 segments by default."""
  b = load_config("detcon_b", None)
  assert b.data.source == "fh_masks" and b.data.max_segments == 256
  assert (b.data.source_args.scale, b.data.source_args.min_size) == (1000, 1000)
  coco = load_config("detcon_b", "coco,fh_scale=500")
  assert coco.data.source == "fh_masks"
  assert (coco.data.source_args.scale, coco.data.source_args.min_size) == (500, 500)
  grid = load_config("detcon_b", "grid")
  assert (grid.data.source, grid.data.masks) == ("tfds", "grid")
  assert grid.data.source_args.name == "imagenet2012"
  coco_grid = load_config("detcon_s", "coco,grid")
  assert (coco_grid.data.source, coco_grid.data.masks) == ("image_folder", "grid")
  assert set(coco_grid.data.source_args) == {"root"}
  test_grid = load_config("detcon_b", "grid,test")
  assert (test_grid.data.source, test_grid.data.masks) == ("builtin_photos", "grid")
  with pytest.raises(config_lib.ConfigError, match="fh_scale=700"):
    load_config("detcon_b", "coco,fh_scale=700")
  with pytest.raises(config_lib.ConfigError, match="add `coco`"):
    load_config("detcon_b", "fh_scale=500")


def test_detcon_s_has_no_ema_or_predictor_fields():
  s, b = load_config("detcon_s", None), load_config("detcon_b", None)
  assert "ema_base" not in s.method_args and "predictor_hidden" not in s.method_args
  assert "ema_base" in b.method_args and "predictor_hidden" in b.method_args


def test_parse_arg():
  known = ("epochs", "coco", "lr", "name")
  assert config_lib.parse_arg("epochs=1000,coco,lr=0.5,name=x", known) == {
      "epochs": 1000, "coco": True, "lr": 0.5, "name": "x"}
  assert config_lib.parse_arg(None) == {}
  with pytest.raises(config_lib.ConfigError, match="'demoo' is unknown; known variants: demo, test"):
    config_lib.parse_arg("demoo")


@pytest.mark.parametrize("field,value,message", [
    ("method", "nope", r"config.method='nope' is unknown"),
    ("optim.base_lr", -0.1, r"config.optim.base_lr=-0.1 must be a positive"),
    ("train.batch_size", 12, r"config.train.batch_size=12 is not divisible by the 8 devices"),
    ("optim.name", "adam", r"config.optim.name='adam' must be one of"),
    ("data.image_size", 36, r"config.data.image_size=36 is not divisible by config.model.patch_size=8"),
    ("data.masks", "boxes", r"config.data.masks='boxes'"),
    ("train.log_every_steps", 0, r"config.train.log_every_steps=0 must be positive"),
])
def test_invalid_values_name_the_field(field, value, message):
  config = load_config("mocov3", "test")
  section, _, key = field.rpartition(".")
  with config.unlocked():
    (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config, num_devices=8)


def test_detcon_without_masks_is_rejected():
  config = load_config("detcon_b", "test")
  with config.unlocked():
    config.data.masks = None
  with pytest.raises(ValueError, match="config.data.masks=None: DetCon needs"):
    config_lib.validate(config, num_devices=8)


def test_detcon_without_precomputed_masks_gives_the_command():
  from ssl_jax import registry  # pylint: disable=import-outside-toplevel
  config = load_config("detcon_b", None)
  with pytest.raises(ValueError, match=r"python -m ssl_jax.data.fh_masks --source=tfds"):
    registry.get_source(config.data.source, **config.data.source_args.to_dict())
