"""Losses vs float64 NumPy references written from the formulas; sharded == unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssl_jax import losses


def np_normalize(x):
  return x / np.sqrt(max(np.sum(x * x), 1e-12))


def np_logsumexp(v):
  v = np.asarray(v, np.float64)
  m = v.max()
  return m + np.log(np.sum(np.exp(v - m)))


def rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


jit_detcon = jax.jit(losses.detcon_loss)
jit_detcon_grads = jax.jit(jax.grad(losses.detcon_loss, argnums=(0, 1, 2, 3)))


def test_l2_normalize():
  x = rand((5, 7), 0)
  x[2] = 0.0
  got = np.asarray(losses.l2_normalize(jnp.asarray(x)))
  want = np.stack([np_normalize(r.astype(np.float64)) for r in x])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[2] == 0)  # zero vector stays zero (no NaN)


@pytest.mark.parametrize("n,d,tau", [(6, 8, 0.2), (1, 4, 1.0), (9, 3, 0.07)])
def test_info_nce_batch(n, d, tau):
  q, k = rand((n, d), 1), rand((n, d), 2)
  want = 0.0
  for i in range(n):
    logits = [np_normalize(q[i]) @ np_normalize(k[j]) / tau for j in range(n)]
    want += np_logsumexp(logits) - logits[i]
  want /= n
  got = losses.info_nce(jnp.asarray(q), jnp.asarray(k), tau)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m", [(4, 10), (1, 1)])
def test_info_nce_queue(n, m):
  q, k, neg = rand((n, 8), 3), rand((n, 8), 4), rand((m, 8), 5)
  tau = 0.2
  want = 0.0
  for i in range(n):
    qi = np_normalize(q[i])
    logits = [qi @ np_normalize(k[i]) / tau] + [qi @ np_normalize(neg[j]) / tau for j in range(m)]
    want += np_logsumexp(logits) - logits[0]
  want /= n
  got = losses.info_nce(jnp.asarray(q), jnp.asarray(k), tau, negatives=jnp.asarray(neg))
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def np_nt_xent(z1, z2, tau):
  """SimCLR's NT-Xent written out: 2N anchors, partner of i is i±N, self excluded."""
  n = len(z1)
  z = [np_normalize(v) for v in np.concatenate([z1, z2])]
  total = 0.0
  for i in range(2 * n):
    partner = (i + n) % (2 * n)
    others = [j for j in range(2 * n) if j != i]  # 2N-1 candidates, 2N-2 negatives
    logits = [z[i] @ z[j] / tau for j in others]
    total += np_logsumexp(logits) - z[i] @ z[partner] / tau
  return total / (2 * n)


@pytest.mark.parametrize("n,tau", [(5, 0.5), (2, 0.1), (1, 1.0)])
def test_nt_xent(n, tau):
  z1, z2 = rand((n, 6), 6), rand((n, 6), 7)
  got = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau)
  np.testing.assert_allclose(float(got), np_nt_xent(z1, z2, tau), rtol=1e-5, atol=1e-5)


def test_byol_loss():
  p, z = rand((7, 5), 8), rand((7, 5), 9)
  p[3] = 0.0
  want = np.mean([2 - 2 * np_normalize(p[i]) @ np_normalize(z[i]) for i in range(7)])
  got = losses.byol_loss(jnp.asarray(p), jnp.asarray(z))
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  assert float(losses.byol_loss(jnp.asarray(z), jnp.asarray(3 * z))) == pytest.approx(0, abs=1e-5)


def np_detcon(p1, p2, t1, t2, pi1, pi2, ti1, ti2, tau):
  """Official byol_nce_detcon semantics, one ROI at a time (plus: ids < 0 are empty ROIs)."""

  def side(p, pi, t_other, ti_other, t_same, ti_same):
    b_size, r_size, _ = p.shape
    total = 0.0
    for b in range(b_size):
      for r in range(r_size):
        if pi[b, r] < 0:
          continue
        q = np_normalize(p[b, r].astype(np.float64))
        logits, labels = [], []
        for u in range(b_size):
          for v in range(r_size):
            if ti_other[u, v] < 0:
              continue
            logits.append(q @ np_normalize(t_other[u, v].astype(np.float64)) / tau)
            labels.append(1.0 if (u == b and ti_other[u, v] == pi[b, r]) else 0.0)
        for u in range(b_size):
          for v in range(r_size):
            if ti_same[u, v] < 0 or (u == b and ti_same[u, v] == pi[b, r]):
              continue  # removed (-1e9 in the official code: contributes exp(-1e9) = 0)
            logits.append(q @ np_normalize(t_same[u, v].astype(np.float64)) / tau)
            labels.append(0.0)
        labels = np.asarray(labels)
        if labels.sum() == 0:
          continue  # no positive: weight 0
        labels /= labels.sum()
        ce = -np.sum(labels * (np.asarray(logits) - np_logsumexp(logits)))
        area = np.sum(pi[b] == pi[b, r])
        total += ce / area
    return total / (b_size * r_size)

  return side(p1, pi1, t2, ti2, t1, ti1) + side(p2, pi2, t1, ti1, t2, ti2)


def detcon_case(name):
  """Returns (B, R, ids1, ids2) for the named case; pind == tind as in DetCon."""
  rng = np.random.default_rng(sum(map(ord, name)))  # fixed per case
  if name == "random":
    return 3, 4, rng.integers(0, 3, (3, 4)), rng.integers(0, 3, (3, 4))
  if name == "all_same":
    return 2, 4, np.zeros((2, 4), int), np.zeros((2, 4), int)
  if name == "one_roi":
    return 3, 1, np.array([[0], [1], [0]]), np.array([[0], [0], [0]])
  if name == "batch_1":
    return 1, 5, np.array([[0, 1, 1, 2, 4]]), np.array([[1, 1, 3, 4, 4]])
  if name == "duplicates":
    return 2, 4, np.array([[0, 0, 1, 1], [2, 2, 2, 5]]), np.array([[0, 1, 1, 1], [5, 5, 2, 0]])
  if name == "no_positive":
    return 2, 3, np.array([[0, 1, 1], [0, 1, 2]]), np.array([[2, 3, 3], [2, 2, 0]])
  if name == "different_ids":
    return 2, 3, np.array([[0, 1, 2], [3, 4, 5]]), np.array([[6, 7, 8], [9, 10, 11]])
  if name == "empty_rois":
    return 2, 3, np.array([[-1, -1, -1], [0, 1, 1]]), np.array([[-1, -1, -1], [1, 1, -1]])
  raise KeyError(name)


CASES = ["random", "all_same", "one_roi", "batch_1", "duplicates", "no_positive",
         "different_ids", "empty_rois"]


@pytest.mark.parametrize("name", CASES)
def test_detcon_loss_matches_reference(name):
  b, r, ids1, ids2 = detcon_case(name)
  d, tau = 6, 0.1
  p1, p2, t1, t2 = (rand((b, r, d), s) for s in range(10, 14))
  want = np_detcon(p1, p2, t1, t2, ids1, ids2, ids1, ids2, tau)
  args = [jnp.asarray(a) for a in (p1, p2, t1, t2)] + [
      jnp.asarray(a, jnp.int32) for a in (ids1, ids2, ids1, ids2)]
  got = jit_detcon(*args, tau)
  np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)
  if name == "different_ids":
    assert float(got) == 0.0  # no ROI has a positive: every weight is 0

  grads = jit_detcon_grads(*args, tau)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  if name == "random":
    assert float(jnp.abs(grads[0]).sum()) > 0  # the test can see a gradient at all


def test_detcon_loss_separate_target_ids():
  """pind != tind (official signature allows it): positives come from the target ids."""
  b, r, d, tau = 2, 3, 5, 0.1
  rng = np.random.default_rng(3)
  ids = [rng.integers(0, 3, (b, r)) for _ in range(4)]
  p1, p2, t1, t2 = (rand((b, r, d), s) for s in range(20, 24))
  want = np_detcon(p1, p2, t1, t2, *ids, tau)
  got = jit_detcon(*(jnp.asarray(a) for a in (p1, p2, t1, t2)),
                   *(jnp.asarray(a, jnp.int32) for a in ids), tau)
  np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_batch_sharded_losses_use_the_global_batch_as_negatives():
  """Inputs split over 8 devices: each loss equals its NumPy reference on the whole batch (the
  negatives cross devices), which differs from an average of per-device losses."""
  mesh = _mesh()
  put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))  # noqa: E731
  b, r, d = 16, 2, 8
  rng = np.random.default_rng(0)
  p1, p2, t1, t2 = (rand((b, r, d), s) for s in range(30, 34))
  i1, i2 = rng.integers(0, 3, (b, r)), rng.integers(0, 3, (b, r))
  dargs = (p1, p2, t1, t2, i1, i2, i1, i2)
  q, k = rand((b, d), 40), rand((b, d), 41)
  sd = [put(a) for a in dargs]
  assert len(sd[0].sharding.device_set) == 8
  cases = {
      "detcon": (float(jax.jit(losses.detcon_loss)(*sd)), np_detcon(*dargs, tau=0.1),
                 lambda sl: np_detcon(*(a[sl] for a in dargs), tau=0.1)),
      "nt_xent": (float(jax.jit(losses.nt_xent, static_argnums=2)(put(q), put(k), 0.5)),
                  np_nt_xent(q, k, 0.5), lambda sl: np_nt_xent(q[sl], k[sl], 0.5)),
  }
  for name, (got, want, local) in cases.items():
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    per_device = np.mean([local(slice(i, i + 2)) for i in range(0, b, 2)])
    assert abs(per_device - got) > 1e-3, name
  grad = jax.jit(jax.grad(losses.detcon_loss))(*sd)
  assert np.all(np.isfinite(np.asarray(grad)))