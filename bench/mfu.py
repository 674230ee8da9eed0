"""Model FLOP utilisation of train steps, as a fraction of a matmul measured in the same run.

  .venv/bin/python bench/mfu.py                         # the five CPU cases below
  .venv/bin/python bench/mfu.py --cases=vits_96 --steps=5
  .venv/bin/python bench/mfu.py --dtype=bfloat16 --cases=vitb_224,r50_224   (accelerators)

Each case is `train.build`'s jitted step of its method (its own views, heads, optimizer and EMA;
BlockSource images) at the given batch and resolution. FLOPs per step are XLA's count for the
model's own convolutions (`cpu_profile.StepBench.reference_flops`: the im2col rewrite of
`ssl_jax.models.conv` also multiplies padding zeros, which would flatter the figure); the
reference rate is the best of a 2048³ matmul in `--dtype` timed before, between (in
alternation with the steps) and after the steps.
Goals on CPU (issue 16): ViT-S >= 0.7, ResNet-18 at 64 px >= 0.3, ResNet-50 at 224 px >= 0.4.
For a case below its goal, the step is then profiled (bench/cpu_profile.py: every thunk's time
attributed to its HLO instruction) and its share of time per op kind is printed under the table:
where the time goes that the matmul rate does not explain (`--no_profile` skips it).
Only the ratio is comparable between machines; bench/README.md has measured tables and the
profiles behind them.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cpu_profile  # noqa: E402  pylint: disable=wrong-import-position,import-error

VIT_S = {"name": "vit_small", "patch_size": 16}
CASES = {
    # name: (method, model, image size, batch, goal on CPU)
    "r18_64": ("byol", {"name": "resnet18"}, 64, 32, 0.3),
    "r18_224": ("byol", {"name": "resnet18"}, 224, 8, None),
    "r50_224": ("byol", {"name": "resnet50"}, 224, 8, 0.4),
    "vits_96": ("mocov3", VIT_S, 96, 32, 0.7),
    "vits_224": ("mocov3", VIT_S, 224, 8, 0.7),
    "vitb_224": ("mocov3", {"name": "vit_base", "patch_size": 16}, 224, 64, None),
}
CPU_CASES = "r18_64,r18_224,r50_224,vits_96,vits_224"


def measure(name: str, steps: int, dtype: str) -> dict:
  method, model, size, batch, goal = CASES[name]
  bench = cpu_profile.StepBench(method, model, size, batch, extra_config={"dtype": dtype})
  run, compiled = bench.runner()
  gflop = bench.reference_flops() / 1e9
  mm_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  # The matmul is timed before, between (alternated with the steps) and after them, and its best
  # is the reference: a load that comes and goes during the run slows both alike.
  mm = cpu_profile.matmul_gflops(mm_dtype)
  n = 2048
  timed = cpu_profile.interleaved_best(
      {"step": run, "matmul": cpu_profile.matmul_runner(mm_dtype, n)}, steps)
  best = timed["step"]
  mm = max(mm, 2 * n**3 / timed["matmul"] / 1e9, cpu_profile.matmul_gflops(mm_dtype))
  return {"name": name, "method": method, "model": model["name"], "size": size, "batch": batch,
          "gflop": gflop, "seconds": best, "gflops": gflop / best, "matmul": mm,
          "ratio": gflop / best / mm, "goal": goal, "run": run, "compiled": compiled,
          "bench": bench}


def profile_kinds(r: dict, steps: int, top: int = 6) -> str:
  """'conv wgrad 31% · dot 22% · ...': the step's time per op kind (summed over threads)."""
  per_op, _ = cpu_profile.profile_ops(r["run"], steps)
  kinds, _, _ = cpu_profile.breakdown(per_op, r["compiled"].as_text(), r["bench"].param_shapes)
  total = sum(kinds.values())
  ranked = sorted(kinds.items(), key=lambda kv: -kv[1])[:top]
  return " · ".join(f"{k} {v / total:.0%}" for k, v in ranked)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default=None, help=f"comma-separated, of {sorted(CASES)}")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (best is kept)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--no_profile", action="store_true",
                      help="do not profile the cases below their goal")
  args = parser.parse_args()
  platform = jax.default_backend()
  cases = args.cases or (CPU_CASES if platform == "cpu" else "vitb_224,r50_224")
  print(f"{cpu_profile.machine_load()}; devices {jax.devices()}; {args.dtype}")
  print(f"{'case':10s} {'step':28s} {'GFLOP':>8s} {'s/step':>8s} {'GFLOP/s':>8s} "
        f"{'matmul':>8s} {'ratio':>6s}  goal")
  unmet = []
  for name in cases.split(","):
    r = measure(name, args.steps, args.dtype)
    goal = "" if r["goal"] is None or platform != "cpu" else (
        f">= {r['goal']}: {'met' if r['ratio'] >= r['goal'] else 'NOT met'}")
    what = f"{r['method']} {r['model']} {r['size']}px b{r['batch']}"
    print(f"{name:10s} {what:28s} {r['gflop']:8.1f} {r['seconds']:8.3f} {r['gflops']:8.1f} "
          f"{r['matmul']:8.1f} {r['ratio']:6.2f}  {goal}", flush=True)
    if "NOT" in goal and not args.no_profile:
      unmet.append((name, profile_kinds(r, max(1, args.steps - 1))))
    del r  # frees the compiled step and its state before the next case
  print(cpu_profile.machine_load())
  if unmet:
    print("\nbelow goal; time per op kind of the profiled step (bench/README.md says why):")
    for name, kinds in unmet:
      print(f"  {name:10s} {kinds}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  main()
