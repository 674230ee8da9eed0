"""Helpers the bench scripts share: a method's config shrunk to a bench model, XLA's FLOP count,
alternated timing."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional


def bench_config(name: str, arg: Optional[str], model: Optional[dict], image_size: int,
                 batch: int):
  """configs/<name>.py[:arg] with `model` (None: the config's), `image_size` and global
  `batch`, data loaded in this process (no workers) and a 1000-step schedule (benches time
  steps, not runs)."""
  from ssl_jax import config_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel
  config = load_config(name, arg)
  with config.unlocked():
    if model is not None:
      config.model = config_lib.ConfigDict(model)
    config.data.image_size = image_size
    config.data.num_workers = 0
    config.train.batch_size = batch
    config.train.total_steps = 1000
  return config


def xla_flops(compiled: Any) -> float:
  """FLOPs of a compiled computation by XLA's `cost_analysis()` (a list on some versions)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def interleaved_best(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
  """Best seconds of each function, run in alternation so machine noise hits all alike."""
  best = {k: float("inf") for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t)
  return best
