"""The one metrics writer (`workdir/metrics.jsonl`), the console lines, and the step timer.

Console output of a run is: one start line, the progress bar (the only moving line), one compact
line per log step (`format_metrics`) and a summary; library INFO logs stay off unless asked for
(`ssl_jax.cli`).
"""
from __future__ import annotations

import json
import sys
import time

import tqdm
from etils import epath

# Shown first on a log line, in this order; the rest follow sorted. Bookkeeping that is in
# metrics.jsonl but not worth a column is left off the console.
_FIRST = ("loss", "lr", "img/s")
_QUIET = ("img/s/core", "sec/step", "grad_norm")


class MetricsWriter:
  """Appends one JSON object per call: {"step": s, **metrics}. Only process 0 writes.

  Locally every line is flushed at once. A bucket object cannot be appended to, so in a bucket
  the file is rewritten whole, at most every `remote_flush_seconds` and on `close` (a crash may
  lose the last minute of lines there, never the file).
  """
  remote_flush_seconds = 60.0

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self._remote = "://" in str(workdir)
    self._lines: list[str] = []
    self._f = None
    self._last_flush = time.monotonic()
    if enabled and not self._remote:
      self._f = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    elif enabled and self.path.exists():  # a bucket object cannot be appended to: rewrite it
      self._lines = self.path.read_text().splitlines(keepends=True)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled or not metrics:
      return
    line = json.dumps({"step": int(step), **metrics}, sort_keys=True) + "\n"
    if self._f is not None:
      self._f.write(line)
      self._f.flush()
    else:
      self._lines.append(line)
      if time.monotonic() - self._last_flush >= self.remote_flush_seconds:
        self._flush_remote()

  def _flush_remote(self) -> None:
    self.path.write_text("".join(self._lines))
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    elif self.enabled and self._remote and self._lines:
      self._flush_remote()


def read_metrics(workdir: str) -> list[dict]:
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
  return str(value)


def format_metrics(step: int, total: int, metrics: dict) -> str:
  """One compact console line: `step 20/600  loss 3.412  lr 0.0123  img/s 812  probe_top1 0.4`."""
  keys = [k for k in _FIRST if k in metrics]
  keys += sorted(k for k in metrics if k not in _FIRST and k not in _QUIET
                 and not (k.startswith("data/") and not metrics[k]))
  return f"step {step}/{total}  " + "  ".join(f"{k} {_fmt(metrics[k])}" for k in keys)


def console(line: str) -> None:
  """Prints a line above any progress bar (stdout, flushed)."""
  tqdm.tqdm.write(line, file=sys.stdout)
  sys.stdout.flush()


class Chrono:
  """Measures throughput between log steps (img/s, img/s/core) and drives the progress bar.

  The first measured interval includes compilation; `metrics()` reports the interval since the
  previous call so later lines show steady-state speed.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int, num_cores: int,
               show_bar: bool = True):
    self.batch_size, self.num_cores = batch_size, num_cores
    self._last_time, self._last_step, self._step = time.perf_counter(), start_step, start_step
    self._bar = (tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                           leave=False, file=sys.stderr)
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


def summary_lines(workdir: str, result: dict, seconds: float) -> list[str]:
  """The end of a run: `done: ...` and, per evaluator with a top-1, init -> end with chance,
  e.g. `knn top-1: 0.30 at init -> 0.43 after 600 steps (chance 0.10)`."""
  lines = [f"done: step {result['step']} in {seconds / 60:.1f} min"
           + (f", loss {result['loss']:.4g}" if "loss" in result else "")]
  try:
    history = read_metrics(workdir)
  except FileNotFoundError:
    return lines
  names = sorted({k[:-len("/top1")] for m in history for k in m if k.endswith("/top1")})
  for name in names:
    points = [(m["step"], m[f"{name}/top1"]) for m in history if f"{name}/top1" in m]
    chance = next((m[f"{name}/chance"] for m in history if f"{name}/chance" in m), None)
    (s0, first), (s1, last) = points[0], points[-1]
    start = "at init" if s0 == 0 else f"at step {s0}"
    line = f"{name} top-1: {first:.2f} {start} -> {last:.2f} after {s1} steps"
    lines.append(line + (f" (chance {chance:.2f})" if chance is not None else ""))
  return lines
