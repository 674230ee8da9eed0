"""SimCLR v1 (Chen et al., 2020): NT-Xent over two augmented views of every image.

Both views go through the encoder f and the projection head g as one batch of 2B (the official
v1 code concatenates them, so batch-norm statistics span both views). Loss (Eq. 1): for each of
the 2B projections, the other view of the same image is the positive and the other 2B − 2
projections are the negatives, cosine similarity / τ. DetCon-S reuses this head and loss on
mask-pooled features (`methods/detcon.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.methods import base
from ssl_jax.models.heads import MLP


def validate(config) -> None:
  if config.method_args.temperature <= 0:
    raise ValueError(f"config.method_args.temperature={config.method_args.temperature} must be > 0")


def batch_spec(config):
  """Two views of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=2)


def simclr_projector(hidden_dim: int, out_dim: int, num_layers: int, dtype) -> MLP:
  """SimCLR v1's projection head (module docstring); DetCon-S uses it too."""
  return MLP(hidden_dim, out_dim, num_layers=num_layers, norm="bn", last_norm="bn_scale",
             use_bias=False, dtype=dtype)


def make(config) -> base.Method:
  a = config.method_args
  net = base.SiameseNet(
      backbone=base.make_backbone(config),
      projector=simclr_projector(a.projector_hidden, a.projector_dim, a.projector_layers,
                                 base.compute_dtype(config)))

  def init(rng, batch):
    variables = net.init({"params": rng}, base.dummy_images(batch), train=True)
    return variables["params"], {"batch_stats": variables.get("batch_stats", {})}

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    x = base.augmented_views(rng, batch["image"], config.data.views)
    b = x.shape[0]
    both = jnp.concatenate([x[:, 0], x[:, 1]], axis=0)
    out, stats = base.apply_train(net, params, state["batch_stats"], both,
                                  method=base.SiameseNet.project)
    z1, z2 = out["z"][:b], out["z"][b:]
    # The official v1 code returns loss_a + loss_b (each a mean over B anchors), twice the mean
    # over the 2B anchors that nt_xent gives; with LARS the scale sets the weight-decay balance.
    loss = 2.0 * losses.nt_xent(z1, z2, a.temperature)
    metrics = {"nt_xent": loss, "features": jax.lax.stop_gradient(out["h"][:b])}
    return loss, ({"batch_stats": stats}, metrics)

  def after_update(state, params, step):
    del params, step
    return state

  eval_fns = base.eval_functions(net, base.SiameseNet.encode, target=False)

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=net.backbone, batch_spec=batch_spec, **eval_fns)
