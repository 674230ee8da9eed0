"""Input pipeline throughput vs DetCon-B train-step throughput, measured in one run.

  .venv/bin/python bench/pipeline.py [--workers=2] [--image_size=224] [--batch=8]

1. FH masks of the built-in photos (crops of 320 px, so crop+resize work is real) are computed
   into a cache once (not timed here: bench/fh_precompute.py times that, 1 vs 2 processes).
2. Pipeline: grain with `--workers` processes producing DetCon-B views (image bicubic + masks
   nearest, joint crop/flip, id compaction) at `--image_size`, batch `--batch`: img/s.
3. Train step: DetCon-B ResNet-50 at the same size and batch on this machine's devices: img/s.
Prints the ratio pipeline/step (goal >= 3: the host never starves the accelerator). On a CPU-only
machine both share the same cores, so the ratio understates a TPU/GPU host's margin.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.common import bench_config  # noqa: E402


def pipeline_images_per_second(source, image_size: int, batch: int, workers: int,
                               num_batches: int) -> float:
  from ssl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  transform = pipeline.MakeViews("detcon_b", image_size, "fh", 64)
  it = iter(pipeline.train_dataset(source, seed=0, batch_size=batch, transform=transform,
                                   num_workers=workers, prefetch=4))
  for _ in range(2):  # worker start-up and first decodes
    next(it)
  t = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * batch / (time.perf_counter() - t)


def step_images_per_second(source, image_size: int, batch: int, steps: int) -> float:
  from ssl_jax import train  # pylint: disable=import-outside-toplevel
  config = bench_config("detcon_b", None, None, image_size, batch)
  setup = train.build(config, source=source)
  arrays = setup.device_batch(next(train.make_data_iterator(setup)))
  ts = setup.init_state(arrays)
  ts, m = setup.step(ts, arrays)
  jax.block_until_ready(m["loss"])
  t = time.perf_counter()
  for _ in range(steps):
    ts, m = setup.step(ts, arrays)
  jax.block_until_ready(m["loss"])
  return steps * batch / (time.perf_counter() - t)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--num_batches", type=int, default=20)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  from ssl_jax.data import fh_masks  # pylint: disable=import-outside-toplevel
  source = fh_masks.FHMaskDataset(scale=1000, min_size=1000, precompute_from="builtin_photos",
                                  precompute_args={"split": "train", "num_per_photo": 8,
                                                   "crop_size": 320})
  print(f"devices: {jax.devices()}; {len(source)} records with FH masks; {args.image_size} px, "
        f"batch {args.batch}, {args.workers} workers")
  pipe = pipeline_images_per_second(source, args.image_size, args.batch, args.workers,
                                    args.num_batches)
  print(f"pipeline (DetCon-B views + FH masks): {pipe:.1f} img/s")
  step = step_images_per_second(source, args.image_size, args.batch, args.steps)
  print(f"DetCon-B ResNet-50 train step: {step:.2f} img/s")
  print(f"ratio pipeline/step: {pipe / step:.1f} (goal >= 3)")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  main()
