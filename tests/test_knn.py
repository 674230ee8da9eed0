"""Weighted cosine kNN (InstDisc/DINO) and batched feature extraction."""
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.evaluate import features, knn


def _numpy_knn_votes(train, labels, test, num_classes, k, temperature):
  """Reference: full [M, N] similarity matrix, argsort, exp(s/T) votes."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = test @ train.T
  votes = np.zeros((test.shape[0], num_classes))
  for m in range(test.shape[0]):
    nearest = np.argsort(-sim[m])[:k]
    for i in nearest:
      votes[m, labels[i]] += np.exp(sim[m, i] / temperature)
  return votes


def test_hand_computed_votes():
  train = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
  labels = np.array([0, 1, 1, 2])
  test = np.array([[2.0, 0.0],      # cos: 1, 0, -1, 1/√2  -> top-3: #0, #3, #1
                   [-3.0, 0.0]])    # cos: -1, 0, 1, -1/√2 -> top-3: #2, #1, #3
  votes = knn.knn_votes(train, labels, test, num_classes=3, k=3, temperature=0.5)
  expected = np.array([
      [np.exp(1 / 0.5), np.exp(0 / 0.5), np.exp((1 / np.sqrt(2)) / 0.5)],
      [0.0, np.exp(1 / 0.5) + np.exp(0 / 0.5), np.exp((-1 / np.sqrt(2)) / 0.5)],
  ])
  np.testing.assert_allclose(votes, expected, rtol=1e-5)
  np.testing.assert_array_equal(
      knn.knn_classify(train, labels, test, num_classes=3, k=3, temperature=0.5), [0, 1])


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (12, 1.0)])
def test_matches_numpy_reference(k, temperature):
  rng = np.random.default_rng(0)
  train = rng.normal(size=(40, 6)).astype(np.float32)
  labels = rng.integers(0, 4, 40)
  test = rng.normal(size=(9, 6)).astype(np.float32)
  votes = knn.knn_votes(train, labels, test, 4, k=k, temperature=temperature, batch_size=4)
  ref = _numpy_knn_votes(train, labels, test, 4, k, temperature)
  np.testing.assert_allclose(votes, ref, rtol=2e-4)


def test_separable_clusters_are_perfect():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(5, 16)) * 4
  train_y = np.repeat(np.arange(5), 30)
  test_y = np.repeat(np.arange(5), 10)
  train = centers[train_y] + 0.3 * rng.normal(size=(150, 16))
  test = centers[test_y] + 0.3 * rng.normal(size=(50, 16))
  acc = knn.knn_accuracy(train, train_y, test, test_y, num_classes=5, k=20)
  assert acc == {"top1": 1.0, "top5": 1.0}
  # Shuffled labels: chance level, so the test can fail.
  wrong = knn.knn_accuracy(train, rng.permutation(train_y), test, test_y, num_classes=5, k=20)
  assert wrong["top1"] < 0.6


@pytest.mark.parametrize("m", [1, 7, 9])
def test_batching_invariance(m):
  rng = np.random.default_rng(2)
  train = rng.normal(size=(30, 8)).astype(np.float32)
  labels = rng.integers(0, 3, 30)
  test = rng.normal(size=(m, 8)).astype(np.float32)
  small = knn.knn_votes(train, labels, test, 3, k=5, batch_size=3)
  large = knn.knn_votes(train, labels, test, 3, k=5, batch_size=1024)
  assert small.shape == (m, 3)
  np.testing.assert_allclose(small, large, rtol=1e-6)


def test_k_larger_than_train_set_raises():
  train, labels, test = np.eye(3), np.arange(3), np.eye(3)
  with pytest.raises(ValueError, match="k=4"):
    knn.knn_classify(train, labels, test, 3, k=4)
  # k == N is allowed: every training sample votes.
  votes = knn.knn_votes(train, labels, test, 3, k=3, temperature=1.0)
  np.testing.assert_allclose(votes, np.where(np.eye(3) > 0, np.e, 1.0), rtol=1e-6)


def test_bad_labels_raise():
  with pytest.raises(ValueError, match="num_classes=2"):
    knn.knn_classify(np.eye(3), np.array([0, 1, 2]), np.eye(3), 2, k=1)


def test_topk_accuracy_by_hand():
  scores = np.array([[0.1, 0.5, 0.4],   # label 2: 2nd -> top1 miss
                     [0.9, 0.0, 0.1],   # label 0: hit
                     [0.2, 0.2, 0.6]])  # label 1: tie with 0 ranks after 0 -> 3rd
  labels = np.array([2, 0, 1])
  acc = knn.topk_accuracy(scores, labels, ks=(1, 2, 5))
  assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top5": 1.0}


def test_extract_features_pads_and_compiles_once():
  traces = []

  def encode(x):
    traces.append(x.shape)
    return {"pooled": x.mean(axis=(1, 2)), "sum": jnp.sum(x, axis=(1, 2, 3))}

  images = np.random.default_rng(3).uniform(size=(10, 4, 4, 3)).astype(np.float32)
  from_array = features.extract_features(encode, images, batch_size=4)
  from_iter = features.extract_features(encode, iter([images[:5], images[5:8], images[8:]]),
                                   batch_size=4)
  np.testing.assert_allclose(from_array["pooled"], images.mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(from_array["sum"], images.sum(axis=(1, 2, 3)), rtol=1e-5)
  for key in from_array:
    np.testing.assert_allclose(from_iter[key], from_array[key], rtol=1e-6)
  assert all(s == (4, 4, 4, 3) for s in traces)
  # One trace for all 6 batches of both calls (jax.jit caches by function): padding works.
  assert len(traces) == 1


def test_extract_features_array_output():
  images = np.arange(5 * 2 * 2 * 3, dtype=np.float32).reshape(5, 2, 2, 3)
  out = features.extract_features(lambda x: x.reshape(x.shape[0], -1), images, batch_size=2)
  assert isinstance(out, np.ndarray)
  np.testing.assert_array_equal(out, images.reshape(5, -1))
