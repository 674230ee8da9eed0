"""`vit.gelu`: the exact GELU x Φ(x) (torch's erf form), checked against float64."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.models import vit

# Tails included: far left GELU underflows to -0, far right it is x.
X = np.concatenate([np.linspace(-12, 12, 4001), [-40.0, -6.5, -1e-3, 0.0, 1e-3, 6.5, 40.0]])


def _phi_cdf(x):
  return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_gelu_equals_x_times_normal_cdf():
  got = np.asarray(vit.gelu(jnp.asarray(X, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, X * _phi_cdf(X), rtol=1e-6, atol=2e-6)
  # tanh approximation (max error ~5e-4) must not pass for it
  approx = np.asarray(jax.nn.gelu(jnp.asarray(X, jnp.float32), approximate=True), np.float64)
  assert np.abs(approx - X * _phi_cdf(X)).max() > 1e-4


def test_gelu_gradient_is_cdf_plus_x_times_density():
  grad = np.asarray(jax.vmap(jax.grad(vit.gelu))(jnp.asarray(X, jnp.float32)), np.float64)
  density = np.exp(-X**2 / 2) / math.sqrt(2 * math.pi)
  np.testing.assert_allclose(grad, _phi_cdf(X) + X * density, rtol=1e-6, atol=2e-6)


def test_gelu_keeps_dtype_and_shape():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  y = vit.gelu(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 4)
  np.testing.assert_allclose(np.asarray(y, np.float32), 1.0 * _phi_cdf(np.ones(1))[0], rtol=1e-2)
