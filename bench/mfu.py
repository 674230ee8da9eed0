"""Model FLOP utilisation of a ViT-S/16 MoCo v3 train step, as a ratio of a matmul measured in the same run.

  .venv/bin/python bench/mfu.py [--batch=8] [--image_size=224] [--steps=3]

FLOPs of the step come from XLA's cost analysis of the compiled step; the reference is a large
f32 matmul (2·n³ FLOPs) on the same devices. Goal on CPU: step GFLOP/s ≥ 0.6 × matmul GFLOP/s.
Only the ratio is comparable between machines.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def _time(fn, *args, repeats: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  return 2 * n**3 / _time(f, a, b, repeats=repeats) / 1e9


def step_gflops(model: str, batch: int, image_size: int, steps: int) -> tuple[float, float, float]:
  """Returns (GFLOP per step from XLA, seconds per step, GFLOP/s)."""
  from ssl_jax import train  # pylint: disable=import-outside-toplevel
  from tests.helpers import BlockSource, load_config  # pylint: disable=import-outside-toplevel

  config = load_config("mocov3", None)
  with config.unlocked():
    config.model.name = model
    config.data.image_size = image_size
    config.train.batch_size = batch
    config.train.total_steps = 100
    config.data.num_workers = 0
  setup = train.build(config, source=BlockSource(n=batch, size=image_size))
  local = next(train.make_data_iterator(setup))
  batch_arrays = setup.device_batch(local)
  ts = setup.init_state(batch_arrays)
  compiled = setup.train_step.lower(ts, batch_arrays, setup.constants).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"])
  ts, m = setup.step(ts, batch_arrays)
  jax.block_until_ready(m["loss"])
  best = float("inf")
  for _ in range(steps):
    t = time.perf_counter()
    ts, m = setup.step(ts, batch_arrays)
    jax.block_until_ready(m["loss"])
    best = min(best, time.perf_counter() - t)
  return flops / 1e9, best, flops / best / 1e9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="vit_small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  mm = matmul_gflops()
  gflop, sec, gflops = step_gflops(args.model, args.batch, args.image_size, args.steps)
  mm_after = matmul_gflops()
  print(f"matmul f32 2048^3: {mm:.1f} GFLOP/s (after the step: {mm_after:.1f})")
  print(f"{args.model}/16 MoCo v3 train step, batch {args.batch} at {args.image_size}px: "
        f"{gflop:.1f} GFLOP/step (XLA), {sec:.3f} s/step, {gflops:.1f} GFLOP/s")
  print(f"ratio step/matmul: {gflops / max(mm, mm_after):.2f} (goal >= 0.6)")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  main()
