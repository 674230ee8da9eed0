"""Swin Transformer: window helpers and one block against NumPy brute force, SimMIM masking,
image-size validation, Swin-T parameter count, layer-decay ids (SimMIM's `get_swin_layer`),
export/import key layout incl. Microsoft's. The comparisons with real timm are in
tests/test_torch_swin.py (export venv).
"""
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from ssl_jax import models, optim
from ssl_jax.export import torch as torch_export
from ssl_jax.models import swin

KEY = jax.random.key(0, impl="rbg")  # rbg: much cheaper to compile on CPU than threefry
# Stage maps at 32 px: 8, 4, 2, 1 -> stages 0-1 shift, stage 2 window = map, stage 3 clamps to 1.
TINY = {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 2), "window_size": 2}


def _random_variables(model, size, seed=0):
  """Variables of `model` at `size` px filled with NumPy values (shape-evaluated, no compile)."""
  abstract = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, size, size, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    noise = rng.normal(size=a.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.3 * noise
  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def _tiny():
  model = models.get_backbone("swin_tiny", **TINY)
  return model, _random_variables(model, 32), jax.jit(functools.partial(model.apply, train=False))


def _images(b=2, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(b, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------ windows, one block, NumPy


def test_relative_position_index_is_the_offset_table_row():
  wh, ww = 3, 2
  got = swin.relative_position_index((wh, ww))
  coords = [(y, x) for y in range(wh) for x in range(ww)]  # row-major tokens of a window
  for i, (yi, xi) in enumerate(coords):
    for j, (yj, xj) in enumerate(coords):
      # B̂ has (2wh−1) × (2ww−1) entries, offsets shifted to start at 0, flattened row-major.
      assert got[i, j] == np.ravel_multi_index((yi - yj + wh - 1, xi - xj + ww - 1),
                                               (2 * wh - 1, 2 * ww - 1))


def test_window_partition_and_reverse():
  x = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
  windows = np.asarray(swin.window_partition(jnp.asarray(x), (2, 3)))
  assert windows.shape == (2 * 2 * 2, 6, 3)
  # Window (b=1, row 1, col 0) holds rows 2..3, columns 0..2 of image 1, row-major.
  np.testing.assert_array_equal(windows[1 * 4 + 1 * 2 + 0], x[1, 2:4, 0:3].reshape(6, 3))
  np.testing.assert_array_equal(swin.window_reverse(jnp.asarray(windows), (2, 3), (4, 6)), x)


@pytest.mark.parametrize("grid,window,shift", [((4, 4), (2, 2), (1, 1)), ((6, 4), (3, 2), (1, 1)),
                                               ((4, 6), (2, 2), (0, 1))])
def test_shifted_window_mask_separates_wrapped_tokens(grid, window, shift):
  got = swin.shifted_window_mask(grid, window, shift)
  h, w = grid
  # Token at rolled position r came from (r + s) mod size; it wrapped around iff r + s >= size.
  # Two tokens of one window may attend iff they wrapped alike along both axes.
  rolled = [(y, x) for y in range(h) for x in range(w)]
  windows = {}
  for y, x in rolled:
    windows.setdefault((y // window[0], x // window[1]), []).append((y, x))
  assert got.shape == (len(windows), window[0] * window[1], window[0] * window[1])
  for n, key in enumerate(sorted(windows)):
    for i, (yi, xi) in enumerate(windows[key]):
      for j, (yj, xj) in enumerate(windows[key]):
        alike = ((yi + shift[0] >= h) == (yj + shift[0] >= h)
                 and (xi + shift[1] >= w) == (xj + shift[1] >= w))
        assert got[n, i, j] == (0.0 if alike else swin.MASK_VALUE)


def _layer_norm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _block_reference(p, x, window, shift, heads):
  """One Swin block on x [H, W, C] by brute force over tokens, in original image coordinates.

  Shifted windows: a token at (y, x) sits at rolled position ((y − s) mod H, (x − s) mod W); it
  attends to the tokens of its rolled window that wrapped around alike, with the bias of
  their true offset: B̂[Δy + wh − 1, Δx + ww − 1] (paper Sec. 3.2).
  """
  h, w, c = x.shape
  hd = c // heads
  (wh, ww), (sy, sx) = window, shift
  table = p["attn"]["relative_position_bias_table"].reshape(2 * wh - 1, 2 * ww - 1, heads)
  y = _layer_norm(x, p["norm1"])
  qkv = (y @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]).reshape(h, w, 3, heads, hd)
  out = np.zeros((h, w, heads, hd))
  for yi in range(h):
    for xi in range(w):
      ri = ((yi - sy) % h, (xi - sx) % w)
      keys = [(yj, xj) for yj in range(h) for xj in range(w)
              if ((yj - sy) % h // wh, (xj - sx) % w // ww) == (ri[0] // wh, ri[1] // ww)
              and (yj < sy) == (yi < sy) and (xj < sx) == (xi < sx)]
      for n in range(heads):
        logits = np.array([qkv[yi, xi, 0, n] @ qkv[yj, xj, 1, n] / math.sqrt(hd)
                           + table[yi - yj + wh - 1, xi - xj + ww - 1, n] for yj, xj in keys])
        a = np.exp(logits - logits.max())
        a /= a.sum()
        out[yi, xi, n] = sum(a_k * qkv[yj, xj, 2, n] for a_k, (yj, xj) in zip(a, keys))
  x = x + out.reshape(h, w, c) @ p["attn"]["proj"]["kernel"] + p["attn"]["proj"]["bias"]
  y = _layer_norm(x, p["norm2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))  # exact GELU
  return x + y @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


@pytest.mark.parametrize("shift", [(0, 0), (1, 1)])
def test_block_matches_brute_force_attention(shift):
  block = swin.SwinBlock(num_heads=2, window=(2, 2), shift=shift, mlp_ratio=2.0, qkv_bias=True,
                         drop_path=0.0, dtype=jnp.float32)
  x = np.random.default_rng(0).normal(size=(1, 4, 6, 8)).astype(np.float32)  # non-square map
  abstract = jax.eval_shape(lambda: block.init(KEY, x, train=False))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.5, abstract)
  got = block.apply(params, x, train=False)
  want = _block_reference(jax.tree.map(np.float64, params["params"]), x[0].astype(np.float64),
                          (2, 2), shift, heads=2)
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4)


def test_patch_merging_concatenates_like_microsoft():
  merge = swin.PatchMerging(out_dim=5, dtype=jnp.float32)
  x = np.random.default_rng(2).normal(size=(2, 4, 6, 3)).astype(np.float32)
  abstract = jax.eval_shape(lambda: merge.init(KEY, x))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  # Microsoft: x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2], x3 = x[1::2, 1::2].
  cat = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                       axis=-1)
  p = params["params"]
  want = _layer_norm(cat, p["norm"]) @ p["reduction"]["kernel"]
  np.testing.assert_allclose(merge.apply(params, x), want, rtol=1e-4, atol=1e-4)
  assert "bias" not in p["reduction"]


# ------------------------------------------------------------------ model, masking, validation


def test_tiny_forward_shapes_and_timm_layout():
  model, variables, apply = _tiny()
  out = apply(variables, _images())
  c = TINY["embed_dim"]
  assert out["pooled"].shape == (2, 8 * c) and out["pooled"].dtype == jnp.float32
  assert out["feature_map"].shape == (2, 1, 1, 8 * c)
  assert [s.shape for s in out["stages"]] == [(2, 8 // 2**i, 8 // 2**i, c * 2**i)
                                              for i in range(4)]
  # pooled = mean of the final normed map; feature_map = final norm of the last stage.
  np.testing.assert_allclose(out["pooled"], out["feature_map"].mean(axis=(1, 2)), rtol=1e-6)
  p = variables["params"]
  assert set(p) == {"patch_embed", "layers_0", "layers_1", "layers_2", "layers_3", "norm"}
  assert set(p["patch_embed"]) == {"proj", "norm"}
  assert "downsample" not in p["layers_0"] and set(p["layers_1"]["downsample"]) == {"norm",
                                                                                     "reduction"}
  assert set(p["layers_1"]["blocks_1"]) == {"norm1", "attn", "norm2", "mlp"}
  tables = [p[f"layers_{i}"]["blocks_0"]["attn"]["relative_position_bias_table"].shape
            for i in range(4)]
  assert tables == [(9, 1), (9, 2), (9, 2), (1, 2)]  # window 2 -> 3² rows; stage 3 map 1 -> 1
  assert "mask_token" not in p  # the method owns it


def test_stage_windows_clamp_like_timm():
  assert swin.stage_windows((56, 56), 7) == ((7, 7), (3, 3))
  assert swin.stage_windows((7, 7), 7) == ((7, 7), (0, 0))  # Swin-T stage 3: no shift
  assert swin.stage_windows((2, 8), 4) == ((2, 4), (0, 2))


def test_simmim_token_mask_replaces_patch_embeddings():
  _, variables, apply = _tiny()
  x = _images()
  n = 8 * 8
  mask = np.zeros((2, n), bool)
  mask[0, [0, 9, 63]] = True
  mask[1, :32] = True
  token = np.random.default_rng(3).normal(size=(8,)).astype(np.float32)
  plain = apply(variables, x)
  masked = apply(variables, x, token_mask=mask, mask_token=token)
  emb = np.asarray(masked["patch_embed"]).reshape(2, n, 8)
  np.testing.assert_array_equal(emb[mask], np.broadcast_to(token, (mask.sum(), 8)))
  np.testing.assert_array_equal(emb[~mask], np.asarray(plain["patch_embed"]).reshape(2, n, 8)[~mask])
  none = apply(variables, x, token_mask=np.zeros((2, n), bool), mask_token=token)
  np.testing.assert_array_equal(none["pooled"], plain["pooled"])
  # Pixels under masked patches no longer matter; an unmasked patch still does.
  x2 = x.copy()
  x2[0, 0:4, 0:4] += 5.0  # patch 0 (masked)
  x2[1, 0:16, :] += 5.0  # patches 0..31 (masked)
  np.testing.assert_array_equal(apply(variables, x2, token_mask=mask, mask_token=token)["pooled"],
                                masked["pooled"])
  x2[0, 0:4, 4:8] += 5.0  # patch 1 (visible)
  changed = apply(variables, x2, token_mask=mask, mask_token=token)["pooled"]
  assert not np.allclose(changed[0], masked["pooled"][0])


def test_stochastic_depth_only_in_training():
  model = models.get_backbone("swin_tiny", **TINY, drop_path_rate=0.5)
  _, variables, apply = _tiny()  # same shapes: drop path adds no variables
  x = _images(b=4)
  train = jax.jit(functools.partial(model.apply, train=True))
  np.testing.assert_allclose(jax.jit(functools.partial(model.apply, train=False))(
      variables, x)["pooled"], apply(variables, x)["pooled"], rtol=1e-6, atol=1e-6)
  a = train(variables, x, rngs={"dropout": jax.random.key(1, impl="rbg")})["pooled"]
  b = train(variables, x, rngs={"dropout": jax.random.key(2, impl="rbg")})["pooled"]
  assert not np.allclose(a, b)


def test_simmim_masking_errors():
  model, variables, _ = _tiny()
  x = _images(b=1)
  token = np.zeros(8, np.float32)
  with pytest.raises(ValueError, match="together"):
    model.apply(variables, x, train=False, token_mask=np.zeros((1, 64), bool))
  with pytest.raises(ValueError, match=r"token_mask has shape \(1, 16\); expected \[B, N\]"):
    model.apply(variables, x, train=False, token_mask=np.zeros((1, 16), bool), mask_token=token)
  with pytest.raises(ValueError, match="mask_token has shape"):
    model.apply(variables, x, train=False, token_mask=np.zeros((1, 64), bool),
                mask_token=np.zeros(9, np.float32))


@pytest.mark.parametrize("size,window,ok", [(224, 7, True), (192, 6, True), (192, 7, False),
                                            (32, 2, True), (64, 4, True), (48, 2, False),
                                            (160, 5, True), (96, 3, True), (96, 7, False),
                                            (112, 4, False)])
def test_image_size_validation(size, window, ok):
  # A size fits when it is divisible by patch·2³ and each stage map is a multiple of the window
  # or at most the window (then the window shrinks to the map).
  maps = [size // 4 // 2**i for i in range(4)]
  assert ok == (size % 32 == 0 and all(r <= window or r % window == 0 for r in maps))
  config = {"name": "swin_tiny", "window_size": window}
  if ok:
    models.check_image_size(config, size)
    return
  with pytest.raises(ValueError, match=rf"config.data.image_size={size} .*config.model.patch_size"
                                       rf"=4, config.model.window_size={window}"):
    models.check_image_size(config, size)
  with pytest.raises(ValueError, match=f"config.data.image_size={size}"):
    jax.eval_shape(lambda: models.get_backbone("swin_tiny", window_size=window).init(
        KEY, jnp.zeros((1, size, size, 3)), train=False))


def test_check_image_size_other_backbones():
  models.check_image_size({"name": "resnet18"}, 33)
  with pytest.raises(ValueError, match="config.data.image_size=33 is not divisible by "
                                       "config.model.patch_size=16"):
    models.check_image_size({"name": "vit_small"}, 33)


def _swin_param_count(embed_dim, depths, heads, window, patch=4, mlp_ratio=4):
  """Swin without classifier, counted from the paper's architecture (full windows everywhere,
  as at 224 px with window 7, where stage 3's 7×7 map equals the window)."""
  count = 3 * patch * patch * embed_dim + embed_dim + 2 * embed_dim  # patch conv + LN
  for i, (depth, h) in enumerate(zip(depths, heads)):
    c = embed_dim * 2**i
    if i:
      count += 2 * (2 * c) + (2 * c) * c  # merging: LN over 4·(c/2), Linear 4·(c/2) -> c
    block = (2 * c + (2 * window - 1) ** 2 * h + 3 * c * c + 3 * c + c * c + c + 2 * c
             + 2 * mlp_ratio * c * c + mlp_ratio * c + c)
    count += depth * block
  return count + 2 * embed_dim * 2 ** (len(depths) - 1)  # final LN


def test_swin_tiny_parameter_count_equals_timm():
  model = models.get_backbone("swin_tiny")
  abstract = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 224, 224, 3)), train=False))
  got = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  assert got == _swin_param_count(96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
  # timm 1.0.29: sum(p.numel() for p in timm.create_model("swin_tiny_patch4_window7_224",
  # num_classes=0).parameters()); tests/test_torch_swin.py checks this number against timm.
  assert got == 27_519_354
  assert set(abstract) == {"params"}  # index and mask are constants, not variables


def test_get_backbone_swin_fields():
  model = models.get_backbone("swin_small", window_size=6, depths=[1, 1, 1, 1])
  assert model.depths == (1, 1, 1, 1) and model.window_size == 6 and model.embed_dim == 96
  assert models.get_backbone("swin_base").num_heads == (4, 8, 16, 32)
  with pytest.raises(ValueError, match=r"does not take.*'window_size'"):
    models.get_backbone("swin_tiny", width=8)
  with pytest.raises(ValueError, match="depths"):
    jax.eval_shape(lambda: models.get_backbone("swin_tiny", depths=(2, 2)).init(
        KEY, jnp.zeros((1, 224, 224, 3)), train=False))


# ------------------------------------------------------------------ layer decay


def _simmim_swin_layer(name, num_layers, depths):
  """SimMIM `optimizer.get_swin_layer`, on Microsoft-layout names (merging at stage ends)."""
  if name == "mask_token" or name.startswith("patch_embed"):
    return 0
  if name.startswith("layers"):
    layer, block = int(name.split(".")[1]), name.split(".")[3]
    if block in ("reduction", "norm"):
      return sum(depths[:layer + 1])
    return sum(depths[:layer]) + int(block) + 1
  return num_layers - 1


def _microsoft_name(path):
  """Our path -> the Microsoft module name (layers_i/downsample is layers.{i-1}.downsample)."""
  names = [str(p.key) for p in path if str(p.key) != "backbone"]
  name = ".".join(names)
  name = re.sub(r"layers_(\d+)\.downsample",
                lambda m: f"layers.{int(m.group(1)) - 1}.downsample", name)
  return re.sub(r"(layers|blocks)_(\d+)", r"\1.\2", name)


def test_swin_layer_decay_ids_match_simmim():
  depths, decay = (2, 1, 3, 1), 0.7
  model = models.get_backbone("swin_tiny", **{**TINY, "depths": depths})
  abstract = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 3)), train=False))
  params = {"backbone": abstract["params"], "mask_token": jnp.zeros(8),
            "head": {"kernel": jnp.zeros((64, 3))}}
  total = sum(depths)
  got = optim.layer_decay_multipliers(params, total, decay)
  seen = set()
  for path, mult in jax.tree_util.tree_leaves_with_path(got):
    layer = _simmim_swin_layer(_microsoft_name(path), total + 2, depths)
    seen.add(layer)
    assert mult == pytest.approx(decay ** (total + 1 - layer)), _microsoft_name(path)
  assert seen == set(range(total + 2))
  # Through the optimizer without num_layers: the depths are read from the names (Σ = 7).
  tx, _ = optim.make_optimizer(ConfigDict(dict(
      name="sgd", base_lr=1.0, lr_rule="none", warmup_steps=0, schedule="constant",
      weight_decay=0.0, momentum=0.0, layer_decay=decay)), 10, 256)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  merge = updates["backbone"]["layers_2"]["downsample"]["reduction"]["kernel"]
  np.testing.assert_allclose(merge, -decay ** (total + 1 - 3), rtol=1e-6)  # Σdepths[:2] = 3
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0)


# ------------------------------------------------------------------ export / import layout


def _timm_key_count(depths):
  # per block: norm1 w/b, bias table, qkv w/b, proj w/b, norm2 w/b, fc1 w/b, fc2 w/b = 13;
  # per merging: norm w/b, reduction w = 3; patch_embed proj w/b + norm w/b = 4; final norm 2.
  return 13 * sum(depths) + 3 * (len(depths) - 1) + 4 + 2


def test_swin_tiny_export_keys_are_timm_and_round_trip():
  model = models.get_backbone("swin_tiny")
  variables = _random_variables(model, 224)
  sd = torch_export.to_torch_state_dict(variables, "swin_tiny_patch4_window7_224")
  assert len(sd) == _timm_key_count((2, 2, 6, 2))
  p = variables["params"]
  np.testing.assert_array_equal(sd["layers.2.blocks.5.attn.qkv.weight"],
                                p["layers_2"]["blocks_5"]["attn"]["qkv"]["kernel"].T)
  np.testing.assert_array_equal(sd["patch_embed.proj.weight"],
                                np.transpose(p["patch_embed"]["proj"]["kernel"], (3, 2, 0, 1)))
  assert sd["layers.3.downsample.reduction.weight"].shape == (768, 1536)
  assert sd["layers.1.blocks.1.attn.relative_position_bias_table"].shape == (169, 6)
  assert {"patch_embed.norm.weight", "norm.bias", "layers.0.blocks.1.mlp.fc2.bias"} <= set(sd)
  assert not any("layers.0.downsample" in k or k.endswith(("relative_position_index", "attn_mask"))
                 for k in sd)
  back = torch_export.from_torch_state_dict(sd, "swin_tiny")
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def _to_microsoft(sd, prefix=""):
  """timm 1.0 keys -> Microsoft's (merging at the end of the previous stage) with the buffers
  Microsoft's files carry and a classifier, written independently of the import code."""
  out = {}
  for key, value in sd.items():
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
    out[prefix + (f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else key)] = value
    if key.endswith("attn.relative_position_bias_table"):
      out[prefix + key.replace("relative_position_bias_table", "relative_position_index")] = (
          np.zeros((4, 4), np.int64))
      out[prefix + key.replace("attn.relative_position_bias_table", "attn_mask")] = np.zeros(
          (4, 4, 4), np.float32)
  out[prefix + "head.weight"] = np.zeros((10, 64), np.float32)
  out[prefix + "head.bias"] = np.zeros((10,), np.float32)
  return out


def test_import_microsoft_and_moby_layouts():
  model, variables, _ = _tiny()
  sd = torch_export.to_torch_state_dict(variables, "swin_tiny", **TINY)
  microsoft = _to_microsoft(sd)
  assert "layers.0.downsample.reduction.weight" in microsoft
  assert "layers.3.downsample.norm.weight" not in microsoft
  back = torch_export.from_torch_state_dict(microsoft, "swin_tiny", **TINY)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  # MoBY: {"encoder.", "encoder_k."} backbones, projector / predictor and queues beside them.
  moby = _to_microsoft(sd, "encoder.")
  moby.update(_to_microsoft({k: np.zeros_like(v) for k, v in sd.items()}, "encoder_k."))
  moby.update({"projector.linear1.weight": np.zeros((4, 64), np.float32),
               "queue1": np.zeros((256, 4096), np.float32)})
  back = torch_export.from_torch_state_dict(moby, "swin_tiny", **TINY)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  momentum = torch_export.from_torch_state_dict(moby, "swin_tiny", prefix_strip="encoder_k.",
                                                **TINY)
  assert not np.any(momentum["params"]["layers_1"]["downsample"]["reduction"]["kernel"])


def test_swin_resolution_is_read_from_the_bias_tables():
  fields = {**TINY, "window_size": 4}  # at 32 px: maps 8, 4, 2, 1 -> tables 7², 7², 3², 1²
  model = models.get_backbone("swin_tiny", **fields)
  variables = _random_variables(model, 32)
  sd = torch_export.to_torch_state_dict(variables, "swin_tiny", **fields)
  assert sd["layers.2.blocks.0.attn.relative_position_bias_table"].shape == (9, 2)
  back = torch_export.from_torch_state_dict(sd, "swin_tiny", **fields)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  assert torch_export.resolve_arch(variables, {"name": "swin_tiny", **fields})[1]["img_size"] == 32
  # A 224-px Swin read as if it had 32-px tables fails with the shapes named.
  with pytest.raises(ValueError, match="relative_position_bias_table: .*expected"):
    torch_export.from_torch_state_dict(sd, "swin_tiny", img_size=64, **fields)


def test_parse_arch_swin_names():
  assert torch_export.parse_arch("swin_tiny_patch4_window7_224") == (
      "swin_tiny", {"patch_size": 4, "window_size": 7, "img_size": 224})
  assert torch_export.torch_model_code("swin_tiny") == (
      'm = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)')
  assert torch_export.torch_model_code({"name": "swin_base", "window_size": 6, "img_size": 192}) \
      == 'm = timm.create_model("swin_base_patch4_window7_224", num_classes=0, img_size=192, ' \
         'window_size=6)'


def test_export_file_metadata_names_the_timm_constructor(tmp_path):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  from ssl_jax.export.__main__ import export  # pylint: disable=import-outside-toplevel
  _, variables, _ = _tiny()
  path = str(tmp_path / "swin.safetensors")
  export(variables, {"name": "swin_tiny", **TINY}, path)
  with safe_open(path, "np") as f:
    meta = f.metadata()
  assert meta["arch"] == "swin_tiny"
  assert json.loads(meta["arch_fields"]) == {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in TINY.items()}
  assert meta["torch_model"] == (
      'm = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=32, '
      "window_size=2, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2))")
