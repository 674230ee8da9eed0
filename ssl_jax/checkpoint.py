"""Checkpoints: the train state and the grain iterator state, saved together by orbax.

`workdir/checkpoints/<step>/{state,data}`. Only the train state and the data position are saved:
frozen constants (a teacher) are never part of it, and where a method keeps its backbone is the
method's business (`Method.encoder`, read through `ssl_jax.weights`). Orbax writes each step into a temporary directory and
renames it when complete, so a kill mid-save leaves the previous step intact; saves are async
(the train loop continues while the state is written). Restoring gives the exact next batch
because the grain iterator state (positions in the shuffled, repeated record stream) is stored
beside the params.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from ssl_jax.errors import UserError

STATE, DATA = "state", "data"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


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
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  manager = make_manager(workdir, keep=1_000_000, async_save=False, create=False)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def load_state(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """Loads a saved train state as host numpy arrays without knowing its structure (export, eval)."""
  step = latest_step(workdir) if step is None else step
  if step is None or not os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), STATE)):
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
  """Set by SIGTERM (preemption notice) so the loop saves and exits at the next step boundary."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> "PreemptionFlag":
    if threading.current_thread() is threading.main_thread():
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
