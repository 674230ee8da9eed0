"""Masked MoCo-v3 with n = 1, 2, 4, 8 online chunks vs MoCo v3: step time and XLA FLOPs, one run.

  .venv/bin/python bench/masked_siamese.py            # ViT-S/16 at 224 px, batch 8
  .venv/bin/python bench/masked_siamese.py --small    # ViT-Tiny (dim 64, depth 4, patch 8), 64 px
  .venv/bin/python bench/masked_siamese.py --heads=bn # Masked MoCo with MoCo v3's BN heads

Paper (Sec. 3.2, Fig. 3a): each chunk attends within itself, so the attention's token-mixing cost
falls from O(N²) to O(N²/n) while the projections and the MLP keep their cost; the paper quotes
~20 % fewer FLOPs per step for M-MoCo (n = 8) than MoCo v3 at ViT-B/224. Goal here: the n = 8
step at 224 px within 1.1× the MoCo v3 step.

Printed per variant: XLA FLOPs of the whole compiled train step (`cost_analysis()`), of the
online backbone's forward alone (Fig. 3a "Att + FFN"), the analytic FLOPs of the attention
modules (Fig. 3a "Att": qkv + QKᵀ + AV + proj over n sequences of K + 1 tokens), each relative to
n = 1 / MoCo v3, and the median step time. Steps are timed in alternation (the machine is
shared: every variant sees the same noise), after one warm-up step each; the load average is
printed before and after. Same backbone (ViT-S with MoCo v3's 12 heads), batch, resolution,
synthetic images and devices for all variants; Masked MoCo uses its config's heads (LN unless
--heads=bn), MoCo v3 its BN heads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import bench_config, xla_flops  # noqa: E402


def prepare(name: str, arg: str, model: dict, batch: int, image_size: int, heads: str):
  """Compiles a train step; returns (step GFLOP, backbone-forward GFLOP, one-step function)."""
  from ssl_jax import config_lib, train  # pylint: disable=import-outside-toplevel
  from ssl_jax.ops import patches  # pylint: disable=import-outside-toplevel
  from tests.helpers import BlockSource  # pylint: disable=import-outside-toplevel

  config = bench_config(name, arg, model, image_size, batch)
  with config.unlocked():
    config.eval = config_lib.ConfigDict()
    if name.startswith("masked"):
      config.method_args.head_norm = heads
  setup = train.build(config, source=BlockSource(n=batch, size=image_size))
  arrays = setup.device_batch(next(train.make_data_iterator(setup)))
  holder = {"ts": setup.init_state(arrays)}
  lowered = setup.train_step.lower(holder["ts"], arrays, setup.constants)
  step_flops = xla_flops(lowered.compile()) / 1e9

  n = int(config.method_args.get("num_chunks", 1))
  backbone = setup.method.backbone
  variables = setup.method.encoder(holder["ts"]["params"], holder["ts"]["state"])
  images = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  num_patches = (image_size // model["patch_size"]) ** 2
  idx = None if n == 1 else patches.chunk_indices(jax.random.PRNGKey(0), batch, num_patches, n)[0]
  forward = jax.jit(lambda v, x, i: backbone.apply(v, x, train=True, keep_indices=i)["pooled"])
  backbone_flops = xla_flops(forward.lower(variables, images, idx).compile()) / 1e9

  def step():
    holder["ts"], m = setup.step(holder["ts"], arrays)
    jax.block_until_ready(m["loss"])

  step()
  return step_flops, backbone_flops, step


def attention_gflops(batch: int, num_patches: int, n: int, dim: int, depth: int) -> float:
  """Analytic forward FLOPs of the attention modules: per sequence of T = K + 1 tokens and
  block, qkv 2·T·D·3D + QKᵀ 2·T²·D + AV 2·T²·D + proj 2·T·D²; B·n sequences, `depth` blocks."""
  t = num_patches // n + 1
  per_sequence = 2 * t * dim * 3 * dim + 4 * t * t * dim + 2 * t * dim * dim
  return batch * n * depth * per_sequence / 1e9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true", help="ViT-Tiny (64 wide, 4 deep) at 64 px")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (median)")
  parser.add_argument("--chunks", default="1,2,4,8")
  parser.add_argument("--heads", default="ln", choices=["ln", "bn"])
  args = parser.parse_args()
  if args.small:
    model = {"name": "vit_tiny", "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4,
             "pos_embed": "sincos"}
    size, dim, depth = 64, 64, 4
  else:
    model = {"name": "vit_small", "patch_size": 16, "num_heads": 12, "pos_embed": "sincos"}
    size, dim, depth = 224, 384, 12
  num_patches = (size // model["patch_size"]) ** 2
  print(f"devices: {jax.devices()}; {model}, {size} px ({num_patches} patches), batch "
        f"{args.batch}; Masked MoCo heads: {args.heads}")
  print(f"load average before: {os.getloadavg()}", flush=True)
  variants = {"mocov3": ("mocov3", None)}
  for n in (int(v) for v in args.chunks.split(",")):
    variants[f"n={n}"] = ("masked_mocov3", f"n={n}")
  flops, backbone_flops, fns = {}, {}, {}
  for key, (name, arg) in variants.items():
    flops[key], backbone_flops[key], fns[key] = prepare(name, arg, model, args.batch, size,
                                                        args.heads)
    print(f"compiled {key}", flush=True)
  times = {k: [] for k in fns}
  for _ in range(args.steps):
    for key, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - t)
  print(f"load average after: {os.getloadavg()}")
  base_t = statistics.median(times["mocov3"])
  att1 = attention_gflops(args.batch, num_patches, 1, dim, depth)
  print(f"{'variant':8s} {'step GFLOP':>11s} {'/MoCo v3':>8s} {'backbone fwd':>12s} {'/n=1':>6s} "
        f"{'Att (analytic)':>14s} {'/n=1':>6s} {'step s (median)':>15s} {'/MoCo v3':>8s}")
  for key in fns:
    n = 1 if key == "mocov3" else int(key[2:])
    att = attention_gflops(args.batch, num_patches, n, dim, depth)
    med = statistics.median(times[key])
    print(f"{key:8s} {flops[key]:11.1f} {flops[key] / flops['mocov3']:8.3f} "
          f"{backbone_flops[key]:12.3f} {backbone_flops[key] / backbone_flops['mocov3']:6.3f} "
          f"{att:14.3f} {att / att1:6.3f} {med:15.3f} {med / base_t:8.3f}")
  last = [k for k in fns if k != "mocov3"][-1]
  ratio = statistics.median(times[last]) / base_t
  print(f"{last} / MoCo v3 step time: {ratio:.3f} (goal <= 1.1): "
        f"{'met' if ratio <= 1.1 else 'NOT met'}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  main()
