"""The key queue shared by MoCo v2 and MimCo (`ops.queue`), against a NumPy queue."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import parallel, train
from ssl_jax.methods import base, moco
from ssl_jax.ops import queue as queue_lib
from tests.helpers import BlockSource, load_config


def _numpy_enqueue(queue, ptr, keys):
  """Reference: the official `_dequeue_and_enqueue` (rows [ptr, ptr + B) ← normalised keys)."""
  queue = queue.copy()
  b = keys.shape[0]
  queue[ptr:ptr + b] = keys / np.linalg.norm(keys, axis=1, keepdims=True)
  return queue, (ptr + b) % queue.shape[0]


@pytest.mark.parametrize("size,batch", [(12, 4), (4, 4), (6, 1)])
def test_enqueue_matches_numpy_over_a_full_cycle(size, batch):
  rng = np.random.default_rng(0)
  queue, ptr = queue_lib.init_queue(jax.random.PRNGKey(0), size, 3)
  np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-6)
  assert int(ptr) == 0 and ptr.dtype == jnp.int32
  ref_q, ref_p = np.asarray(queue), 0
  step = jax.jit(queue_lib.enqueue)
  for _ in range(size // batch + 2):  # past the end: the pointer wraps to 0
    keys = rng.normal(size=(batch, 3)).astype(np.float32) * rng.uniform(0.1, 9.0, (batch, 1))
    queue, ptr = step(queue, ptr, keys)
    ref_q, ref_p = _numpy_enqueue(ref_q, ref_p, keys)
    np.testing.assert_allclose(np.asarray(queue), ref_q, rtol=1e-6, atol=1e-7)
    assert int(ptr) == ref_p


def test_enqueue_writes_at_the_pointer_only():
  queue = jnp.arange(24, dtype=jnp.float32).reshape(8, 3) + 1.0
  keys = jnp.asarray([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]])
  new, ptr = queue_lib.enqueue(queue, jnp.int32(4), keys)
  np.testing.assert_allclose(np.asarray(new[4:6]), [[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]])
  np.testing.assert_array_equal(np.asarray(new[:4]), np.asarray(queue[:4]))
  np.testing.assert_array_equal(np.asarray(new[6:]), np.asarray(queue[6:]))
  assert int(ptr) == 6
  # bf16 queue keeps its dtype; a zero key stays zero instead of NaN.
  new, _ = queue_lib.enqueue(queue.astype(jnp.bfloat16), jnp.int32(0), jnp.zeros((2, 3)))
  assert new.dtype == jnp.bfloat16 and not np.any(np.asarray(new[:2], np.float32))


def test_enqueue_errors():
  queue = jnp.zeros((10, 3))
  with pytest.raises(ValueError, match="multiple"):
    queue_lib.enqueue(queue, jnp.int32(0), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="same D"):
    queue_lib.enqueue(queue, jnp.int32(0), jnp.ones((5, 2)))


def test_mocov2_step_enqueues_its_normalised_keys():
  """MoCo v2 uses the shared queue: after one step rows [ptr, ptr + B) hold its normalised keys
  (the target projections of view 2) and the pointer advanced; the rest is untouched."""
  config = load_config("mocov2", "test")
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  batch = setup.device_batch(next(train.make_data_iterator(setup)))
  method = setup.method
  ts = setup.init_state(batch)
  params, state = ts["params"], ts["state"]
  b = config.train.batch_size
  state = {**state, "queue_ptr": jnp.int32(2 * b)}
  rng = jax.random.PRNGKey(5)
  _, (new_state, _) = jax.jit(method.loss_and_aux)(params, state, batch, rng, jnp.int32(0))
  # The keys, rebuilt: the same augmented view 2 through the target network.
  projector, _ = moco._heads(config)  # pylint: disable=protected-access
  net = base.SiameseNet(backbone=base.make_backbone(config), projector=projector)

  @jax.jit
  def target_keys(target):
    x = base.augmented_views(rng, batch["image"], config.data.views)
    out, _ = base.apply_train(net, target["params"], target["batch_stats"], x[:, 1],
                              method=base.SiameseNet.project)
    return out["z"]

  keys = np.asarray(target_keys(state["target"]))
  keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
  queue = np.asarray(new_state["queue"])
  np.testing.assert_allclose(queue[2 * b:3 * b], keys, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.delete(queue, np.s_[2 * b:3 * b], axis=0),
                                np.delete(np.asarray(state["queue"]), np.s_[2 * b:3 * b], axis=0))
  assert int(new_state["queue_ptr"]) == 3 * b

