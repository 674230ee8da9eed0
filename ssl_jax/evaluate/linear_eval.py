"""Image-level linear evaluation: linear classifiers on a frozen backbone, trained through the
supervised loop (`ssl_jax.evaluate.supervised`) with augmented views, resumable.

Protocol (MoCo v1–v3, BYOL, MAE linear probes): the backbone is frozen in eval mode (batch norm
with its running statistics, no drop path, never updated) and only the head learns, with softmax
cross-entropy, on random-resized crops + flips (host) and, for the multi-layer protocol, colour
jitter and PCA lighting (device); evaluation: resize, centre crop, one crop, top-1/top-5.

Heads (`config.head.kind`):
  * "linear": one linear classifier on the backbone's features: ResNet global average pool; ViT
    the CLS token after the final norm (`features="cls"`, MoCo v3, MAE) or the mean of the normed
    patch tokens (`"avg"`); `head.batch_norm` puts a BatchNorm without affine (ε 1e-6) before it,
    as MAE's `main_linprobe.py` does. MoCo's `main_lincls.py` (v1–v3) has none, so it is off
    unless a config asks for it.
  * "multilayer" (MaskCo's appendix "multi-layer linear evaluation", OpenSelfSup's
    `MultiClsHead`): one linear classifier per ResNet stage conv1…conv5, each on its map
    average-pooled to s×s (≈ 9k dimensions for ResNet-50 at 224 px), batch-normalised per channel
    without affine (BatchNorm2d(affine=False) on the pooled map, momentum 0.1), flattened; the
    loss is the sum of the five cross-entropies (each head gets its own gradient). conv1 is the
    stem's ReLU output *before* the max-pool (112×112 at 224 px), as OpenSelfSup's ResNet
    `out_indices=0`. Pooling `"specified"` is OpenSelfSup's AvgPool2d(kernel, stride, padding)
    per stage (k 10/16/13/8/6, s 10/8/5/3/1, p 4/0/0/0/0: 12, 6, 4, 3, 2 cells at 224 px,
    `count_include_pad`), `"adaptive"` PyTorch's adaptive average pool to `pool_sizes` (any
    resolution). Results: `linear_eval/conv<i>/top1`.

The backbone comes from a pretraining workdir (its `config.json` "model" section and the
checkpoint's online or target backbone) or from a safetensors / PyTorch file, with
`config.backbone.model` naming the architecture (`ssl_jax.weights.load_backbone`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.evaluate import linear, supervised
from ssl_jax.models.heads import LinearClassifier

FEATURES = ("pooled", "cls", "avg")
HEADS = ("linear", "multilayer")
POOLS = ("adaptive", "specified")
NAME = "linear_eval"


# ---------------------------------------------------------------------------------------------
# The frozen backbone

def backbone_of(config: ml_collections.ConfigDict) -> tuple[Any, dict, dict]:
  """The frozen backbone of `config.backbone` (`supervised.load_backbone`)."""
  return supervised.load_backbone(config.backbone)


def backbone_features(module, variables: dict, x: jax.Array, features: str = "pooled") -> jax.Array:
  """Eval-mode features [B, D] float32 of normalised images x [B, H, W, 3]: "pooled" (the
  backbone's own pooling), "cls" (ViT CLS token) or "avg" (ViT mean of the normed patch tokens)."""
  if features not in FEATURES:
    raise ValueError(f"features={features!r} must be one of {FEATURES}")
  out = module.apply(variables, x, train=False)
  if features == "pooled":
    return out["pooled"].astype(jnp.float32)
  if "tokens" not in out:
    raise ValueError(f"features={features!r} needs a ViT backbone (token outputs); use 'pooled'")
  tokens = out["tokens"].astype(jnp.float32)
  return tokens[:, 0] if features == "cls" else jnp.mean(tokens[:, 1:], axis=1)


# ---------------------------------------------------------------------------------------------
# The multi-layer head

class MultiLayerClassifier(nn.Module):
  """One classifier per ResNet stage: pool -> BatchNorm2d without affine -> flatten -> Dense.

  Attributes:
    num_classes: C.
    pool: "specified" (OpenSelfSup's AvgPool2d per stage) or "adaptive" (`pool_sizes`).
    pool_sizes: layer -> s of the adaptive pool (default `linear.RESNET50_POOL_SIZES`).
    batch_norm: the per-channel BN (OpenSelfSup `norm_cfg=BN(affine=False)`).
  """
  num_classes: int
  pool: str = "adaptive"
  pool_sizes: tuple[tuple[str, int], ...] = tuple(linear.RESNET50_POOL_SIZES.items())
  batch_norm: bool = True

  @nn.compact
  def __call__(self, maps: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
    """maps: layer -> [B, h, w, C] float -> layer -> logits [B, num_classes] float32."""
    sizes = dict(self.pool_sizes)
    out = {}
    for layer, fmap in maps.items():
      fmap = fmap.astype(jnp.float32)
      if self.pool == "specified":
        pooled = linear.specified_avg_pool(fmap, *linear.OPENSELFSUP_POOLS[layer])
      else:
        pooled = linear.adaptive_avg_pool(fmap, sizes.get(layer, 1))
      if self.batch_norm:
        pooled = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              use_scale=False, use_bias=False, name=f"bn_{layer}")(pooled)
      out[layer] = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                            name=f"fc_{layer}")(pooled.reshape(pooled.shape[0], -1))
    return out


# ---------------------------------------------------------------------------------------------
# The protocol

def resolve_features(config, model: dict) -> str:
  """`config.head.features`, "" meaning the backbone's default (ViT "cls", ResNet "pooled")."""
  feats = config.head.get("features", "") or ("cls" if model["name"].startswith("vit")
                                              else "pooled")
  if feats not in FEATURES:
    raise supervised.ConfigError(f"config.head.features={feats!r} must be one of {FEATURES}")
  return feats


def make_protocol(config: ml_collections.ConfigDict, data: supervised.Data,
                  backbone: tuple[Any, dict, dict] | None = None) -> supervised.Protocol:
  """The linear protocol on `config.backbone` (or a given (module, variables, model))."""
  h = config.head
  if h.kind not in HEADS:
    raise supervised.ConfigError(f"config.head.kind={h.kind!r} must be one of {HEADS}")
  if h.pool not in POOLS:
    raise supervised.ConfigError(f"config.head.pool={h.pool!r} must be one of {POOLS}")
  module, variables, model = backbone or backbone_of(config)
  multilayer = h.kind == "multilayer"
  if multilayer:
    features = "stages"
    head = MultiLayerClassifier(data.num_classes, pool=h.pool,
                                pool_sizes=tuple(dict(h.pool_sizes or {}).items())
                                or tuple(linear.RESNET50_POOL_SIZES.items()),
                                batch_norm=bool(h.batch_norm))
    frozen_features = functools.partial(linear.resnet_stage_maps, module)
  else:
    features = resolve_features(config, model)
    head = LinearClassifier(data.num_classes, batch_norm=bool(h.batch_norm),
                            bn_epsilon=float(h.bn_epsilon))
    frozen_features = functools.partial(backbone_features, module, features=features)
  size = int(config.data.image_size)
  image_shape = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  feature_shape = jax.eval_shape(frozen_features, variables, image_shape)

  def init(rng):
    dummy = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), feature_shape)
    head_vars = head.init(rng, dummy, train=False)
    return head_vars["params"], {k: v for k, v in head_vars.items() if k != "params"}

  def loss_fn(params, state, frozen, batch, rng):
    # Step 1) the view's device half, then features of the frozen backbone in eval mode.
    x = supervised.train_images(config, rng, batch)
    feats = jax.lax.stop_gradient(frozen_features(frozen, x))
    # Step 2) the head in train mode (its BN statistics update), cross-entropy per head.
    logits, new_state = head.apply({"params": params, **state}, feats, train=True,
                                   mutable=list(state))
    per_head = logits if multilayer else {"": logits}
    losses = {k: optax.softmax_cross_entropy_with_integer_labels(v, batch["label"]).mean()
              for k, v in per_head.items()}
    metrics = {f"loss/{k}": v for k, v in losses.items()} if multilayer else {}
    return sum(losses.values()), (dict(new_state), metrics)

  def logits_fn(params, state, frozen, images):
    feats = frozen_features(frozen, supervised.views.eval_images(images))
    return head.apply({"params": params, **state}, feats, train=False)

  tx, schedule = supervised.make_optimizer(config, data)
  return supervised.Protocol(
      name=NAME, init=init, loss_fn=loss_fn, logits_fn=logits_fn, tx=tx, schedule=schedule,
      view=supervised.train_view(config), constants=variables,
      summary={"features": features, "head": h.kind, "head_batch_norm": bool(h.batch_norm),
               "model": model})


def run(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
  """Trains the head(s) on the frozen backbone (resuming from `workdir`), evaluates, writes
  metrics.jsonl and linear_eval_summary.json: `supervised.run` with this protocol (keywords
  train_source, test_source, backbone, mesh, max_steps)."""
  return supervised.run(config, workdir, make_protocol, backbone_of, **kwargs)
