"""The standard image-level linear evaluation: a linear classifier on a frozen backbone.

Protocol (MoCo v1-v3, BYOL, MAE linear probes): the backbone is frozen in eval mode (batch norm
with its running statistics, no drop path) and only a linear head learns, with softmax
cross-entropy, on
  * train: random-resized-crop (scale 0.08-1, ratio 3/4-4/3, torchvision's sampler) + horizontal
    flip, on the host (grain);
  * eval: resize so the short side is image_size / crop_fraction, centre crop image_size
    (224/256 = 0.875 at ImageNet scale), one crop, top-1 / top-5.
Features: ResNet global average pool; ViT the CLS token after the final norm (MoCo v3, MAE) or
the mean of the normed patch tokens (`features="avg"`). `head.batch_norm` puts a BatchNorm
without affine (ε 1e-6) before the head, as MAE's probe (MoCo v3's ViT probe reaches the same
numbers with it); it is on for ViTs by default.

The backbone comes from a pretraining workdir (its `config.json` "model" section and the
checkpoint's online or target backbone) or from an exported torchvision/timm safetensors file
(`ssl_jax.export`), with `config.backbone.model` naming the architecture.

Metrics go to `workdir/metrics.jsonl` (one line per log step and per evaluation) and
`workdir/linear_eval_summary.json` (final top-1/top-5 and the settings).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import config_lib, optim, parallel, registry, weights
from ssl_jax.data import pipeline, transforms
from ssl_jax.data.augment import normalize
from ssl_jax.evaluate import features as features_lib
from ssl_jax.evaluate.knn import topk_accuracy
from ssl_jax.metrics import MetricsWriter
from ssl_jax.models.heads import LinearClassifier

FEATURES = ("pooled", "cls", "avg")
SUMMARY_FILE = "linear_eval_summary.json"


# ---------------------------------------------------------------------------------------------
# Loading the frozen backbone

def load_backbone(backbone_cfg: ml_collections.ConfigDict) -> tuple[Any, dict, dict]:
  """(Linen backbone module, variables {"params", "batch_stats"?}, model config) to freeze.

  Args:
    backbone_cfg: `config.backbone` with either `workdir` (+ `step`, 0 = latest, and `part`,
      "online" or "target") or `safetensors` (a file written by `python -m ssl_jax.export`, any
      torchvision ResNet / timm ViT state dict, or a PyTorch file) together with `model`
      ({"name", **fields}; for a workdir or our export it defaults to the recorded one and may
      override e.g. `drop_path_rate`). Loading is `ssl_jax.weights.load_backbone`.
  """
  source = backbone_cfg.get("workdir") or backbone_cfg.get("safetensors")
  if not source:
    raise weights.WeightsError("set config.backbone.workdir (a pretraining workdir) or "
                               "config.backbone.safetensors (an exported or PyTorch file)")
  variables, model = weights.load_backbone(
      source, model=dict(backbone_cfg.get("model") or {}),
      step=int(backbone_cfg.get("step", 0) or 0) or None, part=backbone_cfg.get("part", "online"))
  kwargs = {k: v for k, v in model.items() if k not in ("name", "img_size")}
  module = registry.get_backbone(model["name"], **kwargs)
  return module, jax.tree.map(jnp.asarray, variables), model


def backbone_features(module, variables: dict, images: jax.Array, features: str = "pooled",
                      train: bool = False, rng: jax.Array | None = None) -> jax.Array:
  """Frozen features of uint8 images.

  Args:
    module: backbone (returns a dict with "pooled" and, for ViTs, "tokens" [B, 1+N, D]).
    variables: its variables.
    images: [B, H, W, 3] uint8 (or float in [0, 255]); ImageNet-normalised here as in
      pretraining.
    features: "pooled" (the backbone's own pooling), "cls" (ViT CLS token) or "avg" (ViT mean of
      the patch tokens).
    train: backbone in train mode (fine-tuning: BN batch statistics are not updated here, drop
      path active with `rng`).

  Returns:
    [B, D] float32.
  """
  if features not in FEATURES:
    raise ValueError(f"features={features!r} must be one of {FEATURES}")
  x = normalize(jnp.asarray(images, jnp.float32) / 255.0)
  rngs = {"dropout": rng} if rng is not None else None
  out = module.apply(variables, x, train=train, rngs=rngs)
  if features == "pooled":
    return out["pooled"].astype(jnp.float32)
  if "tokens" not in out:
    raise ValueError(f"features={features!r} needs a ViT backbone (token outputs); use 'pooled'")
  tokens = out["tokens"].astype(jnp.float32)
  return tokens[:, 0] if features == "cls" else jnp.mean(tokens[:, 1:], axis=1)


# ---------------------------------------------------------------------------------------------
# Views

@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip(grain.transforms.RandomMap):
  """Train view: torchvision RandomResizedCrop(image_size, scale) + RandomHorizontalFlip."""
  image_size: int
  scale: tuple[float, float] = (0.08, 1.0)

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "error" in record:
      return record
    image = transforms.to_rgb(record["image"])
    box = transforms.random_resized_crop_box(rng, image.shape[0], image.shape[1], self.scale)
    image, _ = transforms.crop_flip_resize(image, box, bool(rng.random() < 0.5), self.image_size)
    return {"image": image, "label": np.int32(record.get("label", -1))}


def train_batches(source, *, image_size: int, batch_size: int, seed: int,
                  scale: tuple[float, float] = (0.08, 1.0), prefetch: int = 2,
                  view: grain.transforms.RandomMap | None = None):
  """Infinite iterator of augmented local batches (reshuffled every epoch, full batches only)."""
  if batch_size % jax.process_count():
    raise ValueError(f"batch_size={batch_size} is not divisible by the {jax.process_count()} "
                     "processes")
  view = view or RandomResizedCropFlip(image_size, tuple(scale))
  ds = grain.MapDataset.source(source).seed(seed)
  ds = ds[jax.process_index()::jax.process_count()].shuffle().repeat().random_map(view)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch * 2),
                                            prefetch_buffer_size=max(1, prefetch * 4)))
  return iter(pipeline.SkipBad(it).batch(batch_size // jax.process_count(), drop_remainder=True))


def evaluate(logits_fn: Callable[[jax.Array], jax.Array], source, *, image_size: int,
             batch_size: int, crop_fraction: float, mesh, limit: int = 0) -> dict[str, float]:
  """Top-1 / top-5 of `logits_fn` (uint8 images [B, H, W, 3] -> [B, C]) over a centre-crop pass."""
  logits, labels = features_lib.source_features(logits_fn, source, image_size=image_size,
                                                batch_size=batch_size, limit=limit,
                                                crop_fraction=crop_fraction, mesh=mesh)
  return topk_accuracy(logits, labels)


# ---------------------------------------------------------------------------------------------
# The linear protocol

def resolve_head_batch_norm(config, model: dict) -> bool:
  """`config.head.batch_norm`: None means on for ViTs (MAE/MoCo v3), off for ResNets."""
  bn = config.head.get("batch_norm", None)
  return model["name"].startswith("vit") if bn is None else bool(bn)


def resolve_features(config, model: dict) -> str:
  feats = config.head.get("features", "") or ("cls" if model["name"].startswith("vit")
                                              else "pooled")
  if feats not in FEATURES:
    raise ValueError(f"config.head.features={feats!r} must be one of {FEATURES}")
  return feats


def steps_of(config, num_records: int) -> dict[str, int]:
  """{"total_steps", "steps_per_epoch", "warmup_steps"} of an evaluation config
  (`config_lib.steps_from_epochs`)."""
  return config_lib.steps_from_epochs(
      config.train.num_epochs, int(config.train.get("total_steps", 0) or 0), num_records,
      config.train.batch_size, config.optim.get("warmup_epochs", 0.0),
      int(config.optim.get("warmup_steps", 0) or 0))


def optim_config(config, steps: dict[str, int]) -> ml_collections.ConfigDict:
  """`config.optim` with `warmup_steps` resolved from the epoch count."""
  cfg = ml_collections.ConfigDict(config.optim.to_dict())
  with cfg.unlocked():
    cfg.warmup_steps = steps["warmup_steps"]
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str, *, train_source=None, test_source=None,
        backbone: tuple[Any, dict, dict] | None = None, mesh=None) -> dict:
  """Trains the linear head on the frozen backbone, evaluates, writes metrics and the summary.

  Args:
    config: `configs/linear_eval.py` (sections backbone, data, head, optim, train).
    workdir: output folder (metrics.jsonl, linear_eval_summary.json).
    train_source, test_source: override `config.data` sources (tests, notebooks).
    backbone: (module, variables, model config) instead of loading `config.backbone`.

  Returns:
    The summary dict: {"top1", "top5", "step", "features", "head_batch_norm", ...}.
  """
  mesh = mesh or parallel.make_mesh()
  module, variables, model = backbone or load_backbone(config.backbone)
  d = config.data
  train_source = train_source or registry.get_source(d.source, **d.train_args.to_dict())
  test_source = test_source or registry.get_source(d.source, **d.test_args.to_dict())
  num_classes = int(d.get("num_classes", 0) or getattr(train_source, "num_classes", 0) or 0)
  if num_classes <= 0:
    raise ValueError("config.data.num_classes must be set (the source does not tell it)")
  features = resolve_features(config, model)
  head = LinearClassifier(num_classes, batch_norm=resolve_head_batch_norm(config, model),
                          bn_epsilon=config.head.get("bn_epsilon", 1e-6))
  steps = steps_of(config, len(train_source))
  total, steps_per_epoch = steps["total_steps"], steps["steps_per_epoch"]
  bs = config.train.batch_size
  if bs % mesh.size:
    raise ValueError(f"config.train.batch_size={bs} is not divisible by the {mesh.size} devices")
  tx, schedule = optim.make_optimizer(optim_config(config, steps), total, bs)

  rng = jax.random.PRNGKey(config.train.seed)
  feature_dim = jax.eval_shape(
      lambda x: backbone_features(module, variables, x, features),
      jax.ShapeDtypeStruct((1, d.image_size, d.image_size, 3), jnp.uint8)).shape[-1]
  head_vars = head.init(rng, jnp.zeros((2, feature_dim)), train=False)
  state = {"params": head_vars["params"], "batch_stats": head_vars.get("batch_stats", {}),
           "opt_state": tx.init(head_vars["params"])}
  repl = parallel.replicated(mesh)
  state, variables = jax.device_put((state, variables), repl)

  def head_vars_of(s):
    return {"params": s["params"], **({"batch_stats": s["batch_stats"]} if s["batch_stats"]
                                      else {})}

  def train_step(s, frozen, images, labels):
    feats = jax.lax.stop_gradient(backbone_features(module, frozen, images, features))

    def loss_fn(params):
      logits, upd = head.apply({**head_vars_of(s), "params": params}, feats, train=True,
                               mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, upd.get("batch_stats", {})

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s["params"])
    updates, opt_state = tx.update(grads, s["opt_state"], s["params"])
    return ({"params": optax.apply_updates(s["params"], updates), "batch_stats": stats,
             "opt_state": opt_state}, loss)

  train_step = jax.jit(train_step, donate_argnums=(0,), out_shardings=(repl, repl))
  logits_fn = jax.jit(lambda s, frozen, images: head.apply(
      head_vars_of(s), backbone_features(module, frozen, images, features), train=False))

  def eval_now(s) -> dict[str, float]:
    return evaluate(lambda im: logits_fn(s, variables, im), test_source,
                    image_size=d.image_size, batch_size=config.eval.batch_size,
                    crop_fraction=d.crop_fraction, mesh=mesh, limit=config.eval.get("limit", 0))

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "linear_eval_config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  batches = train_batches(train_source, image_size=d.image_size, batch_size=bs,
                          seed=config.train.seed, scale=tuple(d.crop_scale))
  eval_every = int(config.eval.get("every_epochs", 0) or 0) * steps_per_epoch
  result: dict[str, float] = {}
  try:
    for step in range(1, total + 1):
      local = next(batches)
      batch = parallel.global_batch({"image": local["image"], "label": local["label"]}, mesh)
      state, loss = train_step(state, variables, batch["image"], batch["label"])
      if step % config.train.log_every_steps == 0 or step == total:
        writer.write(step, {"linear_eval/train_loss": float(loss),
                            "linear_eval/lr": float(schedule(step - 1)),
                            "linear_eval/epoch": step / steps_per_epoch})
      if step == total or (eval_every and step % eval_every == 0):
        result = eval_now(state)
        writer.write(step, {f"linear_eval/{k}": float(v) for k, v in result.items()})
  finally:
    writer.close()
  summary = {**{k: float(v) for k, v in result.items()}, "step": total,
             "epochs": total / steps_per_epoch, "features": features,
             "head_batch_norm": head.batch_norm, "model": model,
             "num_train": len(train_source), "num_test": len(test_source)}
  write_summary(workdir, SUMMARY_FILE, summary)
  return {**summary, "head": jax.device_get(head_vars_of(state))}


def write_summary(workdir: str, filename: str, summary: dict) -> None:
  """The evaluation's final results as `workdir/filename` (JSON), written by process 0."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, filename), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=True, default=str)
