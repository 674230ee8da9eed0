"""ViT inputs of the masked methods: chunked keep_indices, token_mask + mask_token, attention."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.models import vit
from ssl_jax.ops import patches

KEY = jax.random.key(0, impl="rbg")
TINY_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 32 px -> 16 patches


def _images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _model(**kw):
  model = models.get_backbone("vit_tiny", **{**TINY_VIT, **kw})
  variables = jax.jit(functools.partial(model.init, train=False))(KEY, _images())
  return model, variables


@functools.lru_cache(maxsize=None)
def _apply(model, **static):
  return jax.jit(functools.partial(model.apply, train=False, **static))


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_single_identity_chunk_equals_plain_forward(pool):
  model, variables = _model(pool=pool)
  x = _images()
  full = _apply(model)(variables, x)
  idx, dropped = patches.chunk_indices(None, 2, 16, 1, shuffle=False)
  assert dropped == 0
  chunked = _apply(model)(variables, x, keep_indices=idx)
  assert chunked["pooled"].shape == (2, 1, 32) and chunked["tokens"].shape == (2, 1, 17, 32)
  assert "feature_map" not in chunked
  _close(chunked["pooled"][:, 0], full["pooled"])
  _close(chunked["tokens"][:, 0], full["tokens"])


def test_chunks_equal_separate_forwards_and_do_not_attend_to_each_other():
  model, variables = _model()
  x = _images(seed=1)
  idx, _ = patches.chunk_indices(KEY, 2, 16, 4)
  out = _apply(model)(variables, x, keep_indices=idx)
  assert out["pooled"].shape == (2, 4, 32) and out["tokens"].shape == (2, 4, 5, 32)
  # Each chunk is its own sequence: the same as feeding that chunk alone as [B, K].
  for c in range(4):
    alone = _apply(model)(variables, x, keep_indices=idx[:, c])
    _close(out["tokens"][:, c], alone["tokens"])
    _close(out["pooled"][:, c], alone["pooled"])
  # Perturb one patch of chunk 0 (example 0): only chunk 0 of example 0 changes.
  patch = int(idx[0, 0, 0])
  row, col = divmod(patch, 4)
  y = x.at[0, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8].add(3.0)
  out2 = _apply(model)(variables, y, keep_indices=idx)
  assert np.abs(np.asarray(out2["tokens"][0, 0] - out["tokens"][0, 0])).max() > 1e-2
  np.testing.assert_array_equal(out2["tokens"][0, 1:], out["tokens"][0, 1:])
  np.testing.assert_array_equal(out2["tokens"][1], out["tokens"][1])


def test_chunked_attention_shape_and_values():
  model, variables = _model()
  x = _images(seed=2)
  idx, _ = patches.chunk_indices(KEY, 2, 16, 2)
  out = _apply(model, return_attention="cls_key")(variables, x, keep_indices=idx)
  att = out["cls_attention"]
  assert att.shape == (2, 2, 2, 2, 8)  # [depth, B, n, heads, K]
  alone = _apply(model, return_attention="cls_key")(variables, x, keep_indices=idx[:, 1])
  _close(att[:, :, 1], alone["cls_attention"])


def test_keep_indices_bad_shape():
  model, variables = _model()
  with pytest.raises(ValueError, match="keep_indices must be"):
    model.apply(variables, _images(), train=False, keep_indices=jnp.zeros((16,), jnp.int32))


# ---------------------------------------------------------------- token_mask (SimMIM)


def test_all_false_token_mask_equals_plain_forward():
  model, variables = _model()
  x = _images(seed=3)
  full = _apply(model)(variables, x)
  masked = _apply(model)(variables, x, token_mask=jnp.zeros((2, 16), bool),
                         mask_token=jnp.ones((32,)))
  for k in ("pooled", "tokens", "feature_map"):
    np.testing.assert_array_equal(masked[k], full[k])


def _layer_norm(x, scale, bias, eps=1e-6):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def test_masked_positions_see_the_mask_token_before_positions():
  # No blocks: token i = LN(e_i + pos_i) with e_i = mask_token where masked (SimMIM's order:
  # replace, then add the position embedding), the patch embedding elsewhere.
  model, variables = _model(depth=0)
  x = _images(seed=4)
  rng = np.random.default_rng(0)
  token_mask = rng.uniform(size=(2, 16)) < 0.5
  mask_token = rng.normal(size=(32,)).astype(np.float32)
  out = _apply(model)(variables, x, token_mask=jnp.asarray(token_mask),
                      mask_token=jnp.asarray(mask_token))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  embed = np.asarray(vit.patchify(x, 8), np.float64) @ p["patch_embed"]["kernel"].reshape(-1, 32)
  embed = embed + p["patch_embed"]["bias"]
  embed = np.where(token_mask[:, :, None], mask_token, embed)
  ref = _layer_norm(embed + p["pos_embed"][:, 1:], p["norm"]["scale"], p["norm"]["bias"])
  _close(out["tokens"][:, 1:], ref, 1e-4)
  # Masked positions do not depend on the image at all.
  out2 = _apply(model)(variables, _images(seed=5), token_mask=jnp.asarray(token_mask),
                       mask_token=jnp.asarray(mask_token))
  np.testing.assert_array_equal(np.asarray(out2["tokens"][:, 1:])[token_mask],
                                np.asarray(out["tokens"][:, 1:])[token_mask])
  assert not np.allclose(np.asarray(out2["tokens"][:, 1:])[~token_mask],
                         np.asarray(out["tokens"][:, 1:])[~token_mask])


def test_mask_token_gets_gradient_only_through_masked_positions():
  model, variables = _model()
  x = _images(seed=6)

  def loss(token, token_mask):
    return jnp.sum(model.apply(variables, x, train=False, token_mask=token_mask,
                               mask_token=token)["pooled"])

  grad = jax.jit(jax.grad(loss))
  mask = jnp.zeros((2, 16), bool).at[:, 3].set(True)
  assert np.abs(np.asarray(grad(jnp.zeros(32), mask))).max() > 0
  np.testing.assert_array_equal(grad(jnp.zeros(32), jnp.zeros((2, 16), bool)), 0.0)


def test_token_mask_errors():
  model, variables = _model()
  with pytest.raises(ValueError, match="token_mask and mask_token go together"):
    model.apply(variables, _images(), train=False, token_mask=jnp.zeros((2, 16), bool))
  with pytest.raises(ValueError, match="token_mask must be"):
    model.apply(variables, _images(), train=False, token_mask=jnp.zeros((2, 15), bool),
                mask_token=jnp.zeros((32,)))


# ---------------------------------------------------------------- attention directions


def test_attention_directions_match_numpy():
  model, variables = _model()
  x = _images(seed=7)
  query = _apply(model, return_attention="cls_query")(variables, x)["cls_attention"]
  np.testing.assert_array_equal(_apply(model, return_attention=True)(variables, x)["cls_attention"],
                                query)
  key = _apply(model, return_attention="cls_key")(variables, x)["cls_attention"]
  assert key.shape == query.shape == (2, 2, 2, 16)

  # NumPy block 0 (attention map [B, heads, 1+N, 1+N], softmax over keys).
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  tok = np.asarray(vit.patchify(x, 8), np.float64) @ p["patch_embed"]["kernel"].reshape(-1, 32)
  tok = tok + p["patch_embed"]["bias"] + p["pos_embed"][:, 1:]
  cls = np.broadcast_to(p["cls_token"] + p["pos_embed"][:, :1], (2, 1, 32))
  tok = np.concatenate([cls, tok], axis=1)
  blk = p["blocks_0"]
  h = _layer_norm(tok, blk["norm1"]["scale"], blk["norm1"]["bias"])
  qkv = (h @ blk["attn"]["qkv"]["kernel"] + blk["attn"]["qkv"]["bias"]).reshape(2, 17, 3, 2, 16)
  logits = np.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) / 4.0
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  _close(query[0], attn[:, :, 0, 1:], 1e-4)
  _close(key[0], attn[:, :, 1:, 0], 1e-4)  # official ccMIM: avg_attn[:, 1:, 0] per head
  # Official importance: sum over blocks of the head mean.
  _close(patches.attention_importance(key), np.asarray(key).mean(2).sum(0), 1e-6)


def test_return_attention_rejects_unknown_direction():
  model, variables = _model()
  with pytest.raises(ValueError, match="return_attention='patch'"):
    model.apply(variables, _images(), train=False, return_attention="patch")


def test_bfloat16_compute_with_chunks_and_mask_token():
  # Shapes and dtypes only (eval_shape traces without compiling).
  model = models.get_backbone("vit_tiny", **{**TINY_VIT, "dtype": jnp.bfloat16})
  variables = jax.eval_shape(functools.partial(model.init, train=False), KEY, _images())
  idx, _ = patches.chunk_indices(KEY, 2, 16, 4)
  out = jax.eval_shape(functools.partial(model.apply, train=False, return_attention="cls_key"),
                       variables, _images(), keep_indices=idx,
                       token_mask=jnp.zeros((2, 16), bool), mask_token=jnp.zeros((32,)))
  assert out["tokens"].shape == (2, 4, 5, 32) and out["tokens"].dtype == jnp.bfloat16
  assert out["pooled"].dtype == jnp.float32 and out["cls_attention"].dtype == jnp.float32
