"""The one generic trainer: mesh -> data -> method -> sharding -> jitted step -> resume -> loop.

Reads top to bottom like big_vision's: nothing here is method-specific. A method supplies pure
`init`/`loss_and_aux`/`after_update`/`encoder` and declares the batch it consumes
(`ssl_jax.methods.base.Method`); evaluators come from `ssl_jax.evaluate.evaluators`.

Train state (a plain dict pytree, saved whole by orbax):
  step: int32; params; opt_state; state (method: BN stats, EMA target, queue);
  probe: {params, opt_state} of the online linear probe (empty without labels).
Frozen constants (a teacher) are a separate, un-donated argument of the step: never in the state,
never checkpointed; config.json records their source and sha256 ("provenance").
Randomness: the step's key is `fold_in(PRNGKey(seed), step)`, so a resumed run draws exactly
the keys an uninterrupted run would; the data iterator state is checkpointed with the params.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import checkpoint, config_lib, loop, optim, parallel, paths, registry, weights
from ssl_jax.data import pipeline
from ssl_jax.evaluate import evaluators as evaluators_lib
from ssl_jax.evaluate import online_probe
from ssl_jax.methods import base
from ssl_jax.metrics import MetricsWriter, console, format_metrics


NonFiniteLossError = loop.NonFiniteLossError


@dataclasses.dataclass
class Setup:
  """Everything `run` builds before the loop (tests and benchmarks reuse it).

  train_step(ts, batch, constants) is the jitted step (state donated); `step(ts, batch)` calls it
  with this run's constants. batch_spec is the global batch the step consumes (the method's
  keys plus "label" when the online probe is on).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  method: base.Method
  source: Any
  views: pipeline.MakeViews
  batch_spec: dict[str, jax.ShapeDtypeStruct]
  tx: optax.GradientTransformation
  schedule: Callable
  train_step: Callable
  state_sharding: Any
  init_state: Callable[[dict], Any]
  constants: Any
  provenance: dict
  predict_fn: Callable[[Any, np.ndarray, Callable], Any]

  def step(self, ts, batch):
    return self.train_step(ts, batch, self.constants)

  def device_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return loop.device_batch(local, self.mesh, self.batch_spec)

  def zeros_batch(self) -> dict[str, jax.Array]:
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.batch_spec)


# The online probe has its own small optimizer: its gradients never reach the backbone
# (stop-gradient features), and Adam keeps it independent of the method's LARS/AdamW settings.
PROBE_TX = optax.adam(1e-3)


def make_source(config: ml_collections.ConfigDict):
  """The training source of `config.data`; a bad name/argument/path is a ConfigError."""
  d = config.data
  try:
    return registry.get_source(d.source, **d.source_args.to_dict())
  except config_lib.UserError:
    raise
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"config.data.source={d.source!r}: {e}") from e


def build(config: ml_collections.ConfigDict, mesh=None, source=None) -> Setup:
  """Validates the config, builds source, method, optimizer and the sharded train step."""
  mesh = mesh or parallel.make_mesh()
  config_lib.validate(config, num_devices=mesh.size)
  source = make_source(config) if source is None else source
  config_lib.resolve_steps(config, len(source))
  method = registry.get_method(config.method).make(config)
  num_classes = int(config.data.get("num_classes", 0) or getattr(source, "num_classes", 0) or 0)

  # The batch: what the method consumes, checked against what the views produce.
  spec = dict(method.batch_spec(config))
  if num_classes:
    spec["label"] = jax.ShapeDtypeStruct((config.train.batch_size,), jnp.int32)
  views = pipeline.MakeViews.from_config(config)
  _check_views(config, spec, views)

  constants, provenance = _load_constants(config, method)
  base_key = jax.random.PRNGKey(config.train.seed)
  # Step keys are fold_in(base_key, step) for step >= 0; init draws from a separate fold.
  init_key, probe_key = jax.random.split(jax.random.fold_in(base_key, 2**31 - 1))
  abstract_consts = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), constants)
  params_shape, mstate_shape = jax.eval_shape(method.init, init_key, spec)
  feature_dim = 0
  if num_classes:
    metrics_shape = jax.eval_shape(
        lambda p, s, b, c: method.loss_and_aux(p, s, b, init_key, jnp.int32(0), c)[1][1],
        params_shape, mstate_shape, spec, abstract_consts)
    if "features" in metrics_shape:
      feature_dim = int(metrics_shape["features"].shape[-1])

  mask = method.trainable_mask(params_shape) if method.trainable_mask else None
  tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps,
                                      config.train.batch_size, trainable_mask=mask)

  def init_state(batch):
    params, state = method.init(init_key, batch)
    probe = {}
    if feature_dim:
      probe_params = online_probe.init_online_probe(probe_key, feature_dim, num_classes)
      probe = {"params": probe_params, "opt_state": PROBE_TX.init(probe_params)}
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params), "state": state, "probe": probe}

  abstract_state = jax.eval_shape(init_state, spec)
  state_sharding = parallel.state_shardings(abstract_state, mesh, config.sharding.fsdp)
  batch_sharding = parallel.batch_sharding(mesh)
  const_sharding = parallel.state_shardings(abstract_consts, mesh, config.sharding.fsdp)
  replicated = parallel.replicated(mesh)
  constants = jax.device_put(constants, const_sharding)

  def train_step(ts, batch, consts):
    step = ts["step"]
    rng = jax.random.fold_in(base_key, step)
    grad_fn = jax.value_and_grad(method.loss_and_aux, has_aux=True)
    params_in, mstate_in = ts["params"], ts["state"]
    if config.sharding.fsdp:
      # ZeRO-3: weights are gathered for the compute, so activations stay sharded by batch (left
      # alone, XLA may shard the heads' activations by feature and hold whole logits blocks).
      params_in, mstate_in = jax.lax.with_sharding_constraint(
          (params_in, mstate_in), jax.tree.map(lambda _: replicated, (params_in, mstate_in)))
    (loss, (mstate, metrics)), grads = grad_fn(params_in, mstate_in, batch, rng, step, consts)
    if config.sharding.fsdp:
      grads = jax.lax.with_sharding_constraint(grads, state_sharding["params"])
    features = metrics.pop("features", None)
    probe_grads = None
    if ts["probe"] and features is not None:
      (_, probe_metrics), probe_grads = jax.value_and_grad(
          online_probe.online_probe_loss, has_aux=True)(
              ts["probe"]["params"], features, batch["label"])
      metrics.update(probe_metrics)

    def apply():
      updates, opt_state = tx.update(grads, ts["opt_state"], ts["params"])
      params = optax.apply_updates(ts["params"], updates)
      new = {"step": step + 1, "params": params, "opt_state": opt_state,
             "state": method.after_update(mstate, params, step), "probe": ts["probe"]}
      if probe_grads is not None:
        p_updates, p_opt = PROBE_TX.update(probe_grads, ts["probe"]["opt_state"],
                                           ts["probe"]["params"])
        new["probe"] = {"params": optax.apply_updates(ts["probe"]["params"], p_updates),
                        "opt_state": p_opt}
      return new, updates

    # A non-finite step leaves the state untouched: the host stops the run at this step and the
    # last checkpoint (and the in-memory state) stay good.
    new, finite, grad_norm = loop.update_if_finite(apply, ts, loss, grads)
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite, lr=schedule(step))
    return new, metrics

  jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, const_sharding),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))

  def init_sharded(batch):
    return jax.jit(init_state, out_shardings=state_sharding)(batch)

  predict_fn = make_predict_fn(method, mesh)

  return Setup(config=config, mesh=mesh, method=method, source=source, views=views,
               batch_spec=spec, tx=tx, schedule=schedule, train_step=jitted,
               state_sharding=state_sharding, init_state=init_sharded, constants=constants,
               provenance=provenance, predict_fn=predict_fn)


def make_predict_fn(method: base.Method, mesh) -> Callable:
  """The evaluators' predict function (`ssl_jax.evaluate.evaluators`):
  predict(ts, local_images [b, H, W, 3] uint8, select) -> host arrays of `select(outputs)` for the
  whole global batch, where outputs is the backbone's eval-mode output dict. Each process passes
  its rows; one jitted program per `select`."""
  compiled: dict = {}

  def predict(ts, images, select):
    if select not in compiled:
      compiled[select] = jax.jit(lambda ts, x: select(method.backbone.apply(
          method.encoder(ts["params"], ts["state"]), base.normalized(x), train=False)))
    x = parallel.global_batch({"x": np.asarray(images)}, mesh)["x"]
    return parallel.to_host(compiled[select](ts, x))

  return predict


def _check_views(config, spec: Mapping[str, jax.ShapeDtypeStruct],
                 views: pipeline.MakeViews) -> None:
  """The views `config.data` makes must hold every array the method consumes, shape for shape."""
  produced = views.output_spec()
  for key, want in spec.items():
    got = produced.get(key)
    want_desc = f"{key} {list(want.shape[1:])} {np.dtype(want.dtype).name}"
    if got is None or tuple(got[0]) != tuple(want.shape[1:]) or got[1] != np.dtype(want.dtype):
      got_desc = ("no " + key) if got is None else f"{key} {list(got[0])} {got[1].name}"
      raise config_lib.ConfigError(
          f"method {config.method!r} consumes {want_desc} per example, but config.data "
          f"(views={config.data.views!r}, image_size={config.data.image_size}, "
          f"masks={config.data.masks!r}, num_boxes={config.data.num_boxes}) gives {got_desc}")


def _load_constants(config, method: base.Method) -> tuple[Any, dict]:
  """The method's frozen constants (host arrays) and what config.json records about them."""
  provenance: dict = {}
  if config.init_from.source:
    provenance["init_from"] = weights.describe(config.init_from.source,
                                               config.init_from.step or None,
                                               config.init_from.part)
  if method.load_constants is None:
    return None, provenance
  loaded = method.load_constants(config)
  provenance["constants"] = {
      name: (weights.describe(src) if isinstance(src, str) else weights.describe(**src))
      for name, src in loaded.sources.items()}
  return jax.tree.map(np.asarray, loaded.tree), provenance


def make_data_iterator(setup: Setup, start_step: int = 0):
  """This process's local batches from global batch `start_step` on: the data position of a run
  is its step (`ssl_jax.data.pipeline`), at any process count."""
  c = setup.config
  ds = pipeline.train_dataset(setup.source, seed=c.train.seed, batch_size=c.train.batch_size,
                              transform=setup.views, num_workers=c.data.num_workers,
                              prefetch=c.data.prefetch, process_index=jax.process_index(),
                              process_count=jax.process_count(), start_step=start_step)
  return iter(ds)


def _init_from(setup: Setup, ts):
  """Replaces the fresh backbone (and its target copy) by `config.init_from`'s weights."""
  c, method = setup.config.init_from, setup.method
  if method.set_encoder is None:
    raise config_lib.ConfigError(f"config.init_from: method {setup.config.method!r} cannot start "
                                 "from given weights")
  variables, _ = weights.load_backbone(c.source, model=setup.config.model.to_dict(),
                                       step=c.step or None, part=c.part)
  host = jax.device_get(ts)
  weights.check_fits(variables, method.encoder(host["params"], host["state"]),
                     f"config.init_from.source={c.source!r}")
  params, state = method.set_encoder(host["params"], host["state"], variables)
  ts = {**host, "params": params, "state": state}
  return jax.device_put(ts, setup.state_sharding)


def run(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
        source=None, mesh=None) -> dict:
  """Trains (resuming from `workdir` if it has checkpoints). Returns the final metrics and state.

  `max_steps` stops early (after that many total steps) without changing the schedule, as a
  preemption would. `source`/`mesh` override the config's (tests, notebooks).
  """
  parallel.initialize_distributed()
  workdir = paths.check_workdir(workdir)
  setup = build(config, mesh=mesh, source=source)
  config = setup.config
  is_main = jax.process_index() == 0
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  resumed = manager.latest_step() is not None
  if is_main:
    loop.write_run_config(workdir, config, setup.provenance, resumed)

  abstract = jax.eval_shape(setup.init_state, setup.batch_spec)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, setup.state_sharding)
  total = config.train.total_steps
  if resumed:
    start, ts = checkpoint.restore(manager, abstract)
  else:
    ts = setup.init_state(setup.zeros_batch())
    if config.init_from.source:
      ts = _init_from(setup, ts)
    start = 0
  stop_at = total if max_steps is None else min(total, max_steps)
  data_it = make_data_iterator(setup, start_step=start)
  if is_main:
    console(_start_line(setup, workdir, start, stop_at))

  writer = MetricsWriter(workdir, enabled=is_main)
  evaluators = evaluators_lib.make_evaluators(config, setup.predict_fn)
  try:
    if start == 0:
      for ev in evaluators:
        result = ev.run(ts)
        writer.write(0, result)
        if is_main:
          console(format_metrics(0, total, result))
    outcome = loop.run_steps(
        setup.step, ts, data_it, to_device=setup.device_batch, start=start, stop_at=stop_at,
        total=total, manager=manager, workdir=workdir, writer=writer,
        batch_size=config.train.batch_size, log_every=config.train.log_every_steps,
        checkpoint_every=config.train.checkpoint_every_steps,
        periodic=[loop.Periodic(ev.every_steps, ev.run) for ev in evaluators],
        show_bar=bool(config.train.progress_bar), host_counters=pipeline.HOST_COUNTERS)
  finally:
    manager.close()
    writer.close()
  return {"step": outcome.step, "state": outcome.state, **outcome.metrics}


def _start_line(setup: Setup, workdir: str, start: int, stop_at: int) -> str:
  c = setup.config
  devices = jax.devices()
  what = f"resuming at step {start}" if start else "starting"
  return (f"{c.method}: {what}, {stop_at - start} steps of batch {c.train.batch_size} "
          f"({c.model.name}, {c.data.image_size} px) on {len(devices)} {devices[0].platform} "
          f"device{'s' if len(devices) > 1 else ''}, workdir {workdir}")
