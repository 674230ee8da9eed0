"""DetCon method wiring: online and target networks pool the same sampled ids of each view."""
from __future__ import annotations

import jax
import numpy as np

from ssl_jax import parallel, train
from ssl_jax.ops import mask_pooling
from tests.helpers import BlockSource, load_config


def test_online_and_target_pool_the_same_ids(monkeypatch):
  config = load_config("detcon_b", "test")
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  local = next(train.make_data_iterator(setup))
  batch = setup.device_batch(local)
  ts = setup.init_state(batch)
  calls = []
  original = mask_pooling.mask_pool

  def spy(features, grid_ids, sample_ids):
    jax.debug.callback(lambda g, s: calls.append((np.asarray(g), np.asarray(s))),
                       grid_ids, sample_ids, ordered=True)
    return original(features, grid_ids, sample_ids)

  monkeypatch.setattr(mask_pooling, "mask_pool", spy)
  loss_fn = jax.jit(lambda p, s: setup.method.loss_and_aux(p, s, batch, jax.random.PRNGKey(0),
                                                            jax.numpy.int32(0))[0])
  loss = loss_fn(ts["params"], ts["state"])
  jax.effects_barrier()
  assert np.isfinite(float(loss))
  # Order of calls: online view 1, online view 2, target view 1, target view 2.
  assert len(calls) == 4
  (g1, s1), (g2, s2), (tg1, ts1), (tg2, ts2) = calls
  np.testing.assert_array_equal(s1, ts1)
  np.testing.assert_array_equal(s2, ts2)
  np.testing.assert_array_equal(g1, tg1)  # same view, same mask grid for both networks
  assert s1.shape == (config.train.batch_size, config.method_args.num_samples)
  assert not np.array_equal(s1, s2) or not np.array_equal(g1, g2)
  for grid, sample in ((g1, s1), (g2, s2)):  # each view samples among its own grid's ids
    for b in range(grid.shape[0]):
      assert set(sample[b].tolist()) <= set(grid[b].ravel().tolist())
