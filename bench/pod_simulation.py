"""The 128-chip DetCon-B setting, checked before anyone pays for it: lower and compile (never run)
the DetCon-B ResNet-50 train step at global batch 4096 on 128 fake CPU devices, data-parallel and
FSDP, and read from the compiled program what each device would hold and send.

  .venv/bin/python bench/pod_simulation.py                        # 128 devices, batch 4096
  .venv/bin/python bench/pod_simulation.py --devices=8 --batch=256 --modes=dp

Per mode it prints
  * per-device memory from XLA's memory analysis of the compiled step: arguments (train state
    shard + batch shard), outputs, temporaries (activations, gradients, collective buffers),
    and what the donated state saves (alias);
  * collective bytes per step: every all-reduce / all-gather / reduce-scatter / all-to-all /
    collective-permute of the optimised HLO, operand sizes summed per kind (per device);
  * the DetCon logits: every dot whose result has the global ROI count n = B·R as a dimension,
    with its per-device shape: each device must hold only its [n/devices, n] row block (65,536²
    f32 is 17 GB if one device ever holds a whole block), so a dot with two global dimensions of
    n is flagged;
  * replicated arrays above 100 MB: state leaves whose sharding replicates them, and any value of
    the per-device program (HLO instruction result) above 100 MB.

Everything is read from the program XLA:CPU compiles; a TPU compile of the same jaxpr partitions
the same way (GSPMD), but fuses, schedules and combines collectives differently, so the byte
counts are the partitioner's, not a TPU profile. Compiles use XLA's backend optimisation level 0
(codegen only; partitioning, buffer assignment and memory analysis are unaffected) unless
--full_codegen. Compile time and host RAM are printed; on this 2-core machine a setting that does
not compile in budget is reported with the largest that did and the arithmetic to 128 × 4096.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MB = 2**20
FLAG_BYTES = 100 * 10**6  # "replicated array above 100 MB"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=128, help="fake CPU devices (mesh size)")
  p.add_argument("--batch", type=int, default=4096, help="global batch")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--model", default="resnet50")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--modes", default="dp,fsdp", help="comma list of dp, fsdp")
  p.add_argument("--full_codegen", action="store_true",
                 help="compile at XLA's default backend optimisation level (slower)")
  p.add_argument("--hlo_dir", default="", help="write each optimised HLO text here")
  return p.parse_args(argv)


class FakeImageNet:
  """ImageNet-sized records (1,281,167 of them, 224 px, FH ids) that are never read: the
  trainer only needs `len` to resolve epochs into steps, and `build` never iterates."""

  def __len__(self):
    return 1_281_167

  def __getitem__(self, i):
    raise RuntimeError("pod_simulation compiles the step and never reads data")


def _shape_bytes(shape: str) -> int:
  """'f32[512,65536]{1,0}' or a tuple '(f32[2], bf16[3,4])' -> bytes."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", shape):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")


def parse_hlo(text: str) -> list[dict]:
  """Instructions of an HLO module text: name, result type, opcode, operand names."""
  out = []
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, rtype, opcode, rest = m.groups()
    # Operands: the %names before the closing parenthesis of the call.
    depth, end = 1, 0
    for end, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    operands = re.findall(r"%([\w.\-]+)", rest[:end])
    out.append({"name": name, "type": rtype, "op": opcode, "operands": operands,
                "line": line.strip()})
  return out


def collective_bytes(instrs: list[dict]) -> dict[str, dict[str, int]]:
  """{kind: {"count", "operand_bytes", "result_bytes"}} per device, async pairs counted once."""
  types = {i["name"]: i["type"] for i in instrs}
  out: dict[str, dict[str, int]] = {}
  for ins in instrs:
    op = ins["op"]
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind not in COLLECTIVES or op.endswith("-done"):
      continue
    row = out.setdefault(kind, {"count": 0, "operand_bytes": 0, "result_bytes": 0})
    row["count"] += 1
    row["operand_bytes"] += sum(_shape_bytes(types.get(o, "")) for o in ins["operands"])
    row["result_bytes"] += _shape_bytes(ins["type"])
  return out


def _dims(shape: str) -> list[list[int]]:
  return [[int(d) for d in filter(None, dims.split(","))]
          for _, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", shape)]


def logits_dots(instrs: list[dict], n_global: int) -> list[tuple[str, str]]:
  """(result type, metadata op_name) of each dot whose result has the global ROI count as a
  dimension: the DetCon logits blocks and their gradients."""
  found = []
  for ins in instrs:
    if ins["op"] != "dot":
      continue
    dims = _dims(ins["type"])
    if dims and n_global in dims[0]:
      name = re.search(r'op_name="([^"]*)"', ins["line"])
      found.append((ins["type"].split("{")[0], name.group(1) if name else ""))
  return found


def large_values(instrs: list[dict], limit: int, local_sizes: set[int]
                 ) -> tuple[dict[str, list], list[tuple[int, str, str, str]]]:
  """Per-device HLO values above `limit` bytes, split by whether they are batch-sharded.

  A value counts as batch-sharded when one of its dimensions is a per-device batch size in
  `local_sizes` (images or ROIs per device, times 1 or 2 views), or the element count of a
  batch-sharded activation [b, h, w, c] of the program (the activation flattened, e.g. the
  max-pool gradient's [32·56·56·64, 4] indices); the others (whole arrays on every device:
  replicated or not partitioned) are returned for flagging. A heuristic on per-device shapes:
  the partitioned HLO no longer says which values are replicated.
  Returns ({type: [count, bytes]} of the sharded ones, [(bytes, opcode, type, op_name)] of the
  others, largest first).
  """
  sharded: dict[str, list] = {}
  whole = {}
  flat = set(local_sizes)
  for ins in instrs:  # flattened sizes of the batch-sharded activations [b, h, w, c]
    for dims in _dims(ins["type"]):
      if len(dims) >= 4 and dims[0] in local_sizes:
        flat.add(math.prod(dims))
  for ins in instrs:
    if ins["op"] in ("parameter", "get-tuple-element", "tuple", "bitcast"):
      continue
    b = _shape_bytes(ins["type"])
    if b <= limit or ins["type"].startswith("("):
      continue
    t = ins["type"].split("{")[0]
    if set(_dims(t)[0]) & flat:
      sharded.setdefault(t, [0, b])[0] += 1
    else:
      name = re.search(r'op_name="([^"]*)"', ins["line"])
      whole.setdefault((ins["op"], t), (b, name.group(1) if name else ""))
  return sharded, sorted(((b, op, t, n) for (op, t), (b, n) in whole.items()), reverse=True)


def simulate(args, mode: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ssl_jax import parallel, train  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel

  config = load_config("detcon_b", None)
  with config.unlocked():
    config.model.name = args.model
    config.train.batch_size = args.batch
    config.data.image_size = args.image_size
    config.dtype = args.dtype
    config.sharding.fsdp = mode == "fsdp"
  mesh = parallel.make_mesh(jax.devices()[:args.devices])
  t0 = time.perf_counter()
  setup = train.build(config, mesh=mesh, source=FakeImageNet())
  abstract = jax.eval_shape(setup.init_state, setup.batch_spec)
  ts = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                    setup.state_sharding)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh))
           for k, v in setup.batch_spec.items()}
  lowered = setup.train_step.lower(ts, batch, setup.constants)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  text = compiled.as_text()
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
    with open(os.path.join(args.hlo_dir, f"{mode}_{args.devices}x{args.batch}.hlo"), "w",
              encoding="utf-8") as f:
      f.write(text)
  instrs = parse_hlo(text)
  mem = compiled.memory_analysis()
  n_global = args.batch * int(config.method_args.num_samples)
  local = {args.batch // args.devices, n_global // args.devices}
  local |= {2 * x for x in local}

  state_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract))
  replicated = []
  for path, a in jax.tree_util.tree_leaves_with_path(ts):
    nbytes = int(np.prod(a.shape)) * a.dtype.itemsize
    if a.sharding.is_fully_replicated and nbytes > FLAG_BYTES:
      replicated.append((nbytes, jax.tree_util.keystr(path)))
  per_device_state = sum(
      int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(ts))
  return {
      "mode": mode, "lower_s": t1 - t0, "compile_s": t2 - t1,
      "arg": mem.argument_size_in_bytes, "out": mem.output_size_in_bytes,
      "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes,
      "code": mem.generated_code_size_in_bytes,
      "state_total": state_bytes, "state_per_device": per_device_state,
      "collectives": collective_bytes(instrs),
      "logits": logits_dots(instrs, n_global), "n_global": n_global,
      "replicated_state": replicated,
      "params_bytes": sum(int(np.prod(a.shape)) * a.dtype.itemsize
                          for a in jax.tree.leaves(abstract["params"])),
      "large_values": large_values(instrs, FLAG_BYTES, local),
      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def _fmt_mb(b: float) -> str:
  return f"{b / MB:,.1f}"


def report(args, r: dict) -> None:
  per_dev_batch = args.batch // args.devices
  print(f"\n== {r['mode'].upper()}: DetCon-B {args.model} {args.image_size}px {args.dtype}, "
        f"global batch {args.batch} on {args.devices} devices ({per_dev_batch} images/device)")
  print(f"lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} s, "
        f"host peak RSS {r['max_rss_mb']:,.0f} MB")
  print(f"train state: {_fmt_mb(r['state_total'])} MiB in all, "
        f"{_fmt_mb(r['state_per_device'])} MiB per device")
  total = r["arg"] + r["out"] - r["alias"] + r["temp"]
  print("per-device memory (MiB) | arguments | outputs | aliased (donated) | temporaries | "
        "peak ≈ args+out−alias+temp")
  print(f"                        | {_fmt_mb(r['arg']):>9} | {_fmt_mb(r['out']):>7} | "
        f"{_fmt_mb(r['alias']):>17} | {_fmt_mb(r['temp']):>11} | {_fmt_mb(total)}")
  print("collectives per step (per device) | count | operand MiB | result MiB")
  tot_op = 0
  for kind in COLLECTIVES:
    c = r["collectives"].get(kind)
    if c:
      tot_op += c["operand_bytes"]
      print(f"  {kind:<31} | {c['count']:>5} | {_fmt_mb(c['operand_bytes']):>11} | "
            f"{_fmt_mb(c['result_bytes']):>10}")
  print(f"  {'total':<31} |       | {_fmt_mb(tot_op):>11} |")
  print(f"  (the gradients are {_fmt_mb(r['params_bytes'])} MiB: one all-reduce of them is the "
        "data-parallel minimum; XLA:CPU all-reduces each view's partial gradients separately,\n"
        "   TPU/GPU pipelines reassociate them into one and turn FSDP's all-reduce + slice into "
        "a reduce-scatter)")
  n = r["n_global"]
  shapes = sorted({t for t, _ in r["logits"]})
  whole = [t for t in shapes if sum(d == n for d in _dims(t)[0]) >= 2]
  print(f"DetCon logits (n = B·R = {n:,} ROIs): dots with an n-sized dimension, per-device "
        f"shapes: {', '.join(shapes) or 'none found'}")
  if whole:
    print(f"  FLAG: a device holds a whole {n}x{n} logits block: {whole}")
  elif shapes:
    print(f"  row-sharded: no device holds more than {n // args.devices:,} rows of a block "
          f"(a whole f32 block would be {n * n * 4 / 1e9:.1f} GB)")
  for nbytes, path in r["replicated_state"]:
    print(f"  FLAG: replicated state array {path}: {_fmt_mb(nbytes)} MiB")
  if not r["replicated_state"]:
    print("replicated state arrays above 100 MB: none")
  sharded, whole = r["large_values"]
  if sharded:
    top = sorted(sharded.items(), key=lambda kv: -kv[1][1])
    print(f"batch-sharded per-device values above 100 MB (not flagged): "
          f"{sum(c for c, _ in sharded.values())} instructions of {len(sharded)} shapes, "
          "largest " + ", ".join(f"{t} ({_fmt_mb(b)} MiB)" for t, (_, b) in top[:3]))
  for nbytes, op, t, name in whole[:8]:
    print(f"  FLAG: unsharded per-device value above 100 MB: {op} {t} ({_fmt_mb(nbytes)} MiB) "
          f"from {name}")
  if not whole:
    print("unsharded (replicated) per-device values above 100 MB: none")


def main(argv=None) -> None:
  args = _parse_args(argv)
  flags = os.environ.get("XLA_FLAGS", "")
  if not args.full_codegen:
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  os.environ["XLA_FLAGS"] = flags.strip()
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
  if args.batch % args.devices:
    raise SystemExit(f"--batch={args.batch} must be divisible by --devices={args.devices}")
  print(f"pod simulation: {args.devices} fake CPU devices, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
  for mode in args.modes.split(","):
    if mode not in ("dp", "fsdp"):
      raise SystemExit(f"--modes: {mode!r} is not dp or fsdp")
    report(args, simulate(args, mode))


if __name__ == "__main__":
  main()
