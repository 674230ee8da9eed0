"""BYOL: Bootstrap Your Own Latent (Grill et al., 2020).

Two augmented views v, v' (asymmetric blur/solarize, `views.get_recipe("byol")`). The online
network (backbone f_θ, projector g_θ, predictor q_θ) predicts the target network's projection
of the other view; the target (f_ξ, g_ξ) is an exponential moving average of the online weights,
ξ ← τξ + (1 − τ)θ with τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 (Eq. 1 and Sec. 3.3).
Loss (Eq. 2, symmetrised): ‖q̄(z) − z̄'‖² + ‖q̄(z') − z̄‖² = (2 − 2 cos) for each direction.

Projector g and predictor q: Linear (bias) → BN → ReLU → Linear without bias (the official Haiku
`MLP`, `byol_mlp`); DetCon-B uses the same heads. The ResNet's last BN γ of every residual
block starts at 0 (Haiku's `scale_init=zeros`; `config.model.zero_init_residual=True` in
configs/byol.py).

Each view goes through the networks separately, so batch-norm statistics are per view as in
the official code; the target network runs in training mode (batch statistics), as BYOL does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses, optim
from ssl_jax.methods import base
from ssl_jax.models.heads import MLP


def validate(config) -> None:
  a = config.method_args
  if not 0.0 <= a.ema_base < 1.0:
    raise ValueError(f"config.method_args.ema_base={a.ema_base} must be in [0, 1)")


def batch_spec(config):
  """Two views of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=2)


def byol_mlp(hidden_dim: int, out_dim: int, dtype) -> MLP:
  """BYOL's projector/predictor (official Haiku `MLP`): the output Linear has no bias."""
  return MLP(hidden_dim, out_dim, num_layers=2, norm="bn", output_bias=False, dtype=dtype)


def make(config) -> base.Method:
  a = config.method_args
  dtype = base.compute_dtype(config)
  net = base.SiameseNet(
      backbone=base.make_backbone(config),
      projector=byol_mlp(a.projector_hidden, a.projector_dim, dtype),
      predictor=byol_mlp(a.predictor_hidden, a.projector_dim, dtype))
  total_steps = config.train.total_steps

  def init(rng, batch):
    variables = net.init({"params": rng}, base.dummy_images(batch), train=True)
    params, stats = variables["params"], variables.get("batch_stats", {})
    target = base.init_target(params, stats)
    return params, {"batch_stats": stats, "target": target}

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    x = base.augmented_views(rng, batch["image"], config.data.views)
    stats, target = state["batch_stats"], state["target"]
    online, target_z = [], []
    for v in range(2):
      out, stats = base.apply_train(net, params, stats, x[:, v])
      online.append(out)
      t, tstats = base.apply_train(net, target["params"], target["batch_stats"], x[:, v],
                                   method=base.SiameseNet.project)
      target = {"params": target["params"], "batch_stats": tstats}
      target_z.append(jax.lax.stop_gradient(t["z"]))
    loss = (losses.byol_loss(online[0]["p"], target_z[1])
            + losses.byol_loss(online[1]["p"], target_z[0]))
    metrics = {
        "byol_loss": loss,
        "z_std": jnp.mean(jnp.std(losses.l2_normalize(online[0]["z"]), axis=0)),
        "features": jax.lax.stop_gradient(online[0]["h"]),
    }
    return loss, ({"batch_stats": stats, "target": target}, metrics)

  def after_update(state, params, step):
    tau = optim.ema_momentum(step, total_steps, a.ema_base)
    return base.update_target(state, params, tau)

  eval_fns = base.eval_functions(net, base.SiameseNet.encode)

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=net.backbone, batch_spec=batch_spec, **eval_fns)
