"""The one metrics writer (`workdir/metrics.jsonl`) and the step timer behind img/s and ETA."""
from __future__ import annotations

import json
import os
import time

import tqdm
from absl import logging


class MetricsWriter:
  """Appends one JSON object per call: {"step": s, **metrics}. Only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._f = open(self.path, "a", encoding="utf-8") if enabled else None

  def write(self, step: int, metrics: dict) -> None:
    if self._f is None or not metrics:
      return
    self._f.write(json.dumps({"step": int(step), **metrics}, sort_keys=True) + "\n")
    self._f.flush()
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                  else f"{k}={v}" for k, v in metrics.items()))

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Chrono:
  """Measures throughput between log steps (img/s, img/s/core) and drives the progress bar.

  The first measured interval includes compilation; `metrics()` reports the interval since the
  previous call so later lines show steady-state speed.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int, num_cores: int,
               show_bar: bool = True):
    self.batch_size, self.num_cores = batch_size, num_cores
    self._last_time, self._last_step, self._step = time.perf_counter(), start_step, start_step
    self._bar = (tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
                 if show_bar else None)

  def tick(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._step)
    self._step = step

  def metrics(self) -> dict:
    now = time.perf_counter()
    steps = self._step - self._last_step
    dt = max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, self._step
    img_s = steps * self.batch_size / dt
    return {"img/s": img_s, "img/s/core": img_s / self.num_cores, "sec/step": dt / max(steps, 1)}

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
