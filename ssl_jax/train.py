"""The one generic trainer: mesh -> data -> method -> sharding -> jitted step -> resume -> loop.

Reads top to bottom like big_vision's: nothing here is method-specific. A method supplies pure
`init`/`loss_and_aux`/`after_update`/`encode` (`ssl_jax.methods.base.Method`).

Train state (a plain dict pytree, saved whole by orbax):
  step: int32; params; opt_state; state (method: BN stats, EMA target, queue);
  probe: {params, opt_state} of the online linear probe (empty without labels).
Randomness: the step's key is `fold_in(PRNGKey(seed), step)`, so a resumed run draws exactly
the keys an uninterrupted run would; the data iterator state is checkpointed with the params.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ssl_jax import checkpoint, config_lib, optim, parallel, registry
from ssl_jax.data import pipeline
from ssl_jax.evaluate import online_probe
from ssl_jax.metrics import MetricsWriter, Chrono


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Setup:
  """Everything `run` builds before the loop (tests and benchmarks reuse it)."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  method: Any
  source: Any
  tx: optax.GradientTransformation
  schedule: Callable
  train_step: Callable
  state_sharding: Any
  init_state: Callable[[dict], Any]


def resolve_steps(config: ml_collections.ConfigDict, num_records: int) -> None:
  """Fills `train.total_steps` and `optim.warmup_steps` from epochs and the dataset size."""
  steps_per_epoch = max(1, num_records // config.train.batch_size)
  with config.unlocked():
    if config.train.total_steps <= 0:
      config.train.total_steps = max(1, int(round(config.train.num_epochs * steps_per_epoch)))
    if config.optim.warmup_epochs > 0 and config.optim.warmup_steps <= 0:
      config.optim.warmup_steps = int(round(config.optim.warmup_epochs * steps_per_epoch))
    config.optim.warmup_steps = min(config.optim.warmup_steps, config.train.total_steps)


def build(config: ml_collections.ConfigDict, mesh=None, source=None) -> Setup:
  """Validates the config, builds source, method, optimizer and the sharded train step."""
  mesh = mesh or parallel.make_mesh()
  config_lib.validate(config, num_devices=mesh.size)
  if source is None:
    source = registry.get_source(config.data.source, **config.data.source_args.to_dict())
  resolve_steps(config, len(source))
  method = registry.get_method(config.method).make(config)
  num_classes = int(config.data.get("num_classes", 0) or getattr(source, "num_classes", 0) or 0)

  base_key = jax.random.PRNGKey(config.train.seed)
  # Step keys are fold_in(base_key, step) for step >= 0; init draws from a separate fold.
  init_key, probe_key = jax.random.split(jax.random.fold_in(base_key, 2**31 - 1))

  def init_state(batch):
    params, state = method.init(init_key, batch)
    mask = method.trainable_mask(params) if method.trainable_mask else None
    tx, _ = optim.make_optimizer(config.optim, config.train.total_steps,
                                 config.train.batch_size, trainable_mask=mask)
    probe = {}
    if num_classes:
      feature_dim = method.encode(params, state, batch["image"][:, 0]).shape[-1]
      probe_params = online_probe.init_online_probe(probe_key, feature_dim, num_classes)
      probe = {"params": probe_params, "opt_state": PROBE_TX.init(probe_params)}
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params), "state": state, "probe": probe}

  # The optimizer needs the trainable mask, which needs param shapes: derive both abstractly.
  abstract_batch = _abstract_batch(config, method)
  abstract_state = jax.eval_shape(init_state, abstract_batch)
  mask = (method.trainable_mask(abstract_state["params"]) if method.trainable_mask else None)
  tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps,
                                      config.train.batch_size, trainable_mask=mask)
  state_sharding = parallel.state_shardings(abstract_state, mesh, config.sharding.fsdp)
  batch_sharding = parallel.batch_sharding(mesh)

  def train_step(ts, batch):
    step = ts["step"]
    rng = jax.random.fold_in(base_key, step)
    grad_fn = jax.value_and_grad(method.loss_and_aux, has_aux=True)
    (loss, (mstate, metrics)), grads = grad_fn(ts["params"], ts["state"], batch, rng, step)
    features = metrics.pop("features", None)
    updates, opt_state = tx.update(grads, ts["opt_state"], ts["params"])
    params = optax.apply_updates(ts["params"], updates)
    mstate = method.after_update(mstate, params, step)
    new = {"step": step + 1, "params": params, "opt_state": opt_state, "state": mstate,
           "probe": ts["probe"]}
    if ts["probe"] and features is not None:
      (probe_loss, probe_metrics), probe_grads = jax.value_and_grad(
          online_probe.online_probe_loss, has_aux=True)(
              ts["probe"]["params"], features, batch["label"])
      p_updates, p_opt = PROBE_TX.update(probe_grads, ts["probe"]["opt_state"],
                                         ts["probe"]["params"])
      new["probe"] = {"params": optax.apply_updates(ts["probe"]["params"], p_updates),
                      "opt_state": p_opt}
      metrics.update(probe_metrics)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves the state untouched: the host stops the run at this step and the
    # last checkpoint (and the in-memory state) stay good.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, ts)
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite, lr=schedule(step))
    return new, metrics

  jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))

  def init_sharded(batch):
    return jax.jit(init_state, out_shardings=state_sharding)(batch)

  return Setup(config=config, mesh=mesh, method=method, source=source, tx=tx, schedule=schedule,
               train_step=jitted, state_sharding=state_sharding, init_state=init_sharded)


# The online probe has its own small optimizer: its gradients never reach the backbone
# (stop-gradient features), and Adam keeps it independent of the method's LARS/AdamW settings.
PROBE_TX = optax.adam(1e-3)


def _abstract_batch(config, method) -> dict:
  b, s, v = config.train.batch_size, config.data.image_size, method.num_views
  batch = {"image": jax.ShapeDtypeStruct((b, v, s, s, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
  if config.data.masks:
    batch["masks"] = jax.ShapeDtypeStruct((b, v, s, s), jnp.int32)
  return batch


def make_data_iterator(setup: Setup):
  c = setup.config
  transform = pipeline.MakeViews(c.data.views, c.data.image_size, c.data.masks,
                                 c.data.max_segments)
  ds = pipeline.train_dataset(setup.source, seed=c.train.seed, batch_size=c.train.batch_size,
                              transform=transform, num_workers=c.data.num_workers,
                              prefetch=c.data.prefetch, process_index=jax.process_index(),
                              process_count=jax.process_count())
  return iter(ds)


def device_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Model inputs only (host bookkeeping such as `skipped` and `id` stays on the host)."""
  keep = {k: v for k, v in local.items() if k in ("image", "masks", "label", "crop", "flip")}
  return parallel.global_batch(keep, mesh)


def run(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
        source=None, mesh=None) -> dict:
  """Trains (resuming from `workdir` if it has checkpoints). Returns the final metrics and state.

  `max_steps` stops early (after that many total steps) without changing the schedule, as a
  preemption would. `source`/`mesh` override the config's (tests, notebooks).
  """
  parallel.initialize_distributed()
  setup = build(config, mesh=mesh, source=source)
  config = setup.config
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  data_it = make_data_iterator(setup)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  abstract = jax.eval_shape(setup.init_state, _abstract_batch(config, setup.method))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, setup.state_sharding)
  if manager.latest_step() is not None:
    start, ts = checkpoint.restore(manager, abstract, data_it)
    logging.info("resumed from step %d in %s", start, workdir)
  else:
    ts = setup.init_state(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                       _abstract_batch(config, setup.method)))
    start = 0
  total = config.train.total_steps
  stop_at = total if max_steps is None else min(total, max_steps)

  writer = MetricsWriter(workdir, enabled=is_main)
  evaluators = _make_evaluators(config, setup)
  if start == 0:
    for ev in evaluators:
      writer.write(0, ev.run(ts))
  chrono = Chrono(total_steps=total, start_step=start, batch_size=config.train.batch_size,
                  num_cores=jax.device_count(), show_bar=is_main and config.train.progress_bar)
  preempted = checkpoint.PreemptionFlag().install()
  last_metrics: dict = {}
  skipped = 0
  step = start
  pending = None  # (step, metrics) of the previous step, checked one step late (no host sync)
  try:
    while step < stop_at:
      local = next(data_it)
      skipped += int(np.sum(local.get("skipped", 0)))
      ts, metrics = setup.train_step(ts, device_batch(local, setup.mesh))
      step += 1
      _check_finite(pending, workdir)
      pending = (step, metrics)
      chrono.tick(step)
      if step % config.train.log_every_steps == 0 or step == stop_at:
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        last_metrics.update(chrono.metrics(), **{"data/skipped": skipped})
        writer.write(step, last_metrics)
      for ev in evaluators:
        if step % ev.every_steps == 0 or step == total:
          writer.write(step, ev.run(ts))
      save_now = (step % config.train.checkpoint_every_steps == 0 or step == stop_at
                  or preempted.is_set())
      if save_now:
        _check_finite(pending, workdir)  # never save after a non-finite step
        checkpoint.save(manager, step, ts, data_it, force=True)
      if preempted.is_set():
        logging.warning("SIGTERM received: saved step %d, exiting", step)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    preempted.uninstall()
    chrono.close()
    writer.close()
  return {"step": step, "state": ts, **last_metrics}


def _check_finite(pending, workdir: str) -> None:
  if pending is None:
    return
  step, metrics = pending
  if not bool(metrics["finite"]):
    raise NonFiniteLossError(
        f"non-finite loss ({float(metrics['loss'])}) at step {step} (the update from step"
        f" {step - 1} was not applied); the last good checkpoint in"
        f" {checkpoint.checkpoint_dir(workdir)} is kept. Lower config.optim.base_lr or check"
        f" the data.")


class _KnnEvaluator:
  """Weighted cosine kNN on frozen backbone features (`ssl_jax.evaluate.knn`)."""

  def __init__(self, name: str, cfg, config, setup: Setup):
    from ssl_jax.evaluate import knn  # pylint: disable=import-outside-toplevel
    self._knn = knn
    self.name, self.cfg, self.every_steps = name, cfg, cfg.every_steps
    self.image_size = cfg.image_size or config.data.image_size
    self.train = registry.get_source(cfg.source, **cfg.train_args.to_dict())
    self.test = registry.get_source(cfg.source, **cfg.test_args.to_dict())
    self.num_classes = int(cfg.get("num_classes", 0) or getattr(self.train, "num_classes", 0))
    method = setup.method
    self._encode = jax.jit(lambda params, state, images: method.encode(params, state, images))

  def _features(self, ts, source, limit):
    """Frozen features (an array, or a dict of arrays for the multi-layer probe) and labels."""
    feats, labels = [], []
    for batch in pipeline.eval_batches(source, image_size=self.image_size,
                                       batch_size=self.cfg.batch_size, limit=limit):
      images = batch["image"]
      n = images.shape[0]
      if n < self.cfg.batch_size:  # pad to one compiled shape
        pad = np.zeros((self.cfg.batch_size - n,) + images.shape[1:], images.dtype)
        images = np.concatenate([images, pad])
      out = jax.device_get(self._encode(ts["params"], ts["state"], images))
      feats.append(jax.tree.map(lambda v, n=n: np.asarray(v)[:n], out))
      labels.append(batch["label"])
    return jax.tree.map(lambda *xs: np.concatenate(xs), *feats), np.concatenate(labels)

  def run(self, ts) -> dict:
    x_train, y_train = self._features(ts, self.train, self.cfg.max_train)
    x_test, y_test = self._features(ts, self.test, 0)
    num_classes = self.num_classes or int(max(y_train.max(), y_test.max()) + 1)
    acc = self._knn.knn_accuracy(x_train, y_train, x_test, y_test, num_classes,
                                 k=min(self.cfg.k, len(x_train)),
                                 temperature=self.cfg.temperature)
    return {f"{self.name}/{k}": float(v) for k, v in acc.items()}


class _LinearEvaluator(_KnnEvaluator):
  """Feature-level linear probe (`ssl_jax.evaluate.linear.fit_linear_probe`) on frozen features.

  Settings beside the kNN section's (source, train_args, test_args, image_size, batch_size,
  max_train): epochs (30), probe_batch_size (256), lr (0.1), weight_decay (0), optimizer
  ("sgd"), normalize ("bn_noaffine"). Reports `<name>/top1`, `<name>/top5`.
  """

  def _fit_kwargs(self) -> dict:
    c = self.cfg
    return dict(epochs=c.get("epochs", 30), batch_size=c.get("probe_batch_size", 256),
                lr=c.get("lr", 0.1), weight_decay=c.get("weight_decay", 0.0),
                optimizer=c.get("optimizer", "sgd"), normalize=c.get("normalize", "bn_noaffine"))

  def run(self, ts) -> dict:
    from ssl_jax.evaluate import linear  # pylint: disable=import-outside-toplevel
    x_train, y_train = self._features(ts, self.train, self.cfg.max_train)
    x_test, y_test = self._features(ts, self.test, 0)
    num_classes = self.num_classes or int(max(y_train.max(), y_test.max()) + 1)
    probe = linear.fit_linear_probe(x_train, y_train, num_classes,
                                    rng=jax.random.PRNGKey(self.cfg.get("seed", 0)),
                                    **self._fit_kwargs())
    acc = linear.evaluate_linear_probe(probe, x_test, y_test)
    return {f"{self.name}/{k}": float(v) for k, v in acc.items()}


class _MultilayerEvaluator(_LinearEvaluator):
  """One linear probe per ResNet stage conv1…conv5 (MaskCo Table 7): `<name>/<layer>/top1`.

  `pool_sizes` ({layer: s}, default global average pool) sets each stage's s×s adaptive pool
  (`ssl_jax.evaluate.linear.RESNET50_POOL_SIZES` for the paper's ~9k-dim features).
  """

  def __init__(self, name: str, cfg, config, setup: Setup):
    super().__init__(name, cfg, config, setup)
    from ssl_jax.evaluate import linear  # pylint: disable=import-outside-toplevel
    from ssl_jax.methods import base  # pylint: disable=import-outside-toplevel
    method = setup.method
    pool_sizes = dict(cfg.get("pool_sizes", None) or {})
    self._encode = jax.jit(lambda params, state, images: linear.multilayer_features(
        method.backbone.apply(method.encoder(params, state), base.normalized(images),
                              train=False), pool_sizes))

  def run(self, ts) -> dict:
    from ssl_jax.evaluate import linear  # pylint: disable=import-outside-toplevel
    x_train, y_train = self._features(ts, self.train, self.cfg.max_train)
    x_test, y_test = self._features(ts, self.test, 0)
    num_classes = self.num_classes or int(max(y_train.max(), y_test.max()) + 1)
    per_layer = {k: (x_train[k], x_test[k]) for k in x_train}
    acc = linear.multilayer_probe(per_layer, y_train, y_test, num_classes,
                                  rng=jax.random.PRNGKey(self.cfg.get("seed", 0)),
                                  **self._fit_kwargs())
    return {f"{self.name}/{layer}/top1": float(v) for layer, v in acc.items()}


EVALUATORS = {"knn": _KnnEvaluator, "linear": _LinearEvaluator,
              "multilayer": _MultilayerEvaluator}


def _make_evaluators(config, setup: Setup) -> list:
  out = []
  for name, cfg in config.eval.items():
    kind = cfg.get("kind", name)
    if kind not in EVALUATORS:
      raise config_lib.ConfigError(
          f"config.eval.{name}: unknown evaluator {kind!r}; known: {sorted(EVALUATORS)}")
    out.append(EVALUATORS[kind](name, cfg, config, setup))
  return out
