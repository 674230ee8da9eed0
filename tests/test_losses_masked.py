"""Losses of the masked methods (MAE, SimMIM) and Masked MoCo's spherical mean and κ monitor."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import vonmises_fisher

from ssl_jax import losses


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------- MAE


def _mae_numpy(pred, images_patches, mask, norm_pix):
  t = images_patches.astype(np.float64)
  if norm_pix:
    # torch's .var() is unbiased (ddof=1): the official forward_loss.
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
  per_patch = ((pred - t) ** 2).mean(-1)
  m = mask.astype(np.float64)
  return (per_patch * m).sum() / m.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("b,n,p", [(2, 16, 12), (1, 4, 3)])
def test_masked_patch_mse_matches_numpy(norm_pix, b, n, p):
  rng = _rng(b * n)
  pred = rng.normal(size=(b, n, p)).astype(np.float32)
  target = rng.uniform(0, 5, size=(b, n, p)).astype(np.float32)
  mask = rng.uniform(size=(b, n)) < 0.6
  mask[0, 0] = True
  got = losses.masked_patch_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask),
                                norm_pix)
  np.testing.assert_allclose(got, _mae_numpy(pred, target, mask, norm_pix), rtol=1e-5)
  # A float 0/1 mask is the same as a bool mask.
  np.testing.assert_allclose(
      losses.masked_patch_mse(jnp.asarray(pred), jnp.asarray(target),
                              jnp.asarray(mask, jnp.float32), norm_pix), got, rtol=1e-6)


def test_masked_patch_mse_ignores_visible_predictions():
  rng = _rng(1)
  pred = jnp.asarray(rng.normal(size=(2, 16, 12)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 16, 12)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(2, 16)) < 0.75)
  grad = np.asarray(jax.grad(losses.masked_patch_mse)(pred, target, mask))
  assert (grad[~np.asarray(mask)] == 0).all()
  assert (np.abs(grad[np.asarray(mask)]).sum(-1) > 0).all()
  # Changing visible predictions does not change the loss.
  other = jnp.where(mask[..., None], pred, 100.0)
  np.testing.assert_array_equal(losses.masked_patch_mse(other, target, mask),
                                losses.masked_patch_mse(pred, target, mask))


def test_masked_patch_mse_degenerate_masks():
  pred = jnp.ones((1, 4, 3))
  target = jnp.zeros((1, 4, 3))
  assert float(losses.masked_patch_mse(pred, target, jnp.zeros((1, 4), bool))) == 0.0
  one = jnp.zeros((1, 4), bool).at[0, 2].set(True)
  np.testing.assert_allclose(losses.masked_patch_mse(pred, target, one, norm_pix=False), 1.0)
  # A constant patch normalises to 0 (variance floor 1e-6), not NaN.
  assert np.isfinite(float(losses.masked_patch_mse(pred, target, one, norm_pix=True)))
  with pytest.raises(ValueError, match="mask"):
    losses.masked_patch_mse(pred, target, jnp.zeros((1, 3), bool))


# ---------------------------------------------------------------- SimMIM


def test_masked_pixel_l1_matches_numpy_and_normalisation():
  rng = _rng(2)
  pred = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  img = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  mask = rng.uniform(size=(2, 8, 8)) < 0.6
  got = losses.masked_pixel_l1(jnp.asarray(pred), jnp.asarray(img), jnp.asarray(mask))
  # Official: (|x − x_rec| · mask[:, None]).sum() / (mask.sum() + 1e-5) / in_chans.
  ref = (np.abs(pred - img) * mask[..., None]).sum() / (mask.sum() + 1e-5) / 3
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # Error e on every masked pixel and channel gives e (the mean over masked pixels and channels).
  const = losses.masked_pixel_l1(jnp.full((1, 4, 4, 3), 0.5), jnp.zeros((1, 4, 4, 3)),
                                 jnp.zeros((1, 4, 4), bool).at[0, :2].set(True))
  np.testing.assert_allclose(const, 0.5, rtol=1e-5)
  assert float(losses.masked_pixel_l1(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)),
                                      jnp.zeros((1, 2, 2)))) == 0.0


def test_masked_pixel_l1_ignores_visible_pixels():
  rng = _rng(3)
  pred = jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32)
  img = jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(1, 8, 8)) < 0.5)
  grad = np.asarray(jax.grad(losses.masked_pixel_l1)(pred, img, mask))
  assert (grad[~np.asarray(mask)] == 0).all() and (grad[np.asarray(mask)] != 0).all()
  with pytest.raises(ValueError, match="pixel_mask"):
    losses.masked_pixel_l1(pred, img, mask[:, :4])


# ---------------------------------------------------------------- Masked MoCo


def test_spherical_mean_matches_numpy():
  x = _rng(4).normal(size=(3, 5, 8)).astype(np.float32)
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  ref = unit.sum(1) / np.linalg.norm(unit.sum(1), axis=-1, keepdims=True)
  np.testing.assert_allclose(losses.spherical_mean(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)
  # Each member counts once whatever its norm (unlike a plain mean).
  scaled = x * np.array([1, 100, 0.01, 3, 7], np.float32)[None, :, None]
  np.testing.assert_allclose(losses.spherical_mean(jnp.asarray(scaled)), ref, rtol=1e-4,
                             atol=1e-5)
  # One member: its direction; set on another axis.
  np.testing.assert_allclose(losses.spherical_mean(jnp.asarray(x[:, :1])), unit[:, 0], rtol=1e-5)
  np.testing.assert_allclose(losses.spherical_mean(jnp.asarray(x.transpose(1, 0, 2)), axis=0),
                             ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="feature axis"):
    losses.spherical_mean(jnp.asarray(x), axis=-1)


def test_vmf_kappa_formula_and_edge_cases():
  x = _rng(5).normal(size=(4, 3, 6)).astype(np.float32)
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  r = np.linalg.norm(unit.mean(1), axis=-1)
  np.testing.assert_allclose(losses.vmf_kappa(jnp.asarray(x)), r * (6 - r**2) / (1 - r**2),
                             rtol=1e-4)
  same = jnp.ones((2, 4, 8))
  k = np.asarray(losses.vmf_kappa(same))
  assert np.isfinite(k).all() and (k > 1e5).all()
  opposite = jnp.asarray([[[1.0, 0.0], [-1.0, 0.0]]])
  np.testing.assert_allclose(losses.vmf_kappa(opposite), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="n >= 2"):
    losses.vmf_kappa(jnp.ones((3, 1, 8)))


@pytest.mark.parametrize("d,kappa", [(16, 5.0), (16, 20.0), (16, 100.0), (256, 20.0),
                                     (256, 100.0), (256, 500.0)])
def test_vmf_kappa_recovers_known_concentration(d, kappa):
  mu = _rng(d).normal(size=d)
  mu /= np.linalg.norm(mu)
  samples = vonmises_fisher(mu, kappa).rvs(4000, random_state=_rng(int(kappa)))
  est = float(losses.vmf_kappa(jnp.asarray(samples, jnp.float32)))
  assert abs(est / kappa - 1) < 0.1, (est, kappa)
