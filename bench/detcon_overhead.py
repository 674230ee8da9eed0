"""DetCon-B (and DetCon-S) vs BYOL (SimCLR) train-step time and XLA FLOPs, measured in one run.

  .venv/bin/python bench/detcon_overhead.py                 # paper setting: ResNet-50, 224 px
  .venv/bin/python bench/detcon_overhead.py --small         # ResNet-18/16 at 64 px, reported apart

Same backbone, batch, resolution and devices for each pair, steps timed in alternation (best
of N each); masks are synthetic 4×4 blocks (the
pipeline is not timed here: bench/pipeline.py does that). Paper (App. A.2): +11.6 % FLOPs for
DetCon-B over BYOL, +5.3 % for DetCon-S over SimCLR. Goal: step-time ratio ≤ 1.12.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.common import bench_config, interleaved_best, xla_flops  # noqa: E402


def prepare(name: str, model: dict, batch: int, image_size: int):
  """Compiles `name`'s train step; returns (XLA GFLOP per step, a function running one step)."""
  from ssl_jax import train  # pylint: disable=import-outside-toplevel
  from tests.helpers import BlockSource  # pylint: disable=import-outside-toplevel

  config = bench_config(name, None, model, image_size, batch)
  setup = train.build(config, source=BlockSource(n=batch, size=image_size))
  arrays = setup.device_batch(next(train.make_data_iterator(setup)))
  holder = {"ts": setup.init_state(arrays)}
  flops = xla_flops(setup.train_step.lower(holder["ts"], arrays, setup.constants).compile())

  def step():
    holder["ts"], m = setup.step(holder["ts"], arrays)
    jax.block_until_ready(m["loss"])

  step()
  return flops / 1e9, step


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true", help="ResNet-18 width 16 at 64 px")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--pairs", default="b,s", help="b: DetCon-B vs BYOL, s: DetCon-S vs SimCLR")
  args = parser.parse_args()
  if args.small:
    model, size = {"name": "resnet18", "width": 16, "small_image_stem": True}, 64
  else:
    model, size = {"name": "resnet50"}, 224
  print(f"devices: {jax.devices()}; model {model}, {size} px, batch {args.batch}")
  pairs = {"b": ("detcon_b", "byol"), "s": ("detcon_s", "simclr")}
  for key in args.pairs.split(","):
    detcon, baseline = pairs[key]
    flops, fns = {}, {}
    for name in (baseline, detcon):
      flops[name], fns[name] = prepare(name, model, args.batch, size)
    best = interleaved_best(fns, args.steps)
    for name in (baseline, detcon):
      print(f"{name:8s}: {flops[name]:9.1f} GFLOP/step  {best[name]:.3f} s/step")
    print(f"{detcon}/{baseline}: FLOP ratio {flops[detcon] / flops[baseline]:.3f}, step-time "
          f"ratio {best[detcon] / best[baseline]:.3f} (goal <= 1.12)")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  main()
