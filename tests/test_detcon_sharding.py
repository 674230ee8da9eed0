"""DetCon-B's step on an 8-device mesh, read through a spy on `losses.detcon_loss`:

- the loss is the global one: it equals the NumPy reference on the concatenated batch, and a loss
  with only each device's own ROIs as negatives (a per-shard loss averaged) is measurably
  different;
- `detcon_loss` receives the online predictions of both views and the target projections of both
  views, in the order that contrasts each view's predictions with the other view's targets;
- each view draws its ids among its own grid's ids, independently of the other view.

One build and one compile of the loss for the whole file (views without the random colour ops,
so the test can recompute the networks' outputs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import losses, parallel, train
from ssl_jax.methods import base, byol, detcon
from ssl_jax.ops import mask_pooling
from tests.helpers import BlockSource, load_config
from tests.test_losses import np_detcon

NUM_DEVICES = 8


def _deterministic_views(rng, images, recipe_name, *, normalize=True):
  """`base.augmented_views` without the random colour ops."""
  del rng, recipe_name
  x = images.astype(jnp.float32) / 255.0
  return base.normalized_views(x) if normalize else x


@functools.lru_cache(maxsize=None)
def _run():
  """One DetCon-B loss on the 8-device mesh; returns (setup, host batch, host state, loss,
  detcon_loss's arguments as NumPy arrays)."""
  config = load_config("detcon_b", "test")
  setup = train.build(config, mesh=parallel.make_mesh(jax.devices()[:NUM_DEVICES]),
                      source=BlockSource())
  local = next(train.make_data_iterator(setup))
  batch = setup.device_batch(local)
  assert len(batch["image"].sharding.device_set) == NUM_DEVICES
  ts = setup.init_state(batch)
  # A target network that differs from the online one (at init it is a copy, whose projections
  # equal the online ones), so that online projections passed as targets would show.
  target = ts["state"]["target"]
  target = {**target, "params": jax.tree.map(lambda t: t * 1.5 + 0.01, target["params"])}
  ts = {**ts, "state": {**ts["state"], "target": target}}
  calls = []
  original_views, original_loss = base.augmented_views, losses.detcon_loss

  def spy(*args, **kwargs):
    jax.debug.callback(lambda *a: calls.append([np.asarray(x) for x in a]), *args)
    return original_loss(*args, **kwargs)

  base.augmented_views, losses.detcon_loss = _deterministic_views, spy
  try:
    loss_fn = jax.jit(lambda p, s, b: setup.method.loss_and_aux(
        p, s, b, jax.random.PRNGKey(7), jnp.int32(0))[0])
    loss = float(loss_fn(ts["params"], ts["state"], batch))
    jax.effects_barrier()
  finally:
    base.augmented_views, losses.detcon_loss = original_views, original_loss
  assert len(calls) == 1, len(calls)
  return setup, local, jax.device_get(ts), loss, calls[0]


def test_negatives_are_the_global_batch():
  """Ours = NumPy reference over the whole (concatenated) batch; the mean of per-device losses,
  each with only its own 2 images' ROIs as negatives, differs."""
  setup, local, _, loss, args = _run()
  tau = setup.config.method_args.temperature
  np.testing.assert_allclose(loss, np_detcon(*args, tau), rtol=1e-4, atol=1e-5)
  b = local["image"].shape[0]
  per = b // NUM_DEVICES
  local_only = np.mean([np_detcon(*(a[i:i + per] for a in args), tau)
                        for i in range(0, b, per)])
  assert abs(local_only - loss) > 0.05 * abs(loss), (local_only, loss)


def _apply(net, variables, x, masks, ids, predict):
  out, _ = net.apply(variables, x, masks, ids, train=True, predict=predict,
                     mutable=["batch_stats"])
  return np.asarray(out["p"] if predict else out["z"])


def test_predictions_of_one_view_meet_targets_of_the_other():
  """The spied arguments are (online p of view 1, of view 2, target z of view 1, of view 2, ids
  of view 1, 2, 1, 2), recomputed here per view from the networks: `detcon_loss` contrasts
  pred1 with target2 and pred2 with target1 (tests/test_losses.py), so each view's predictions
  meet the other view's targets, and never the online projections or the same view's."""
  setup, local, ts, _, args = _run()
  a, config = setup.config.method_args, setup.config
  pred1, pred2, target1, target2, pind1, pind2, tind1, tind2 = args
  np.testing.assert_array_equal(tind1, pind1)
  np.testing.assert_array_equal(tind2, pind2)
  net = detcon.DetConNet(backbone=setup.method.backbone,
                         projector=byol.byol_mlp(a.projector_hidden, a.projector_dim, jnp.float32),
                         predictor=byol.byol_mlp(a.predictor_hidden, a.projector_dim, jnp.float32),
                         num_ids=config.data.max_segments)
  x = np.asarray(_deterministic_views(None, jnp.asarray(local["image"]), None))
  masks = np.asarray(local["masks"]).astype(np.int32)
  online = {"params": ts["params"], "batch_stats": ts["state"]["batch_stats"]}
  target = ts["state"]["target"]
  ids = (pind1, pind2)
  for v, (pred, tgt) in enumerate(((pred1, target1), (pred2, target2))):
    want_p = _apply(net, online, x[:, v], masks[:, v], ids[v], predict=True)
    want_z = _apply(net, target, x[:, v], masks[:, v], ids[v], predict=False)
    np.testing.assert_allclose(pred, want_p, rtol=1e-4, atol=1e-5, err_msg=f"view {v + 1}")
    np.testing.assert_allclose(tgt, want_z, rtol=1e-4, atol=1e-5, err_msg=f"view {v + 1}")
  # The four are different arrays (a swap above would not pass by coincidence).
  assert not np.allclose(want_p, want_z, atol=1e-3)
  assert not np.allclose(target1, target2, atol=1e-3)


def test_views_sample_their_own_ids_independently():
  """Each view's ids are drawn among the ids of its own feature grid, and not among the ids of
  both views: over the batch, some id drawn for view 1 is absent from view 2's grid."""
  setup, local, ts, _, args = _run()
  pind1, pind2 = args[4], args[5]
  variables = {"params": ts["params"]["backbone"],
               "batch_stats": ts["state"]["batch_stats"]["backbone"]}
  x = jnp.zeros((1,) + local["image"].shape[2:], jnp.float32)
  g = jax.eval_shape(lambda v: setup.method.backbone.apply(v, x, train=False),
                     variables)["feature_map"].shape[1]
  masks = jnp.asarray(np.asarray(local["masks"]).astype(np.int32))
  grids = [np.asarray(mask_pooling.masks_to_grid(masks[:, v], g, setup.config.data.max_segments))
           for v in range(2)]
  absent = 0
  for b in range(pind1.shape[0]):
    own = [set(grids[v][b].ravel().tolist()) - {-1} for v in range(2)]
    assert set(pind1[b].tolist()) <= own[0], (b, pind1[b], own[0])
    assert set(pind2[b].tolist()) <= own[1], (b, pind2[b], own[1])
    absent += len(set(pind1[b].tolist()) - own[1])
  assert absent > 0, "every id drawn for view 1 is in view 2's grid: not sampled per view"
