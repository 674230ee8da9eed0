"""Every config field is read by something (issue 20 item 9: no dead fields).

Each pretraining config's `:test` variant is built as the trainer builds it (`train.build`, the
train step traced with `jax.eval_shape`, the data iterator's first batch, the evaluators), with
every `ConfigDict` read recorded; reads made only by `config_lib.validate` do not count (a field
that is checked but never used is still dead). A field nobody read fails the test unless it is
listed below:
- READ_BY_RUN: read by the training loop (`train.run`) or an error path, outside what is built
  here; each entry names the file and the expression that reads it, and the test checks that the
  expression is still there (so the list cannot go stale silently);
- CONDITIONAL: read only under another setting (the optimizer family, a method option); the
  entry is excused only when its condition is false for the config.
The default variants have the same fields as `:test` (checked), except the data source's
arguments, which must be parameters of the source's constructor.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re

import jax
import pytest
from ml_collections import ConfigDict

from ssl_jax import config_lib, parallel, train
from ssl_jax.data import sources
from ssl_jax.evaluate import evaluators
from tests.helpers import ROOT, load_config

CONFIGS = ["simclr", "byol", "mocov2", "mocov3", "detcon_b", "detcon_s", "maskco", "mae", "ccmim",
           "simmim", "mimco", "masked_mocov3", "masked_byol"]

READ_BY_RUN = {
    "train.checkpoint_every_steps": ("ssl_jax/train.py", r"config\.train\.checkpoint_every_steps"),
    "train.keep_checkpoints": ("ssl_jax/train.py", r"config\.train\.keep_checkpoints"),
    "train.log_every_steps": ("ssl_jax/train.py", r"config\.train\.log_every_steps"),
    "train.progress_bar": ("ssl_jax/train.py", r"config\.train\.progress_bar"),
    # `_init_from`, when init_from.source is set.
    "init_from.step": ("ssl_jax/train.py", r"step=c\.step"),
    "init_from.part": ("ssl_jax/train.py", r"part=c\.part"),
    # MimCo's message when its teacher is missing.
    "method_args.teacher_command": ("ssl_jax/methods/mimco.py", r'"teacher_command"'),
}

CONDITIONAL = {
    "optim.b1": lambda c: c.optim.name == "adamw",
    "optim.b2": lambda c: c.optim.name == "adamw",
    "optim.eps": lambda c: c.optim.name == "adamw",
    "optim.nesterov": lambda c: c.optim.name in ("sgd", "lars"),
    # ccMIM: the projector only with method_args.projector, the predictor with contrast "align".
    "method_args.projector_hidden": lambda c: c.method != "ccmim" or bool(c.method_args.projector),
    "method_args.projector_dim": lambda c: c.method != "ccmim" or bool(c.method_args.projector),
    "method_args.predictor_hidden": (
        lambda c: c.method != "ccmim" or c.method_args.contrast == "align"),
}


def leaves(config: ConfigDict, prefix: str = "") -> set[str]:
  """Dotted paths of the leaves of a ConfigDict (an empty ConfigDict is a leaf)."""
  out = set()
  for key in config.keys():
    value = config._fields[key]  # pylint: disable=protected-access
    if isinstance(value, ConfigDict) and len(value.keys()):
      out |= leaves(value, f"{prefix}{key}.")
    else:
      out.add(f"{prefix}{key}")
  return out


class ReadTracker:
  """Records `ConfigDict` reads (`config.x`, `config["x"]`, `.get`, `.to_dict()` of a section)
  on the ConfigDicts of one config, by dotted path."""

  def __init__(self, config: ConfigDict):
    self.paths: dict[int, str] = {}
    self.read: set[str] = set()
    self.on = False

    def walk(node, prefix):
      self.paths[id(node)] = prefix
      for key in node.keys():
        child = node._fields[key]  # pylint: disable=protected-access
        if isinstance(child, ConfigDict):
          walk(child, f"{prefix}{key}.")
    walk(config, "")

  @contextlib.contextmanager
  def recording(self, monkeypatch):
    getitem, to_dict = ConfigDict.__getitem__, ConfigDict.to_dict
    tracker = self

    def tracked_getitem(node, key):
      if tracker.on and id(node) in tracker.paths and isinstance(key, str):
        tracker.read.add(tracker.paths[id(node)] + key)
      return getitem(node, key)

    def tracked_to_dict(node, *args, **kwargs):
      # A section handed on whole (config.model -> backbone kwargs, source_args -> source).
      if tracker.on and tracker.paths.get(id(node)):
        tracker.read.add(tracker.paths[id(node)] + "*")
      return to_dict(node, *args, **kwargs)

    validate = config_lib.validate

    def untracked_validate(*args, **kwargs):
      was, tracker.on = tracker.on, False
      try:
        return validate(*args, **kwargs)
      finally:
        tracker.on = was

    monkeypatch.setattr(ConfigDict, "__getitem__", tracked_getitem)
    monkeypatch.setattr(ConfigDict, "to_dict", tracked_to_dict)
    monkeypatch.setattr(config_lib, "validate", untracked_validate)
    self.on = True
    try:
      yield self
    finally:
      self.on = False

  def was_read(self, path: str) -> bool:
    parts = path.split(".")
    return path in self.read or any(".".join(parts[:i]) + ".*" in self.read
                                    for i in range(1, len(parts)))


def unread_fields(config: ConfigDict, monkeypatch) -> list[str]:
  """Leaves of `config` that building and stepping it does not read (allow-lists applied)."""
  tracker = ReadTracker(config)
  with tracker.recording(monkeypatch):
    setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]))
    abstract = jax.eval_shape(setup.init_state, setup.batch_spec)
    jax.eval_shape(setup.step, abstract, setup.batch_spec)
    next(train.make_data_iterator(setup))
    evaluators.make_evaluators(config, setup.predict_fn)
  unread = []
  for path in sorted(leaves(config)):
    if tracker.was_read(path) or path in READ_BY_RUN:
      continue
    if path in CONDITIONAL and not CONDITIONAL[path](config):
      continue
    unread.append(path)
  return unread


@pytest.mark.parametrize("name", CONFIGS)
def test_every_field_is_read(name, monkeypatch):
  config = load_config(name, "test")
  assert unread_fields(config, monkeypatch) == []


def test_a_dead_field_is_reported(monkeypatch):
  """The check can fail: DetCon-S with the EMA and predictor fields it used to carry."""
  config = load_config("detcon_s", "test")
  with config.unlocked():
    config.method_args.ema_base = 0.99
    config.method_args.predictor_hidden = 64
  assert unread_fields(config, monkeypatch) == ["method_args.ema_base",
                                                "method_args.predictor_hidden"]


def test_fields_read_by_run_are_still_read_there():
  for path, (filename, pattern) in READ_BY_RUN.items():
    with open(os.path.join(ROOT, filename)) as f:
      assert re.search(pattern, f.read()), f"{path}: {pattern!r} no longer in {filename}"


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "mimco"])
def test_default_variant_has_the_test_variants_fields(name):
  """The paper setting (not built here: it needs ImageNet) has no field the `:test` build does
  not exercise, besides its own data source arguments and model fields, which the source's
  constructor and the backbone take by name."""
  default, test = load_config(name, None), load_config(name, "test")
  extra = {p for p in leaves(default) - leaves(test)
           if not p.startswith(("data.source_args.", "model."))}
  assert not extra
  make = sources.source_constructor(default.data.source)
  params = inspect.signature(make).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    assert set(default.data.source_args) <= set(params), (default.data.source, params)
