"""MoCo v2 (Chen et al., 2020) and MoCo v3 (Chen, Xie, He, 2021).

Both contrast a query q (online encoder) against keys k from a momentum encoder,
ξ ← mξ + (1 − m)θ, with the InfoNCE loss at temperature τ.

- v2 (`config.method = "mocov2"`): one direction, q from view 1, k⁺ from view 2, negatives are a
  queue of K past keys (Eq. 1 of MoCo); 2-layer MLP head without BN; constant m = 0.999. The
  official code shuffles BN across GPUs so that keys cannot cheat through per-GPU statistics; our
  step computes batch-norm statistics over the global batch (one jit), which removes the per-GPU
  leak the shuffle guards against (as SimCLR's global BN does).
- v3 (`config.method = "mocov3"`, ViT recipe of `CONFIG.md`): symmetric
  ctr(q1, k2) + ctr(q2, k1), keys are the other images of the global batch (no queue), the
  loss is scaled by 2τ as in the official code; 3-layer BN projector (last BN without affine),
  2-layer BN predictor (no last BN); m follows the cosine schedule from m_base to 1; the random patch
  projection is frozen (Sec. 4.1 "random patch projection").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses, optim
from ssl_jax.methods import base
from ssl_jax.models.heads import MLP
from ssl_jax.ops import queue as queue_lib

def validate(config) -> None:
  a = config.method_args
  if a.temperature <= 0:
    raise ValueError(f"config.method_args.temperature={a.temperature} must be > 0")
  if config.method == "mocov2" and a.queue_size % config.train.batch_size:
    raise ValueError(f"config.method_args.queue_size={a.queue_size} must be a multiple of "
                     f"config.train.batch_size={config.train.batch_size}")


def _heads(config):
  a, dtype = config.method_args, base.compute_dtype(config)
  if config.method == "mocov2":
    return MLP(a.projector_hidden, a.projector_dim, num_layers=2, norm="none", dtype=dtype), None
  # Official `_build_mlp`: Linear layers without bias (each is followed by BN), the projector
  # ends with a BN without affine, the predictor with no BN (`last_bn=False`).
  projector = MLP(a.projector_hidden, a.projector_dim, num_layers=3, norm="bn",
                  last_norm="bn_noaffine", use_bias=False, dtype=dtype)
  predictor = MLP(a.predictor_hidden, a.projector_dim, num_layers=2, norm="bn", use_bias=False,
                  dtype=dtype)
  return projector, predictor


def batch_spec(config):
  """Two views of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=2)


def make(config) -> base.Method:
  a = config.method_args
  v3 = config.method == "mocov3"
  projector, predictor = _heads(config)
  net = base.SiameseNet(backbone=base.make_backbone(config), projector=projector,
                        predictor=predictor)
  total_steps = config.train.total_steps

  def init(rng, batch):
    params_rng, queue_rng = jax.random.split(rng)
    variables = net.init({"params": params_rng}, base.dummy_images(batch), train=True)
    params, stats = variables["params"], variables.get("batch_stats", {})
    state = {"batch_stats": stats,
             "target": base.init_target(params, stats)}
    if not v3:  # random unit keys, as the official queue initialisation
      state["queue"], state["queue_ptr"] = queue_lib.init_queue(queue_rng, a.queue_size,
                                                                a.projector_dim)
    return params, state

  def keys(target, x):
    out, stats = base.apply_train(net, target["params"], target["batch_stats"], x,
                                  method=base.SiameseNet.project)
    return jax.lax.stop_gradient(out["z"]), {"params": target["params"], "batch_stats": stats}

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    x = base.augmented_views(rng, batch["image"], config.data.views)
    stats, target = state["batch_stats"], state["target"]
    if v3:
      q, k = [], []
      for v in range(2):
        out, stats = base.apply_train(net, params, stats, x[:, v])
        q.append(out)
        kv, target = keys(target, x[:, v])
        k.append(kv)
      scale = 2.0 * a.temperature  # official MoCo v3: CrossEntropy(logits / τ) * 2τ
      loss = scale * (losses.info_nce(q[0]["p"], k[1], a.temperature)
                      + losses.info_nce(q[1]["p"], k[0], a.temperature))
      new_state = {"batch_stats": stats, "target": target}
      h = q[0]["h"]
    else:
      out, stats = base.apply_train(net, params, stats, x[:, 0], method=base.SiameseNet.project)
      k, target = keys(target, x[:, 1])
      loss = losses.info_nce(out["z"], k, a.temperature, negatives=state["queue"])
      queue, ptr = queue_lib.enqueue(state["queue"], state["queue_ptr"], k)
      new_state = {"batch_stats": stats, "target": target, "queue": queue, "queue_ptr": ptr}
      h = out["h"]
    metrics = {"info_nce": loss, "features": jax.lax.stop_gradient(h)}
    return loss, (new_state, metrics)

  def after_update(state, params, step):
    m = optim.ema_momentum(step, total_steps, a.momentum) if v3 else jnp.float32(a.momentum)
    return base.update_target(state, params, m)

  eval_fns = base.eval_functions(net, base.SiameseNet.encode)

  def trainable_mask(params):
    """MoCo v3 freezes the random patch projection (its Sec. 4.1); v2 trains everything."""
    mask = jax.tree.map(lambda _: True, params)
    if v3 and a.freeze_patch_embed and "patch_embed" in mask.get("backbone", {}):
      mask["backbone"]["patch_embed"] = jax.tree.map(lambda _: False,
                                                     mask["backbone"]["patch_embed"])
    return mask

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=net.backbone, batch_spec=batch_spec, **eval_fns,
                     trainable_mask=trainable_mask)
