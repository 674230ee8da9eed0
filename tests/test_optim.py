"""Schedules, optimizer masks, LARS/AdamW updates, layer decay and EMA vs closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from ssl_jax import optim


def cfg(**kw):
  base = dict(name="sgd", base_lr=1.0, lr_rule="none", warmup_steps=0, schedule="constant",
              end_lr=0.0, weight_decay=0.0, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
              eps=1e-8, grad_clip=0.0, exclude_from_decay="bias_and_norm")
  base.update(kw)
  return ConfigDict(base)


def params_and_grads(seed=0):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
            "bn": {"scale": rng.normal(size=(4,))}}
  grads = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
  return cast(params), cast(grads)


def test_scale_lr():
  assert optim.scale_lr(0.3, 4096) == pytest.approx(0.3 * 16)
  assert optim.scale_lr(0.3, 4096, "none") == 0.3
  assert optim.scale_lr(0.1, 1024, "sqrt") == pytest.approx(0.2)
  with pytest.raises(ValueError, match="config.optim.lr_rule"):
    optim.scale_lr(0.1, 256, "quadratic")


@pytest.mark.parametrize("warmup,total,end", [(10, 100, 0.0), (0, 50, 0.0), (5, 40, 0.01),
                                              (20, 20, 0.0)])
def test_warmup_cosine(warmup, total, end):
  peak = 2.0
  sched = optim.warmup_cosine(peak, warmup, total, end)

  def closed(t):  # BYOL learning_rate_schedule, with an end value
    if t < warmup:
      return peak * t / warmup
    if total == warmup:
      return peak
    frac = min(t - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))

  for t in sorted({0, 1, warmup // 2, warmup, warmup + 1, (warmup + total) // 2, total - 1,
                   total, total + 7}):
    assert float(sched(t)) == pytest.approx(closed(t), rel=1e-5, abs=1e-6), t
  assert float(sched(jnp.int32(warmup))) == pytest.approx(peak)


@pytest.mark.parametrize("warmup", [10, 0])
def test_warmup_piecewise(warmup):
  sched = optim.warmup_piecewise(1.0, warmup, 1000)
  expected = {10: 1.0, 500: 1.0, 959: 1.0, 960: 0.1, 979: 0.1, 980: 0.01, 999: 0.01}
  expected.update({0: 0.0, 5: 0.5} if warmup else {0: 1.0, 5: 1.0})
  for t, v in expected.items():
    assert float(sched(t)) == pytest.approx(v, rel=1e-5, abs=1e-7), t


def test_make_optimizer_schedule_uses_lr_rule():
  _, sched = optim.make_optimizer(cfg(base_lr=0.1, lr_rule="linear", warmup_steps=4,
                                      schedule="cosine"), 20, 512)
  assert float(sched(4)) == pytest.approx(0.2)
  assert float(sched(2)) == pytest.approx(0.1)
  assert float(sched(20)) == pytest.approx(0.0, abs=1e-7)


def test_lars_excludes_bias_and_norm():
  lr, wd, mom, eta = 0.5, 0.1, 0.9, 1e-3
  tx, _ = optim.make_optimizer(cfg(name="lars", base_lr=lr, weight_decay=wd, momentum=mom), 10, 256)
  params, grads = params_and_grads()
  state = tx.init(params)
  np_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  np_grads = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
  np_mom = jax.tree.map(np.zeros_like, np_params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    # NumPy LARS (BYOL form): kernel adapted and decayed; bias / BN scale plain momentum SGD.
    w, g = np_params["dense"]["kernel"], np_grads["dense"]["kernel"]
    u = g + wd * w
    trust = eta * np.linalg.norm(w) / np.linalg.norm(u)
    np_mom["dense"]["kernel"] = mom * np_mom["dense"]["kernel"] + lr * trust * u
    for path in (("dense", "bias"), ("bn", "scale")):
      np_mom[path[0]][path[1]] = mom * np_mom[path[0]][path[1]] + lr * np_grads[path[0]][path[1]]
    np_params = jax.tree.map(lambda p, m: p - m, np_params, np_mom)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6),
                 params, np_params)


@pytest.mark.parametrize("exclude,decayed", [
    ("bias_and_norm", {"kernel", "cls_token", "relative_position_bias_table"}),
    ("bias_norm_and_tokens", {"kernel"}),
    ("none", {"kernel", "cls_token", "bias", "scale", "relative_position_bias_table"}),
])
def test_adamw_weight_decay_mask(exclude, decayed):
  lr, wd = 0.1, 0.5
  params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((3,)),
            "cls_token": jnp.ones((1, 1, 3)),
            "relative_position_bias_table": jnp.ones((9, 2))}  # Swin: SimMIM does not decay it
  tx, _ = optim.make_optimizer(cfg(name="adamw", base_lr=lr, weight_decay=wd,
                                   exclude_from_decay=exclude), 10, 256)
  zero = jax.tree.map(jnp.zeros_like, params)  # Adam part is 0: only decoupled decay remains
  updates, _ = tx.update(zero, tx.init(params), params)
  for name, u in updates.items():
    want = -lr * wd if name in decayed else 0.0
    np.testing.assert_allclose(np.asarray(u), want, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_trainable_mask_freezes_exactly_masked_leaves(name):
  params, grads = params_and_grads(1)
  mask = {"dense": {"kernel": False, "bias": True}, "bn": {"scale": False}}
  tx, _ = optim.make_optimizer(cfg(name=name, weight_decay=0.1, grad_clip=1.0), 10, 256,
                               trainable_mask=mask)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert np.all(np.asarray(updates["dense"]["kernel"]) == 0)
    assert np.all(np.asarray(updates["bn"]["scale"]) == 0)
    assert np.all(np.asarray(updates["dense"]["bias"]) != 0)
  # No optimizer state (momentum, Adam moments) is kept for the frozen leaves.
  state_sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim)
  assert state_sizes < 3 * 4


def test_grad_clip():
  params, grads = params_and_grads(2)
  tx, _ = optim.make_optimizer(cfg(momentum=0.0, grad_clip=0.5), 10, 256)
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = float(optax.global_norm(updates))
  assert norm == pytest.approx(0.5, rel=1e-5)
  assert float(optax.global_norm(grads)) > 0.5


def test_invalid_name_raises():
  with pytest.raises(ValueError, match="config.optim.name='adam'"):
    optim.make_optimizer(cfg(name="adam"), 10, 256)
  with pytest.raises(ValueError, match="config.optim.exclude_from_decay"):
    optim.make_optimizer(cfg(exclude_from_decay="all"), 10, 256)
  with pytest.raises(ValueError, match="config.optim.schedule"):
    optim.make_optimizer(cfg(schedule="step"), 10, 256)


def vit_params():
  z = jnp.zeros((2, 2))
  return {"patch_embed": {"kernel": z}, "cls_token": z, "pos_embed": z,
          "blocks_0": {"attn": {"kernel": z}}, "blocks_1": {"mlp": {"bias": jnp.zeros(2)}},
          "norm": {"scale": jnp.zeros(2)}, "head": {"kernel": z}}


def test_layer_decay_multipliers():
  decay, layers = 0.5, 2
  got = optim.layer_decay_multipliers(vit_params(), layers, decay)
  layer_id = {"patch_embed": 0, "cls_token": 0, "pos_embed": 0, "blocks_0": 1, "blocks_1": 2,
              "norm": 3, "head": 3}
  for top, lid in layer_id.items():
    for m in jax.tree.leaves(got[top]):
      assert m == pytest.approx(decay ** (layers + 1 - lid)), top


def test_layer_decay_in_optimizer():
  params = vit_params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx, _ = optim.make_optimizer(cfg(momentum=0.0, layer_decay=0.5), 10, 256)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["cls_token"]), -0.125)
  np.testing.assert_allclose(np.asarray(updates["blocks_1"]["mlp"]["bias"]), -0.5)
  np.testing.assert_allclose(np.asarray(updates["head"]["kernel"]), -1.0)


def test_ema():
  base, total = 0.99, 100
  assert float(optim.ema_momentum(0, total, base)) == pytest.approx(base)
  assert float(optim.ema_momentum(total, total, base)) == pytest.approx(1.0)
  assert float(optim.ema_momentum(50, total, base)) == pytest.approx(1 - (1 - base) / 2)
  t = 30
  want = 1 - (1 - base) * (math.cos(math.pi * t / total) + 1) / 2
  assert float(jax.jit(optim.ema_momentum, static_argnums=(1, 2))(jnp.int32(t), total, base)) \
      == pytest.approx(want, rel=1e-6)
  target = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[0.0]], jnp.bfloat16)}
  online = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[1.0]], jnp.bfloat16)}
  new = optim.ema_update(target, online, jnp.float32(0.75))
  np.testing.assert_allclose(np.asarray(new["a"]), [1.5, 1.5])
  assert new["b"].dtype == jnp.bfloat16 and float(new["b"][0, 0]) == 0.25
