"""A toy method for the trainer's tests: an extra batch key and a frozen constant.

It consumes MaskCo's batch (one key view `image[:, 1]`, `boxes` [B, K, 4], `masked_box` [B, 4])
and a frozen "teacher" matrix loaded from a safetensors file named by
`config.method_args.teacher`. Loss: ‖W·pooled(image) − teacher·box_features‖², where the box
features are the mean box coordinates (so the extra key really enters the loss).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from safetensors.numpy import load_file

from ssl_jax.methods import base


def validate(config) -> None:
  if not config.method_args.get("teacher"):
    raise ValueError("config.method_args.teacher must name a safetensors file")


def batch_spec(config):
  spec = base.view_batch_spec(config, num_views=2)
  b, k = config.train.batch_size, config.data.num_boxes
  spec["boxes"] = jax.ShapeDtypeStruct((b, k, 4), jnp.float32)
  spec["masked_box"] = jax.ShapeDtypeStruct((b, 4), jnp.float32)
  return spec


class ToyNet(nn.Module):
  backbone: nn.Module

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = self.backbone(x, train=train)["pooled"].astype(jnp.float32)
    return {"h": h, "z": nn.Dense(4, name="head")(h)}

  def encode(self, x, *, train: bool = False):
    return self.backbone(x, train=train)["pooled"].astype(jnp.float32)


def make(config) -> base.Method:
  net = ToyNet(base.make_backbone(config))

  def init(rng, batch):
    variables = net.init({"params": rng}, base.dummy_images(batch), train=True)
    return variables["params"], {"batch_stats": variables.get("batch_stats", {})}

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step
    x = base.augmented_views(rng, batch["image"], config.data.views)
    out, stats = base.apply_train(net, params, state["batch_stats"], x[:, 1])
    box_features = jnp.concatenate([batch["boxes"].mean(axis=1), batch["masked_box"]], -1) / 32.0
    target = box_features @ constants["teacher"]
    loss = jnp.mean((out["z"] - target) ** 2)
    return loss, ({"batch_stats": stats}, {"toy_loss": loss,
                                           "features": jax.lax.stop_gradient(out["h"])})

  def after_update(state, params, step):
    del params, step
    return state

  def load_constants(config):
    path = config.method_args.teacher
    return base.Constants(tree={"teacher": load_file(path)["teacher"]}, sources={"teacher": path})

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=net.backbone, batch_spec=batch_spec, load_constants=load_constants,
                     **base.eval_functions(net, ToyNet.encode, target=False))
