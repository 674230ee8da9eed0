"""End-to-end fine-tuning (the BEiT/MAE recipe that MAE, ccMIM, MimCo, Masked MoCo and SimMIM
report), trained through the supervised loop (`ssl_jax.evaluate.supervised`), resumable.

Every backbone weight trains, with the recipe switches of `configs/finetune.py`:
  * AdamW (β 0.9/0.999), weight decay on matrices only (biases, norms, cls_token, pos_embed
    excluded, timm's `no_weight_decay`), linear warmup + cosine, lr = blr × batch/256, optional
    gradient clipping (SimMIM 5.0);
  * layer-wise lr decay (BEiT, MAE Sec. A.2): a parameter with layer id i gets
    lr × decay^(L + 1 − i), id 0 for the patch embedding and tokens, i + 1 for block i, L + 1 for
    the final norm and the head; Swin ids over all Σdepths blocks as SimMIM's `get_swin_layer`
    (`ssl_jax.optim.layer_decay_multipliers`, L counted from the parameter names);
  * drop path (stochastic depth, linear in depth) in the backbone;
  * host views: random-resized crop (bicubic) + flip + RandAugment `rand-m9-mstd0.5-inc1`
    (`ssl_jax.data.randaugment`), then random erasing p 0.25 'pixel' in normalised space
    (`ssl_jax.data.supervised_views`), in timm's order;
  * label smoothing and mixup / cutmix (timm's `Mixup` in batch mode: per batch either mixup
    with λ ~ Beta(α, α) or cutmix with a box of area 1 − λ, chosen with probability 1/2 when both
    are on; the batch is mixed with its reverse; targets are the smoothed one-hots mixed by λ);
  * optional EMA of the weights (`train.ema_decay`, timm's `ModelEma`), evaluated beside the
    weights themselves (`finetune_ema/top1`).
Evaluation: resize, centre crop, top-1/top-5.

Classifier input (`config.model.features`):
  * "global_pool": MAE's `models_vit` with `global_pool=True` (its fine-tuning default, also BEiT's
    `use_mean_pooling`): the mean of the last block's patch tokens *before* the final norm, then a
    new LayerNorm `fc_norm` (ε 1e-6) in the head; the backbone's final norm is then unused
    (MAE deletes it). Needs a ViT; the last block's output is read with flax
    `capture_intermediates`.
  * "cls": the CLS token after the final norm (MoCo v3, DeiT, iBOT's `--use_cls`).
  * "avg": the mean of the normed patch tokens (timm `global_pool="avg", fc_norm=False`).
  * "pooled": the backbone's own pooling (ResNet global average pool; Swin: final norm then
    average pool, the Swin/SimMIM classifier input).
The head is Dense(num_classes) with truncated-normal std 2e-5 weights and zero bias (MAE's
`trunc_normal_(head.weight, std=2e-5)`: tiny logits keep the first steps from wrecking the
pretrained features).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.evaluate import supervised
from ssl_jax.models.vit import LN_EPSILON

FEATURES = ("global_pool", "cls", "avg", "pooled")
NAME = "finetune"


def last_block_tokens(vit: nn.Module, variables: dict, x: jax.Array, *, train: bool = False,
                      rngs: dict | None = None) -> tuple[jax.Array, dict]:
  """The last transformer block's output [B, 1+N, D] (the final norm's input) and the updated
  mutable collections, read with flax `capture_intermediates` (our ViT returns normed tokens
  only; MAE's global pool needs the tokens before that norm)."""
  last = f"blocks_{vit.depth - 1}"
  _, updated = vit.apply(variables, x, train=train, rngs=rngs, mutable=["intermediates"],
                         capture_intermediates=lambda mdl, method: (mdl.name == last
                                                                   and method == "__call__"))
  updated = dict(updated)
  return updated.pop("intermediates")[last]["__call__"][0][0], updated  # (x, attention)


class ClassifierHead(nn.Module):
  """[B, D] features -> optional LayerNorm `fc_norm` (MAE global pool) -> Dense -> [B, C] f32."""
  num_classes: int
  fc_norm: bool = False

  @nn.compact
  def __call__(self, feats: jax.Array) -> jax.Array:
    feats = feats.astype(jnp.float32)
    if self.fc_norm:
      feats = nn.LayerNorm(epsilon=LN_EPSILON, name="fc_norm")(feats)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5),
                    name="head")(feats)


@dataclasses.dataclass(frozen=True)
class FineTuneModel:
  """Backbone + classifier head as two Linen modules under params {"backbone", "head"}.

  apply(params, state, x, train, rng) -> (logits [B, C] float32, state): x normalised images
  [B, H, W, 3]; state {"batch_stats": backbone BN statistics} (ResNet) or {}; in train mode the
  BN statistics update and drop path draws from `rng`.
  """
  backbone: nn.Module
  num_classes: int
  features: str = "cls"

  def __post_init__(self):
    if self.features not in FEATURES:
      raise ValueError(f"config.model.features={self.features!r} must be one of {FEATURES}")
    if self.features == "global_pool" and not hasattr(self.backbone, "depth"):
      raise ValueError("config.model.features='global_pool' (MAE) needs a ViT backbone; use "
                       "'pooled' for ResNets and Swins")

  @property
  def head(self) -> ClassifierHead:
    return ClassifierHead(self.num_classes, fc_norm=self.features == "global_pool")

  def init(self, rng: jax.Array, backbone_variables: dict, image_size: int) -> tuple[dict, dict]:
    """(params {"backbone", "head"}, state) with the given backbone weights."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    feats = jax.eval_shape(lambda v, im: self.features_of(v, im, False, None)[0],
                           backbone_variables, x)
    head = self.head.init(rng, jnp.zeros(feats.shape, feats.dtype))["params"]
    params = {"backbone": backbone_variables["params"], "head": head}
    state = ({"batch_stats": backbone_variables["batch_stats"]}
             if "batch_stats" in backbone_variables else {})
    return params, state

  def features_of(self, variables: dict, x: jax.Array, train: bool, rng: jax.Array | None
                  ) -> tuple[jax.Array, dict]:
    """(features [B, D] float32, updated backbone variables besides params) of `x`."""
    mutable = ["batch_stats"] if train and "batch_stats" in variables else []
    rngs = {"dropout": rng} if train and rng is not None else None
    if self.features == "global_pool":
      tokens, updated = last_block_tokens(self.backbone, variables, x, train=train, rngs=rngs)
      return jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1), updated
    out, updated = self.backbone.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
    updated = dict(updated)
    if self.features == "pooled" or "tokens" not in out:
      return out["pooled"].astype(jnp.float32), updated
    tokens = out["tokens"].astype(jnp.float32)
    return (tokens[:, 0] if self.features == "cls" else jnp.mean(tokens[:, 1:], axis=1)), updated

  def apply(self, params: dict, state: dict, x: jax.Array, *, train: bool,
            rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    feats, updated = self.features_of({"params": params["backbone"], **state}, x, train, rng)
    logits = self.head.apply({"params": params["head"]}, feats)
    return logits.astype(jnp.float32), ({**state, **updated} if updated else state)


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """[B] int -> [B, C] targets: 1 − ε + ε/C on the label, ε/C elsewhere (timm's convention)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """A box of area ≈ (1 − λ)·H·W, centre uniform, clipped to the image (timm's `rand_bbox`).

  Returns:
    [H, W] bool, True inside the box (where the other image is pasted).
  """
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2, 0, height)
  x0, x1 = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def mixup_cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array, mixup_alpha: float,
                 cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
  """timm's batch-mode Mixup: each image is mixed with the image at the mirrored batch position.

  Args:
    rng: PRNG key.
    images: [B, H, W, 3] float.
    targets: [B, C] float (already smoothed).
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that mode. With both on, cutmix is
      chosen with probability 1/2.

  Returns:
    (mixed images [B, H, W, 3], mixed targets [B, C]): targets λ·y + (1 − λ)·y_flip, λ the
    kept fraction (for cutmix, recomputed from the clipped box's area).
  """
  if not mixup_alpha and not cutmix_alpha:
    return images, targets
  k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 4)
  flipped = images[::-1]
  _, h, w, _ = images.shape
  use_cutmix = (jax.random.bernoulli(k_switch, 0.5) if mixup_alpha and cutmix_alpha
                else jnp.asarray(bool(cutmix_alpha)))
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha else jnp.float32(1)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha else jnp.float32(1)
  box = cutmix_box(k_box, lam_cut, h, w)
  lam_box = 1.0 - jnp.mean(box.astype(jnp.float32))
  cut_images = jnp.where(box[None, :, :, None], flipped, images)
  mix_images = lam_mix * images + (1.0 - lam_mix) * flipped
  lam = jnp.where(use_cutmix, lam_box, lam_mix)
  mixed = jnp.where(use_cutmix, cut_images, mix_images)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def backbone_of(config: ml_collections.ConfigDict) -> tuple[Any, dict, dict]:
  """`config.backbone` with the fine-tuning drop path rate (`supervised.load_backbone`)."""
  return supervised.load_backbone(
      config.backbone, overrides={"drop_path_rate": float(config.model.drop_path_rate)})


def make_protocol(config: ml_collections.ConfigDict, data: supervised.Data,
                  backbone: tuple[Any, dict, dict] | None = None) -> supervised.Protocol:
  """The fine-tuning protocol: backbone (with `config.model.drop_path_rate`) + head, all trained."""
  module, variables, model = backbone or backbone_of(config)
  try:
    net = FineTuneModel(module, data.num_classes, config.model.features)
  except ValueError as e:
    raise supervised.ConfigError(str(e)) from e
  t = config.train
  smoothing, mixup_alpha, cutmix_alpha = (float(t.label_smoothing), float(t.mixup_alpha),
                                          float(t.cutmix_alpha))

  def init(rng):
    return net.init(rng, variables, int(config.data.image_size))

  def loss_fn(params, state, constants, batch, rng):
    del constants
    k_view, k_mix, k_drop = jax.random.split(rng, 3)
    # Step 1) the view's device half: normalise, random erasing.
    x = supervised.train_images(config, k_view, batch)
    # Step 2) smoothed one-hot targets, mixed with the reversed batch by mixup or cutmix.
    targets = smoothed_one_hot(batch["label"], data.num_classes, smoothing)
    x, targets = mixup_cutmix(k_mix, x, targets, mixup_alpha, cutmix_alpha)
    # Step 3) forward in train mode (drop path, BN batch statistics), soft-target cross-entropy.
    logits, state = net.apply(params, state, x, train=True, rng=k_drop)
    return optax.softmax_cross_entropy(logits, targets).mean(), (state, {})

  def logits_fn(params, state, constants, images):
    del constants
    return net.apply(params, state, supervised.views.eval_images(images), train=False)[0]

  tx, schedule = supervised.make_optimizer(config, data)
  return supervised.Protocol(
      name=NAME, init=init, loss_fn=loss_fn, logits_fn=logits_fn, tx=tx, schedule=schedule,
      view=supervised.train_view(config),
      summary={"features": net.features, "model": model})


def run(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
  """Fine-tunes backbone + head (resuming from `workdir`), evaluates, writes metrics.jsonl and
  finetune_summary.json: `supervised.run` with this protocol (keywords as `linear_eval.run`)."""
  return supervised.run(config, workdir, make_protocol, backbone_of, **kwargs)
