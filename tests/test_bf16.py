"""Mixed precision (`config.dtype="bfloat16"`): bf16 compute, float32 everything that accumulates.

What bf16 must not touch: the parameters and optimizer state (float32 masters), batch-norm
statistics (float32 running averages, float32 batch moments), normalisations and softmaxes
(float32), and the losses (float32). What it must cover: the big matmuls and convolutions.

For every method at its `:test` config, on the same params, batch and key:
  * the first-step loss in bf16 is within LOSS_RTOL of the float32 loss. bf16 keeps 8 bits of
    mantissa (relative rounding 2^-9 ≈ 0.2 %); the backbone's features and the projections carry
    that error into the logits, which τ = 0.1 multiplies by 10: the differences measured at the
    `:test` settings are 0.03–1.1 % (DetCon-B the largest), hence 2.5 %;
  * the new method state (BN statistics, EMA target, queue) is float32 and the BN running
    statistics move by what the float32 forward moves them;
  * in the train step's jaxpr: the train state (params, optimizer state, method state, probe) is
    float32 in and out, every convolution has bf16 operands, ≥ 90 % of the conv + matmul FLOPs
    run in bf16, every Dense/Conv kernel enters its matmul as bf16 (never float32; followed by
    data flow, not by shape), and no forward reduction, rsqrt or log (BN/LayerNorm moments,
    softmax, L2 normalisation, loss) reads bf16.
One real bf16 train step (DetCon-B) is finite and leaves float32 params and optimizer state.
Gradients of bf16-cast parameters come out of their matmuls (and of the bias broadcasts) in bf16
and are converted to float32 for the update: the usual mixed-precision trade-off, not checked.
Runtime: ~90 s of CPU (13 tests; mostly the 6 forward compiles of the loss comparison).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
import pytest

from ssl_jax import parallel, registry, train
from tests.helpers import BlockSource, load_config

METHODS = ["simclr", "byol", "mocov2", "mocov3", "detcon_b", "detcon_s"]
LOSS_RTOL = 0.025
# Forward ops that must never read bf16: moments and sums of normalisations, softmax and
# losses (reduce_*), their rsqrt/sqrt, and the log of a log-softmax.
F32_ONLY = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
            "cumsum", "cumlogsumexp", "rsqrt", "sqrt", "log", "log1p"}


@functools.lru_cache(maxsize=None)
def _setup(name):
  config = load_config(name, "test")
  with config.unlocked():
    config.dtype = "bfloat16"
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  return setup, setup.device_batch(next(train.make_data_iterator(setup)))


def _float32_method(setup):
  config = setup.config.copy_and_resolve_references()
  with config.unlocked():
    config.dtype = "float32"
  return registry.get_method(config.method).make(config)


def _floats(tree):
  return [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.mark.parametrize("name", METHODS)
def test_bf16_loss_and_batch_norm_statistics_close_to_float32(name):
  """The first step's loss and new method state (BN statistics, EMA target, queue), bf16 vs
  float32 compute, from the same float32 params, batch and key."""
  setup, batch = _setup(name)
  ts = setup.init_state(batch)
  method32, method16 = _float32_method(setup), setup.method
  # The train step's key at step 0 (train.build: fold_in(PRNGKey(seed), step)).
  key = jax.random.fold_in(jax.random.PRNGKey(setup.config.train.seed), 0)

  @jax.jit
  def both(params, state):
    args = (params, state, batch, key, jnp.int32(0), setup.constants)
    return method32.loss_and_aux(*args), method16.loss_and_aux(*args)

  (loss32, (state32, _)), (loss16, (state16, _)) = jax.device_get(both(ts["params"], ts["state"]))
  assert loss32.dtype == loss16.dtype == np.float32
  assert abs(float(loss16) - float(loss32)) <= LOSS_RTOL * abs(float(loss32)), (
      name, float(loss16), float(loss32))
  for path, x in _floats(state16):
    assert x.dtype == np.float32 and np.all(np.isfinite(x)), (name, path, x.dtype)
  # BN running statistics move by what the float32 forward moves them, up to bf16's rounding of
  # the (normalised, O(1)) activations; a bf16 reduction of the moments would also fail the
  # jaxpr test below.
  stats0 = jax.device_get(ts["state"]["batch_stats"])
  moved16 = jax.tree.map(np.subtract, state16["batch_stats"], stats0)
  moved32 = jax.tree.map(np.subtract, state32["batch_stats"], stats0)
  assert _floats(moved16), name
  for (path, d16), (_, d32) in zip(_floats(moved16), _floats(moved32)):
    assert np.linalg.norm(d16) > 0, (name, path)
    tol = 0.05 * np.linalg.norm(d32) + 1e-3 * np.sqrt(d32.size)
    assert np.linalg.norm(d16 - d32) <= tol, (name, path, np.linalg.norm(d16 - d32), tol)


def test_bf16_train_step_runs_and_keeps_float32_masters():
  """One real bf16 step (DetCon-B, the pod setting's method): finite, and the new params,
  optimizer state and method state are float32 and moved."""
  setup, batch = _setup("detcon_b")
  ts = setup.init_state(batch)
  init = jax.device_get(ts)
  new, metrics = setup.step(ts, batch)
  new = jax.device_get(new)
  assert bool(metrics["finite"]) and metrics["loss"].dtype == jnp.float32
  for part in ("params", "opt_state", "state", "probe"):
    for path, x in _floats(new[part]):
      assert x.dtype == np.float32 and np.all(np.isfinite(x)), (part, path, x.dtype)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new["params"], init["params"])
  assert any(jax.tree.leaves(changed))
  stats_changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new["state"]["batch_stats"],
                               init["state"]["batch_stats"])
  assert all(jax.tree.leaves(stats_changed))


def _ops(jaxpr, backward=False):
  """Every equation of a jaxpr and its sub-jaxprs, with whether it belongs to the backward pass
  (its name stack, or an enclosing equation's, runs under `transpose`)."""
  for eqn in jaxpr.eqns:
    bwd = backward or "transpose(" in str(eqn.source_info.name_stack)
    yield eqn, bwd
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
          yield from _ops(sub.jaxpr, bwd)
        elif type(sub).__name__ == "Jaxpr":
          yield from _ops(sub, bwd)


def _flops(eqn) -> int:
  """Multiply-adds × 2 of a dot_general or conv_general_dilated."""
  out = math.prod(eqn.outvars[0].aval.shape)
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  if eqn.primitive.name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return 2 * out * math.prod(lhs[d] for d in lhs_contract)
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
  return 2 * out * math.prod(rhs[d] for d in rhs_spec[1:])


SHAPE_ONLY = ("reshape", "squeeze", "transpose", "expand_dims", "broadcast_in_dim")


def _kernels_entering_matmuls(closed, abstract_ts):
  """(kernels, via_bf16, as_float32): the jaxpr variables of the Dense/Conv kernels in
  `params`, those cast to bf16 right before a dot_general/conv, and those a dot/conv reads as
  float32. Follows the data flow of the step's body (no shape guessing)."""
  (outer,) = closed.jaxpr.eqns  # the jitted step: one pjit whose body takes the flat arguments
  body = outer.params["jaxpr"].jaxpr
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_ts)]
  kernels = {body.invars[i] for i, p in enumerate(paths)
             if p.startswith("['params']") and p.endswith("['kernel']")}
  # A kernel may be reshaped before or after its cast (convolutions run as one matmul,
  # ssl_jax.models.conv): shape-only ops carry a variable's origin along.
  reshaped = {k: k for k in kernels}  # float32 kernel (or a reshape of it) -> kernel
  cast_of = {}  # bf16 copy (or a reshape of it) -> kernel
  via_bf16, as_float32 = set(), set()
  for eqn in body.eqns:
    ins = [v for v in eqn.invars if isinstance(v, jex_core.Var)]
    name = eqn.primitive.name
    if name in SHAPE_ONLY and ins and ins[0] in reshaped:
      reshaped[eqn.outvars[0]] = reshaped[ins[0]]
    elif name in SHAPE_ONLY and ins and ins[0] in cast_of:
      cast_of[eqn.outvars[0]] = cast_of[ins[0]]
    elif (name == "convert_element_type" and ins and ins[0] in reshaped
          and eqn.params["new_dtype"] == jnp.bfloat16):
      cast_of[eqn.outvars[0]] = reshaped[ins[0]]
    elif name in ("dot_general", "conv_general_dilated"):
      via_bf16 |= {cast_of[v] for v in ins if v in cast_of}
      as_float32 |= {reshaped[v] for v in ins if v in reshaped}
  return kernels, via_bf16, as_float32


@pytest.mark.parametrize("name", METHODS)
def test_bf16_step_runs_matmuls_in_bf16_and_reductions_in_float32(name):
  setup, _ = _setup(name)
  abstract_ts = jax.eval_shape(setup.init_state, setup.batch_spec)
  closed = jax.make_jaxpr(setup.train_step)(abstract_ts, setup.batch_spec, setup.constants)
  # float32 masters: every float of the train state (params, optimizer state, BN statistics,
  # EMA target, queue, probe), and the step's new state has the same dtypes.
  for path, x in _floats(abstract_ts):
    assert x.dtype == jnp.float32, (name, path, x.dtype)
  state_in = jax.tree_util.tree_leaves_with_path(abstract_ts)
  for (path, x), out in zip(state_in, closed.out_avals[:len(state_in)]):
    assert out.dtype == x.dtype and out.shape == x.shape, (name, jax.tree_util.keystr(path))

  flops = {"bf16": 0, "other": 0}
  leaks = []
  for eqn, backward in _ops(closed.jaxpr):
    dtypes = [getattr(v.aval, "dtype", None) for v in eqn.invars]
    prim = eqn.primitive.name
    if prim in ("dot_general", "conv_general_dilated"):
      low = all(d == jnp.bfloat16 for d in dtypes[:2])
      flops["bf16" if low else "other"] += _flops(eqn)
      assert low or prim == "dot_general", (name, "convolution outside bf16", eqn)
    elif prim in F32_ONLY and not backward and jnp.bfloat16 in dtypes:
      leaks.append((prim, str(eqn.source_info.name_stack)))
  assert not leaks, (name, leaks)
  share = flops["bf16"] / (flops["bf16"] + flops["other"])
  assert share >= 0.9, (name, flops)
  kernels, via_bf16, as_float32 = _kernels_entering_matmuls(closed, abstract_ts)
  assert kernels and via_bf16 == kernels, (name, len(kernels), len(via_bf16))
  assert not as_float32, (name, "a kernel enters a float32 matmul")
