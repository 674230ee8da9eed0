"""DetCon: contrastive detection (Hénaff et al., 2021), variants DetCon-S and DetCon-B.

Paper Sec. 3 (the spec), with the semantics of the official JAX code where the text is silent
(DESIGN "Method notes", FIDELITY rows 1–4):

1. Views: two augmentations of the image and of its segmentation (FH, spatial grid or ground
   truth), carried through the same crop/flip on the host (`data/views.py`); ids are consistent
   across the two views of an image. The random crop is the official one (`crop_sampler=
   "detcon"`: one draw of area and ratio, clipped to the image; `transforms.detcon_crop_box`),
   not torchvision's ten tries with a centre fallback. Up to `config.data.max_segments`=256
   segments per image are kept (the official uint8 id range; more are counted as
   `data/segments_dropped`).
2. Masks → feature grid: each mask is reduced to the backbone's final grid (7×7 for ResNet-50 at
   224 px) by average pooling of its one-hot then argmax, i.e. every cell gets one id
   (`ops.mask_pooling.masks_to_grid`; counted per cell, never one-hot at full resolution).
   `method_args.mask_pooling="soft"` keeps the paper's soft average-pooled weights instead.
   Counting is per example (no collective across devices).
3. Sampling: each view draws `num_samples`=16 ids uniformly with replacement among the ids present
   in its own grid, independently of the other view; the online and target networks use the same
   draw (`sample_from="both"` draws among ids present in both views instead). With soft pooling,
   "present" means a positive soft weight in some cell (an id may cover part of cells without
   winning any).
4. Mask pooling (Eq. 1): h_m = Σ_cells [id = m] f / Σ_cells [id = m], then the projector g
   (and predictor q for B) on every pooled vector.
5. Loss (Eq. 2–3, `losses.detcon_loss`): for each ROI, the other view's ROIs of the same image and
   id are positives, all other ROIs of the global batch (both views) are negatives; latents are
   L2-normalised and divided by τ = 0.1, which is the paper's "rescale to norm 1/√τ" (the dot
   product of two latents of norm 1/√τ is cos/τ).

DetCon-B (BYOL-style): online backbone + projector (4096 → 256) + predictor, BYOL's heads
(`byol.byol_mlp`: the output Linear has no bias, as the official Haiku `MLP`); the target network is
an EMA of the online one (τ_ema cosine from 0.99 / 0.996 to 1) and provides the targets.
DetCon-S (SimCLR-style): SimCLR v1's projector 2048 → 128 (`simclr.simclr_projector`, ending in a
BN), no predictor and no target network: the online projections are both predictions and targets.
Both start with the last BN γ of every residual block at 0, as the official ResNets
(`config.model.zero_init_residual`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import losses, optim
from ssl_jax.methods import base, byol, simclr
from ssl_jax.ops import mask_pooling

def validate(config) -> None:
  a = config.method_args
  if config.data.masks not in ("fh", "grid", "gt"):
    raise ValueError(f"config.data.masks={config.data.masks!r}: DetCon needs 'fh', 'grid' or 'gt'")
  if a.num_samples < 1:
    raise ValueError(f"config.method_args.num_samples={a.num_samples} must be >= 1")
  if a.mask_pooling not in ("hard", "soft"):
    raise ValueError(f"config.method_args.mask_pooling={a.mask_pooling!r} must be 'hard' or 'soft'")
  if a.sample_from not in ("view", "both"):
    raise ValueError(f"config.method_args.sample_from={a.sample_from!r} must be 'view' or 'both'")
  if a.temperature <= 0:
    raise ValueError(f"config.method_args.temperature={a.temperature} must be > 0")


class DetConNet(nn.Module):
  """backbone → final feature map → mask pooling → projector (→ predictor)."""
  backbone: nn.Module
  projector: nn.Module
  predictor: nn.Module | None = None
  num_ids: int = 64
  soft: bool = False

  def feature_grid(self, x, masks, *, train: bool):
    """x: [B,H,W,3] float, masks: [B,H,W] int -> (feature_map [B,h,w,C], grid ids [B,h,w],
    soft weights [B,h*w,num_ids] or None)."""
    fmap = self.backbone(x, train=train)["feature_map"].astype(jnp.float32)
    b, h, w, _ = fmap.shape
    if h != w:
      raise ValueError(f"DetCon expects a square feature grid, got {h}x{w}")
    grid = mask_pooling.masks_to_grid(masks, h, self.num_ids)
    weights = mask_pooling.masks_to_grid_soft(masks, h, self.num_ids) if self.soft else None
    return fmap, grid, weights

  def __call__(self, x, masks, ids, *, train: bool, predict: bool = True):
    """ids: [B,R] int sampled mask ids -> dict(z [B,R,D], p [B,R,D] or None, h [B,C])."""
    fmap, grid, weights = self.feature_grid(x, masks, train=train)
    return self.heads(fmap, grid, weights, ids, train=train, predict=predict)

  def heads(self, fmap, grid, weights, ids, *, train: bool, predict: bool = True):
    if self.soft:
      pooled = mask_pooling.mask_pool_soft(fmap, weights, ids)
    else:
      pooled = mask_pooling.mask_pool(fmap, grid, ids)
    b, r, c = pooled.shape
    z = self.projector(pooled.reshape(b * r, c), train=train).astype(jnp.float32)
    p = None
    if predict and self.predictor is not None:
      p = self.predictor(z, train=train).astype(jnp.float32).reshape(b, r, -1)
    return {"z": z.reshape(b, r, -1), "p": p, "h": jnp.mean(fmap, axis=(1, 2))}

  def encode(self, x, *, train: bool = False):
    return self.backbone(x, train=train)["pooled"].astype(jnp.float32)


def batch_spec(config):
  """Two views of every image with their segment ids (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=2, masks=True)


def make(config) -> base.Method:
  a = config.method_args
  variant_b = config.method == "detcon_b"
  dtype = base.compute_dtype(config)
  if variant_b:
    projector = byol.byol_mlp(a.projector_hidden, a.projector_dim, dtype)
    predictor = byol.byol_mlp(a.predictor_hidden, a.projector_dim, dtype)
  else:
    projector, predictor = simclr.simclr_projector(a.projector_hidden, a.projector_dim, 2,
                                                   dtype), None
  net = DetConNet(backbone=base.make_backbone(config), projector=projector, predictor=predictor,
                  num_ids=config.data.max_segments, soft=a.mask_pooling == "soft")
  total_steps, num_ids, r = config.train.total_steps, config.data.max_segments, a.num_samples

  def init(rng, batch):
    x = base.dummy_images(batch)
    masks = jnp.zeros(x.shape[:3], jnp.int32)
    ids = jnp.zeros((x.shape[0], r), jnp.int32)
    variables = net.init({"params": rng}, x, masks, ids, train=True)
    params, stats = variables["params"], variables.get("batch_stats", {})
    state = {"batch_stats": stats}
    if variant_b:
      state["target"] = base.init_target(params, stats)
    return params, state

  def sample_ids(rng, feats):
    """feats: per view (feature map, [B,h,w] id grid, soft weights or None) -> two [B,R] samples
    (shared by online and target)."""
    if net.soft:  # the ids soft pooling can see: positive weight in some cell
      present = [mask_pooling.present_ids_soft(f[2]) for f in feats]
    else:  # the ids that win a cell
      present = [mask_pooling.present_ids(f[1], num_ids) for f in feats]
    keys = jax.random.split(rng, 2)
    if a.sample_from == "both":
      shared = mask_pooling.sample_present_ids(keys[0], present[0] & present[1], r)
      return shared, shared
    return tuple(mask_pooling.sample_present_ids(keys[v], present[v], r) for v in range(2))

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    aug_rng, sample_rng = jax.random.split(rng)
    x = base.augmented_views(aug_rng, batch["image"], config.data.views)
    masks = batch["masks"].astype(jnp.int32)  # sent in the smallest dtype that holds the ids
    stats = state["batch_stats"]
    feats = []
    for v in range(2):
      (fmap, grid, weights), stats = base.apply_train(
          net, params, stats, x[:, v], masks[:, v], method=DetConNet.feature_grid)
      feats.append((fmap, grid, weights))
    ids = sample_ids(sample_rng, feats)
    online = []
    for v in range(2):
      out, stats = base.apply_train(net, params, stats, *feats[v], ids[v],
                                    method=DetConNet.heads)
      online.append(out)
    new_state = {"batch_stats": stats}
    if variant_b:
      target = state["target"]
      targets = []
      for v in range(2):
        out, tstats = base.apply_train(net, target["params"], target["batch_stats"], x[:, v],
                                       masks[:, v], ids[v], predict=False)
        target = {"params": target["params"], "batch_stats": tstats}
        targets.append(jax.lax.stop_gradient(out["z"]))
      new_state["target"] = target
      preds = [o["p"] for o in online]
    else:  # DetCon-S: the online projections are predictions and targets (SimCLR-style)
      preds = targets = [o["z"] for o in online]
    loss = losses.detcon_loss(preds[0], preds[1], targets[0], targets[1],
                              ids[0], ids[1], ids[0], ids[1], temperature=a.temperature)
    num_masks = jnp.mean(jnp.stack([_ids_per_image(f[1], num_ids) for f in feats]))
    metrics = {"detcon_loss": loss, "masks_per_view": num_masks,
               "features": jax.lax.stop_gradient(online[0]["h"])}
    return loss, (new_state, metrics)

  def after_update(state, params, step):
    if not variant_b:
      return state
    tau = optim.ema_momentum(step, total_steps, a.ema_base)
    return base.update_target(state, params, tau)

  eval_fns = base.eval_functions(net, DetConNet.encode, target=variant_b)

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=net.backbone, batch_spec=batch_spec, **eval_fns)


def _ids_per_image(grid: jax.Array, num_ids: int) -> jax.Array:
  """Mean number of distinct ids per grid [B,h,w] (a health metric: collapse to 1 is bad)."""
  onehot = jax.nn.one_hot(grid.reshape(grid.shape[0], -1), num_ids, dtype=jnp.float32)
  return jnp.mean(jnp.sum(jnp.max(onehot, axis=1), axis=-1))
