"""XLA:CPU convolution speed per layer shape: forward, input gradient, weight gradient.

  .venv/bin/python bench/cpu_convs.py                      # ResNet-18 at 64 px, batch 32
  .venv/bin/python bench/cpu_convs.py --net=r50_224        # ResNet-50 at 224 px, batch 8
  .venv/bin/python bench/cpu_convs.py --impls=lax,matmul,matmul4d --with_bn

For each distinct convolution of the network (NHWC × HWIO, torchvision padding), times
`lax.conv_general_dilated` ("lax"), `ssl_jax.models.conv.conv_as_matmul` ("matmul": im2col +
one 2-D matmul) and, for the record, the same product written as a 4-D `dot_general`
("matmul4d", our first version), in alternation (best of `--repeats`), next to a 2048³ f32
matmul. `--with_bn` times conv → batch norm (batch statistics) → ReLU forward + backward
instead, as the network runs it, so fusions with the neighbours count. Prints GFLOP/s of the
convolution's own FLOPs (2·B·Ho·Wo·kh·kw·Cin·Cout per product).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import cpu_profile  # noqa: E402  pylint: disable=wrong-import-position,import-error
from ssl_jax.models import conv  # noqa: E402  pylint: disable=wrong-import-position

# (batch, input side, Cin, Cout, kernel, stride): the distinct convolutions of each network.
NETS = {
    "r18_64": [(32, 64, 3, 64, 7, 2), (32, 16, 64, 64, 3, 1), (32, 16, 64, 128, 3, 2),
               (32, 16, 64, 128, 1, 2), (32, 8, 128, 128, 3, 1), (32, 8, 128, 256, 3, 2),
               (32, 4, 256, 256, 3, 1), (32, 4, 256, 512, 3, 2), (32, 4, 256, 512, 1, 2),
               (32, 2, 512, 512, 3, 1)],
    "r18_224": [(8, 224, 3, 64, 7, 2), (8, 56, 64, 64, 3, 1), (8, 56, 64, 128, 3, 2),
                (8, 56, 64, 128, 1, 2), (8, 28, 128, 128, 3, 1), (8, 28, 128, 256, 3, 2),
                (8, 28, 128, 256, 1, 2), (8, 14, 256, 256, 3, 1), (8, 14, 256, 512, 3, 2),
                (8, 14, 256, 512, 1, 2), (8, 7, 512, 512, 3, 1)],
    "r50_224": [(8, 224, 3, 64, 7, 2), (8, 56, 64, 64, 1, 1), (8, 56, 64, 64, 3, 1),
                (8, 56, 64, 256, 1, 1), (8, 56, 256, 64, 1, 1), (8, 56, 256, 128, 1, 1),
                (8, 56, 128, 128, 3, 2), (8, 28, 128, 512, 1, 1), (8, 56, 256, 512, 1, 2),
                (8, 28, 512, 128, 1, 1), (8, 28, 128, 128, 3, 1), (8, 14, 256, 256, 3, 1),
                (8, 14, 1024, 256, 1, 1), (8, 7, 512, 512, 3, 1), (8, 7, 2048, 512, 1, 1)],
}


def _lax(x, w, stride, pad):
  return lax.conv_general_dilated(x, w, (stride,) * 2, ((pad, pad),) * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _matmul(x, w, stride, pad):
  return conv.conv_as_matmul(x, w, (stride,) * 2, ((pad, pad),) * 2)


def _matmul4d(x, w, stride, pad):
  """The im2col product as a 4-D dot_general (patches [B, Ho, Wo, K] · kernel [K, Cout])."""
  kh, kw, cin, cout = w.shape
  b, h, wd = x.shape[:3]
  ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  cols = [lax.slice(xp, (0, i, j, 0), (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1,
                                       cin), (1, stride, stride, 1))
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, -1) if len(cols) > 1 else cols[0]
  return lax.dot_general(patches, w.reshape(-1, cout), (((3,), (0,)), ((), ())))


IMPLS = {"lax": _lax, "matmul": _matmul, "matmul4d": _matmul4d}


def _bn_relu(y):
  mean = jnp.mean(y, (0, 1, 2))
  var = jnp.mean(jnp.square(y), (0, 1, 2)) - jnp.square(mean)
  return jax.nn.relu((y - mean) * lax.rsqrt(var + 1e-5))


def programs(impl, stride, pad, with_bn):
  """{part: jit(x, w, g) -> array}: fwd, dgrad, wgrad (or all three through conv+BN+ReLU)."""
  f = lambda x, w: impl(x, w, stride, pad)  # noqa: E731
  if with_bn:
    def step(x, w, g):
      return jax.grad(lambda x, w: jnp.sum(_bn_relu(f(x, w)) * g), (0, 1))(x, w)
    return {"conv+bn+relu fwd+bwd": jax.jit(step)}
  return {"fwd": jax.jit(lambda x, w, g: f(x, w)),
          "dgrad": jax.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0]),
          "wgrad": jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--net", default="r18_64", choices=sorted(NETS))
  parser.add_argument("--impls", default="lax,matmul")
  parser.add_argument("--with_bn", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  impls = args.impls.split(",")
  print(f"{cpu_profile.machine_load()}; {args.net}; GFLOP/s per product")
  mm = cpu_profile.matmul_gflops()
  for b, side, cin, cout, k, stride in NETS[args.net]:
    pad = k // 2
    x = jax.random.normal(jax.random.PRNGKey(0), (b, side, side, cin))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, k, cin, cout)) * 0.05
    ho = (side + 2 * pad - k) // stride + 1
    g = jax.random.normal(jax.random.PRNGKey(2), (b, ho, ho, cout))
    gflop = 2 * b * ho * ho * k * k * cin * cout / 1e9
    fns = {}
    for name in impls:
      for part, fn in programs(IMPLS[name], stride, pad, args.with_bn).items():
        if part == "dgrad" and cin == 3:
          continue  # the stem's input gradient is never computed
        compiled = fn.lower(x, w, g).compile()
        fns[(part, name)] = lambda c=compiled: jax.block_until_ready(c(x, w, g))
    best = cpu_profile.interleaved_best(fns, args.repeats)
    parts = sorted({p for p, _ in best}, key=["fwd", "dgrad", "wgrad"].index
                   if not args.with_bn else None)
    mult = 3 if args.with_bn else 1
    cells = []
    for part in parts:
      cells.append(part + " " + " ".join(
          f"{n} {mult * gflop / best[(part, n)]:6.1f}" for n in impls if (part, n) in best))
    print(f"B{b} {side}x{side} {cin:4d}->{cout:4d} k{k} s{stride} -> {ho}x{ho} "
          f"(matmul: {conv.use_matmul((k, k), (side, side), (ho, ho))}):  " + " | ".join(cells),
          flush=True)
  print(f"matmul 2048³ f32: {max(mm, cpu_profile.matmul_gflops()):.1f} GFLOP/s; "
        f"{cpu_profile.machine_load()}")


if __name__ == "__main__":
  main()
