"""MaskCo: the loss against a NumPy InfoNCE with the same negative layout, the negative count,
the masked query, the network wiring, 1 vs 8 devices, stop-gradient, the momentum update, and
a fixed batch fitted with the loss rebuilt from the network outputs."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import config_lib, losses, parallel, train
from ssl_jax.data import augment
from ssl_jax.evaluate import linear
from ssl_jax.methods import base, maskco
from ssl_jax.ops.roi_align import roi_align
from tests.helpers import BlockSource, load_config

MEAN, STD = np.asarray(augment.IMAGENET_MEAN), np.asarray(augment.IMAGENET_STD)


# ------------------------------------------------------------------------------------------
# NumPy reference

def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(max(np.sum(x * x), 1e-12))


def np_logsumexp(v):
  v = np.asarray(v, np.float64)
  return v.max() + np.log(np.sum(np.exp(v - v.max())))


def np_maskco_loss(q, k, tau, group, inter=True, intra=False):
  """One query at a time: positive k[i, 0]; inter = boxes 1.. of the other images of i's group
  (consecutive images of the batch); intra = boxes 1.. of image i. Returns (loss, negatives)."""
  b, num_boxes, _ = k.shape
  total, counts = 0.0, set()
  for i in range(b):
    qi = np_normalize(q[i])
    logits = [qi @ np_normalize(k[i, 0]) / tau]
    start = (i // group) * group
    if inter:
      logits += [qi @ np_normalize(k[j, m]) / tau for j in range(start, start + group) if j != i
                 for m in range(1, num_boxes)]
    if intra:
      logits += [qi @ np_normalize(k[i, m]) / tau for m in range(1, num_boxes)]
    total += np_logsumexp(logits) - logits[0]
    counts.add(len(logits) - 1)
  assert len(counts) == 1
  return total / b, counts.pop()


def rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("b,num_boxes,group,inter,intra", [
    (4, 3, 2, True, False), (6, 5, 3, True, True), (4, 3, 4, True, False),
    (4, 4, 1, False, True), (1, 2, 1, False, True), (3, 2, 3, True, True), (4, 3, 2, False, True)])
def test_loss_matches_numpy(b, num_boxes, group, inter, intra):
  q, k = rand((b, 8), b), rand((b, num_boxes, 8), 10 + b)
  q[0] = 0.0  # a zero query stays finite: all its logits are 0
  want, count = np_maskco_loss(q, k, 0.2, group, inter, intra)
  got = losses.maskco_loss(jnp.asarray(q), jnp.asarray(k), 0.2, group, inter_negatives=inter,
                           intra_negatives=intra)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)
  assert count == losses.maskco_num_negatives(num_boxes, group, inter_negatives=inter,
                                              intra_negatives=intra)


@pytest.mark.parametrize("group,intra,negatives", [(32, False, 496), (32, True, 512),
                                                   (8, False, 112), (8, True, 128)])
def test_negative_count(group, intra, negatives):
  """With every feature equal, all logits tie: loss = log(1 + #negatives) = 16·(G − 1) (+16)."""
  k = jnp.ones((64, 17, 4))
  loss = losses.maskco_loss(k[:, 0], k, 0.2, group, intra_negatives=intra)
  assert float(loss) == pytest.approx(np.log(1 + negatives), rel=1e-6)
  assert losses.maskco_num_negatives(17, group, intra_negatives=intra) == negatives


def test_loss_gradient_is_finite_and_bad_layouts_are_refused():
  q, k = jnp.asarray(rand((4, 8), 0)), jnp.asarray(rand((4, 3, 8), 1))
  g = jax.grad(lambda q: losses.maskco_loss(q, k, 0.2, 2, intra_negatives=True))(q)
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  for kwargs, match in (({"group_size": 3}, "must divide"), ({"group_size": 1}, "group_size >= 2"),
                        ({"group_size": 2, "inter_negatives": False}, "enable")):
    with pytest.raises(ValueError, match=match):
      losses.maskco_loss(q, k, 0.2, **kwargs)
  with pytest.raises(ValueError, match="at least one negative"):
    losses.maskco_loss(q, k[:, :1], 0.2, 2)


# ------------------------------------------------------------------------------------------
# Config and network

@pytest.mark.parametrize("field,value,match", [
    ("method_args.mph_blocks", 5, "mph_blocks=5"),
    ("method_args.mask_fill", "grey", "mask_fill='grey'"),
    ("method_args.negatives_group_size", 3, "negatives_group_size=3 must divide"),
    ("method_args.negatives_group_size", 1, "need >= 2 images"),
    ("method_args.temperature", 0.0, "temperature=0.0"),
    ("data.num_boxes", 1, "num_boxes=1"),
    ("data.box_side", (0.0, 0.5), "box_side"),
    ("data.box_side", (0.6, 0.5), "box_side"),
    ("data.masks", "grid", "masks='grid'"),
    ("model", {"name": "vit_tiny", "patch_size": 8}, "needs a ResNet"),
])
def test_bad_fields_are_refused(field, value, match):
  config = load_config("maskco", "test")
  with config.unlocked():
    if "." in field:
      section, name = field.split(".")
      config[section][name] = value
    else:
      config[field] = config_lib.ConfigDict(value)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config, num_devices=1)


@pytest.mark.parametrize("arg", [None, "demo", "test", "plus_in", "wd=1e-4", "epochs=100"])
def test_variants_validate(arg):
  config_lib.validate(load_config("maskco", arg), num_devices=8 if arg == "test" else 1)


def test_negatives_switches_and_variants():
  config = load_config("maskco", "test")
  with config.unlocked():
    config.method_args.inter_negatives = False
  with pytest.raises(config_lib.ConfigError, match="both False"):
    config_lib.validate(config, num_devices=1)
  with config.unlocked():
    config.method_args.intra_negatives = True
    config.method_args.negatives_group_size = 1  # intra only (Table 6) needs no other images
  config_lib.validate(config, num_devices=1)
  paper = load_config("maskco", None)
  assert paper.method_args.intra_negatives is False and paper.optim.weight_decay == 1e-3
  assert load_config("maskco", "plus_in").method_args.intra_negatives is True
  assert load_config("maskco", "wd=1e-4").optim.weight_decay == 1e-4
  assert paper.train.num_epochs == 200 and paper.data.num_boxes == 17
  with pytest.raises(config_lib.ConfigError, match="unknown"):
    load_config("maskco", "plusin")


def test_network_is_backbone_mph_roialign_projector():
  """z = projector(mean of the 7×7 RoIAlign bins of MPH(C5)) at 1 / output_stride: the :test
  ResNet-18's CIFAR stem gives stride 8, not 32. The encoder is the plain backbone."""
  config = load_config("maskco", "test")
  net = maskco.make_net(config)
  assert net.backbone.output_stride == 8
  x = jnp.asarray(rand((2, 32, 32, 3), 0))
  boxes = jnp.asarray([[[2.0, 3.0, 14.0, 15.0], [10.0, 0.5, 30.0, 20.5]],
                       [[0.0, 0.0, 32.0, 32.0], [5.0, 17.0, 11.0, 23.0]]])
  variables = jax.jit(functools.partial(net.init, train=True))(jax.random.PRNGKey(0), x, boxes)
  p, s = variables["params"], variables["batch_stats"]
  assert set(p) == {"backbone", "mask_head", "projector"} and set(s) == {"backbone", "mask_head"}

  @jax.jit
  def method_and_manual(variables):
    out = net.apply(variables, x, boxes, train=False)
    c5 = net.backbone.apply({"params": p["backbone"], "batch_stats": s["backbone"]}, x,
                            train=False)["feature_map"]
    fmap = net.mask_head.apply({"params": p["mask_head"], "batch_stats": s["mask_head"]}, c5,
                               train=False)
    pooled = roi_align(fmap, boxes, 7, 1 / 8, sampling_ratio=2).mean(axis=(2, 3))
    z = net.projector.apply({"params": p["projector"]}, pooled.reshape(4, -1), train=False)
    return out, z.reshape(2, 2, -1)

  out, z = method_and_manual(variables)
  np.testing.assert_allclose(out["z"], z, rtol=1e-4, atol=1e-5)
  assert out["z"].shape == (2, 2, config.method_args.projector_dim)
  # ResNet-50 variants: stride 32 by default, 16 with a dilated conv5 (the head dilates too).
  r50 = load_config("maskco", None)
  assert maskco.make_net(r50).backbone.output_stride == 32
  with r50.unlocked():
    r50.model.replace_stride_with_dilation = (False, False, True)
  dilated = maskco.make_net(r50)
  assert dilated.backbone.output_stride == 16 and dilated.mask_head.dilation == 2
  with r50.unlocked():
    r50.method_args.mph_blocks = 0
  shapes = jax.eval_shape(functools.partial(maskco.make_net(r50).init, train=True),
                          jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 2, 4)))
  assert "mask_head" not in shapes["params"]


def test_mask_query_fills():
  x = jnp.full((2, 6, 5, 3), 0.7)
  boxes = jnp.asarray([[1.0, 1.4, 3.5, 4.6], [0.0, 0.0, 0.4, 0.4]])  # the 2nd covers no centre
  inside = np.zeros((2, 6, 5), bool)
  inside[0, 1:3, 1:5] = True  # row centres 1.5, 2.5 in [1, 3.5); cols 1.5 .. 4.5 in [1.4, 4.6)
  np.testing.assert_array_equal(maskco.box_pixels(boxes, 6, 5), inside)
  black = np.asarray(maskco.mask_query(x, boxes, "black"))
  assert np.all(black[inside] == 0) and np.all(black[~inside] == np.float32(0.7))
  mean = np.asarray(base.normalized_views(maskco.mask_query(x, boxes, "mean")))
  assert np.all(mean[inside] == 0) and not np.any(mean[~inside] == 0)


# ------------------------------------------------------------------------------------------
# The method in the trainer (one device unless stated)

@pytest.fixture(scope="module")
def setup():
  config = load_config("maskco", "test")
  with config.unlocked():
    config.train.total_steps = 100          # the lr stays near its peak for the steps below
    config.optim.lr_rule = "none"
    config.optim.base_lr = 0.05
  s = train.build(config, mesh=parallel.make_mesh(jax.devices()[:1]), source=BlockSource())
  local = next(train.make_data_iterator(s))
  ts = jax.device_get(s.init_state(s.device_batch(local)))
  return s, local, ts


RNG = jax.random.PRNGKey(7)


def augmented(config, images, rng=RNG):
  return np.asarray(jax.jit(lambda i: base.augmented_views(rng, i, config.data.views,
                                                           normalize=False))(images))


def np_inside(boxes, size):
  """bool [B, S, S]: pixel centres inside each (y0, x0, y1, x1) box, written out."""
  c = np.arange(size) + 0.5
  rows = (c[None] >= boxes[:, :1]) & (c[None] < boxes[:, 2:3])
  cols = (c[None] >= boxes[:, 1:2]) & (c[None] < boxes[:, 3:4])
  return rows[:, :, None] & cols[:, None, :]


def rebuilt_qk(setup_, params, state, local, rng=RNG):
  """q and k recomputed outside the method: NumPy masking and normalisation, then the network
  with the online variables (masked query view, masked box) and the momentum variables (key
  view, key boxes)."""
  config = setup_.config
  net = maskco.make_net(config)
  x = augmented(config, local["image"], rng)
  size = x.shape[2]
  x_q = np.where(np_inside(local["masked_box"], size)[..., None], 0.0, x[:, 0])
  x_q, x_k = (x_q - MEAN) / STD, (x[:, 1] - MEAN) / STD

  @jax.jit
  def forward(params, state, x_q, x_k):
    q, _ = net.apply({"params": params, "batch_stats": state["batch_stats"]}, x_q,
                     local["masked_box"][:, None], train=True, mutable=["batch_stats"])
    t = state["target"]
    k, _ = net.apply({"params": t["params"], "batch_stats": t["batch_stats"]}, x_k,
                     local["boxes"], train=True, mutable=["batch_stats"])
    return q["z"][:, 0], k["z"]

  q, k = forward(params, state, x_q.astype(np.float32), x_k.astype(np.float32))
  return np.asarray(q), np.asarray(k)


def method_loss(setup_, params, state, batch, rng=RNG):
  return float(jax.jit(lambda p, s, b: setup_.method.loss_and_aux(p, s, b, rng, 0)[0])(
      params, state, batch))


@pytest.mark.parametrize("mask", [True, False])
def test_query_masked_after_augmentation_before_normalisation(setup, monkeypatch, mask):
  """What reaches the normalisation: the augmented query with exactly the masked box's pixels
  (centre rule, computed here) at 0 and nothing else changed; the key view untouched. With
  `mask=False` (Table 5) the query is untouched too."""
  s, local, ts = setup
  seen = []
  original = base.normalized_views

  def spy(x):
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), x, ordered=True)
    return original(x)

  monkeypatch.setattr(base, "normalized_views", spy)
  config = s.config.copy_and_resolve_references()
  with config.unlocked():
    config.method_args.mask = mask
  method = maskco.make(config)
  loss = jax.jit(lambda p, st, b: method.loss_and_aux(p, st, b, RNG, 0)[0])(
      ts["params"], ts["state"], {k: local[k] for k in s.batch_spec})
  jax.effects_barrier()
  assert np.isfinite(float(loss)) and len(seen) == 2
  x = augmented(config, local["image"])
  inside = np_inside(local["masked_box"], x.shape[2])
  assert np.all(inside.sum(axis=(1, 2)) > 0)
  assert np.mean(x[:, 0][inside] != 0) > 0.9  # the augmented pixels there were not black
  query, key = seen
  np.testing.assert_array_equal(key, x[:, 1])
  if mask:
    assert np.all(query[inside] == 0.0)
    np.testing.assert_array_equal(query[~inside], x[:, 0][~inside])
  else:
    np.testing.assert_array_equal(query, x[:, 0])


def test_same_loss_on_1_and_8_devices(setup):
  """Groups of 8 consecutive images of the global batch (16) give the negatives: the same loss
  on one device and on 8 (2 images each, so a group spans 4 devices), equal to the NumPy
  reference on the global order and unequal to per-device groups of 2."""
  s, local, ts = setup
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = parallel.make_mesh(devices)
    batch = parallel.global_batch({k: local[k] for k in s.batch_spec}, mesh)
    params, state = jax.device_put((ts["params"], ts["state"]), parallel.replicated(mesh))
    results.append(method_loss(s, params, state, batch))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5)
  q, k = rebuilt_qk(s, ts["params"], ts["state"], local)
  want, count = np_maskco_loss(q, k, 0.2, 8)
  assert count == 16 * 7
  np.testing.assert_allclose(results[1], want, rtol=2e-4)
  per_device, _ = np_maskco_loss(q, k, 0.2, 2)
  assert abs(per_device - want) > 1e-2


def test_no_gradient_reaches_the_momentum_network(setup):
  s, local, ts = setup
  batch = {k: local[k] for k in s.batch_spec}

  def loss(params, target_params):
    state = {**ts["state"], "target": {**ts["state"]["target"], "params": target_params}}
    return s.method.loss_and_aux(params, state, batch, RNG, 0)[0]

  g_online, g_target = jax.jit(jax.grad(loss, argnums=(0, 1)))(ts["params"],
                                                               ts["state"]["target"]["params"])
  assert set(g_target) == {"backbone", "mask_head", "projector"}
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_target))
  for part in ("backbone", "mask_head", "projector"):
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(g_online[part])) > 0, part


def test_fits_a_fixed_batch_and_updates_the_momentum_network(setup):
  """The loss at a fixed key equals the NumPy loss rebuilt from the network outputs, before and
  after training; 30 steps on one batch lower it; after a step the momentum network is
  m·old + (1 − m)·new online for backbone, MPH and projector, and its BN statistics come from
  its own pass."""
  s, local, ts0 = setup
  m = s.config.method_args.momentum
  batch = s.device_batch(local)
  before = method_loss(s, ts0["params"], ts0["state"], batch)
  q, k = rebuilt_qk(s, ts0["params"], ts0["state"], local)
  np.testing.assert_allclose(before, np_maskco_loss(q, k, 0.2, 8)[0], rtol=2e-4)

  ts = s.init_state(batch)
  ts, metrics = s.step(ts, batch)
  ts1 = jax.device_get(ts)
  assert bool(metrics["finite"]) and float(metrics["num_negatives"]) == 112
  want = jax.tree.map(lambda old, new: m * old + (1 - m) * new,
                      ts0["state"]["target"]["params"], ts1["params"])
  assert set(ts1["state"]["target"]["params"]) == {"backbone", "mask_head", "projector"}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ts1["state"]["target"]["params"], want)
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(ts1["params"]),
                                                 jax.tree.leaves(ts0["params"]))]
  assert max(moved) > 1e-4  # the online network did move, so the check above has teeth
  t_stats, o_stats = ts1["state"]["target"]["batch_stats"], ts1["state"]["batch_stats"]
  assert not np.allclose(t_stats["mask_head"]["block_0"]["bn1"]["mean"],
                         o_stats["mask_head"]["block_0"]["bn1"]["mean"])

  for _ in range(29):
    ts, metrics = s.step(ts, batch)
    assert bool(metrics["finite"])
  ts = jax.device_get(ts)
  after = method_loss(s, ts["params"], ts["state"], batch)
  assert after < before - 0.05, (before, after)
  q, k = rebuilt_qk(s, ts["params"], ts["state"], local)
  np.testing.assert_allclose(after, np_maskco_loss(q, k, 0.2, 8)[0], rtol=2e-4)
  feats = s.method.encode(ts["params"], ts["state"], np.asarray(local["image"][:, 0]))
  assert feats.shape == (16, 64) and np.all(np.isfinite(feats))
  # The encoder is the plain ResNet: the multi-layer probe (Table 7) gets conv1…conv5.
  layers = s.predict_fn(ts, np.asarray(local["image"][:4, 1]), linear.multilayer_features)
  assert sorted(layers) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
  assert set(s.method.encoder(ts["params"], ts["state"])["params"]) == set(ts["params"]["backbone"])
