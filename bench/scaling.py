"""Sharding overhead and memory: per-image step time on 1 vs 8 fake CPU devices (data parallel
and FSDP, float32 and bfloat16), and per-device parameter + optimizer memory of ViT-B and
ResNet-50 with and without FSDP.

  .venv/bin/python bench/scaling.py                       # DetCon-B :demo model, batch 256
  .venv/bin/python bench/scaling.py --config=byol --batch=64 --steps=3
  .venv/bin/python bench/scaling.py --skip_timing         # memory table only (seconds)

Timing: the same global batch is stepped on a 1-device mesh and on an 8-device mesh (all
devices of one process, sharing this machine's cores), so the per-image time of 8 devices over
1 device measures what sharding costs (collectives, partitioned ops, per-device dispatch), not a
speed-up: fake devices share the same CPU cores. Setups are timed interleaved (round-robin,
`--steps` steps per setup per round) and the medians over rounds are reported, with the load
average before and after (the machine is shared). Goal: 8 devices ≤ 1.1 × one device per image.
Default: DetCon-B at global batch 256, i.e. 32 images per device, the per-device batch of the
paper's 128-chip setting (4096 / 128).

What 8 fake devices cost on a 2-core machine is a fixed time per step, not per image: each
device runs the whole program on its share of the batch, and the 8 device threads meet at every
collective (BYOL's step has 116 all-reduces: the global batch-norm statistics, forward and
backward, and the gradients), 4 threads per core. Measured 2026-12-02 (BYOL :demo, ResNet-18
width 16 at 64 px): ~110 ms per step at any batch, so 1.47x one device at 8 images per device
(global 64) and 1.06-1.11x at 32; with 2 or 4 devices (<= 2 threads per core) 0.94-0.97x at 32
images per device. One device's step at batch 8 is as fast per image as at batch 64, so the
extra is the device threads' contention, not small-batch inefficiency.
On CPU bf16 is not faster (XLA:CPU computes bf16 dots via float32); it is timed to show the
bf16 step runs and what it costs here.

Memory: params + optimizer state per device from the shardings of the abstract train state at
the papers' settings (ResNet-50 under DetCon-B with LARS, ViT-B/16 under MoCo v3 with AdamW),
replicated (data parallel) vs FSDP over `--devices`; FSDP should cut it by about the device
count (small arrays, < 16k elements, stay replicated: biases, norms). The compiled timing steps'
`memory_analysis()` argument sizes give the same comparison for the timed model.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 2**20


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--config", default="detcon_b", help="configs/<name>.py, at --variant")
  p.add_argument("--variant", default="demo")
  p.add_argument("--batch", type=int, default=256, help="global batch (same for every mesh)")
  p.add_argument("--steps", type=int, default=2, help="steps per setup per round")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--skip_timing", action="store_true")
  p.add_argument("--skip_memory", action="store_true")
  return p.parse_args(argv)


class FakeImageNet:
  """`len` of ImageNet's training set: `train.build` resolves epochs with it, never reads."""

  def __len__(self):
    return 1_281_167

  def __getitem__(self, i):
    raise RuntimeError("not read")


def _random_batch(spec, seed=0):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in spec.items():
    if np.dtype(s.dtype) == np.uint8:
      out[k] = rng.integers(0, 256, s.shape, dtype=np.uint8)
    elif np.issubdtype(np.dtype(s.dtype), np.integer):
      out[k] = rng.integers(0, 8, s.shape).astype(s.dtype)  # segment ids / labels
    else:
      out[k] = rng.random(s.shape).astype(s.dtype)
  return out


def _load_config(name, variant):
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel
  return load_config(name, variant or None)


def timing(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ssl_jax import parallel, train  # pylint: disable=import-outside-toplevel

  setups = {}
  for dtype in args.dtypes.split(","):
    for label, n, fsdp in (("1 device", 1, False), (f"{args.devices} dev DP", args.devices, False),
                           (f"{args.devices} dev FSDP", args.devices, True)):
      config = _load_config(args.config, args.variant)
      with config.unlocked():
        config.train.batch_size = args.batch
        config.train.total_steps = 1000
        config.dtype = dtype
        config.sharding.fsdp = fsdp
      setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:n]),
                          source=FakeImageNet())
      local = _random_batch({k: v for k, v in setup.batch_spec.items()})
      batch = setup.device_batch(local)
      ts = setup.init_state(batch)
      t = time.perf_counter()
      compiled = setup.train_step.lower(ts, batch, setup.constants).compile()
      mem = compiled.memory_analysis()
      step = lambda ts, b, c=compiled, k=setup.constants: c(ts, b, k)  # noqa: E731
      ts, m = step(ts, batch)  # warm-up
      jax.block_until_ready(m["loss"])
      setups[(dtype, label)] = {"step": step, "config": setup.config, "ts": ts, "batch": batch,
                                "times": [],
                                "arg_mb": mem.argument_size_in_bytes / MB,
                                "temp_mb": mem.temp_size_in_bytes / MB,
                                "compile_s": time.perf_counter() - t}
      print(f"compiled {dtype:<8} {label:<12} in {time.perf_counter() - t:5.1f} s "
            f"(load {os.getloadavg()[0]:.1f})", flush=True)

  load_before = os.getloadavg()[0]
  for _ in range(args.rounds):
    for s in setups.values():
      t = time.perf_counter()
      for _ in range(args.steps):
        s["ts"], m = s["step"](s["ts"], s["batch"])
      jax.block_until_ready((s["ts"], m))
      s["times"].append((time.perf_counter() - t) / args.steps)
  load_after = os.getloadavg()[0]

  config = next(iter(setups.values()))["config"]
  print(f"\nper-image step time: {args.config}:{args.variant} ({config.model.name}, "
        f"{config.data.image_size} px), global batch {args.batch}, {args.rounds} rounds x "
        f"{args.steps} steps, interleaved; load average {load_before:.1f} -> {load_after:.1f} on "
        f"{os.cpu_count()} cores")
  print("dtype    | mesh         | ms/image (median) | min-max over rounds | vs 1 device "
        "(median, min) | extra ms/step | args MiB/device | temp MiB/device")
  for dtype in args.dtypes.split(","):
    one = setups[(dtype, "1 device")]["times"]
    for (dt, label), s in setups.items():
      if dt != dtype:
        continue
      per_image = [t / args.batch for t in s["times"]]
      med = statistics.median(per_image)
      ratios = f"{med * args.batch / statistics.median(one):.2f}x, {min(s['times']) / min(one):.2f}x"
      extra = (statistics.median(s["times"]) - statistics.median(one)) * 1e3
      print(f"{dtype:<8} | {label:<12} | {med * 1e3:17.2f} | "
            f"{min(per_image) * 1e3:8.2f}-{max(per_image) * 1e3:<10.2f} | {ratios:>24} | "
            f"{extra:13.0f} | {s['arg_mb']:15.1f} | {s['temp_mb']:15.1f}")
  worst = max(statistics.median(s["times"]) / statistics.median(setups[(dt, "1 device")]["times"])
              for (dt, label), s in setups.items() if label != "1 device")
  worst_min = max(min(s["times"]) / min(setups[(dt, "1 device")]["times"])
                  for (dt, label), s in setups.items() if label != "1 device")
  verdict = "met" if worst <= 1.1 else "NOT met"
  print(f"goal 8 devices <= 1.1x one device per image: {verdict} on medians (worst "
        f"{worst:.2f}x; {worst_min:.2f}x on the fastest rounds, less disturbed by other load)")
  del np


def memory(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ssl_jax import parallel, train  # pylint: disable=import-outside-toplevel

  print(f"\nper-device params + optimizer state at the papers' settings, {args.devices} devices "
        "(from the shardings of the abstract train state)")
  print("model     | method (optimizer) | params, M (backbone) | DP MiB/device | "
        "FSDP MiB/device | cut")
  mesh = parallel.make_mesh(jax.devices()[:args.devices])
  for model, cfg, arg in (("ResNet-50", "detcon_b", None), ("ViT-B/16", "mocov3", None)):
    row = {}
    for fsdp in (False, True):
      config = _load_config(cfg, arg)
      with config.unlocked():
        config.sharding.fsdp = fsdp
      setup = train.build(config, mesh=mesh, source=FakeImageNet())
      abstract = jax.eval_shape(setup.init_state, setup.batch_spec)
      total = 0
      for part in ("params", "opt_state"):
        for a, s in zip(jax.tree.leaves(abstract[part]), jax.tree.leaves(setup.state_sharding[part])):
          total += int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
      row[fsdp] = total
      if not fsdp:
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
        backbone = sum(int(np.prod(a.shape))
                       for a in jax.tree.leaves(abstract["params"]["backbone"]))
    method = f"{cfg} ({config.optim.name})"
    params = f"{n_params / 1e6:.1f} ({backbone / 1e6:.1f})"
    print(f"{model:<9} | {method:<18} | {params:<20} | {row[False] / MB:13.1f} | "
          f"{row[True] / MB:15.1f} | {row[False] / row[True]:.2f}x")


def main(argv=None) -> None:
  args = _parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", args.devices)
  print(f"scaling: {args.devices} fake CPU devices on {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}", flush=True)
  if not args.skip_memory:
    memory(args)
  if not args.skip_timing:
    timing(args)


if __name__ == "__main__":
  main()
