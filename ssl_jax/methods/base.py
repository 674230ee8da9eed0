"""What every method gives the trainer, and the pieces methods share.

The trainer knows nothing method-specific: it calls the pure functions of a `Method`.
Methods import shared pieces (losses, heads, ops, augment) and never the trainer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import optim, registry
from ssl_jax.data import augment
from ssl_jax.data import views as views_lib

Params = Any
State = Any
Batch = dict


@dataclasses.dataclass(frozen=True)
class Method:
  """Pure functions of a self-supervised method.

  init(rng, batch) -> (params, state): `params` are trained by the optimizer; `state` holds
    everything else (batch-norm statistics, EMA target, queues).
  loss_and_aux(params, state, batch, rng, step) -> (loss, (new_state, metrics)): `metrics` is a
    dict of scalars; the reserved key "features" may carry stop-gradient backbone features
    [B, C] of the first view, which the trainer pops and feeds to the online linear probe.
  after_update(state, params, step) -> state: after the optimizer step (EMA, queue).
  encode(params, state, images [B, H, W, 3] uint8) -> [B, C] float32: frozen eval features.
  encoder(params, state) -> {"params", "batch_stats"?}: backbone variables (export, evaluation).
  trainable_mask(params) -> pytree of bool or None: False leaves are frozen.
  """
  init: Callable[..., tuple[Params, State]]
  loss_and_aux: Callable[..., tuple[jax.Array, tuple[State, dict]]]
  after_update: Callable[[State, Params, jax.Array], State]
  encode: Callable[[Params, State, jax.Array], jax.Array]
  encoder: Callable[[Params, State], dict]
  backbone: nn.Module
  num_views: int
  trainable_mask: Optional[Callable[[Params], Any]] = None


def compute_dtype(config) -> jnp.dtype:
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def make_backbone(config) -> nn.Module:
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  return registry.get_backbone(config.model.name, dtype=compute_dtype(config), **kwargs)


def augmented_views(rng: jax.Array, images: jax.Array, recipe_name: str) -> jax.Array:
  """images: [B, V, H, W, 3] uint8 (host geometry done) -> [B, V, H, W, 3] float32, normalised."""
  return augment.augment_views(rng, images, views_lib.get_recipe(recipe_name))


def normalized(images: jax.Array) -> jax.Array:
  """Eval preprocessing: uint8 [..., 3] -> ImageNet-normalised float32 (no augmentation)."""
  return augment.normalize(images.astype(jnp.float32) / 255.0)


def dummy_images(batch: Batch) -> jax.Array:
  """First view of the batch as float zeros [B, H, W, 3] (shape source for `init`)."""
  return jnp.zeros(batch["image"].shape[:1] + batch["image"].shape[2:], jnp.float32)


def apply_train(module: nn.Module, params, batch_stats, *args, method=None, **kwargs):
  """Train-mode apply that threads batch-norm statistics: returns (outputs, new_batch_stats)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    out, updates = module.apply(variables, *args, train=True, method=method,
                                mutable=["batch_stats"], **kwargs)
    return out, updates["batch_stats"]
  return module.apply(variables, *args, train=True, method=method, **kwargs), batch_stats


def select(tree: dict, keys) -> dict:
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


def backbone_variables(params: dict, batch_stats: dict | None) -> dict:
  """Backbone sub-tree of a SiameseNet-style variable dict (key "backbone")."""
  v = {"params": params["backbone"]}
  if batch_stats and "backbone" in batch_stats:
    v["batch_stats"] = batch_stats["backbone"]
  return v


# The target (EMA / momentum) network of BYOL, MoCo and DetCon-B: backbone + projector.
TARGET_KEYS = ("backbone", "projector")


def init_target(params: dict, batch_stats: dict) -> dict:
  """The target network starts as a copy of the online backbone and projector."""
  return {"params": select(params, TARGET_KEYS), "batch_stats": select(batch_stats, TARGET_KEYS)}


def update_target(state: dict, params: dict, momentum) -> dict:
  """ξ ← m·ξ + (1 − m)·θ on the target's params (its BN statistics come from its own passes)."""
  target = dict(state["target"])
  target["params"] = optim.ema_update(target["params"], select(params, TARGET_KEYS), momentum)
  return {**state, "target": target}


def eval_functions(net: nn.Module, encode_method) -> tuple[Callable, Callable]:
  """`Method.encode` and `Method.encoder` for a network whose backbone is `net.backbone`, params
  under "backbone" and batch-norm statistics in `state["batch_stats"]`."""

  def encode(params, state, images):
    return net.apply({"params": params, "batch_stats": state["batch_stats"]},
                     normalized(images), method=encode_method)

  def encoder(params, state):
    return backbone_variables(params, state["batch_stats"])

  return encode, encoder
