"""Where the time of a train step goes on XLA:CPU: a per-HLO-op profile of the compiled step.

  .venv/bin/python bench/cpu_profile.py                                  # BYOL, ResNet-18, 64 px
  .venv/bin/python bench/cpu_profile.py --method=mocov3 --model=vit_small --image_size=96
  .venv/bin/python bench/cpu_profile.py --compare='{"xla_cpu_use_onednn": true}'
  .venv/bin/python bench/cpu_profile.py --conv_policies=auto,lax --no_profile   (before/after #16)

The step is `train.build`'s jitted step of `--method` (its own views and heads; BlockSource
images), compiled once per variant: the default XLA options and each `--compare` JSON dict of
XLA debug options (passed as `compile(compiler_options=...)`), for each of `--conv_policies`
(`auto`: the library's choice of convolutions run as matmuls; `lax`: every convolution through
`lax.conv_general_dilated`, the model before issue 16; `matmul`: every one as a matmul). All
variants live in one process and are timed in alternation (A, B, A, B, ...; best of `--steps`).
The first variant is then run under `jax.profiler` and every thunk's time is attributed to its
HLO instruction, grouped by kind (convolution forward / input gradient / weight gradient, dot,
fusions, copies) and by the Flax module (or function) its `op_name` metadata names.

Prints seconds per step, the model's GFLOP per step (XLA's count with plain convolutions), the
ratio to a 2048³ f32 matmul timed in the same run, the time per group and the top ops. Op times
are summed over XLA's threads (2 on this machine), so they can add up to more than the wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import bench_config, interleaved_best, xla_flops  # noqa: E402,F401  (re-exported)

# -------------------------------------------------------------------------------------------
# Building and timing steps (bench/mfu.py uses these too).


def matmul_runner(dtype=jnp.float32, n: int = 2048) -> Callable[[], None]:
  """A function running one n×n×n matmul in `dtype` on the default device (compiled, warm)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)

  def run():
    jax.block_until_ready(f(a, b))

  run()
  return run


def matmul_gflops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """GFLOP/s of an n×n×n matmul in `dtype` on the default device (best of `repeats`)."""
  best = interleaved_best({"mm": matmul_runner(dtype, n)}, repeats)["mm"]
  return 2 * n**3 / best / 1e9


class StepBench:
  """One method's train step, lowered once, compiled per set of XLA options.

  `runner(options)` compiles with `compiler_options=options` and returns a function running one
  step on its own copy of the train state (the step donates it); `flops` is XLA's count.
  """

  def __init__(self, method: str, model: dict, image_size: int, batch: int,
               method_args: dict | None = None, views: str | None = None,
               use_matmul: Callable[..., bool] | None = None, extra_config: dict | None = None):
    from ssl_jax import train  # pylint: disable=import-outside-toplevel
    from tests.helpers import BlockSource  # pylint: disable=import-outside-toplevel

    config = bench_config(method, None, model, image_size, batch)
    with config.unlocked():
      for k, v in (method_args or {}).items():
        config.method_args[k] = v
      if views:
        config.data.views = views
      for k, v in (extra_config or {}).items():  # top-level fields, e.g. {"dtype": "bfloat16"}
        config[k] = v
    with self._extra_recipes(), self._conv_policy(use_matmul):
      self.setup = setup = train.build(config, source=BlockSource(n=batch, size=image_size))
      self.batch = setup.device_batch(next(train.make_data_iterator(setup)))
      self.state = setup.init_state(self.batch)
      self.lowered = setup.train_step.lower(self.state, self.batch, setup.constants)
    self.flops = None
    self.param_shapes = {tuple(x.shape) for x in jax.tree.leaves(self.state["params"])}

  @staticmethod
  def _conv_policy(use_matmul):
    """Lowers with `use_matmul` in place of `ssl_jax.models.conv.use_matmul` (to time which
    convolutions should run as matmuls); None keeps the library's."""
    import contextlib  # pylint: disable=import-outside-toplevel
    from unittest import mock  # pylint: disable=import-outside-toplevel
    from ssl_jax.models import conv  # pylint: disable=import-outside-toplevel
    if use_matmul is None:
      return contextlib.nullcontext()
    jax.clear_caches()
    return mock.patch.object(conv, "use_matmul", use_matmul)

  @staticmethod
  def _extra_recipes():
    """`views="crop_flip"`: two views with crop and flip only (no colour on device), a recipe
    the library has no name for (two-view methods always augment colour); added for the
    duration of the build and lowering only."""
    from unittest import mock  # pylint: disable=import-outside-toplevel
    from ssl_jax.data import views as views_lib  # pylint: disable=import-outside-toplevel
    return mock.patch.dict(views_lib._RECIPES,  # pylint: disable=protected-access
                           {"crop_flip": (views_lib.ViewSpec(),) * 2})

  def reference_flops(self) -> float:
    """XLA's FLOP count of the step with every convolution left to `lax.conv_general_dilated`.

    The model's FLOPs: `ssl_jax.models.conv` runs some convolutions as im2col matmuls, which
    also multiply the zero padding (a 3x3 conv on a 2x2 map: 9 taps per output instead of 4),
    so the compiled step's own count is higher than the work the model asks for.
    """
    from unittest import mock  # pylint: disable=import-outside-toplevel
    from ssl_jax.models import conv  # pylint: disable=import-outside-toplevel
    jax.clear_caches()  # the jitted step's trace cache would return the im2col trace
    with mock.patch.object(conv, "use_matmul", lambda *_: False), self._extra_recipes():
      lowered = self.setup.train_step.lower(self.state, self.batch, self.setup.constants)
    jax.clear_caches()
    return xla_flops(lowered)

  def compile(self, options: dict | None = None):
    compiled = self.lowered.compile(compiler_options=dict(options or {}))
    if self.flops is None:
      self.flops = xla_flops(compiled)
    return compiled

  def runner(self, options: dict | None = None) -> tuple[Callable[[], None], Any]:
    compiled = self.compile(options)
    holder = {"ts": jax.tree.map(jnp.copy, self.state)}
    consts = self.setup.constants

    def run():
      holder["ts"], metrics = compiled(holder["ts"], self.batch, consts)
      jax.block_until_ready(metrics["loss"])

    run()
    return run, compiled


def machine_load() -> str:
  try:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
  except OSError:
    return f"{os.cpu_count()} CPUs"


# -------------------------------------------------------------------------------------------
# The compiled module: which instruction is what.

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """Compiled HLO text -> ({instruction: info}, {computation: [opcodes]}).

  info: opcode, shape (dims of an array result), op_name metadata, called computations.
  """
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _INSTR.match(line)
    if m and current is not None:
      name, shape, opcode, rest = m.groups()
      dims = _SHAPE.match(shape)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest)
      instrs[name] = {"opcode": opcode, "computation": current,
                      "dims": tuple(int(d) for d in dims.group(1).split(",") if d) if dims else None,
                      "op_name": op_name.group(1) if op_name else "", "calls": calls,
                      "custom": re.search(r'custom_call_target="([^"]*)"', rest)}
      comps[current].append(opcode)
      continue
    c = _COMP.match(line)
    if c and "=" not in line.split("{")[0]:
      current = c.group(1)
  return instrs, comps


def _called_opcodes(name: str, instrs: dict, comps: dict) -> set[str]:
  out, todo, seen = set(), list(instrs[name]["calls"]), set()
  while todo:
    comp = todo.pop()
    if comp in seen:
      continue
    seen.add(comp)
    out.update(comps.get(comp, ()))
    todo.extend(c for i in instrs.values() if i["computation"] == comp for c in i["calls"])
  return out


def kind_of(name: str, instrs: dict, comps: dict, param_shapes: set) -> str:
  """convolution fwd/dgrad/wgrad, dot, reduce, elementwise fusion, copy/transpose, other."""
  info = instrs[name]
  op = info["opcode"]
  inner = _called_opcodes(name, instrs, comps) if info["calls"] else set()
  if op == "convolution" or "convolution" in inner:
    if "transpose(" not in info["op_name"]:
      return "conv fwd"
    # A weight gradient has the kernel's shape, possibly in another dimension order.
    dims = tuple(sorted(info["dims"] or ()))
    return "conv wgrad" if dims in {tuple(sorted(p)) for p in param_shapes} else "conv dgrad"
  if op == "dot" or "dot" in inner:
    return "dot"
  if op == "custom-call":
    return "custom-call " + (info["custom"].group(1) if info["custom"] else "")
  if op in ("copy", "transpose") or (inner and inner <= {"copy", "transpose", "parameter",
                                                           "bitcast", "reverse"}):
    return "copy/transpose"
  if op == "reduce" or "reduce" in inner or op == "reduce-window" or "reduce-window" in inner:
    return "reduce (incl. fused)"
  if op == "while":
    return "while loop"
  if op == "fusion" or inner:
    return "elementwise fusion"
  return op


_SKIP = re.compile(r"^(\w*\(.*\)|while|body|cond|closed_call|branch_\d+|[A-Z]\w*\.\w+)$")


def scope_of(op_name: str, depth: int = 1) -> str:
  """'jit(train_step)/jvp(SiameseNet)/SiameseNet.project/backbone/layer4_0/conv2/dot_general' ->
  'backbone' (depth 1), 'backbone/layer4_0' (depth 2): the Flax module path without transforms,
  method calls and the primitive; a function's ops keep its name ('color_views'); a bare
  primitive of the step itself is step-level."""
  parts = [p for p in op_name.split("/") if p and not _SKIP.match(p)]
  if not parts:
    return "(no metadata: made by XLA)" if not op_name else "(step-level ops)"
  if len(parts) == 1:
    return "(step-level: optimizer, EMA, loss)"
  return "/".join(parts[:-1][:depth])


# -------------------------------------------------------------------------------------------
# Profiling


def profile_ops(run: Callable[[], None], steps: int) -> tuple[dict[str, float], float]:
  """Runs `run` `steps` times under jax.profiler; returns ({thunk name: seconds per step},
  wall seconds per step)."""
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    t = time.perf_counter()
    for _ in range(steps):
      run()
    wall = (time.perf_counter() - t) / steps
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.xplane.pb"))[0]
    data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.defaultdict(float)
  plane = data.find_plane_with_name("/host:CPU")
  for line in plane.lines:
    for event in line.events:
      per_op[event.name] += event.duration_ns / 1e9 / steps
  return dict(per_op), wall


def breakdown(per_op: dict[str, float], hlo_text: str, param_shapes: set,
              scope_depth: int = 1) -> tuple[dict, dict, list]:
  """Seconds per op kind, per scope, and the op list [(seconds, name, kind, scope)]."""
  instrs, comps = parse_hlo(hlo_text)
  kinds, scopes, ops = collections.Counter(), collections.Counter(), []
  for name, sec in per_op.items():
    if name not in instrs or instrs[name]["opcode"] in ("parameter", "tuple",
                                                        "get-tuple-element"):
      continue
    kind = kind_of(name, instrs, comps, param_shapes)
    scope = scope_of(instrs[name]["op_name"], scope_depth)
    if "transpose(" in instrs[name]["op_name"]:
      scope += " (bwd)"
    kinds[kind] += sec
    scopes[scope] += sec
    ops.append((sec, name, kind, scope, instrs[name]["dims"]))
  return dict(kinds), dict(scopes), sorted(ops, reverse=True)


def print_table(title: str, rows: dict[str, float], total: float, limit: int = 20) -> None:
  print(f"\n{title} (s/step, share of summed op time)")
  for name, sec in sorted(rows.items(), key=lambda kv: -kv[1])[:limit]:
    print(f"  {name:48s} {sec:8.3f}  {sec / total:6.1%}")


CONV_POLICIES = {
    "auto": None,  # ssl_jax.models.conv.use_matmul
    "lax": lambda *_: False,  # every convolution through lax.conv_general_dilated (before #16)
    "matmul": lambda *_: True,  # every convolution as im2col + matmul
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="byol")
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--model_args", default="{}", help='JSON, e.g. {"width": 16}')
  parser.add_argument("--method_args", default="{}", help='JSON, e.g. {"projector_hidden": 512}')
  parser.add_argument("--views", default=None,
                      help="views recipe (default: the method's; crop_flip: no colour)")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
  parser.add_argument("--compare", action="append", default=[],
                      help="JSON dict of XLA options compiled as a second variant (repeatable)")
  parser.add_argument("--conv_policies", default="auto",
                      help=f"comma-separated, of {sorted(CONV_POLICIES)}: which convolutions "
                           "run as matmuls (auto: the library's choice); each is a variant")
  parser.add_argument("--no_profile", action="store_true")
  parser.add_argument("--scope_depth", type=int, default=2)
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()

  model = {"name": args.model, **json.loads(args.model_args)}
  print(f"{machine_load()}; jax {jax.__version__}, devices {jax.devices()}")
  print(f"{args.method}, {model}, {args.image_size} px, batch {args.batch}")
  options = {"default": {}}
  for c in args.compare:
    options[c] = json.loads(c)
  fns, compiled, benches = {}, {}, {}
  for policy in args.conv_policies.split(","):
    bench = benches[policy] = StepBench(args.method, model, args.image_size, args.batch,
                                        json.loads(args.method_args), views=args.views,
                                        use_matmul=CONV_POLICIES[policy])
    for opt_name, opts in options.items():
      name = opt_name if policy == "auto" else f"convs {policy}, {opt_name}"
      t = time.perf_counter()
      fns[name], compiled[name] = bench.runner(opts)
      print(f"compiled {name}: {time.perf_counter() - t:.1f} s")
  first = next(iter(fns))
  bench = next(iter(benches.values()))
  gflop = bench.reference_flops() / 1e9
  mm = matmul_gflops()
  best = interleaved_best(fns, args.steps)
  mm = max(mm, matmul_gflops())
  print(f"\nmatmul 2048³ f32: {mm:.1f} GFLOP/s; step: {gflop:.2f} GFLOP (XLA, plain convolutions)"
        f"; {machine_load()}")
  for name, sec in best.items():
    print(f"  {name:40s} {sec:7.3f} s/step  {gflop / sec:7.1f} GFLOP/s  "
          f"ratio to matmul {gflop / sec / mm:.3f}  (time vs {first}: {sec / best[first]:.2f})")
  if args.no_profile:
    return
  per_op, wall = profile_ops(fns[first], max(1, args.steps - 1))
  kinds, scopes, ops = breakdown(per_op, compiled[first].as_text(), bench.param_shapes,
                                 args.scope_depth)
  total = sum(kinds.values())
  print(f"\nprofiled {first}: {wall:.3f} s/step wall, {total:.3f} s/step summed over ops")
  print_table("by op kind", kinds, total)
  print_table(f"by scope (depth {args.scope_depth})", scopes, total, limit=25)
  print(f"\ntop {args.top} ops")
  for sec, name, kind, scope, dims in ops[:args.top]:
    print(f"  {sec:7.3f}  {sec / total:6.1%}  {kind:20s} {name:32s} {str(dims):22s} {scope}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  main()
