"""What every method gives the trainer, and the pieces methods share.

The trainer knows nothing method-specific: it calls the pure functions of a `Method`, builds the
batch a method declares (`batch_spec`) and hands frozen `constants` to the step. Methods import
shared pieces (losses, heads, ops, augment) and never the trainer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import config_lib, optim, registry
from ssl_jax.data import augment
from ssl_jax.data import views as views_lib

Params = Any
State = Any
Batch = dict
BatchSpec = dict  # {key: jax.ShapeDtypeStruct} of the global batch


@dataclasses.dataclass(frozen=True)
class Constants:
  """Frozen arrays a method reads but never trains (MimCo's teacher).

  tree: the pytree handed to `loss_and_aux` (host or device arrays).
  sources: {name: where it came from} (a workdir, safetensors or PyTorch file); the trainer records
    each source with its sha256 in config.json and refuses to resume when one changed.
  """
  tree: Any
  sources: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Method:
  """Pure functions of a self-supervised method.

  init(rng, batch) -> (params, state): `params` are trained by the optimizer; `state` holds
    everything else (batch-norm statistics, EMA target, queues).
  loss_and_aux(params, state, batch, rng, step, constants) -> (loss, (new_state, metrics)):
    `metrics` is a dict of scalars; the reserved key "features" may carry stop-gradient backbone
    features [B, C], which the trainer pops and feeds to the online linear probe. `constants` is
    the tree of `load_constants` (None for methods without).
  after_update(state, params, step) -> state: after the optimizer step (EMA, queue).
  encode(params, state, images [B, H, W, 3] uint8) -> [B, C] float32: frozen eval features.
  encoder(params, state) -> {"params", "batch_stats"?}: backbone variables of the online network
    (evaluation, export); `backbone.apply(encoder(...), x, train=False)` runs it.
  backbone: the backbone module (`encoder`'s variables fit it).
  batch_spec(config) -> {key: ShapeDtypeStruct}: the global batch `loss_and_aux` consumes
    (`view_batch_spec` for the usual views/masks). The trainer ships exactly these keys (plus
    "label" for the online probe) to the device.
  trainable_mask(params) -> pytree of bool: False leaves are frozen (None: all trained).
  target_encoder(params, state) -> backbone variables of the EMA/momentum network (None: none).
  set_encoder(params, state, variables) -> (params, state): starts the backbone (and its target
    copy) from `variables` (`config.init_from`).
  load_constants(config) -> Constants: frozen networks, loaded once per run (None: none).
  """
  init: Callable[..., tuple[Params, State]]
  loss_and_aux: Callable[..., tuple[jax.Array, tuple[State, dict]]]
  after_update: Callable[[State, Params, jax.Array], State]
  encode: Callable[[Params, State, jax.Array], jax.Array]
  encoder: Callable[[Params, State], dict]
  backbone: nn.Module
  batch_spec: Callable[[Any], BatchSpec]
  trainable_mask: Optional[Callable[[Params], Any]] = None
  target_encoder: Optional[Callable[[Params, State], dict]] = None
  set_encoder: Optional[Callable[[Params, State, dict], tuple[Params, State]]] = None
  load_constants: Optional[Callable[[Any], Constants]] = None


def compute_dtype(config) -> jnp.dtype:
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def make_backbone(config) -> nn.Module:
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  return registry.get_backbone(config.model.name, dtype=compute_dtype(config), **kwargs)


# ---------------------------------------------------------------------------------------------
# The batch a method consumes

def view_batch_spec(config, num_views: int, *, masks: bool = False) -> BatchSpec:
  """The usual batch: `image` [B, V, S, S, 3] uint8 and, with `masks`, segment ids [B, V, S, S]
  in the smallest integer dtype that holds `config.data.max_segments` ids (and −1).

  Multi-crop configs (`config.data.local_views` > 0) add `local_image` [B, L, s, s, 3] uint8
  with s = `config.data.local_image_size`.
  """
  b, s = config.train.batch_size, config.data.image_size
  spec = {"image": jax.ShapeDtypeStruct((b, num_views, s, s, 3), jnp.uint8)}
  if masks:
    spec["masks"] = jax.ShapeDtypeStruct((b, num_views, s, s),
                                         views_lib.mask_dtype(config_lib.max_segments(config)))
  local = int(config.data.get("local_views", 0) or 0)
  if local:
    ls = int(config.data.local_image_size)
    spec["local_image"] = jax.ShapeDtypeStruct((b, local, ls, ls, 3), jnp.uint8)
  return spec


def zeros_like_spec(spec: BatchSpec) -> Batch:
  """Host zeros of every array of a batch spec (a shape source for `init`)."""
  return {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}


# ---------------------------------------------------------------------------------------------
# Views on device

def augmented_views(rng: jax.Array, images: jax.Array, recipe_name: str, *,
                    normalize: bool = True) -> jax.Array:
  """images: [B, V, H, W, 3] uint8 (host geometry done) -> [B, V, H, W, 3] float32.

  Colour augmentation of the recipe on device, then ImageNet normalisation; `normalize=False`
  returns the augmented pixels in [0, 1] so a method can edit them first (MaskCo zeroes a box)
  and call `normalized_views`.
  """
  x = augment.color_views(rng, images, views_lib.get_recipe(recipe_name, images.shape[1]))
  return augment.normalize(x) if normalize else x


def normalized_views(x: jax.Array) -> jax.Array:
  """float pixels in [0, 1] [..., 3] -> ImageNet-normalised (after `normalize=False`)."""
  return augment.normalize(x)


def normalized(images: jax.Array) -> jax.Array:
  """Eval preprocessing: uint8 [..., 3] -> ImageNet-normalised float32 (no augmentation)."""
  return augment.normalize(images.astype(jnp.float32) / 255.0)


def dummy_images(batch: Batch, key: str = "image") -> jax.Array:
  """First view of `batch[key]` as float zeros [B, H, W, 3] (shape source for `init`)."""
  return jnp.zeros(batch[key].shape[:1] + batch[key].shape[2:], jnp.float32)


# ---------------------------------------------------------------------------------------------
# Networks

def apply_train(module: nn.Module, params, batch_stats, *args, method=None, **kwargs):
  """Train-mode apply that threads batch-norm statistics: returns (outputs, new_batch_stats)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    out, updates = module.apply(variables, *args, train=True, method=method,
                                mutable=["batch_stats"], **kwargs)
    return out, updates["batch_stats"]
  return module.apply(variables, *args, train=True, method=method, **kwargs), batch_stats


def trainable_except(params: Mapping, *paths: tuple[str, ...]) -> dict:
  """`Method.trainable_mask` that freezes the subtrees at `paths` (e.g. ("backbone",
  "patch_embed")) and trains everything else; a path absent from `params` is ignored."""
  mask = jax.tree.map(lambda _: True, params)
  for path in paths:
    node = mask
    for key in path[:-1]:
      node = node.get(key, {})
    if path[-1] in node:
      node[path[-1]] = jax.tree.map(lambda _: False, node[path[-1]])
  return mask


def select(tree: Mapping, keys) -> dict:
  """The sub-dict of `tree` with `keys` that are present (e.g. target = backbone + projector)."""
  return {k: tree[k] for k in keys if k in tree}


class SiameseNet(nn.Module):
  """backbone -> pooled h -> projector z -> (optional) predictor p (SimCLR/BYOL/MoCo)."""
  backbone: nn.Module
  projector: nn.Module
  predictor: Optional[nn.Module] = None

  def __call__(self, x, *, train: bool):
    """x: [B, H, W, 3] float -> dict(h [B, C], z [B, D], p [B, D] or None)."""
    out = self.project(x, train=train)
    out["p"] = None if self.predictor is None else self.predictor(out["z"], train=train)
    return out

  def project(self, x, *, train: bool):
    """The target branch: no predictor."""
    h = self.backbone(x, train=train)["pooled"].astype(jnp.float32)
    return {"h": h, "z": self.projector(h, train=train).astype(jnp.float32)}

  def encode(self, x, *, train: bool = False):
    return self.backbone(x, train=train)["pooled"].astype(jnp.float32)


BACKBONE = "backbone"


def backbone_variables(params: Mapping, batch_stats: Mapping | None) -> dict:
  """Backbone sub-tree of a variable dict that keeps the backbone under key "backbone"."""
  v = {"params": params[BACKBONE]}
  if batch_stats and BACKBONE in batch_stats:
    v["batch_stats"] = batch_stats[BACKBONE]
  return v


# The target (EMA / momentum) network of BYOL, MoCo and DetCon-B: backbone + projector.
TARGET_KEYS = ("backbone", "projector")


def init_target(params: Mapping, batch_stats: Mapping, keys=TARGET_KEYS) -> dict:
  """The target network starts as a copy of the online sub-networks named by `keys`."""
  return {"params": select(params, keys), "batch_stats": select(batch_stats, keys)}


def update_target(state: Mapping, params: Mapping, momentum, keys=TARGET_KEYS) -> dict:
  """ξ ← m·ξ + (1 − m)·θ on the target's params named by `keys` (its BN statistics come from its
  own passes)."""
  target = dict(state["target"])
  target["params"] = {**target["params"],
                      **optim.ema_update(select(target["params"], keys), select(params, keys),
                                         momentum)}
  return {**state, "target": target}


def set_backbone(params: Mapping, state: Mapping, variables: Mapping) -> tuple[dict, dict]:
  """`Method.set_encoder` for methods that keep the backbone under "backbone" of their params,
  batch statistics in `state["batch_stats"]` and (optionally) a target copy in
  `state["target"]`: the online backbone and its target copy both start from `variables`."""
  params = {**params, BACKBONE: variables["params"]}
  state = dict(state)
  stats = variables.get("batch_stats")
  if stats is not None and BACKBONE in state.get("batch_stats", {}):
    state["batch_stats"] = {**state["batch_stats"], BACKBONE: stats}
  if "target" in state and BACKBONE in state["target"].get("params", {}):
    target = dict(state["target"])
    target["params"] = {**target["params"], BACKBONE: variables["params"]}
    if stats is not None and BACKBONE in target.get("batch_stats", {}):
      target["batch_stats"] = {**target["batch_stats"], BACKBONE: stats}
    state["target"] = target
  return params, state


def eval_functions(net: nn.Module, encode_method, *, target: bool = True
                   ) -> dict[str, Callable]:
  """`Method` fields `encode`, `encoder`, `target_encoder` (None without a `target` network) and
  `set_encoder` for a network whose backbone is `net.backbone`, params under "backbone",
  batch-norm statistics in `state["batch_stats"]` and the EMA target in `state["target"]`."""

  def encode(params, state, images):
    return net.apply({"params": params, "batch_stats": state["batch_stats"]},
                     normalized(images), method=encode_method)

  def encoder(params, state):
    return backbone_variables(params, state["batch_stats"])

  def target_encoder(params, state):
    del params
    return backbone_variables(state["target"]["params"], state["target"].get("batch_stats"))

  return {"encode": encode, "encoder": encoder,
          "target_encoder": target_encoder if target else None, "set_encoder": set_backbone}
