"""Backbones by name: `get_backbone("resnet50", dtype=jnp.bfloat16)`, `BACKBONES`."""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from ssl_jax.models import resnet, vit

BACKBONES = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "vit_tiny": vit.vit_tiny,
    "vit_small": vit.vit_small,
    "vit_base": vit.vit_base,
}


def get_backbone(name: str, **kwargs) -> nn.Module:
  """The backbone `name` with its fields overridden by `kwargs` (e.g. width=16, patch_size=8)."""
  if name not in BACKBONES:
    raise ValueError(f"config.model.name={name!r} is unknown; known backbones: {sorted(BACKBONES)}")
  cls = vit.VisionTransformer if name.startswith("vit") else resnet.ResNet
  # stage_sizes/block are what the name fixes.
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "stage_sizes", "block"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that backbone {name!r} does not take; "
                     f"its fields are {sorted(fields)}")
  return BACKBONES[name](**kwargs)
