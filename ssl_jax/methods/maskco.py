"""MaskCo and MaskCo(+in): contrastive mask prediction (Zhao et al., 2021, "Self-Supervised
Visual Representations Learning by Contrastive Mask Prediction", §3.2–3.3, Algorithm 1, App. A.2).

No official code exists (FIDELITY rows 5–8); this file follows the text, and every switch of the
paper's ablations is a field of `config.method_args` (or `config.data`):

1. Views (`data/views.py:make_maskco_views`, host): a query and a key crop of one image (MoCo v2
   augmentation, crops >= 20 % of the image, constrained to overlap), `config.data.num_boxes`=17
   square boxes in the key view with sides in `config.data.box_side` × image size (32–128 px at
   224, Table "box size"), the first the positive; the other 16 have IoU < 0.2 with it. The
   positive's projection into the query view is the masked box.
2. Mask (`method_args.mask`, Tables 5/8): after colour augmentation and before normalisation the
   pixels of the masked box are set to `mask_fill` in the query view: "black" (0, default) or
   "mean" (the ImageNet mean, i.e. 0 after normalisation). The paper says "the selected region is
   masked to zero" and generates the boxes "after global augmentation", which reads as zero
   pixels of the augmented image (black); OpenSelfSup pipelines end in `Normalize`, so a mask
   applied to the model's input tensor would instead be the mean colour: hence the switch.
   A pixel is masked when its centre lies in the box (y0 <= r + ½ < y1, x0 <= c + ½ < x1).
3. Forward (Algorithm 1): q = head_q(roi_align(net_q(x_q), masked_box)), keys
   k = head_k(roi_align(net_k(x_k), key_boxes)), no gradient to k. net = ResNet backbone → Mask
   Prediction Head on C5 (`method_args.mph_blocks` = 0..4, Table 4; default 3) → RoIAlign; head =
   MoCo v2's projection head (global average pool of the RoI feature → fc 2048 → ReLU → fc 128).
   RoIAlign: `roi_output_size`=7 bins, `roi_sampling_ratio`=2, aligned, spatial scale =
   1 / backbone.output_stride (1/32 for a plain ResNet-50, 1/16 with a dilated conv5, 1/8 for
   the small-image stem). The head's average pool over the 7×7 bins equals one bin sampled
   14×14 (the same sample points), which is what we compute: no [B, K, 7, 7, C] array.
4. Loss (`losses.maskco_loss`, Eq. 1, τ = 0.2): the positive key box against the 16 negative
   boxes of every other image of the query's group of `negatives_group_size` images (default 32,
   the paper's images per GPU: 16 × 31 = 496 negatives; the grouping follows the global batch
   order, so the loss does not depend on the device count); MaskCo(+in) (`intra_negatives`)
   adds the query image's own 16 negative boxes (512). `inter_negatives=False,
   intra_negatives=True` is Table 6's intra-only row.
5. Momentum network (backbone + MPH + projector): ξ ← m·ξ + (1 − m)·θ after each step, m = 0.999
   constant (MoCo v2's), no queue (FIDELITY row 6).

The Mask Prediction Head lives under params["mask_head"] (and its BN statistics under
batch_stats["mask_head"]): the encoder seen by evaluation and export (`encoder`,
`target_encoder`) is the plain ResNet, so the multi-layer linear probe (MaskCo Table 7,
evaluator kind "multilayer") and the torchvision export work unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.data import augment
from ssl_jax.data import views as views_lib
from ssl_jax.methods import base
from ssl_jax.models import resnet
from ssl_jax.models.heads import MLP
from ssl_jax.models.mask_head import MaskPredictionHead
from ssl_jax.ops.roi_align import roi_align

# The momentum (key) network: everything the query network has.
TARGET_KEYS = ("backbone", "mask_head", "projector")
MASK_FILLS = ("black", "mean")


def validate(config) -> None:
  a, d = config.method_args, config.data
  if d.num_boxes < 2:
    raise ValueError(f"config.data.num_boxes={d.num_boxes}: MaskCo needs the positive box and at "
                     "least one negative box (the paper uses 17)")
  if d.masks is not None:
    raise ValueError(f"config.data.masks={d.masks!r}: MaskCo views carry no masks; set None")
  if len(views_lib.get_recipe(d.views)) != 2:
    raise ValueError(f"config.data.views={d.views!r} must be a 2-view recipe (query, key), e.g. "
                     "'maskco'")
  lo, hi = (float(v) for v in d.box_side)
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"config.data.box_side={tuple(d.box_side)} must be (lo, hi) fractions of "
                     "the image side with 0 < lo <= hi <= 1 (the paper: 32/224 to 128/224)")
  if int(a.mph_blocks) != a.mph_blocks or not 0 <= a.mph_blocks <= 4:
    raise ValueError(f"config.method_args.mph_blocks={a.mph_blocks} must be an integer in 0..4 "
                     "(the paper's Table 4; 0 = no Mask Prediction Head)")
  if not isinstance(a.mask, bool):
    raise ValueError(f"config.method_args.mask={a.mask!r} must be True or False")
  if a.mask_fill not in MASK_FILLS:
    raise ValueError(f"config.method_args.mask_fill={a.mask_fill!r} must be one of {MASK_FILLS}")
  if not (a.inter_negatives or a.intra_negatives):
    raise ValueError("config.method_args.inter_negatives and intra_negatives are both False: "
                     "enable at least one (Table 6)")
  g, b = int(a.negatives_group_size), int(config.train.batch_size)
  if g < 1 or b % g:
    raise ValueError(f"config.method_args.negatives_group_size={a.negatives_group_size} must "
                     f"divide config.train.batch_size={b} (images per group of negatives; "
                     "equal to the batch for global negatives)")
  if a.inter_negatives and g < 2:
    raise ValueError(f"config.method_args.negatives_group_size={g}: inter-image negatives need "
                     ">= 2 images per group (or set inter_negatives=False)")
  if a.temperature <= 0:
    raise ValueError(f"config.method_args.temperature={a.temperature} must be > 0")
  if not 0.0 <= a.momentum <= 1.0:
    raise ValueError(f"config.method_args.momentum={a.momentum} must be in [0, 1]")
  if a.roi_output_size < 1 or a.roi_sampling_ratio < 1:
    raise ValueError(f"config.method_args.roi_output_size={a.roi_output_size} and "
                     f"roi_sampling_ratio={a.roi_sampling_ratio} must be >= 1")
  if not config.model.name.startswith("resnet"):
    raise ValueError(f"config.model.name={config.model.name!r}: MaskCo needs a ResNet (its C5 "
                     "feature map feeds the Mask Prediction Head and RoIAlign)")


class MaskCoNet(nn.Module):
  """backbone → C5 → Mask Prediction Head → RoIAlign → average pool → projection head."""
  backbone: nn.Module
  mask_head: nn.Module
  projector: nn.Module
  roi_output_size: int = 7
  roi_sampling_ratio: int = 2

  def __call__(self, x, boxes, *, train: bool):
    """x: [B, H, W, 3] float, boxes: [B, K, 4] (y0, x0, y1, x1) input pixels ->
    dict(z [B, K, D] float32 projections of the boxes, h [B, C] pooled backbone features)."""
    out = self.backbone(x, train=train)
    fmap = self.mask_head(out["feature_map"], train=train)
    # mean over the n×n bins of RoIAlign(ratio r) == one bin sampled (n·r)×(n·r): same points.
    ratio = self.roi_output_size * self.roi_sampling_ratio
    pooled = roi_align(fmap, boxes, 1, 1.0 / self.backbone.output_stride,
                       sampling_ratio=ratio, aligned=True)[:, :, 0, 0]     # [B, K, C]
    b, k, c = pooled.shape
    z = self.projector(pooled.reshape(b * k, c), train=train).astype(jnp.float32)
    return {"z": z.reshape(b, k, -1), "h": out["pooled"].astype(jnp.float32)}

  def encode(self, x, *, train: bool = False):
    return self.backbone(x, train=train)["pooled"].astype(jnp.float32)


def box_pixels(boxes: jax.Array, height: int, width: int) -> jax.Array:
  """boxes: [B, 4] (y0, x0, y1, x1) pixels -> bool [B, H, W], True where the pixel centre lies
  in the box (y0 <= r + ½ < y1, x0 <= c + ½ < x1)."""
  r = jnp.arange(height, dtype=jnp.float32) + 0.5
  c = jnp.arange(width, dtype=jnp.float32) + 0.5
  y0, x0, y1, x1 = (boxes[:, i, None] for i in range(4))
  rows = (r[None] >= y0) & (r[None] < y1)                                   # [B, H]
  cols = (c[None] >= x0) & (c[None] < x1)                                   # [B, W]
  return rows[:, :, None] & cols[:, None, :]


def mask_query(x: jax.Array, masked_box: jax.Array, fill: str = "black") -> jax.Array:
  """x: [B, H, W, 3] augmented pixels in [0, 1], masked_box: [B, 4] -> x with the box's pixels
  set to 0 ("black") or to the ImageNet mean ("mean": exactly 0 after normalisation)."""
  if fill not in MASK_FILLS:
    raise ValueError(f"mask_fill={fill!r} must be one of {MASK_FILLS}")
  value = (jnp.zeros(3, x.dtype) if fill == "black"
           else jnp.asarray(augment.IMAGENET_MEAN, x.dtype))
  inside = box_pixels(masked_box, x.shape[1], x.shape[2])
  return jnp.where(inside[..., None], value, x)


def batch_spec(config):
  """Query and key views, the key boxes [B, K, 4] and the masked box [B, 4]."""
  spec = base.view_batch_spec(config, num_views=2)
  b, k = config.train.batch_size, int(config.data.num_boxes)
  spec["boxes"] = jax.ShapeDtypeStruct((b, k, 4), jnp.float32)
  spec["masked_box"] = jax.ShapeDtypeStruct((b, 4), jnp.float32)
  return spec


def make_net(config) -> MaskCoNet:
  """The query network of `config` (the momentum network is the same module with its own
  variables): params {"backbone", "mask_head" (absent for mph_blocks=0), "projector"}."""
  a = config.method_args
  dtype = base.compute_dtype(config)
  backbone = base.make_backbone(config)
  if not isinstance(backbone, resnet.ResNet):
    raise ValueError(f"config.model.name={config.model.name!r}: MaskCo needs a ResNet")
  # The head continues conv5's dilation (torchvision doubles it at every dilated stage).
  dilation = 2 ** sum(bool(v) for v in backbone.replace_stride_with_dilation)
  return MaskCoNet(
      backbone=backbone,
      mask_head=MaskPredictionHead(num_blocks=int(a.mph_blocks), dilation=dilation, dtype=dtype),
      projector=MLP(a.projector_hidden, a.projector_dim, num_layers=2, norm="none", dtype=dtype),
      roi_output_size=int(a.roi_output_size), roi_sampling_ratio=int(a.roi_sampling_ratio))


def make(config) -> base.Method:
  a = config.method_args
  net = make_net(config)
  group = int(a.negatives_group_size)
  inter, intra = bool(a.inter_negatives), bool(a.intra_negatives)
  num_negatives = losses.maskco_num_negatives(int(config.data.num_boxes), group,
                                              inter_negatives=inter, intra_negatives=intra)

  def init(rng, batch):
    variables = net.init({"params": rng}, base.dummy_images(batch), batch["boxes"], train=True)
    params, stats = variables["params"], variables.get("batch_stats", {})
    return params, {"batch_stats": stats,
                    "target": base.init_target(params, stats, keys=TARGET_KEYS)}

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    # Step 1) Views: colour-augment query and key views (pixels in [0, 1]); mask the query's box
    # after the augmentation, before normalisation; the key view stays unaltered.
    x = base.augmented_views(rng, batch["image"], config.data.views, normalize=False)
    x_q, x_k = x[:, 0], x[:, 1]
    if a.mask:
      x_q = mask_query(x_q, batch["masked_box"], a.mask_fill)
    x_q, x_k = base.normalized_views(x_q), base.normalized_views(x_k)
    # Step 2) Query: online backbone → MPH → RoIAlign of the masked box → projection head.
    out, stats = base.apply_train(net, params, state["batch_stats"], x_q,
                                  batch["masked_box"][:, None])
    q = out["z"][:, 0]                                                      # [B, D]
    # Step 3) Keys: momentum network on the key view, all K key boxes; no gradient to keys.
    target = state["target"]
    key_out, target_stats = base.apply_train(net, target["params"], target["batch_stats"], x_k,
                                             batch["boxes"])
    k = jax.lax.stop_gradient(key_out["z"])                                 # [B, K, D]
    # Step 4) Contrastive loss: positive box vs negative boxes of the other images of the group
    # (+ the image's own negative boxes for MaskCo(+in)), τ = 0.2, label 0.
    loss = losses.maskco_loss(q, k, a.temperature, group, inter_negatives=inter,
                              intra_negatives=intra)
    new_state = {"batch_stats": stats,
                 "target": {"params": target["params"], "batch_stats": target_stats}}
    qn, kn = losses.l2_normalize(q), losses.l2_normalize(k)
    metrics = {"maskco_loss": loss,
               "positive_similarity": jnp.mean(jnp.sum(qn * kn[:, 0], axis=-1)),
               "num_negatives": jnp.float32(num_negatives),
               "features": jax.lax.stop_gradient(out["h"])}
    return loss, (new_state, metrics)

  def after_update(state, params, step):
    # Step 5) Momentum update of the key network (backbone, MPH, projector), m constant.
    del step
    return base.update_target(state, params, jnp.float32(a.momentum), keys=TARGET_KEYS)

  eval_fns = base.eval_functions(net, MaskCoNet.encode)
  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=net.backbone, batch_spec=batch_spec, **eval_fns)
