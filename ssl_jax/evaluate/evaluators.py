"""Periodic evaluators of a training run (big_vision's `evaluators/` pattern).

`make_evaluators(config, predict_fn)` builds one evaluator per entry of `config.eval`; each has
`every_steps` and `run(train_state) -> {name/metric: float}`. The trainer hands over a single
predict function and nothing else:

  predict_fn(train_state, images, select) -> host arrays: `select` (a function of the backbone's
    eval-mode output dict: "pooled" [B, C] and, for ResNets, "stages"/"stem"; see
    `ssl_jax.models`) applied on device to this process's uint8 images [b, H, W, 3], returned
    for the whole global batch on every host (so evaluators work on any number of processes).

Kinds (`config.eval.<name>.kind`, default the entry's name):
  knn         weighted cosine kNN (`ssl_jax.evaluate.knn`) on pooled features: `<name>/top1`,
              `<name>/top5`, `<name>/chance`.
  linear      feature-level linear probe (`ssl_jax.evaluate.linear.fit_linear_probe`).
  multilayer  one linear probe per ResNet stage conv1…conv5 (MaskCo Table 7).
Settings of every kind: source, train_args, test_args (the source built twice), image_size (0:
the pretraining one), batch_size, max_train (0: all), every_steps; see `config_lib.knn_eval`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ssl_jax import config_lib, registry
from ssl_jax.evaluate import features as features_lib

PredictFn = Callable[[Any, np.ndarray, Callable[[dict], Any]], Any]


class KnnEvaluator:
  """Weighted cosine kNN on frozen pooled features."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               predict_fn: PredictFn):
    self.name, self.cfg, self.every_steps = name, cfg, int(cfg.every_steps)
    self.image_size = int(cfg.get("image_size", 0) or config.data.image_size)
    self.train = _source(name, cfg, "train_args")
    self.test = _source(name, cfg, "test_args")
    self.num_classes = int(cfg.get("num_classes", 0) or getattr(self.train, "num_classes", 0))
    self._predict, self._select = predict_fn, self.select()

  def select(self) -> Callable[[dict], Any]:
    """What to take from the backbone's outputs (runs on device; one function per evaluator so
    it compiles once)."""
    return lambda outputs: outputs["pooled"]

  def features(self, ts) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """(train features, train labels, test features, test labels) of the current state."""
    encode = lambda images: self._predict(ts, images, self._select)  # noqa: E731
    kw = dict(image_size=self.image_size, batch_size=int(self.cfg.batch_size))
    x_train, y_train = features_lib.source_features(encode, self.train,
                                                    limit=int(self.cfg.max_train), **kw)
    x_test, y_test = features_lib.source_features(encode, self.test, **kw)
    return x_train, y_train, x_test, y_test

  def classes(self, y_train: np.ndarray, y_test: np.ndarray) -> int:
    return self.num_classes or int(max(y_train.max(), y_test.max()) + 1)

  def run(self, ts) -> dict[str, float]:
    from ssl_jax.evaluate import knn  # pylint: disable=import-outside-toplevel
    x_train, y_train, x_test, y_test = self.features(ts)
    num_classes = self.classes(y_train, y_test)
    acc = knn.knn_accuracy(x_train, y_train, x_test, y_test, num_classes,
                           k=min(int(self.cfg.k), len(x_train)),
                           temperature=float(self.cfg.temperature))
    out = {f"{self.name}/{k}": float(v) for k, v in acc.items()}
    out[f"{self.name}/chance"] = 1.0 / num_classes
    return out


class LinearEvaluator(KnnEvaluator):
  """Feature-level linear probe on frozen pooled features.

  Settings beside the kNN ones: epochs (30), probe_batch_size (256), lr (0.1), weight_decay (0),
  optimizer ("sgd"), normalize ("bn_noaffine"), seed (0). Reports `<name>/top1`, `<name>/top5`.
  """

  def fit_kwargs(self) -> dict:
    c = self.cfg
    return dict(epochs=c.get("epochs", 30), batch_size=c.get("probe_batch_size", 256),
                lr=c.get("lr", 0.1), weight_decay=c.get("weight_decay", 0.0),
                optimizer=c.get("optimizer", "sgd"), normalize=c.get("normalize", "bn_noaffine"))

  def run(self, ts) -> dict[str, float]:
    from ssl_jax.evaluate import linear  # pylint: disable=import-outside-toplevel
    x_train, y_train, x_test, y_test = self.features(ts)
    num_classes = self.classes(y_train, y_test)
    probe = linear.fit_linear_probe(x_train, y_train, num_classes,
                                    rng=jax.random.PRNGKey(self.cfg.get("seed", 0)),
                                    **self.fit_kwargs())
    acc = linear.evaluate_linear_probe(probe, x_test, y_test)
    return {f"{self.name}/{k}": float(v) for k, v in acc.items()}


class MultilayerEvaluator(LinearEvaluator):
  """One linear probe per ResNet stage conv1…conv5 (MaskCo Table 7): `<name>/<layer>/top1`.

  `pool_sizes` ({layer: s}, default global average pool) sets each stage's s×s adaptive pool
  (`ssl_jax.evaluate.linear.RESNET50_POOL_SIZES` for the paper's ~9k-dim features).
  """

  def select(self) -> Callable[[dict], Any]:
    from ssl_jax.evaluate import linear  # pylint: disable=import-outside-toplevel
    pool_sizes = dict(self.cfg.get("pool_sizes", None) or {})
    return lambda outputs: linear.multilayer_features(outputs, pool_sizes)

  def run(self, ts) -> dict[str, float]:
    from ssl_jax.evaluate import linear  # pylint: disable=import-outside-toplevel
    x_train, y_train, x_test, y_test = self.features(ts)
    num_classes = self.classes(y_train, y_test)
    per_layer = {k: (x_train[k], x_test[k]) for k in x_train}
    acc = linear.multilayer_probe(per_layer, y_train, y_test, num_classes,
                                  rng=jax.random.PRNGKey(self.cfg.get("seed", 0)),
                                  **self.fit_kwargs())
    return {f"{self.name}/{layer}/top1": float(v) for layer, v in acc.items()}


EVALUATORS = {"knn": KnnEvaluator, "linear": LinearEvaluator, "multilayer": MultilayerEvaluator}


def _source(name: str, cfg: ml_collections.ConfigDict, args_field: str):
  try:
    return registry.get_source(cfg.source, **cfg[args_field].to_dict())
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"config.eval.{name}.{args_field} (source {cfg.source!r}): "
                                 f"{e}") from e


def make_evaluators(config: ml_collections.ConfigDict, predict_fn: PredictFn) -> list:
  """One evaluator per `config.eval` entry (kind = `.kind` or the entry's name)."""
  out = []
  for name, cfg in config.eval.items():
    kind = cfg.get("kind", name)
    if kind not in EVALUATORS:
      raise config_lib.ConfigError(
          f"config.eval.{name}: unknown evaluator {kind!r}; known: {sorted(EVALUATORS)}")
    out.append(EVALUATORS[kind](name, cfg, config, predict_fn))
  return out
