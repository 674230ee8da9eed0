"""Backbones by name: `get_backbone("resnet50", dtype=jnp.bfloat16)`, `BACKBONES`."""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from ssl_jax.models import resnet, swin, vit

BACKBONES = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "vit_tiny": vit.vit_tiny,
    "vit_small": vit.vit_small,
    "vit_base": vit.vit_base,
    "swin_tiny": swin.swin_tiny,
    "swin_small": swin.swin_small,
    "swin_base": swin.swin_base,
}
# name -> (module class, fields the name fixes and config.model may not override).
_CLASSES = {
    **{name: (resnet.ResNet, {"stage_sizes", "block"}) for name in BACKBONES
       if name.startswith("resnet")},
    **{name: (vit.VisionTransformer, set()) for name in BACKBONES if name.startswith("vit_")},
    **{name: (swin.SwinTransformer, set()) for name in BACKBONES if name.startswith("swin_")},
}


def backbone_fields(name: str) -> set[str]:
  """The fields `config.model` may set for backbone `name` (besides `name`)."""
  if name not in BACKBONES:
    raise ValueError(f"config.model.name={name!r} is unknown; known backbones: {sorted(BACKBONES)}")
  cls, fixed = _CLASSES[name]
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"} - fixed


def get_backbone(name: str, **kwargs) -> nn.Module:
  """The backbone `name` with its fields overridden by `kwargs` (e.g. width=16, patch_size=8;
  for Swin e.g. embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)."""
  fields = backbone_fields(name)
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that backbone {name!r} does not take; "
                     f"its fields are {sorted(fields)}")
  return BACKBONES[name](**kwargs)


def check_image_size(model_config, image_size: int) -> None:
  """ValueError (naming config.data.image_size and the model fields) when `image_size` does not
  fit `config.model` (a mapping with `name` and field overrides); for `config_lib.validate`.

  ResNets take any size; ViTs need a multiple of patch_size; Swins see `swin.check_image_size`.
  """
  model_config = dict(model_config)
  name = model_config.pop("name")
  model = get_backbone(name, **{k: v for k, v in model_config.items() if k != "dtype"})
  if isinstance(model, vit.VisionTransformer) and image_size % model.patch_size:
    raise ValueError(f"config.data.image_size={image_size} is not divisible by"
                     f" config.model.patch_size={model.patch_size}")
  if isinstance(model, swin.SwinTransformer):
    swin.check_image_size(image_size, image_size, model.patch_size, model.window_size,
                          len(tuple(model.depths)))
