"""MAE and SimMIM pixel decoders against NumPy references, parameter counts and invariances."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import decoder, vit
from ssl_jax.ops import patches

KEY = jax.random.key(0, impl="rbg")


def _layer_norm(x, scale, bias, eps=1e-6):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def _tokens(b, k, d, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, 1 + k, d)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _mae(depth):
  model = decoder.MAEDecoder(patch_size=4, embed_dim=16, depth=depth, num_heads=2)
  masking = patches.random_masking(KEY, 2, 16, 0.75)
  variables = jax.jit(model.init, static_argnums=3)(KEY, _tokens(2, 4, 24), masking.restore,
                                                   (4, 4))
  return model, variables, jax.jit(model.apply, static_argnums=3)


def test_mae_decoder_without_blocks_matches_numpy():
  model, variables, apply = _mae(0)
  masking = patches.random_masking(jax.random.key(1, impl="rbg"), 2, 16, 0.75)
  tokens = _tokens(2, 4, 24, seed=1)
  out = apply(variables, tokens, masking.restore, (4, 4))
  assert out.shape == (2, 16, 4 * 4 * 3) and out.dtype == jnp.float32

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x = np.asarray(tokens, np.float64) @ p["embed"]["kernel"] + p["embed"]["bias"]
  keep = np.asarray(masking.keep_indices)
  full = np.broadcast_to(p["mask_token"][0], (2, 16, 16)).copy()  # mask token everywhere ...
  for b in range(2):
    full[b, keep[b]] = x[b, 1:]                                    # ... but the visible patches
  pos = vit.sincos_pos_embed(16, (4, 4))[0].astype(np.float64)
  seq = np.concatenate([x[:, :1], full], axis=1) + pos
  ref = _layer_norm(seq, p["norm"]["scale"], p["norm"]["bias"]) @ p["pred"]["kernel"]
  ref = ref + p["pred"]["bias"]
  np.testing.assert_allclose(out, ref[:, 1:], rtol=1e-4, atol=1e-5)


def test_mae_decoder_output_ignores_visible_order():
  # The same visible set presented in another order (with its restore) gives the same output:
  # restore puts every token back at its patch position before the blocks.
  model, variables, apply = _mae(2)
  masking = patches.random_masking(jax.random.key(2, impl="rbg"), 2, 16, 0.5)
  tokens = _tokens(2, 8, 24, seed=2)
  out = apply(variables, tokens, masking.restore, (4, 4))
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  keep2 = np.asarray(masking.keep_indices)[:, perm]
  order2 = np.concatenate([keep2, np.asarray(masking.mask_indices)], axis=1)
  tokens2 = jnp.concatenate([tokens[:, :1], tokens[:, 1:][:, perm]], axis=1)
  restore2 = patches.masking_from_order(jnp.asarray(order2), 8).restore
  np.testing.assert_allclose(apply(variables, tokens2, restore2, (4, 4)), out, rtol=1e-5,
                             atol=1e-5)
  # ... while a wrong restore (visible tokens at the wrong patches) changes it.
  wrong = apply(variables, tokens2, masking.restore, (4, 4))
  assert np.abs(np.asarray(wrong - out)).max() > 1e-3


def test_mae_decoder_default_parameter_count():
  # MAE ViT-B decoder: 8 blocks × 512 wide, 16 heads, p = 16. Independent count per layer.
  model = decoder.MAEDecoder(patch_size=16)
  shapes = jax.eval_shape(functools.partial(model.init, grid=(14, 14)), KEY,
                          jnp.zeros((1, 50, 768)), jnp.zeros((1, 196), jnp.int32))
  d, hidden = 512, 2048
  block = (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d
  expected = (768 * d + d) + d + 8 * block + 2 * d + (d * 768 + 768)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == expected
  assert set(shapes["params"]) == {"embed", "mask_token", "norm", "pred",
                                   *(f"blocks_{i}" for i in range(8))}


def test_mae_decoder_errors():
  model, variables, _ = _mae(0)
  with pytest.raises(ValueError, match="restore must be"):
    model.apply(variables, _tokens(2, 4, 24), jnp.zeros((2, 15), jnp.int32), (4, 4))
  with pytest.raises(ValueError, match="K <= N=16"):
    model.apply(variables, _tokens(2, 17, 24), jnp.zeros((2, 16), jnp.int32), (4, 4))


def _pixel_shuffle_numpy(x, r):
  """torch.nn.PixelShuffle written out: out[c, y·r+i, x·r+j] = in[c·r² + i·r + j, y, x]."""
  b, h, w, c = x.shape
  out = np.zeros((b, h * r, w * r, c // (r * r)), x.dtype)
  for ch in range(c // (r * r)):
    for i in range(r):
      for j in range(r):
        out[:, i::r, j::r, ch] = x[..., ch * r * r + i * r + j]
  return out


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_pixel_shuffle_is_torch_order(stride):
  x = np.random.default_rng(stride).normal(size=(2, 3, 2, 3 * stride * stride)).astype(np.float32)
  np.testing.assert_array_equal(decoder.pixel_shuffle(jnp.asarray(x), stride),
                                _pixel_shuffle_numpy(x, stride))


def test_linear_pixel_decoder_matches_numpy_and_init():
  model = decoder.LinearPixelDecoder(stride=4)
  fmap = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 2, 24)), jnp.float32)
  variables = jax.jit(model.init)(KEY, fmap)
  out = jax.jit(model.apply)(variables, fmap)
  assert out.shape == (2, 12, 8, 3) and out.dtype == jnp.float32
  kernel = np.asarray(variables["params"]["conv"]["kernel"])
  bias = np.asarray(variables["params"]["conv"]["bias"])
  assert kernel.shape == (1, 1, 24, 48)
  ref = _pixel_shuffle_numpy(np.asarray(fmap) @ kernel[0, 0] + bias, 4)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # PyTorch's Conv2d default init: kernel and bias uniform in ±1/√fan_in (here fan_in = 24).
  bound = 24**-0.5
  for a in (kernel, bias):
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
  # Each feature-map cell only predicts its own stride × stride pixels (ViT: per-token Linear).
  bumped = jax.jit(model.apply)(variables, fmap.at[0, 1, 0].add(1.0))
  changed = np.abs(np.asarray(bumped - out)).sum(-1) > 0
  expected = np.zeros((2, 12, 8), bool)
  expected[0, 4:8, 0:4] = True
  np.testing.assert_array_equal(changed, expected)


def test_decoders_compute_in_bfloat16_and_return_float32():
  mae = decoder.MAEDecoder(patch_size=4, embed_dim=16, depth=1, num_heads=2, dtype=jnp.bfloat16)
  args = (_tokens(2, 4, 24).astype(jnp.bfloat16), jnp.zeros((2, 16), jnp.int32))
  variables = jax.eval_shape(functools.partial(mae.init, grid=(4, 4)), KEY, *args)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(functools.partial(mae.apply, grid=(4, 4)), variables,
                        *args).dtype == jnp.float32
  simmim = decoder.LinearPixelDecoder(stride=2, dtype=jnp.bfloat16)
  fmap = jnp.zeros((1, 2, 2, 8), jnp.bfloat16)
  variables = jax.eval_shape(simmim.init, KEY, fmap)
  out = jax.eval_shape(simmim.apply, variables, fmap)
  assert out.shape == (1, 4, 4, 3) and out.dtype == jnp.float32
