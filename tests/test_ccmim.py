"""ccMIM: Eq. 7 and the official NCE against NumPy, stop-gradients checked with jax.grad, the mask is
importance sampling on the current encoder's attention, the loss is rebuilt from the network
outputs, the method fits a fixed batch, and the workdir's encoder is a plain ViT."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import config_lib, losses, parallel, registry, train, weights
from ssl_jax.methods import base, ccmim
from ssl_jax.models import vit
from ssl_jax.ops import patches
from tests.helpers import load_config
from tests.test_mae import _batch, _mae_loss_np

B = 8


def _config(arg="test", **method_args):
  config = load_config("ccmim", arg)
  with config.unlocked():
    config.train.batch_size = B
    config.train.total_steps = 10
    config.method_args.update(method_args)
  return config


# ---------------------------------------------------------------- losses against NumPy


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _official_nce_np(h_vis, h_mask, tau):
  """models_ccmim.forward_alignment_loss on one process holding the whole batch."""
  logits = _normalize(h_vis) @ _normalize(h_mask).T / tau
  logits -= logits.max(1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -np.mean(np.diag(log_prob)) * 2 * tau


def _eq7_np(h_vis, h_mask, tau):
  """Eq. 7 written term by term."""
  v, m = _normalize(h_vis), _normalize(h_mask)
  n = len(v)
  total = 0.0
  for i in range(n):
    positive = np.exp(m[i] @ v[i] / tau)
    denominator = sum(np.exp(v[i] @ v[j] / tau) for j in range(n) if j != i)
    denominator += sum(np.exp(m[i] @ v[j] / tau) for j in range(n))
    total += -np.log(positive / denominator)
  return total / n


def _align_np(p_vis, h_mask):
  return np.mean(1.0 - np.sum(_normalize(p_vis) * _normalize(h_mask), axis=1))


@pytest.mark.parametrize("n, d, tau", [(6, 5, 0.5), (1, 3, 0.5), (4, 8, 0.2)])
def test_nce_forms_match_numpy(n, d, tau):
  rng = np.random.default_rng(n * d)
  h_vis = rng.normal(size=(n, d)).astype(np.float32) * 3
  h_mask = rng.normal(size=(n, d)).astype(np.float32)
  np.testing.assert_allclose(losses.ccmim_nce(h_vis, h_mask, tau), _eq7_np(h_vis, h_mask, tau),
                             rtol=1e-5, atol=1e-6)
  config = _config(temperature=tau)
  out = {"h_vis": jnp.asarray(h_vis), "h_mask": jnp.asarray(h_mask), "p_vis": jnp.asarray(h_vis)}
  np.testing.assert_allclose(ccmim.contrast_loss(config, out), _official_nce_np(h_vis, h_mask, tau),
                             rtol=1e-5, atol=1e-6)
  config = _config(contrast="align")
  np.testing.assert_allclose(ccmim.contrast_loss(config, out), _align_np(h_vis, h_mask),
                             rtol=1e-5, atol=1e-6)
  if n == 1:  # one image: Eq. 7's denominator is the positive alone
    assert float(losses.ccmim_nce(h_vis, h_mask, tau)) == pytest.approx(0.0, abs=1e-6)


def test_eq7_gradient_is_the_numpy_gradient():
  """d Eq.7 / d h_vis by jax.grad equals central differences of the NumPy formula."""
  rng = np.random.default_rng(0)
  h_vis, h_mask = rng.normal(size=(2, 4, 3))
  grad = np.asarray(jax.grad(losses.ccmim_nce)(jnp.asarray(h_vis, jnp.float32),
                                               jnp.asarray(h_mask, jnp.float32), 0.5))
  eps, numeric = 1e-5, np.zeros_like(h_vis)
  for idx in np.ndindex(h_vis.shape):
    up, down = h_vis.copy(), h_vis.copy()
    up[idx] += eps
    down[idx] -= eps
    numeric[idx] = (_eq7_np(up, h_mask, 0.5) - _eq7_np(down, h_mask, 0.5)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_ccmim_nce_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"h_vis \(2, 3\) and h_mask \(3, 3\)"):
    losses.ccmim_nce(jnp.zeros((2, 3)), jnp.zeros((3, 3)), 0.5)


# ---------------------------------------------------------------- the method


def _setup(config, seed=0):
  method = registry.get_method("ccmim").make(config)
  forward, _, _ = ccmim.make_forward(config)
  batch = _batch(seed)
  params, state = jax.jit(method.init)(jax.random.PRNGKey(seed), batch)
  return method, forward, batch, params, state


def _probe_fn(config, method, forward):
  """jit(params, state, batch, rng, d_vis, d_mask) -> loss, metrics, d loss/d d_vis,
  d loss/d d_mask, outputs: d_vis / d_mask are added to the visible / masked set's encoder
  tokens inside the method's own loss_and_aux."""
  n = (config.data.image_size // config.model.patch_size) ** 2
  k_vis = patches.num_visible(n, config.method_args.mask_ratio)

  def offsets(d_vis, d_mask):
    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      keep = kwargs.get("keep_indices")
      if isinstance(context.module, vit.VisionTransformer) and keep is not None:
        delta = d_vis if keep.shape[1] == k_vis else d_mask
        out = {**out, "tokens": out["tokens"] + delta}
      return out
    return nn.intercept_methods(add)

  @jax.jit
  def probe(params, state, batch, rng, d_vis, d_mask):
    def f(d_vis, d_mask):
      with offsets(d_vis, d_mask):
        loss, (_, metrics) = method.loss_and_aux(params, state, batch, rng, 0)
      return loss, metrics
    (loss, metrics), (g_vis, g_mask) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        d_vis, d_mask)
    return loss, metrics, g_vis, g_mask, forward(params, state, batch, rng)[0]

  d = config.model.embed_dim
  zeros = (jnp.zeros((B, 1 + k_vis, d)), jnp.zeros((B, 1 + n - k_vis, d)))
  return probe, zeros


CASES = {
    "code": {},
    "eq7_projector": {"contrast": "eq7", "projector": True},
    "align_paper_direction": {"contrast": "align", "importance": "paper"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_rebuilt_and_masked_branch_gets_no_gradient(case):
  """For each contrast form: the loss equals NumPy's L_recons + λ·L_contrast on the outputs; the
  mask is importance sampling on the attention of the *same* params, read independently from the
  ViT; the contrasted CLS tokens are the ViT's on each set; no gradient reaches the masked set's
  encoding (jax.grad through loss_and_aux) while the visible set's CLS and patches get one."""
  config = _config(**CASES[case])
  method, forward, batch, params, state = _setup(config)
  probe, zeros = _probe_fn(config, method, forward)
  rng = jax.random.PRNGKey(11)
  loss, metrics, g_vis, g_mask, out = probe(params, state, batch, rng, *zeros)
  a, p = config.method_args, config.model.patch_size
  n = (config.data.image_size // p) ** 2

  # Stop-gradient on the masked branch; the visible branch is trained by both losses.
  assert np.all(np.asarray(g_mask) == 0)
  assert np.abs(np.asarray(g_vis)[:, 0]).sum(-1).min() > 0      # CLS: the contrast
  assert np.abs(np.asarray(g_vis)[:, 1:]).sum() > 0             # patches: the decoder

  # The mask is importance sampling on the attention of these params (read independently).
  _, k_mask, _ = jax.random.split(rng, 3)
  direction = {"code": "cls_key", "paper": "cls_query"}[a.importance]
  full = method.backbone.apply({"params": params["backbone"]}, out["x"], train=False,
                               return_attention=direction)
  attn = np.asarray(full["cls_attention"], np.float64)            # [depth, B, heads, N]
  importance = attn.mean(axis=2).sum(axis=0)
  np.testing.assert_allclose(out["importance"], importance, rtol=1e-5, atol=1e-7)
  want = patches.importance_sampling(k_mask, jnp.asarray(importance, jnp.float32), a.mask_ratio)
  np.testing.assert_array_equal(out["masking"].keep_indices, want.keep_indices)
  np.testing.assert_array_equal(out["masking"].mask, want.mask)
  assert np.asarray(out["masking"].mask).sum(1).tolist() == [n - n // 4] * B
  # The probe features are the full unmasked image's pooled output.
  np.testing.assert_allclose(metrics["features"], full["pooled"], rtol=1e-5, atol=1e-6)

  # The contrasted vectors: each set's CLS token (through the projector when on).
  cls = {name: method.backbone.apply({"params": params["backbone"]}, out["x"], train=False,
                                     keep_indices=getattr(out["masking"], idx))["tokens"][:, 0]
         for name, idx in (("vis", "keep_indices"), ("mask", "mask_indices"))}
  if not a.projector:
    np.testing.assert_allclose(out["h_vis"], cls["vis"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["h_mask"], cls["mask"], rtol=1e-5, atol=1e-6)
  else:
    assert out["h_vis"].shape == (B, a.projector_dim)

  # The loss from the outputs, in NumPy.
  mask = np.asarray(out["masking"].mask, np.float64)
  rec = _mae_loss_np(out["pred"], out["x"], mask, p)
  if a.contrast == "code":
    contrast = _official_nce_np(out["h_vis"], out["h_mask"], a.temperature)
  elif a.contrast == "eq7":
    contrast = _eq7_np(out["h_vis"], out["h_mask"], a.temperature)
  else:
    contrast = _align_np(out["p_vis"], out["h_mask"])
  np.testing.assert_allclose(float(loss), rec + a.contrast_weight * contrast, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["reconstruction"]), rec, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["contrast"]), contrast, rtol=1e-5)
  ratio = [importance[b][mask[b] > 0].mean() / importance[b].mean() for b in range(B)]
  np.testing.assert_allclose(float(metrics["masked_importance_ratio"]), np.mean(ratio),
                             rtol=1e-5)


def test_importance_forward_carries_no_gradient():
  """The importance scores and the probe features (both from the full-sequence forward) have zero
  gradient with respect to every parameter."""
  config = _config()
  _, forward, batch, params, state = _setup(config)

  @jax.jit
  def grads(params):
    def f(params):
      out = forward(params, state, batch, jax.random.PRNGKey(2))[0]
      return jnp.sum(out["importance"] ** 2) + jnp.sum(out["features"] ** 2)
    return jax.grad(f)(params)

  g = grads(params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))


@pytest.mark.parametrize("dividing", ["importance", "random", "block"])
def test_other_dividing_strategies(dividing):
  """Table 5's ablation: every strategy hides the same number of patches; "importance" is the
  noise-free order of the same attention; random/block skip the importance forward and probe
  the visible set."""
  config = _config(dividing=dividing)
  method, forward, batch, params, state = _setup(config)
  out = jax.jit(forward)(params, state, batch, jax.random.PRNGKey(4))[0]
  n = (config.data.image_size // config.model.patch_size) ** 2
  mask = np.asarray(out["masking"].mask)
  assert mask.sum(1).tolist() == [n - n // 4] * B
  if dividing == "importance":
    attn = method.backbone.apply({"params": params["backbone"]}, out["x"], train=False,
                                 return_attention="cls_key")["cls_attention"]
    importance = np.asarray(attn, np.float64).mean(2).sum(0)
    visible = ~mask
    # The visible patches are the least important ones.
    for b in range(B):
      assert importance[b][visible[b]].max() <= importance[b][~visible[b]].min() + 1e-7
  else:
    assert out["importance"] is None


def test_fits_a_fixed_batch():
  """100 AdamW steps on one batch and one key: the total loss falls below 75 % of its start and
  the contrast term falls too."""
  config = _config()
  method, _, batch, params, state = _setup(config)
  tx = optax.adamw(3e-3, b2=0.95)
  rng = jax.random.PRNGKey(5)

  @jax.jit
  def step(params, opt):
    (loss, (_, metrics)), grads = jax.value_and_grad(method.loss_and_aux, has_aux=True)(
        params, state, batch, rng, 0)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, metrics["contrast"]

  opt, history, contrast = tx.init(params), [], []
  for _ in range(100):
    params, opt, value, c = step(params, opt)
    history.append(float(value))
    contrast.append(float(c))
  assert history[-1] < 0.75 * history[0], history[::10]
  assert contrast[-1] < contrast[0], contrast[::10]


def test_configs_and_validation():
  c = load_config("ccmim", None)
  a = c.method_args
  assert (a.dividing, a.importance, a.contrast, a.temperature, a.contrast_weight, a.projector) == (
      "importance_sampling", "code", "code", 0.5, 0.1, False)
  assert (a.decoder_dim, a.decoder_depth, a.decoder_heads, c.train.batch_size) == (512, 8, 16, 4096)
  assert (c.optim.base_lr, c.optim.b2, c.optim.weight_decay, c.data.views) == (
      1.5e-4, 0.95, 0.05, "mae")
  p = load_config("ccmim", "paper")
  assert (p.method_args.contrast_weight, p.method_args.decoder_depth, p.train.batch_size,
          p.method_args.contrast, p.method_args.projector, p.method_args.importance) == (
              0.2, 2, 1024, "eq7", True, "paper")
  for field, value, message in (("dividing", "grid", "dividing='grid' must be one of"),
                                ("importance", "x", "importance='x' must be one of"),
                                ("contrast", "simclr", "contrast='simclr' must be one of"),
                                ("temperature", 0.0, "temperature=0.0 must be > 0"),
                                ("contrast_weight", -1.0, "contrast_weight=-1.0 must be >= 0")):
    with pytest.raises(config_lib.ConfigError, match=f"config.method_args.{message}"):
      config_lib.validate(_config(**{field: value}), num_devices=1)
  for arg in (None, "demo", "test", "paper", "demo,paper", "test,paper", "epochs=300"):
    config_lib.validate(load_config("ccmim", arg), num_devices=8 if arg == "test" else 1)


def test_workdir_encoder_is_a_plain_vit(tmp_path):
  workdir = str(tmp_path / "ccmim")
  config = load_config("ccmim", "test")
  with config.unlocked():
    config.train.total_steps = 2
  train.run(config, workdir, mesh=parallel.make_mesh(jax.devices()[:1]))
  _, variables = weights.workdir_encoder(workdir)
  backbone = base.make_backbone(config)
  fresh = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
  assert set(variables) == {"params"}
  weights.check_fits(variables, {"params": fresh["params"]}, "ccMIM workdir encoder")
  with config.unlocked():
    config.model = ml_collections.ConfigDict({"name": "resnet18"})
  with pytest.raises(ValueError, match="needs a ViT backbone"):
    ccmim.validate(config)
