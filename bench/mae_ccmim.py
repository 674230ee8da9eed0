"""ccMIM vs MAE: train-step time and XLA FLOPs, measured in one run.

  .venv/bin/python bench/mae_ccmim.py                  # paper setting: ViT-B/16, 224 px, 8 × 512 decoder
  .venv/bin/python bench/mae_ccmim.py --small          # ViT 64-wide, 4 blocks, 64 px (CPU-friendly)
  .venv/bin/python bench/mae_ccmim.py --flops_only     # compile and count, no timing

Both methods use their own default configs (75 % masking, norm-pix MSE, the same decoder) with
the same backbone, batch, resolution and devices. Where ccMIM's step costs more:
  * the importance forward: a no-gradient encoder pass over *all* N + 1 tokens (MAE's encoder
    sees N/4 + 1 tokens, forward and backward);
  * the masked set: a second no-gradient encoder pass over 3N/4 + 1 tokens (its CLS is the
    stop-gradient teacher of the contrast);
  * the contrast itself (a B × B logit matrix) is negligible.
Reported: compiled `cost_analysis()` FLOPs of each whole train step (optimizer and online probe
included) and of the importance forward alone, and the median step time of steps timed in
alternation (MAE, ccMIM, MAE, ...) so machine noise hits both alike. The machine load is printed
before and after: on a shared CPU the times are only indicative, the FLOP ratio is exact.
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
import numpy as np  # noqa: E402

from bench.common import bench_config, xla_flops  # noqa: E402


def _config(name: str, model: dict, image_size: int, batch: int, decoder: tuple[int, int, int]):
  config = bench_config(name, None, model, image_size, batch)
  with config.unlocked():
    config.method_args.update({"decoder_dim": decoder[0], "decoder_depth": decoder[1],
                               "decoder_heads": decoder[2]})
  return config


def prepare(name: str, model: dict, image_size: int, batch: int, decoder, flops_only: bool):
  """Compiles `name`'s train step: (GFLOP per step, one-step function or None, setup)."""
  from ssl_jax import parallel, train  # pylint: disable=import-outside-toplevel
  from tests.helpers import BlockSource  # pylint: disable=import-outside-toplevel

  config = _config(name, model, image_size, batch, decoder)
  mesh = parallel.make_mesh(jax.devices()[:1])
  setup = train.build(config, mesh=mesh, source=BlockSource(n=batch, size=image_size))
  rng = np.random.default_rng(0)
  arrays = setup.device_batch({
      k: (rng.integers(0, 256, v.shape).astype(v.dtype) if k == "image"
          else np.zeros(v.shape, v.dtype)) for k, v in setup.batch_spec.items()})
  holder = {"ts": setup.init_state(arrays)}
  flops = xla_flops(setup.train_step.lower(holder["ts"], arrays, setup.constants).compile())
  if flops_only:
    return flops / 1e9, None, setup

  def step():
    holder["ts"], metrics = setup.step(holder["ts"], arrays)
    jax.block_until_ready(metrics["loss"])

  step()
  step()
  return flops / 1e9, step, setup


def encoder_pass_flops(setup, image_size: int, batch: int) -> dict[str, float]:
  """GFLOP of the no-grad passes ccMIM adds: the full-sequence importance forward (with its
  attention read) and a plain full-sequence forward for comparison."""
  backbone = setup.method.backbone
  x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), x, train=False))

  def full(p, x, attention):
    return backbone.apply(p, x, train=False, return_attention=attention)["pooled"]

  out = {}
  for key, attention in (("importance_forward", "cls_key"), ("full_forward", False)):
    compiled = jax.jit(full, static_argnums=2).lower(params, x, attention).compile()
    out[key] = xla_flops(compiled) / 1e9
  return out


def interleaved_medians(steps: dict, repeats: int) -> dict[str, float]:
  times = {k: [] for k in steps}
  for _ in range(repeats):
    for name, fn in steps.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def load() -> str:
  one, five, _ = os.getloadavg()
  return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="ViT 64-wide, 4 blocks, patch 8 at 64 px, decoder 64 × 2")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=7, help="timed steps per method")
  parser.add_argument("--flops_only", action="store_true")
  args = parser.parse_args(argv)
  if args.small:
    model = {"name": "vit_tiny", "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4,
             "pos_embed": "sincos"}
    size, decoder = 64, (64, 2, 4)
  else:
    model = {"name": "vit_base", "patch_size": 16, "pos_embed": "sincos"}
    size, decoder = 224, (512, 8, 16)
  print(f"devices: {jax.devices()}; {model}, {size} px, batch {args.batch}, decoder "
        f"{decoder[1]} × {decoder[0]}; {load()}", flush=True)
  flops, fns, setups = {}, {}, {}
  for name in ("mae", "ccmim"):
    flops[name], fns[name], setups[name] = prepare(name, model, size, args.batch, decoder,
                                                   args.flops_only)
  passes = encoder_pass_flops(setups["ccmim"], size, args.batch)
  result = {"flops": flops, "passes": passes, "flop_ratio": flops["ccmim"] / flops["mae"]}
  print(f"MAE   step: {flops['mae']:10.1f} GFLOP")
  print(f"ccMIM step: {flops['ccmim']:10.1f} GFLOP  (× {result['flop_ratio']:.3f} MAE)")
  print(f"  importance forward (all tokens, no grad): {passes['importance_forward']:.1f} GFLOP = "
        f"{passes['importance_forward'] / flops['ccmim']:.1%} of the ccMIM step, "
        f"{passes['importance_forward'] / flops['mae']:.1%} of the MAE step "
        f"(a plain full forward: {passes['full_forward']:.1f} GFLOP)")
  if not args.flops_only:
    medians = interleaved_medians({k: fns[k] for k in ("mae", "ccmim")}, args.steps)
    result.update(seconds=medians, time_ratio=medians["ccmim"] / medians["mae"])
    print(f"median step time: MAE {medians['mae'] * 1e3:.1f} ms, ccMIM "
          f"{medians['ccmim'] * 1e3:.1f} ms (× {result['time_ratio']:.3f}) over {args.steps} "
          f"interleaved steps each; {load()}")
  return result


if __name__ == "__main__":
  main()
