"""Registries, name -> constructor: methods here; backbones and data sources delegate.

Methods are imported lazily so importing the registry (e.g. in a grain worker) stays cheap.
"""
from __future__ import annotations

import importlib
import types

# Method name (`config.method`) -> module exposing `make(config) -> Method` and `validate(config)`.
METHODS = {
    "simclr": "ssl_jax.methods.simclr",
    "byol": "ssl_jax.methods.byol",
    "mocov2": "ssl_jax.methods.moco",
    "mocov3": "ssl_jax.methods.moco",
    "detcon_b": "ssl_jax.methods.detcon",
    "detcon_s": "ssl_jax.methods.detcon",
    "mae": "ssl_jax.methods.mae",
    "ccmim": "ssl_jax.methods.ccmim",
    "simmim": "ssl_jax.methods.simmim",
    "mimco": "ssl_jax.methods.mimco",
    "maskco": "ssl_jax.methods.maskco",
    "masked_mocov3": "ssl_jax.methods.masked_siamese",
    "masked_byol": "ssl_jax.methods.masked_siamese",
}


def get_method(name: str) -> types.ModuleType:
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is unknown; known methods: {sorted(METHODS)}")
  return importlib.import_module(METHODS[name])


def get_backbone(name: str, /, **kwargs):
  from ssl_jax import models  # pylint: disable=import-outside-toplevel
  return models.get_backbone(name, **kwargs)


def get_source(name: str, /, **kwargs):
  from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
  return sources.make_source(name, **kwargs)
