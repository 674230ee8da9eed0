"""The step loop every trainer shares: batches in, jitted steps out, logs, evaluations, checkpoints.

Pretraining (`ssl_jax.train`) and the supervised protocols (`ssl_jax.evaluate.supervised`: linear
evaluation and fine-tuning) differ in what their jitted step computes; what happens around it is
one piece of code, here:
  * `device_batch`: a process-local numpy batch -> global arrays of exactly the keys a step
    consumes (host bookkeeping such as `id` and `skipped` stays on the host);
  * `update_if_finite`, called inside the jitted step: a non-finite loss or gradient norm leaves
    the state untouched, so the in-memory state and the last checkpoint stay good;
  * `run_steps`: next batch -> step -> log line (metrics.jsonl and one compact console line) ->
    periodic evaluations -> checkpoint of the state (every N steps, at the end, and at once on
    SIGTERM, then exit: on several hosts, all at the step they agree on). The finite check reads
    the previous step's flag, so the host never waits on the step it just dispatched.
A resumed run restores the state (`ssl_jax.checkpoint`), reads the data from its step on (the
data position is the step: `ssl_jax.data.pipeline`) and draws the keys `fold_in(seed, step)`, so
it continues with exactly the batches and randomness of an uninterrupted run, at any process
count.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from etils import epath

from ssl_jax import checkpoint, parallel, paths
from ssl_jax.config_lib import ConfigError
from ssl_jax.metrics import Chrono, MetricsWriter, console, format_metrics


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


def device_batch(local: Mapping[str, np.ndarray], mesh,
                 spec: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """The arrays of `spec` from a process-local batch, as global arrays sharded over "data".

  Args:
    local: {key: [b, ...] array} of this process (b = global batch / process count).
    mesh: the device mesh.
    spec: {key: ShapeDtypeStruct of the GLOBAL batch} the step consumes.

  Raises:
    ValueError naming the key when one is missing or has the wrong per-example shape/dtype.
  """
  out = {}
  for key, want in spec.items():
    if key not in local:
      raise ValueError(f"the batch has no {key!r} (keys: {sorted(local)}); the step's batch "
                       "spec and the data pipeline disagree")
    x = np.asarray(local[key])
    if x.shape[1:] != tuple(want.shape[1:]) or x.dtype != np.dtype(want.dtype):
      raise ValueError(f"batch[{key!r}] is {x.dtype}{list(x.shape)}, the step expects "
                       f"{np.dtype(want.dtype)}{list(want.shape)} (global)")
    out[key] = x
  return parallel.global_batch(out, mesh)


def update_if_finite(apply: Callable[[], tuple[Any, Any]], old: Any, loss: jax.Array,
                     grads: Any) -> tuple[Any, jax.Array, jax.Array]:
  """(state after `apply()` if the step is finite else `old`, finite flag, ‖grads‖): call inside
  the step.

  `apply() -> (new state, updates)` runs under a `lax.cond` on the loss and ‖grads‖ being
  finite, so a non-finite step leaves the state untouched without a pass over the whole state
  choosing old or new leaf by leaf (that `jnp.where` cost 4 % of a ViT-S step: bench/README.md).
  The flag is also false when finite gradients give a non-finite update (an optimizer's
  division); that state is returned as computed, and the host (`check_finite` in `run_steps`)
  stops before it is saved or evaluated.

  Args:
    apply: () -> (the state after the update, the optimizer's update pytree).
    old: the state before the update (same pytree structure as apply's state).
    loss: scalar loss of the step.
    grads: the gradient pytree.

  Returns:
    (state, finite: bool scalar, grad_norm: float scalar).
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def take():
    new, updates = apply()
    return new, jnp.isfinite(optax.global_norm(updates))

  new, update_finite = jax.lax.cond(finite, take, lambda: (old, jnp.bool_(False)))
  return new, finite & update_finite, grad_norm


def check_finite(pending: tuple[int, Mapping[str, Any]] | None, workdir: str) -> None:
  """Raises NonFiniteLossError when the step metrics in `pending` = (step, metrics) say the step
  was not finite (`metrics["finite"]` from `update_if_finite`)."""
  if pending is None:
    return
  step, metrics = pending
  if not bool(metrics["finite"]):
    raise NonFiniteLossError(
        f"non-finite loss ({float(metrics['loss'])}) at step {step} (the update from step"
        f" {step - 1} was not applied); the last good checkpoint in"
        f" {checkpoint.checkpoint_dir(workdir)} is kept. Lower config.optim.base_lr or check"
        f" the data.")


def _weight_inputs(provenance: Mapping[str, Any]) -> dict[str, dict]:
  """{label: {"source", "sha256", ...}} of the recorded weight inputs: "backbone" (an evaluated
  network), "constants.<name>" (frozen networks) and "init_from"."""
  out = {k: v for k, v in provenance.items() if k != "constants" and isinstance(v, Mapping)}
  out.update({f"constants.{k}": v for k, v in provenance.get("constants", {}).items()})
  return out


def write_run_config(workdir: str, config, provenance: Mapping[str, Any],
                     resumed: bool = False) -> None:
  """`workdir/config.json`: the resolved config plus "provenance" (source and sha256 of the
  weights the run reads), written atomically (a kill mid-write leaves the old file).

  A resumed run refuses weights it keeps reading (an evaluated backbone, frozen constants) that
  changed since it started, and keeps the recorded `init_from` (its weights live in the
  checkpoint now).
  """
  path = epath.Path(workdir) / "config.json"
  provenance = dict(provenance)
  if resumed and path.exists():
    recorded = json.loads(path.read_text()).get("provenance", {})
    then = _weight_inputs(recorded)
    for label, now in _weight_inputs(provenance).items():
      if label != "init_from" and label in then and then[label]["sha256"] != now["sha256"]:
        raise ConfigError(
            f"{label}: {now['source']} changed since this run started (sha256 "
            f"{then[label]['sha256'][:12]}... then, {now['sha256'][:12]}... now); restore it or "
            "run in a new workdir")
    if "init_from" in recorded:
      provenance["init_from"] = recorded["init_from"]
  out = json.loads(config.to_json_best_effort(sort_keys=True))
  out["provenance"] = provenance
  paths.write_atomic(path, json.dumps(out, indent=2, sort_keys=True))


@dataclasses.dataclass
class Periodic:
  """An evaluation run every `every_steps` steps and at the last step of the schedule.

  run(state) -> {name/metric: float}, written to metrics.jsonl and the console.
  """
  every_steps: int
  run: Callable[[Any], dict]


@dataclasses.dataclass
class Outcome:
  """What `run_steps` ends with: the last step and state, the last logged metrics and the
  results of the evaluations that ran at the last step (empty when none did)."""
  step: int
  state: Any
  metrics: dict
  evals: dict


def run_steps(step_fn: Callable[[Any, dict], tuple[Any, dict]], state: Any,
              data_it: Iterator[dict], *, to_device: Callable[[dict], dict], start: int,
              stop_at: int, total: int, manager, workdir: str, writer: MetricsWriter,
              batch_size: int, log_every: int, checkpoint_every: int,
              periodic: Sequence[Periodic] = (), show_bar: bool = True,
              host_counters: Sequence[str] = (),
              extra_metrics: Callable[[int], dict] | None = None) -> Outcome:
  """Runs steps start+1 … stop_at (the schedule has `total`), checkpointing as it goes.

  Args:
    step_fn: jitted (state, device batch) -> (state, metrics); metrics holds scalar "loss" and
      "finite" (`update_if_finite`) and anything else worth logging.
    state: the train state at `start` (a fresh or a restored one).
    data_it: iterator of process-local batches, positioned after `start` steps (the data
      position of a run is its step: `ssl_jax.data.pipeline.train_dataset(start_step=...)`).
    to_device: local batch -> global device batch (`device_batch` with the step's spec).
    start, stop_at, total: steps done, where to stop (a preemption test or `max_steps`), and the
      length of the schedule (log lines read `step s/total`; evaluations run at `total`).
    manager: orbax CheckpointManager (`checkpoint.make_manager`).
    writer: metrics.jsonl writer (disabled on processes other than 0).
    batch_size: global batch, for img/s.
    log_every, checkpoint_every: in steps; the last step is always logged and saved.
    periodic: evaluations.
    show_bar: progress bar on stderr (process 0 only).
    host_counters: batch keys summed over the run and logged as `data/<key>` (skipped records).
    extra_metrics: step -> more host-side values for the log line (e.g. the epoch).

  Returns:
    Outcome. Raises NonFiniteLossError (after which nothing more is saved) on a NaN/Inf step.
  """
  is_main = jax.process_index() == 0
  chrono = Chrono(total_steps=total, start_step=start, batch_size=batch_size,
                  num_cores=jax.device_count(), show_bar=show_bar and is_main)
  preempted = checkpoint.PreemptionFlag().install()
  counters = {name: 0 for name in host_counters}
  last_metrics: dict = {}
  evals: dict = {}
  step = start
  pending = None  # (step, metrics) of the previous step, checked one step late (no host sync)
  try:
    while step < stop_at:
      local = next(data_it)
      for name in counters:
        counters[name] += int(np.sum(local.get(name, 0)))
      state, metrics = step_fn(state, to_device(local))
      step += 1
      check_finite(pending, workdir)
      pending = (step, metrics)
      chrono.tick(step)
      evals = {}
      if step % log_every == 0 or step == stop_at:
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        last_metrics.update(chrono.metrics(), **{f"data/{k}": v for k, v in counters.items()})
        if extra_metrics is not None:
          last_metrics.update(extra_metrics(step))
        writer.write(step, last_metrics)
        if is_main:
          console(format_metrics(step, total, last_metrics))
      for ev in periodic:
        if step % ev.every_steps == 0 or step == total:
          check_finite(pending, workdir)  # never evaluate (or report) a non-finite state
          result = ev.run(state)
          evals.update(result)
          writer.write(step, result)
          if is_main:
            console(format_metrics(step, total, result))
      stop_now = preempted.reached(step)  # every host agrees on the step (multi-host)
      if step % checkpoint_every == 0 or step == stop_at or stop_now:
        check_finite(pending, workdir)  # never save after a non-finite step
        checkpoint.save(manager, step, state, force=True)
      if stop_now:
        if is_main:
          console(f"SIGTERM received: saved step {step}, exiting")
        break
  finally:
    manager.wait_until_finished()
    preempted.uninstall()
    chrono.close()
  return Outcome(step=step, state=state, metrics=last_metrics, evals=evals)
