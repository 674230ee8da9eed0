"""Config files load in every variant, and invalid values fail before compile, naming the field."""
from __future__ import annotations

import pytest

from ssl_jax import config_lib
from tests.helpers import load_config

CONFIGS = ["simclr", "byol", "mocov2", "mocov3", "detcon_b", "detcon_s", "maskco", "mae", "ccmim",
           "simmim", "mimco", "masked_mocov3", "masked_byol"]
# Variants beyond demo/test that each config documents.
VARIANTS = {"detcon_b": ["epochs=300", "coco", "grid"], "maskco": ["plus_in", "wd=1e-4"],
            "ccmim": ["paper"], "simmim": ["model=swin_tiny", "model=vit_base"],
            "mocov3": ["model=vit_small"], "byol": ["epochs=300"],
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
