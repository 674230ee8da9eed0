"""Online linear probe: stop-gradient features, unlabelled rows ignored, learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssl_jax.evaluate import online_probe


def _numpy_loss(kernel, bias, features, labels):
  """Mean CE and top-1 over rows with label >= 0, computed row by row."""
  losses, hits = [], []
  for f, y in zip(features.astype(np.float64), labels):
    if y < 0:
      continue
    z = f @ kernel + bias
    losses.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[y])
    hits.append(np.argmax(z) == y)
  return (np.mean(losses), np.mean(hits)) if losses else (0.0, 0.0)


def test_init_shapes():
  params = online_probe.init_online_probe(jax.random.key(0), 16, 5)
  assert params["kernel"].shape == (16, 5) and params["bias"].shape == (5,)
  assert float(jnp.abs(params["kernel"]).sum()) > 0


@pytest.mark.parametrize("labels", [
    [0, 1, 2, 1, 0, 2],        # all labelled
    [0, -1, 2, -1, 0, 2],      # some unlabelled
    [1, -1, -1, -1, -1, -1],   # one labelled row
])
def test_loss_matches_numpy(labels):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array(labels)
  params = online_probe.init_online_probe(jax.random.key(1), 4, 3)
  params["bias"] = jnp.array([0.1, -0.2, 0.3])
  loss, metrics = online_probe.online_probe_loss(params, jnp.asarray(features),
                                                 jnp.asarray(labels))
  ref_loss, ref_top1 = _numpy_loss(np.asarray(params["kernel"], np.float64),
                                   np.asarray(params["bias"], np.float64), features, labels)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["probe_loss"], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["probe_top1"], ref_top1, rtol=1e-6)


def test_unlabelled_rows_have_no_effect():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(5, 4)).astype(np.float32)
  labels = jnp.array([0, -1, 1, -1, 2])
  params = online_probe.init_online_probe(jax.random.key(0), 4, 3)
  changed = features.copy()
  changed[[1, 3]] = 100.0 * rng.normal(size=(2, 4))
  a = online_probe.online_probe_loss(params, features, labels)
  b = online_probe.online_probe_loss(params, changed, labels)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  np.testing.assert_allclose(a[1]["probe_top1"], b[1]["probe_top1"])
  # A labelled row does matter.
  changed[0] = 100.0
  assert abs(float(online_probe.online_probe_loss(params, changed, labels)[0]) - float(a[0])) > 1e-3


def test_all_unlabelled_is_zero_not_nan():
  params = online_probe.init_online_probe(jax.random.key(0), 4, 3)
  loss, metrics = online_probe.online_probe_loss(params, jnp.ones((3, 4)), -jnp.ones(3, jnp.int32))
  assert float(loss) == 0.0 and float(metrics["probe_top1"]) == 0.0
  grads = jax.grad(lambda p: online_probe.online_probe_loss(p, jnp.ones((3, 4)),
                                                            -jnp.ones(3, jnp.int32))[0])(params)
  assert all(np.all(np.isfinite(g)) and not np.any(g) for g in jax.tree.leaves(grads))


def test_no_gradient_reaches_the_encoder():
  """The probe's loss must not train the representation: zero gradient w.r.t. the encoder."""
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 8))
  encoder_w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  params = online_probe.init_online_probe(jax.random.key(0), 4, 3)

  def loss(encoder_w, params):
    return online_probe.online_probe_loss(params, jnp.tanh(images @ encoder_w), labels)[0]

  g_encoder, g_probe = jax.grad(loss, argnums=(0, 1))(encoder_w, params)
  np.testing.assert_array_equal(g_encoder, np.zeros_like(g_encoder))
  assert float(jnp.abs(g_probe["kernel"]).sum()) > 0  # while the probe itself does learn
  g_features = jax.grad(lambda f: online_probe.online_probe_loss(params, f, labels)[0])(
      jnp.tanh(images @ encoder_w))
  np.testing.assert_array_equal(g_features, np.zeros_like(g_features))


def test_loss_decreases_on_separable_features():
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(4, 8)) * 2
  labels = rng.integers(0, 4, 64)
  features = jnp.asarray(centers[labels] + 0.3 * rng.normal(size=(64, 8)), jnp.float32)
  labels = jnp.asarray(np.where(np.arange(64) % 4 == 0, -1, labels))  # a quarter unlabelled
  params = online_probe.init_online_probe(jax.random.key(0), 8, 4)
  tx = optax.sgd(0.5, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    (loss, metrics), grads = jax.value_and_grad(online_probe.online_probe_loss, has_aux=True)(
        params, features, labels)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  params, opt_state, first = step(params, opt_state)
  for _ in range(50):
    params, opt_state, last = step(params, opt_state)
  assert float(last["probe_loss"]) < 0.1 * float(first["probe_loss"])
  assert float(last["probe_top1"]) == 1.0
