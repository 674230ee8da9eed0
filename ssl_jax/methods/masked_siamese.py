"""Masked MoCo-v3 and Masked BYOL ("An improved baseline for masked contrastive learning").

`config.method = "masked_mocov3"` / `"masked_byol"`. Paper Sec. 3.2–3.4, Eq. 3–4:

1. Views. Two views of each image (`config.data.views`: `masked_light` = one shared crop with
   colour jitter twice, the paper's default; `masked_medium`, `masked_strong`, Sec. 4.1).
2. Online masking (Sec. 3.2, Fig. 2). The N patches of a view are shuffled per example and cut
   into n chunks of K = N // n (`ops.patches.chunk_indices`); each chunk gets its own CLS and is
   an independent sequence of the ViT (`keep_indices [B, n, K]`): no attention across chunks;
   the patch embedding and position embedding run once on the whole view. When n does not divide
   N, the last N − n·K patches of the shuffled order are dropped (a random subset, per example;
   DESIGN "Method notes"), counted in the metric `chunks/dropped`. n = 1 is the full view in
   patch order (a shuffle cannot change a ViT's CLS or mean-pooled output, so none is drawn).
3. Target. The momentum / EMA network (backbone, cross-attention blocks if any, projector) sees
   the full other view (m = 1), or m chunks of it whose projections are combined by the
   spherical mean k̂ = Σ k̄_j / ‖Σ k̄_j‖ (Eq. 4, `losses.spherical_mean`).
4. Heads. Projector 3 layers, predictor 2, hidden 4096, out 256 as MoCo v3's ViT heads, with every
   BN replaced by a LayerNorm (Sec. 3.4; `method_args.head_norm="bn"` keeps MoCo v3's BN heads,
   the paper's ablation). Masked BYOL's predictor has no norm after its output layer ("For BYOL,
   we found it critical to remove the BN for the output fc of the predictor", Sec. 3.1).
   Optional `cross_attention_blocks` class-attention blocks between backbone and projector
   (Table 3 "LN + CA"; off by default, FIDELITY row 11).
5. Loss (Eq. 3), averaged over the n queries of each view and symmetrised over the two views as
   MoCo v3 / BYOL (the paper's text defines one direction; it says n = 1 "reduces to the standard
   MoCo or BYOL losses", which are symmetric):
     masked_mocov3: 2τ · [ (1/n) Σ_i ctr(q¹_i, k²) + (1/n) Σ_i ctr(q²_i, k¹) ], ctr = InfoNCE
       (Eq. 1) of the chunk query against the keys of the global batch. Our reading of Eq. 1 + 3:
       each chunk query q_i of image b is its own InfoNCE problem whose positive is k_b and whose
       negatives are the keys of the other images of the global batch; the other chunks of the
       same image are queries, never keys (logits [B, B] per chunk).
     masked_byol: (1/n) Σ_i ‖q̄¹_i − k̄²‖² + (1/n) Σ_i ‖q̄²_i − k̄¹‖² (Eq. 2), q = predictions.
   With n = m = 1 the step is MoCo v3's / BYOL's step (same ops in the same order, tested).
6. Target update: ξ ← mξ + (1 − m)θ with m cosine from `momentum` (0.99) to 1 (MoCo v3 ViT,
   FIDELITY rows 12–13).
7. Monitor (Sec. 3.4, Fig. 6): per image the n normalised chunk representations are vMF samples;
   κ (Banerjee, `losses.vmf_kappa`) at "rep" (mean of the last block's patch tokens after the
   ViT's final norm, CLS excluded), projection and prediction, averaged over images and both views:
   `kappa/rep`, `kappa/proj`, `kappa/pred` (stop-gradient; only for n ≥ 2, κ needs two samples).

The online linear probe sees stop-gradient *target* features of the full view 1 (the online
network never sees a full view during training): the target's pooled backbone output, computed
for free when m = 1, by one extra no-gradient target backbone pass when m > 1.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import losses, optim
from ssl_jax.methods import base
from ssl_jax.models import vit
from ssl_jax.models.heads import MLP, CrossAttentionHead
from ssl_jax.ops import patches

METHODS = ("masked_mocov3", "masked_byol")
HEAD_NORMS = ("ln", "bn")
# The target (momentum / EMA) network: everything but the predictor.
TARGET_KEYS = ("backbone", "cross_attention", "projector")


def num_patches(config) -> int:
  """N = (image_size / patch_size)² of the ViT."""
  p = int(config.model.get("patch_size", 16))
  return (int(config.data.image_size) // p) ** 2


def validate(config) -> None:
  a = config.method_args
  if not str(config.model.name).startswith("vit"):
    raise ValueError(f"config.model.name={config.model.name!r}: {config.method} chunks patch "
                     "tokens and needs a ViT backbone (vit_tiny, vit_small, vit_base)")
  n_patches = num_patches(config)
  for field in ("num_chunks", "target_chunks"):
    value = a[field]
    if int(value) != value or not 1 <= value <= n_patches:
      raise ValueError(f"config.method_args.{field}={value} must be an integer in [1, "
                       f"{n_patches}] (the patch count at config.data.image_size="
                       f"{config.data.image_size})")
  if a.head_norm not in HEAD_NORMS:
    raise ValueError(f"config.method_args.head_norm={a.head_norm!r} must be one of {HEAD_NORMS}")
  if int(a.cross_attention_blocks) != a.cross_attention_blocks or a.cross_attention_blocks < 0:
    raise ValueError(f"config.method_args.cross_attention_blocks={a.cross_attention_blocks} must "
                     "be an integer >= 0")
  if not 0.0 <= a.momentum < 1.0:
    raise ValueError(f"config.method_args.momentum={a.momentum} must be in [0, 1)")
  if config.method == "masked_mocov3" and a.temperature <= 0:
    raise ValueError(f"config.method_args.temperature={a.temperature} must be > 0")


def _heads(config) -> tuple[nn.Module, nn.Module]:
  """MoCo v3's ViT heads (official `_build_mlp`: Linear without bias, norm after every Linear,
  the last norm without affine for BN) with BN or LN; Masked BYOL's predictor ends without norm."""
  a, dtype = config.method_args, base.compute_dtype(config)
  norm = a.head_norm
  # LN's affine last norm: the literal "replace BN by LN" keeps γ, β of LN (there is no
  # affine-free LayerNorm in the PyTorch export layout of `export.torch`).
  last = "ln" if norm == "ln" else "bn_noaffine"
  projector = MLP(a.projector_hidden, a.projector_dim, num_layers=3, norm=norm, last_norm=last,
                  use_bias=False, dtype=dtype)
  predictor = MLP(a.predictor_hidden, a.projector_dim, num_layers=2, norm=norm,
                  last_norm=last if config.method == "masked_mocov3" else "none", use_bias=False,
                  dtype=dtype)
  return projector, predictor


class MaskedSiameseNet(nn.Module):
  """ViT backbone (on the full view or on chunks) → optional class-attention blocks → projector
  → (online) predictor. Parameter names: backbone, cross_attention, projector, predictor."""
  backbone: nn.Module
  projector: nn.Module
  predictor: nn.Module
  cross_attention: Optional[nn.Module] = None

  def __call__(self, x, *, train: bool, keep_indices=None):
    """The online branch: `project` + p [B, n, E] float32."""
    out = self.project(x, train=train, keep_indices=keep_indices)
    b, n, e = out["z"].shape
    out["p"] = self.predictor(out["z"].reshape(b * n, e),
                              train=train).astype(jnp.float32).reshape(b, n, e)
    return out

  def project(self, x, *, train: bool, keep_indices=None):
    """x: [B, H, W, 3] float; keep_indices None (full view, n = 1) or [B, n, K] chunks.

    Returns dict of float32 arrays with a chunk axis (n = 1 for the full view):
      h [B, n, D] pooled backbone output, rep [B, n, D] mean of the patch tokens (CLS excluded),
      z [B, n, E] projection.
    """
    out = self.backbone(x, train=train, keep_indices=keep_indices)
    tokens, h = out["tokens"], out["pooled"]
    if keep_indices is None:  # one "chunk": the full view
      tokens, h = tokens[:, None], h[:, None]
    b, n, t, d = tokens.shape
    rep = jnp.mean(tokens[:, :, 1:].astype(jnp.float32), axis=2)
    head_in = h.reshape(b * n, d)
    if self.cross_attention is not None:
      head_in = self.cross_attention(tokens.reshape(b * n, t, d))
    z = self.projector(head_in, train=train).astype(jnp.float32)
    return {"h": h.astype(jnp.float32), "rep": rep, "z": z.reshape(b, n, -1)}

  def encode(self, x, *, train: bool = False):
    return self.backbone(x, train=train)["pooled"].astype(jnp.float32)


def batch_spec(config):
  """Two views of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=2)


def _chunks(rng, batch_size: int, n_patches: int, num: int):
  """(keep_indices [B, num, K] or None for the full view, dropped patches per example)."""
  if num == 1:
    return None, 0
  return patches.chunk_indices(rng, batch_size, n_patches, num, shuffle=True)


def _mean_kappa(x: jax.Array) -> jax.Array:
  """x: [B, n, D] -> mean over images of the vMF κ of each image's n vectors (no gradient)."""
  return jnp.mean(losses.vmf_kappa(jax.lax.stop_gradient(x)))


def build_net(config) -> MaskedSiameseNet:
  """The online network of `config` (the target is a copy of all of it but the predictor)."""
  a = config.method_args
  backbone = base.make_backbone(config)
  if not isinstance(backbone, vit.VisionTransformer):
    raise ValueError(f"config.model.name={config.model.name!r} is not a ViT")
  cross_attention = None
  if a.cross_attention_blocks:
    # Blocks as wide as the backbone's, with its head count and MLP ratio (ExtreMA's `Block_CA`).
    cross_attention = CrossAttentionHead(int(a.cross_attention_blocks), backbone.num_heads,
                                         backbone.mlp_ratio, dtype=base.compute_dtype(config))
  projector, predictor = _heads(config)
  return MaskedSiameseNet(backbone=backbone, projector=projector, predictor=predictor,
                          cross_attention=cross_attention)


def make(config) -> base.Method:
  a = config.method_args
  mocov3 = config.method == "masked_mocov3"
  n, m = int(a.num_chunks), int(a.target_chunks)
  net = build_net(config)
  n_patches = num_patches(config)
  total_steps = config.train.total_steps

  def init(rng, batch):
    variables = net.init({"params": rng}, base.dummy_images(batch), train=True)
    params, stats = variables["params"], variables.get("batch_stats", {})
    return params, {"batch_stats": stats,
                    "target": base.init_target(params, stats, keys=TARGET_KEYS)}

  def target_keys(target, x, rng):
    """Target projection of the full view [B, E] (m = 1) or the spherical mean of its m chunk
    projections (m > 1, Eq. 4); no gradient. Returns (keys, h [B, n_t, D], new target)."""
    idx, _ = _chunks(rng, x.shape[0], n_patches, m)
    out, stats = base.apply_train(net, target["params"], target["batch_stats"], x,
                                  keep_indices=idx, method=MaskedSiameseNet.project)
    z = out["z"][:, 0] if m == 1 else losses.spherical_mean(out["z"], axis=1)
    return (jax.lax.stop_gradient(z), jax.lax.stop_gradient(out["h"]),
            {"params": target["params"], "batch_stats": stats})

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    # Step 1) views: colour augmentation from `rng` exactly as MoCo v3 / BYOL draw it.
    x = base.augmented_views(rng, batch["image"], config.data.views)
    chunk_rngs = jax.random.split(jax.random.fold_in(rng, 1), 4)
    stats, target = state["batch_stats"], state["target"]
    online, keys, target_h = [], [], []
    for v in range(2):
      # Step 2) online: n chunks of view v, each its own sequence with its own CLS.
      idx, dropped = _chunks(chunk_rngs[v], x.shape[0], n_patches, n)
      out, stats = base.apply_train(net, params, stats, x[:, v], keep_indices=idx)
      online.append(out)
      # Step 3) target: the full view v (or m chunks, spherical mean), keys for the other view.
      k, h, target = target_keys(target, x[:, v], chunk_rngs[2 + v])
      keys.append(k)
      target_h.append(h)
    # Step 4) Eq. 3: mean over the n queries, symmetrised over the views.
    if mocov3:
      def direction(q, k):
        return jnp.mean(jnp.stack([losses.info_nce(q[:, i], k, a.temperature)
                                   for i in range(n)]))
      scale = 2.0 * a.temperature  # MoCo v3: CrossEntropy(logits / τ) · 2τ
    else:
      def direction(q, k):
        return jnp.mean(jnp.stack([losses.byol_loss(q[:, i], k) for i in range(n)]))
      scale = 1.0
    loss = scale * (direction(online[0]["p"], keys[1]) + direction(online[1]["p"], keys[0]))
    # The online probe: stop-gradient full-view target features of view 1.
    if m == 1:
      features = target_h[0][:, 0]
    else:
      features = jax.lax.stop_gradient(net.apply(
          {"params": target["params"], "batch_stats": target["batch_stats"]}, x[:, 0],
          method=MaskedSiameseNet.encode))
    # Collapse check (as methods/byol.py): std over the batch of the unit projections of view 1's
    # chunks, averaged over dimensions; ~1/√E when spread, 0 when collapsed.
    z_unit = jax.lax.stop_gradient(losses.l2_normalize(online[0]["z"]))
    metrics = {"info_nce" if mocov3 else "byol_loss": loss,
               "z_std": jnp.mean(jnp.std(z_unit.reshape(-1, z_unit.shape[-1]), axis=0)),
               "chunks/dropped": jnp.float32(dropped),
               "features": features}
    if m > 1:
      metrics["chunks/dropped_target"] = jnp.float32(n_patches - m * (n_patches // m))
    if n >= 2:  # Step 5) the concentration monitor (Sec. 3.4)
      for name, key in (("rep", "rep"), ("proj", "z"), ("pred", "p")):
        metrics[f"kappa/{name}"] = 0.5 * (_mean_kappa(online[0][key]) +
                                          _mean_kappa(online[1][key]))
    return loss, ({"batch_stats": stats, "target": target}, metrics)

  def after_update(state, params, step):
    return base.update_target(state, params, optim.ema_momentum(step, total_steps, a.momentum),
                              keys=TARGET_KEYS)

  eval_fns = base.eval_functions(net, MaskedSiameseNet.encode)

  def trainable_mask(params):
    """`freeze_patch_embed` (MoCo v3's random patch projection; off in the paper's M-MoCo/BYOL,
    Table 1 "Frozen PE")."""
    mask = jax.tree.map(lambda _: True, params)
    if a.freeze_patch_embed:
      mask["backbone"]["patch_embed"] = jax.tree.map(lambda _: False,
                                                     mask["backbone"]["patch_embed"])
    return mask

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=net.backbone, batch_spec=batch_spec, **eval_fns,
                     trainable_mask=trainable_mask)
