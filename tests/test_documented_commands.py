"""Every command and `--config.*` override written in the evaluation configs' docstrings
(configs/linear_eval.py, configs/finetune.py) parses through `ml_collections.config_flags` as
`python -m ssl_jax.evaluate` parses it (`DEFINE_config_file("config", lock_config=False)` and
`--workdir`), each override lands on its field with its value, and the result validates
(issue 20 item 8: `--config.backbone.model.name=...` used to fail at flag parsing)."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from ssl_jax.evaluate import supervised
from tests.helpers import ROOT

DOCUMENTED = ("linear_eval", "finetune")


def _module(name: str):
  spec = importlib.util.spec_from_file_location(f"doc_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _doc(name: str) -> str:
  return _module(name).__doc__


def documented_commands(doc: str) -> list[list[str]]:
  """The arguments of each `python -m ssl_jax.evaluate ...` command (backslash continuations
  joined, a trailing remark such as "(CPU, minutes)" dropped)."""
  text = re.sub(r"\\\n\s*", " ", doc)
  commands = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("python -m ssl_jax.evaluate "):
      args = shlex.split(line.split("(", 1)[0] if " (" in line else line)[3:]
      commands.append([a for a in args if a.startswith("--")])
  return commands


def documented_overrides(doc: str) -> list[list[str]]:
  """Each backquoted run of `--config.*=...` flags in the prose."""
  return [shlex.split(m) for m in re.findall(r"`(--config\.[^`]*)`", doc)]


def parse(args: list[str]):
  """The config `python -m ssl_jax.evaluate ARGS` would run with (flags parsed, not run)."""
  argv = ["ssl_jax.evaluate", *args]
  values = flags.FlagValues()
  # sys_argv: the CLI's sys.argv, from which config_flags defines the override flags.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=False,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  return values.config


def _assert_landed(config, args: list[str]):
  for arg in args:
    if not arg.startswith("--config."):
      continue
    path, text = arg[len("--config."):].split("=", 1)
    value = config
    for part in path.split("."):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      assert str(value) == text, (arg, value)
    else:
      assert value == pytest.approx(float(text)), (arg, value)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_commands_parse_and_validate(name, monkeypatch):
  monkeypatch.chdir(ROOT)  # the commands name configs/... relative to the checkout
  commands = documented_commands(_doc(name))
  assert len(commands) >= 4, commands  # the docstring's examples were found
  for args in commands:
    assert args[0].startswith(f"--config=configs/{name}.py"), args
    config = parse(args)
    _assert_landed(config, args)
    supervised.validate(config, num_devices=1)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_overrides_parse_on_every_imagenet_variant(name, monkeypatch):
  """The prose's overrides are for the ImageNet recipes (`demo` / `test` read the built-in
  photos, which have no ImageNet split or class subset)."""
  monkeypatch.chdir(ROOT)
  module = _module(name)
  overrides = documented_overrides(module.__doc__)
  if name == "linear_eval":
    assert len(overrides) >= 5, overrides  # 10 %, ImageNet-100, ccMIM, Masked MoCo, MaskCo lr
  variants = [f"configs/{name}.py:{v}" for v in module.VARIANTS
              if v not in ("demo", "test", "model")]
  for variant in variants:
    for args in overrides:
      config = parse([f"--config={variant}", *args])
      _assert_landed(config, args)
      supervised.validate(config, num_devices=1)


def test_the_foreign_file_command_sets_the_model_fields(monkeypatch):
  """The docstring's `--config.backbone.model.name=vit_base --config.backbone.model.patch_size=16`
  reach the placeholders the weight loader reads (typed: the patch size is an int)."""
  monkeypatch.chdir(ROOT)
  [args] = [a for a in documented_commands(_doc("linear_eval"))
            if any(x.startswith("--config.backbone.model.") for x in a)]
  config = parse(args)
  assert config.backbone.model.name == "vit_base" and config.backbone.model.patch_size == 16
  assert isinstance(config.backbone.model.patch_size, int)
  assert config.backbone.safetensors == "vit_b.safetensors"
  with pytest.raises(flags.IllegalFlagValueError):
    parse([*args, "--config.backbone.model.patch_size=sixteen"])
  with pytest.raises((AttributeError, KeyError, flags.Error)):
    parse([*args, "--config.backbone.model.nmae=vit_base"])


def test_finetune_documented_models_load_with_their_recipe(monkeypatch):
  """Every `model=...` the fine-tuning docstring names is a preset of a recipe, and
  `--config=configs/finetune.py:<recipe>,model=<m>` parses and validates."""
  monkeypatch.chdir(ROOT)
  module = _module("finetune")
  named = set(re.findall(r"`model=(\w+)`", module.__doc__))
  presets = {m for models in module.MODELS.values() for m in models}
  assert named and named <= presets, named - presets
  for recipe, models in module.MODELS.items():
    for model in models:
      config = parse([f"--config=configs/finetune.py:{recipe},model={model}", "--workdir=..."])
      supervised.validate(config, num_devices=1)


def test_readme_evaluate_commands_parse_and_validate(monkeypatch):
  """The README's "Evaluate" block: each `python -m ssl_jax.evaluate` command parses and
  validates as the CLI would run it."""
  monkeypatch.chdir(ROOT)
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = readme.split("\n## Evaluate\n", 1)[1].split("\n## ", 1)[0]
  commands = documented_commands(section)
  assert len(commands) >= 5, commands
  for args in commands:
    config = parse(args)
    _assert_landed(config, args)
    supervised.validate(config, num_devices=1)
