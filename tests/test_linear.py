"""Linear probe: reaches the L-BFGS optimum, multi-layer protocol, adaptive pooling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from ssl_jax.evaluate import linear


def _overlapping_gaussians(n, d, c, seed, offset=3.0):
  """Classes that overlap, so the regularised optimum is interior and non-trivial."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(c, d))
  y = rng.integers(0, c, n)
  # The offset makes normalisation matter (the normalised objectives differ).
  x = centers[y] + 1.5 * rng.normal(size=(n, d)) + offset
  return x.astype(np.float32), y.astype(np.int32)


def _numpy_normalize(x, mode, train_x):
  if mode == "l2":
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  if mode == "bn_noaffine":
    return (x - train_x.mean(0)) / np.sqrt(train_x.var(0) + 1e-6)
  return x


def _lbfgs_optimum(x, y, c, wd):
  """min_{W,b} mean_i CE(W x_i + b, y_i) + wd/2 |W|², in float64 with the exact gradient."""
  n, d = x.shape
  x = x.astype(np.float64)
  onehot = np.eye(c)[y]

  def objective(theta):
    w, b = theta[:d * c].reshape(d, c), theta[d * c:]
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    loss = -(onehot * logp).sum() / n + 0.5 * wd * (w ** 2).sum()
    g_z = (np.exp(logp) - onehot) / n
    return loss, np.concatenate([(x.T @ g_z + wd * w).ravel(), g_z.sum(0)])

  res = scipy.optimize.minimize(objective, np.zeros(d * c + c), jac=True, method="L-BFGS-B",
                                options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
  return res.fun


# Raw features get no offset: an uncentred input is badly conditioned for SGD (the reason for
# MAE's BN before the probe) and would need far more epochs.
@pytest.mark.parametrize("normalize,offset", [(None, 0.0), ("bn_noaffine", 3.0), ("l2", 3.0)])
def test_sgd_reaches_lbfgs_optimum(normalize, offset):
  x, y = _overlapping_gaussians(128, 6, 3, seed=0, offset=offset)
  wd = 1e-2
  probe = linear.fit_linear_probe(x, y, 3, epochs=100, batch_size=32, lr=0.3,
                                  weight_decay=wd, optimizer="sgd",
                                  rng=jax.random.key(0), normalize=normalize)
  # Objective of the fitted probe, computed in NumPy on independently normalised features.
  xn = _numpy_normalize(x.astype(np.float64), normalize, x.astype(np.float64))
  w, b = np.asarray(probe.kernel, np.float64), np.asarray(probe.bias, np.float64)
  z = xn @ w + b
  logp = z - z.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  fitted = -logp[np.arange(len(y)), y].mean() + 0.5 * wd * (w ** 2).sum()
  optimum = _lbfgs_optimum(xn, y, 3, wd)
  assert optimum <= fitted + 1e-6
  assert fitted - optimum < 3e-4 * optimum, (fitted, optimum)
  # The library's own objective agrees with the NumPy one.
  np.testing.assert_allclose(linear.probe_objective(probe, x, y, wd), fitted, rtol=1e-4)


def test_too_short_training_is_detectably_off_optimum():
  """Guards the tolerance above: two epochs at a small lr must not pass it."""
  x, y = _overlapping_gaussians(128, 6, 3, seed=0)
  probe = linear.fit_linear_probe(x, y, 3, epochs=2, batch_size=32, lr=0.05, weight_decay=1e-2,
                                  rng=jax.random.key(0), normalize="bn_noaffine")
  xn = _numpy_normalize(x.astype(np.float64), "bn_noaffine", x.astype(np.float64))
  optimum = _lbfgs_optimum(xn, y, 3, 1e-2)
  fitted = float(linear.probe_objective(probe, x, y, 1e-2))
  assert fitted - optimum > 3e-4 * optimum


# LARS moves W by at most lr·1e-3·|W| per step (trust ratio), so from the std-0.01 init it needs
# MAE's large lr (0.1·16384/256 = 6.4) and a few hundred steps to grow |W|.
@pytest.mark.parametrize("optimizer,lr,epochs", [("sgd", 0.1, 20), ("lars", 6.4, 100),
                                                 ("adamw", 0.05, 20)])
def test_optimizers_separate_clusters(optimizer, lr, epochs):
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 8)) * 3
  train_y, test_y = rng.integers(0, 4, 96), rng.integers(0, 4, 40)
  train_x = centers[train_y] + 0.5 * rng.normal(size=(96, 8))
  test_x = centers[test_y] + 0.5 * rng.normal(size=(40, 8))
  probe = linear.fit_linear_probe(train_x, train_y, 4, epochs=epochs, batch_size=32, lr=lr,
                                  weight_decay=1e-4, optimizer=optimizer,
                                  rng=jax.random.key(1))
  acc = linear.evaluate_linear_probe(probe, test_x, test_y)
  assert acc == {"top1": 1.0, "top5": 1.0}


def test_evaluate_by_hand():
  probe = linear.LinearProbe(kernel=jnp.eye(3), bias=jnp.array([0.0, 0.0, 0.5]),
                             mean=jnp.zeros(3), inv_std=jnp.ones(3))
  x = np.array([[1.0, 0.0, 0.0],    # logits 1, 0, .5 -> 0
                [0.0, 1.0, 0.0],    # 0, 1, .5 -> 1
                [0.2, 0.0, 0.0],    # .2, 0, .5 -> 2
                [0.0, 0.0, 0.0]])   # 0, 0, .5 -> 2
  y = np.array([0, 2, 0, 2])        # hits: rows 0, 3; row 1 label 2 is 2nd; row 2 label 0 is 2nd
  acc = linear.evaluate_linear_probe(probe, x, y, batch_size=3)
  assert acc["top1"] == 0.5 and acc["top5"] == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(normalize="bn"), "normalize='bn'"),
    (dict(optimizer="lbfgs"), "optimizer='lbfgs'"),
    (dict(epochs=0), "epochs=0"),
])
def test_bad_arguments_raise(kwargs, match):
  args = dict(epochs=1, batch_size=2, lr=0.1, rng=jax.random.key(0)) | kwargs
  with pytest.raises(ValueError, match=match):
    linear.fit_linear_probe(np.ones((4, 2)), np.array([0, 1, 0, 1]), 2, **args)


def test_labels_out_of_range_raise():
  with pytest.raises(ValueError, match="num_classes=2"):
    linear.fit_linear_probe(np.ones((4, 2)), np.array([0, 1, 2, 1]), 2, epochs=1, batch_size=2,
                            lr=0.1, rng=jax.random.key(0))


def _numpy_adaptive_pool(x, s):
  """PyTorch adaptive_avg_pool2d, written with explicit loops over output cells."""
  b, h, w, c = x.shape
  out = np.zeros((b, s, s, c))
  for i in range(s):
    for j in range(s):
      h0, h1 = int(np.floor(i * h / s)), int(np.ceil((i + 1) * h / s))
      w0, w1 = int(np.floor(j * w / s)), int(np.ceil((j + 1) * w / s))
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("h,w,s", [(7, 7, 3), (6, 6, 6), (5, 4, 2), (4, 4, 1), (3, 3, 5),
                                   (14, 14, 4)])
def test_adaptive_avg_pool(h, w, s):
  x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
  np.testing.assert_allclose(linear.adaptive_avg_pool(jnp.asarray(x), s),
                             _numpy_adaptive_pool(x, s), rtol=1e-5, atol=1e-6)


def _fake_resnet(images):
  """Stand-in backbone output: stem and 4 stages of decreasing resolution (8, 4, 2, 1 at 16 px)."""
  b = images.shape[0]
  stem = jnp.tile(images, (1, 1, 1, 2))                              # [B, 16, 16, 6]
  stages = tuple(jax.image.resize(stem, (b, 16 // r, 16 // r, 6), "linear")[..., :c]
                 for r, c in ((2, 4), (4, 5), (8, 6), (16, 6)))
  return {"stem": stem, "stages": stages, "pooled": stages[-1].mean(axis=(1, 2))}


def test_multilayer_features_names_and_dims():
  images = jnp.ones((3, 16, 16, 3))
  feats = linear.multilayer_features(_fake_resnet(images), {"conv1": 4, "conv2": 2})
  assert {k: v.shape for k, v in feats.items()} == {
      "conv1": (3, 6 * 16), "conv2": (3, 4 * 4), "conv3": (3, 5), "conv4": (3, 6),
      "conv5": (3, 6)}
  no_stem = {"stages": _fake_resnet(images)["stages"]}
  assert list(linear.multilayer_features(no_stem)) == ["conv2", "conv3", "conv4", "conv5"]
  with pytest.raises(ValueError, match="stages"):
    linear.multilayer_features({"pooled": images})


def test_multilayer_probe_one_result_per_layer():
  rng = np.random.default_rng(2)
  train_y, test_y = np.arange(64) % 2, np.arange(32) % 2
  informative = lambda y: (2 * y[:, None] - 1) * 2.0 + 0.3 * rng.normal(size=(len(y), 5))  # noqa
  noise = lambda y: rng.normal(size=(len(y), 7))  # noqa: E731
  layers = {"conv4": (noise(train_y), noise(test_y)),
            "conv5": (informative(train_y), informative(test_y))}
  result = linear.multilayer_probe(layers, train_y, test_y, 2, rng=jax.random.key(0),
                                   epochs=10, batch_size=16, lr=0.1)
  assert set(result) == {"conv4", "conv5"}
  assert result["conv5"] == 1.0
  assert result["conv4"] < 0.8


def test_linear_eval_from_images():
  rng = np.random.default_rng(3)
  colours = np.eye(3, dtype=np.float32)
  train_y, test_y = rng.integers(0, 3, 30), rng.integers(0, 3, 12)
  make = lambda y: colours[y][:, None, None] + 0.1 * rng.normal(size=(len(y), 16, 16, 3))  # noqa
  acc = linear.linear_eval_from_images(_fake_resnet, make(train_y), train_y, make(test_y), test_y,
                                       num_classes=3, rng=jax.random.key(0),
                                       extract_batch_size=8, epochs=20, batch_size=10, lr=0.1)
  assert acc["top1"] == 1.0
