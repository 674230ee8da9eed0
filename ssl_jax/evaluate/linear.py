"""Linear probe on frozen features: last-layer (MoCo/BYOL/MAE) and multi-layer (MaskCo Table 7).

A linear classifier W x + b is trained with softmax cross-entropy on features of a frozen
encoder; only W and b learn. Before the classifier the features can be
  * "bn_noaffine": standardised per dimension, as MAE's linear probe (BatchNorm without affine,
    eps 1e-6). With frozen features BN's running statistics converge to the training-set mean
    and variance, so we use those directly: exact at test time, and training sees the same fixed
    normalisation instead of per-batch noise;
  * "l2": L2-normalised per row (cosine-style features, as the kNN monitor);
  * None: left as they are.
Weight decay applies to W only (biases excluded, `ssl_jax.optim` convention); with SGD it is the
L2 term (wd/2)·|W|² of the objective.

The multi-layer protocol (MaskCo's appendix, after Goyal et al. 2019 / OpenSelfSup) trains one
probe per ResNet stage conv1…conv5 on adaptively average-pooled maps of ~9k dimensions.

This is the feature-level probe: features are extracted once without augmentation (the
evaluators of a pretraining run). The image-level protocols, trained on augmented views through
the frozen encoder, are `ssl_jax.evaluate.linear_eval` (which reuses the pooling here).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import optim
from ssl_jax.evaluate.features import extract_features
from ssl_jax.evaluate.knn import topk_accuracy

NORMALIZE = ("bn_noaffine", "l2", None)
OPTIMIZERS = ("sgd", "lars", "adamw")
# MAE's linear-probe BatchNorm1d(affine=False, eps=1e-6).
BN_EPS = 1e-6
# OpenSelfSup's adaptive pooling for ResNet-50 at 224 px (MaskCo used OpenSelfSup): each stage is
# average-pooled to s×s so that C·s² ≈ 9k (64·12², 256·6², 512·4², 1024·3², 2048·2²).
RESNET50_POOL_SIZES = {"conv1": 12, "conv2": 6, "conv3": 4, "conv4": 3, "conv5": 2}


@flax.struct.dataclass
class LinearProbe:
  """A fitted probe: logits = normalise(x) @ kernel + bias.

  kernel: [D, C]; bias: [C]; mean, inv_std: [D] fixed feature standardisation (0 and 1 when
  off); l2_normalize: static, L2-normalise rows before standardising.
  """
  kernel: jax.Array
  bias: jax.Array
  mean: jax.Array
  inv_std: jax.Array
  l2_normalize: bool = flax.struct.field(pytree_node=False, default=False)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _normalize(probe: LinearProbe, x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  if probe.l2_normalize:
    x = _l2_normalize(x)
  return (x - probe.mean) * probe.inv_std


def linear_probe_logits(probe: LinearProbe, x: jax.Array) -> jax.Array:
  """Logits [B, C] of features `x` [B, D] float."""
  return _normalize(probe, x) @ probe.kernel + probe.bias


def probe_objective(probe: LinearProbe, x: jax.Array, y: jax.Array,
                    weight_decay: float) -> jax.Array:
  """mean_i CE(softmax(W x_i + b), y_i) + (wd/2)·|W|²: what SGD with coupled decay minimises.

  Args:
    probe: LinearProbe.
    x: [N, D] float features. y: [N] int labels.
    weight_decay: wd (the bias is not decayed).

  Returns:
    Scalar float32.
  """
  logits = linear_probe_logits(probe, x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return ce + 0.5 * weight_decay * jnp.sum(jnp.square(probe.kernel))


def _check_xy(x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
  if x.ndim != 2:
    raise ValueError(f"{where}: features must be [N, D]; got shape {x.shape}")
  if y.shape != (x.shape[0],):
    raise ValueError(f"{where}: labels shape {y.shape} != ({x.shape[0]},)")
  if x.shape[0] == 0:
    raise ValueError(f"{where}: no samples")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"{where}: labels must lie in [0, num_classes={num_classes}); got"
                     f" [{y.min()}, {y.max()}]")


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, *,
                     epochs: int, batch_size: int, lr: float, weight_decay: float = 0.0,
                     optimizer: str = "sgd", rng: jax.Array,
                     normalize: str | None = "bn_noaffine", momentum: float = 0.9,
                     warmup_epochs: int = 0, schedule: str = "cosine") -> LinearProbe:
  """Trains a linear classifier on fixed features with minibatch `optimizer`.

  Each epoch reshuffles the training set and takes N // batch_size full batches (the remainder
  of the shuffle is dropped, so every step has the same shape and compiles once).

  Args:
    train_x: [N, D] float features. train_y: [N] int labels in [0, num_classes).
    num_classes: C.
    epochs: passes over the data.
    batch_size: rows per step (clamped to N).
    lr: peak learning rate (no batch-size rule applied here), warmup then `schedule`.
    weight_decay: on the kernel only.
    optimizer: "sgd" (momentum), "lars" (MAE's linear probe) or "adamw" (decoupled decay).
    rng: PRNG key for the initial kernel (normal, std 0.01 as MAE's head) and the shuffles.
    normalize: "bn_noaffine", "l2" or None (module docstring).
    momentum: SGD/LARS momentum.
    warmup_epochs: linear warmup length.
    schedule: "cosine", "constant" or "piecewise" (ssl_jax.optim schedules).

  Returns:
    LinearProbe.
  """
  train_x = np.asarray(train_x, np.float32)
  train_y = np.asarray(train_y, np.int32)
  _check_xy(train_x, train_y, num_classes, "fit_linear_probe")
  if normalize not in NORMALIZE:
    raise ValueError(f"fit_linear_probe: normalize={normalize!r} must be one of {NORMALIZE}")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"fit_linear_probe: optimizer={optimizer!r} must be one of {OPTIMIZERS}")
  if epochs <= 0 or batch_size <= 0:
    raise ValueError(f"fit_linear_probe: epochs={epochs} and batch_size={batch_size} must be"
                     " positive")
  n, d = train_x.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  total_steps = epochs * steps_per_epoch

  if normalize == "bn_noaffine":
    mean = train_x.mean(axis=0, dtype=np.float64)
    inv_std = 1.0 / np.sqrt(train_x.var(axis=0, dtype=np.float64) + BN_EPS)
  else:
    mean, inv_std = np.zeros(d, np.float32), np.ones(d, np.float32)

  init_key, shuffle_key = jax.random.split(rng)
  probe = LinearProbe(
      kernel=0.01 * jax.random.normal(init_key, (d, num_classes), jnp.float32),
      bias=jnp.zeros((num_classes,), jnp.float32),
      mean=jnp.asarray(mean, jnp.float32), inv_std=jnp.asarray(inv_std, jnp.float32),
      l2_normalize=normalize == "l2")
  trainable = {"kernel": probe.kernel, "bias": probe.bias}

  optim_cfg = ml_collections.ConfigDict(dict(
      name=optimizer, base_lr=float(lr), lr_rule="none",
      warmup_steps=warmup_epochs * steps_per_epoch, schedule=schedule, end_lr=0.0,
      weight_decay=float(weight_decay), momentum=momentum,
      exclude_from_decay="bias_and_norm"))
  tx, _ = optim.make_optimizer(optim_cfg, total_steps=total_steps, batch_size=batch_size)
  opt_state = tx.init(trainable)

  def loss_fn(params, x, y):
    p = probe.replace(kernel=params["kernel"], bias=params["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(linear_probe_logits(p, x), y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for epoch in range(epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n))
    for s in range(steps_per_epoch):
      idx = perm[s * batch_size:(s + 1) * batch_size]
      trainable, opt_state = train_step(trainable, opt_state, train_x[idx], train_y[idx])
  return probe.replace(kernel=trainable["kernel"], bias=trainable["bias"])


def evaluate_linear_probe(probe: LinearProbe, x: np.ndarray, y: np.ndarray,
                          batch_size: int = 4096) -> dict[str, float]:
  """Top-1 / top-5 accuracy of the probe on features `x` [M, D] with labels `y` [M]."""
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  logits_fn = jax.jit(linear_probe_logits)
  logits = np.concatenate([np.asarray(logits_fn(probe, x[s:s + batch_size]))
                           for s in range(0, x.shape[0], batch_size)], axis=0)
  return topk_accuracy(logits, y)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch `adaptive_avg_pool2d` on NHWC: output cell i averages rows ⌊iH/s⌋ … ⌈(i+1)H/s⌉−1.

  Args:
    x: [B, H, W, C] float feature map.
    size: s, output height and width.

  Returns:
    [B, s, s, C].
  """
  def pool_matrix(length: int) -> np.ndarray:
    m = np.zeros((size, length), np.float32)
    for i in range(size):
      start, end = (i * length) // size, -((-(i + 1) * length) // size)
      m[i, start:end] = 1.0 / (end - start)
    return m

  return jnp.einsum("ih,bhwc,jw->bijc", pool_matrix(x.shape[1]), x, pool_matrix(x.shape[2]))


# OpenSelfSup's `MultiPooling(pool_type="specified")` for ResNet-50 (MaskCo's multi-layer
# protocol): AvgPool2d(kernel, stride, padding) per stage, giving 12, 6, 4, 3, 2 cells at 224 px.
OPENSELFSUP_POOLS = {"conv1": (10, 10, 4), "conv2": (16, 8, 0), "conv3": (13, 5, 0),
                     "conv4": (8, 3, 0), "conv5": (6, 1, 0)}


def specified_avg_pool(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """PyTorch `AvgPool2d(kernel, stride, padding)` (count_include_pad, floor mode) on NHWC.

  Each output cell is the sum over its kernel×kernel window of the zero-padded map divided by
  kernel² (padded zeros count, PyTorch's default).

  Args:
    x: [B, H, W, C] float.
    kernel, stride, padding: square window, step and symmetric zero padding.

  Returns:
    [B, (H + 2p − k) // s + 1, (W + 2p − k) // s + 1, C].
  """
  if kernel > min(x.shape[1], x.shape[2]) + 2 * padding:
    raise ValueError(f"specified_avg_pool: kernel {kernel} (padding {padding}) is larger than the "
                     f"{x.shape[1]}x{x.shape[2]} map; use the adaptive pool at this resolution")
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, kernel, kernel, 1),
                                 (1, stride, stride, 1),
                                 ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return summed / float(kernel * kernel)


def resnet_stage_maps(module, variables: Mapping[str, Any], x: jax.Array) -> dict[str, jax.Array]:
  """Eval-mode ResNet maps conv1…conv5 of normalised images, conv1 *before* the stem's max-pool.

  conv1 is ReLU(bn1(conv1(x))), the map OpenSelfSup's ResNet returns for `out_indices=0` (at
  224 px: 112×112), read from the stem's batch norm (flax `capture_intermediates`); conv2…conv5
  are the residual stages. With `small_image_stem` (no max-pool) conv1 is the stem output.

  Args:
    module: a `ssl_jax.models.resnet.ResNet`. variables: its variables.
    x: [B, H, W, 3] float, normalised.

  Returns:
    {"conv1": [B, H/2, W/2, C1], "conv2": …, "conv5": [B, H/32, W/32, C5]} (H/1 … H/8 for the
    small stem).
  """
  out, captured = module.apply(variables, x, train=False, mutable=["intermediates"],
                               capture_intermediates=lambda mdl, method: (
                                   mdl.name == "bn1" and method == "__call__"))
  if "stages" not in out:
    raise ValueError("resnet_stage_maps needs a ResNet backbone (stage maps); got outputs "
                     f"{sorted(out)}")
  maps = {"conv1": jax.nn.relu(captured["intermediates"]["bn1"]["__call__"][0])}
  maps.update({f"conv{i + 2}": stage for i, stage in enumerate(out["stages"])})
  return maps


def multilayer_features(outputs: Mapping[str, Any],
                        pool_sizes: Mapping[str, int] | None = None) -> dict[str, jax.Array]:
  """Flattened per-stage features conv1…conv5 from a ResNet's output dict.

  Args:
    outputs: backbone output with "stages" (4 maps [B, h_i, w_i, C_i] = conv2…conv5) and, if the
      backbone exposes it, "stem" ([B, h, w, C] = conv1).
    pool_sizes: layer -> s for an s×s adaptive average pool (e.g. RESNET50_POOL_SIZES); None or a
      missing layer: global average pool (s = 1).

  Returns:
    dict layer -> [B, C_i·s²] float32.
  """
  maps = {}
  if "stem" in outputs:
    maps["conv1"] = outputs["stem"]
  if "stages" not in outputs:
    raise ValueError("multilayer_features: encoder output has no 'stages' (ResNet stage maps);"
                     f" keys: {sorted(outputs)}")
  for i, stage in enumerate(outputs["stages"]):
    maps[f"conv{i + 2}"] = stage
  pool_sizes = pool_sizes or {}
  feats = {}
  for name, fmap in maps.items():
    s = pool_sizes.get(name, 1)
    pooled = adaptive_avg_pool(fmap.astype(jnp.float32), s)
    feats[name] = pooled.reshape(pooled.shape[0], -1)
  return feats


def multilayer_encode_fn(encode_fn: Callable[[jax.Array], Mapping[str, Any]],
                         pool_sizes: Mapping[str, int] | None = None
                         ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """images -> dict layer -> pooled features, to pass to `extract_features` (pooling on device)."""
  return lambda images: multilayer_features(encode_fn(images), pool_sizes)


def multilayer_probe(features_per_layer: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int, *,
                     rng: jax.Array, **fit_kwargs) -> dict[str, float]:
  """One linear probe per layer (MaskCo Table 7), test top-1 per layer.

  Args:
    features_per_layer: layer -> (train_x [N, D_l], test_x [M, D_l]).
    train_labels: [N] int. test_labels: [M] int.
    num_classes: C.
    rng: PRNG key; layer i uses fold_in(rng, i).
    **fit_kwargs: `fit_linear_probe` keywords (epochs, batch_size, lr, ...), shared by layers.

  Returns:
    dict layer -> top-1 accuracy.
  """
  results = {}
  for i, (layer, (train_x, test_x)) in enumerate(features_per_layer.items()):
    probe = fit_linear_probe(train_x, train_labels, num_classes,
                             rng=jax.random.fold_in(rng, i), **fit_kwargs)
    results[layer] = evaluate_linear_probe(probe, test_x, test_labels)["top1"]
  return results


def _pooled(outputs: Any) -> jax.Array:
  return outputs["pooled"] if isinstance(outputs, Mapping) else outputs


def linear_eval_from_images(encode_fn: Callable[[jax.Array], Any], train_images: np.ndarray,
                            train_labels: np.ndarray, test_images: np.ndarray,
                            test_labels: np.ndarray, *, num_classes: int, rng: jax.Array,
                            extract_batch_size: int = 256, **fit_kwargs) -> dict[str, float]:
  """Frozen features of both splits, a fitted probe, its test top-1/top-5.

  Args:
    encode_fn: images [b, H, W, 3] -> features [b, D] or a dict with "pooled" [b, D].
    train_images: [N, H, W, 3]. train_labels: [N] int.
    test_images: [M, H, W, 3]. test_labels: [M] int.
    num_classes: C.
    rng: PRNG key for `fit_linear_probe`.
    extract_batch_size: images per encoder call.
    **fit_kwargs: `fit_linear_probe` keywords (epochs, batch_size, lr, ...).

  Returns:
    {"top1": ..., "top5": ...}.
  """
  encode = lambda images: _pooled(encode_fn(images))  # noqa: E731
  train_x = extract_features(encode, train_images, extract_batch_size)
  test_x = extract_features(encode, test_images, extract_batch_size)
  probe = fit_linear_probe(train_x, train_labels, num_classes, rng=rng, **fit_kwargs)
  return evaluate_linear_probe(probe, test_x, test_labels)
