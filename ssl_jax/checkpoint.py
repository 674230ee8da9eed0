"""Checkpoints: the train state, saved by orbax (locally or in a bucket).

`workdir/checkpoints/<step>/state`. Only the train state is saved: the pretraining data position
is the step itself (`ssl_jax.data.pipeline`: a global stream that any process count slices the
same way), frozen constants (a teacher) are never part of it, and where a method keeps its
backbone is the method's business (`Method.encoder`, read through `ssl_jax.weights`). A grain
iterator may still be saved beside the state (`data_iterator=`: loops over a plain grain
iterator). Orbax writes each step into a temporary directory and renames it when complete, so a
kill mid-save leaves the previous step intact; saves are async (the train loop continues while
the state is written).
"""
from __future__ import annotations

import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from ssl_jax import paths
from ssl_jax.errors import UserError

STATE, DATA = "state", "data"


def checkpoint_dir(workdir) -> epath.Path:
  """`workdir/checkpoints` (local: absolute; `gs://` kept as given)."""
  return paths.resolve(workdir) / "checkpoints"


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A workdir holds no (such) checkpoint."""


def make_manager(workdir: str, keep: int, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None,
         force: bool = False) -> bool:
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator=None,
            step: int | None = None) -> tuple[int, Any]:
  """Restores `step` (default latest) into `abstract_state`'s shapes/shardings.

  `data_iterator` (a fresh grain iterator) is advanced in place to the saved position.
  Returns (step, state).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return step, restored[STATE]


def latest_step(workdir: str) -> int | None:
  """The latest complete checkpoint step of a workdir, or None (nothing is created)."""
  if not checkpoint_dir(workdir).exists():
    return None
  manager = make_manager(workdir, keep=1_000_000, async_save=False, create=False)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def load_state(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """Loads a saved train state as host numpy arrays without knowing its structure (export, eval)."""
  step = latest_step(workdir) if step is None else step
  if step is None or not (checkpoint_dir(workdir) / str(step) / STATE).exists():
    raise CheckpointNotFoundError(
        f"no checkpoint{'' if step is None else f' at step {step}'} in {checkpoint_dir(workdir)}:"
        " train first or pass the right workdir/step")
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     DATA: grain.checkpoint.CheckpointHandler()})
  try:
    metadata = manager.item_metadata(step)[STATE]
    tree = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract)}))
  finally:
    manager.close()
  return step, jax.device_get(restored[STATE])


class PreemptionFlag:
  """Preemption (SIGTERM): the loop saves and exits at a step boundary, every host at the same step.

  One process: a SIGTERM handler sets a flag, `reached(step)` is True from then on. Several
  processes (`jax.distributed`): JAX's preemption service catches SIGTERM on whichever host gets
  it, tells the others, and agrees on a step all of them reach (`multihost_utils.
  reached_preemption_sync_point`); then no Python handler is installed (it would replace JAX's).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> "PreemptionFlag":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (called at every step, on every process)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self._event.is_set()
