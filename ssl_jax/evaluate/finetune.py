"""End-to-end fine-tuning of a pretrained ViT (the BEiT/MAE/MoCo v3 protocol).

Every backbone weight trains, with
  * AdamW (β 0.9/0.999), weight decay on matrices only (biases, norms, cls_token, pos_embed
    excluded, timm's `no_weight_decay`), linear warmup + cosine, lr = blr × batch/256;
  * layer-wise lr decay (BEiT, MAE Sec. A.2): parameter group with layer id i gets
    lr × decay^(L + 1 − i), with id 0 for the patch embedding and tokens, i+1 for block i, L+1
    for the final norm and the head (`ssl_jax.optim.layer_decay_multipliers`);
  * drop path (stochastic depth) in the backbone, label smoothing, and optional mixup / cutmix
    (timm's `Mixup`: per batch either mixup with λ ~ Beta(α, α) or cutmix with a box of area
    1 − λ, chosen with probability 1/2 when both are on; the batch is mixed with its reverse).
Train views are random-resized-crop + flip; evaluation is the linear protocol's resize + centre
crop, top-1/top-5 (`ssl_jax.evaluate.linear_eval`). Not implemented: RandAugment and random
erasing of MAE's recipe (listed in configs/finetune.py), EMA of the weights.

The classifier reads the CLS token after the final norm (MoCo v3 / DeiT) or the mean of the
normed patch tokens (`features="avg"`, MAE's global pool; MAE normalises after pooling instead).
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import optim, parallel, registry
from ssl_jax.data.augment import normalize
from ssl_jax.evaluate import linear_eval
from ssl_jax.metrics import MetricsWriter

SUMMARY_FILE = "finetune_summary.json"


class FineTuneModel(nn.Module):
  """Backbone -> CLS/avg/pooled features -> Dense(num_classes).

  The head starts at truncated normal std 2e-5 (MAE's fine-tune head init; tiny logits at the
  start keep the first steps from wrecking the pretrained features) and zero bias.
  """
  backbone: nn.Module
  num_classes: int
  features: str = "cls"

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """images: [B, H, W, 3] normalised float -> logits [B, num_classes] float32."""
    out = self.backbone(images, train=train)
    if self.features == "pooled" or "tokens" not in out:
      feats = out["pooled"]
    elif self.features == "cls":
      feats = out["tokens"][:, 0]
    else:
      feats = jnp.mean(out["tokens"][:, 1:], axis=1)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5),
                      param_dtype=jnp.float32, name="head")(feats.astype(jnp.float32))
    return logits.astype(jnp.float32)


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


def make_finetune_optimizer(config: ml_collections.ConfigDict, num_layers: int, total_steps: int,
                            steps: dict[str, int]
                            ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + warmup-cosine + layer decay from `config.optim` (see module docstring).

  Args:
    config: the fine-tune config (`optim` section with layer_decay).
    num_layers: L, the backbone's number of transformer blocks.
    total_steps: run length.
    steps: `linear_eval.steps_of(...)` (its resolved warmup_steps is used).
  """
  cfg = linear_eval.optim_config(config, steps)
  with cfg.unlocked():
    cfg.num_layers = num_layers
  return optim.make_optimizer(cfg, total_steps, config.train.batch_size)


def run(config: ml_collections.ConfigDict, workdir: str, *, train_source=None, test_source=None,
        backbone: tuple[Any, dict, dict] | None = None, mesh=None) -> dict:
  """Fine-tunes backbone + head, evaluates, writes metrics.jsonl and finetune_summary.json.

  Args: as `linear_eval.run` (`config` is `configs/finetune.py`).

  Returns:
    The summary dict {"top1", "top5", "step", ...}.
  """
  mesh = mesh or parallel.make_mesh()
  if backbone is None:
    bcfg = ml_collections.ConfigDict(config.backbone.to_dict())
    with bcfg.unlocked():  # drop path is a fine-tuning setting of the pretrained architecture
      bcfg.model.drop_path_rate = float(config.model.drop_path_rate)
    backbone = linear_eval.load_backbone(bcfg)
  module, variables, model = backbone
  d = config.data
  train_source = train_source or registry.get_source(d.source, **d.train_args.to_dict())
  test_source = test_source or registry.get_source(d.source, **d.test_args.to_dict())
  num_classes = int(d.get("num_classes", 0) or getattr(train_source, "num_classes", 0) or 0)
  if num_classes <= 0:
    raise ValueError("config.data.num_classes must be set (the source does not tell it)")
  features = config.model.get("features", "") or ("cls" if "tokens" in jax.eval_shape(
      lambda x: module.apply(variables, x, train=False),
      jax.ShapeDtypeStruct((1, d.image_size, d.image_size, 3), jnp.float32)) else "pooled")
  net = FineTuneModel(module, num_classes, features)
  steps = linear_eval.steps_of(config, len(train_source))
  total, steps_per_epoch = steps["total_steps"], steps["steps_per_epoch"]
  bs = config.train.batch_size
  if bs % mesh.size:
    raise ValueError(f"config.train.batch_size={bs} is not divisible by the {mesh.size} devices")
  num_layers = int(getattr(module, "depth", 0) or 0)
  tx, schedule = make_finetune_optimizer(config, num_layers, total, steps)

  rng = jax.random.PRNGKey(config.train.seed)
  init_key, step_key = jax.random.split(rng)
  dummy = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32)
  init_vars = net.init(init_key, dummy, train=False)
  params = {**init_vars["params"], "backbone": variables["params"]}
  batch_stats = ({"backbone": variables["batch_stats"]} if "batch_stats" in variables else {})
  state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
  repl = parallel.replicated(mesh)
  state = jax.device_put(state, repl)
  smoothing, mix_a, cut_a = (config.train.label_smoothing, config.train.mixup_alpha,
                             config.train.cutmix_alpha)

  def eval_logits(s, images):
    v = {"params": s["params"], **({"batch_stats": s["batch_stats"]} if s["batch_stats"] else {})}
    return net.apply(v, normalize(jnp.asarray(images, jnp.float32) / 255.0), train=False)

  def train_step(s, images, labels, step):
    key = jax.random.fold_in(step_key, step)
    k_mix, k_drop = jax.random.split(key)
    x = normalize(images.astype(jnp.float32) / 255.0)
    targets = smoothed_one_hot(labels, num_classes, smoothing)
    x, targets = mixup_cutmix(k_mix, x, targets, mix_a, cut_a)

    def loss_fn(params):
      v = {"params": params, **({"batch_stats": s["batch_stats"]} if s["batch_stats"] else {})}
      out = net.apply(v, x, train=True, rngs={"dropout": k_drop},
                      mutable=["batch_stats"] if s["batch_stats"] else False)
      logits, stats = out if s["batch_stats"] else (out, {})
      stats = stats.get("batch_stats", s["batch_stats"]) if stats else s["batch_stats"]
      return optax.softmax_cross_entropy(logits, targets).mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s["params"])
    updates, opt_state = tx.update(grads, s["opt_state"], s["params"])
    return ({"params": optax.apply_updates(s["params"], updates), "batch_stats": stats,
             "opt_state": opt_state}, loss)

  train_step = jax.jit(train_step, donate_argnums=(0,), out_shardings=(repl, repl))
  logits_fn = jax.jit(eval_logits)

  def eval_now(s) -> dict[str, float]:
    return linear_eval.evaluate(lambda im: logits_fn(s, im), test_source,
                                image_size=d.image_size, batch_size=config.eval.batch_size,
                                crop_fraction=d.crop_fraction, mesh=mesh,
                                limit=config.eval.get("limit", 0))

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "finetune_config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  batches = linear_eval.train_batches(train_source, image_size=d.image_size, batch_size=bs,
                                      seed=config.train.seed, scale=tuple(d.crop_scale))
  eval_every = int(config.eval.get("every_epochs", 0) or 0) * steps_per_epoch
  result: dict[str, float] = {}
  try:
    for step in range(1, total + 1):
      local = next(batches)
      batch = parallel.global_batch({"image": local["image"], "label": local["label"]}, mesh)
      state, loss = train_step(state, batch["image"], batch["label"], jnp.int32(step))
      if not np.isfinite(float(loss)):
        raise FloatingPointError(f"fine-tune loss is {float(loss)} at step {step}; lower "
                                 "config.optim.base_lr")
      if step % config.train.log_every_steps == 0 or step == total:
        writer.write(step, {"finetune/train_loss": float(loss),
                            "finetune/lr": float(schedule(step - 1)),
                            "finetune/epoch": step / steps_per_epoch})
      if step == total or (eval_every and step % eval_every == 0):
        result = eval_now(state)
        writer.write(step, {f"finetune/{k}": float(v) for k, v in result.items()})
  finally:
    writer.close()
  summary = {**{k: float(v) for k, v in result.items()}, "step": total,
             "epochs": total / steps_per_epoch, "features": features, "model": model,
             "num_layers": num_layers, "num_train": len(train_source),
             "num_test": len(test_source)}
  linear_eval.write_summary(workdir, SUMMARY_FILE, summary)
  return summary
