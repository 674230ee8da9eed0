"""Swin against real timm 1.0: strict loads both ways with equal outputs, SimMIM masking, the
Microsoft layout built from a timm model's own modules, the parameter count, the classifier.

Needs the export environment (`make test-export`); skipped in the main venv, failures under
SSL_JAX_REQUIRE_TORCH=1.
"""
import functools
import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.export import torch as torch_export
from ssl_jax.models import heads

KEY = jax.random.key(0, impl="rbg")
TINY = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)}
# (image size, window): 64/4 -> maps 16, 8, 4, 2: shifted windows in stages 0-1, the window
# equal to the map in stage 2 and clamped to 2 in stage 3; 32/2 -> a 1×1 last stage.
CASES = [(64, 4), (32, 2)]


def _need(module: str):
  """The module, or a skip with the reason; under `make test-export` (CI) missing is a failure."""
  if os.environ.get("SSL_JAX_REQUIRE_TORCH") == "1":
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=f"{module} lives in .venv-export (make test-export)")


def _random_variables(model, size, seed=0):
  """Variables filled with NumPy values (LayerNorm γ around 1), shape-evaluated, no compile."""
  abstract = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, size, size, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    noise = rng.normal(size=a.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.05 * noise
  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


def _timm(torch, timm, code, state_dict):
  namespace = {"torch": torch, "timm": timm}
  exec(code, namespace)  # pylint: disable=exec-used
  net = namespace["m"].eval()
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                      strict=True)
  return net


def _close(theirs, ours):
  assert theirs.shape == ours.shape
  err, scale = np.abs(theirs - ours).max(), np.abs(theirs).max()
  assert err <= 1e-4 * max(scale, 1.0), (err, scale)


@pytest.mark.parametrize("size,window", CASES)
def test_tiny_swin_matches_timm_both_ways(size, window):
  torch, timm = _need("torch"), _need("timm")
  fields = {**TINY, "window_size": window}
  model = models.get_backbone("swin_tiny", **fields)
  variables = _random_variables(model, size)
  x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  ours = _apply(model)(variables, x)
  sd = torch_export.to_torch_state_dict(variables, "swin_tiny", **fields)
  code = torch_export.torch_model_code({"name": "swin_tiny", **fields, "img_size": size})
  net = _timm(torch, timm, code, sd)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    _close(net(xt).numpy(), np.asarray(ours["pooled"]))
    # Per-stage outputs too (timm's intermediates are NCHW, the last one before the final norm).
    _, inter = net.forward_intermediates(xt)
    for theirs, stage in zip(inter, ours["stages"]):
      _close(theirs.permute(0, 2, 3, 1).numpy(), np.asarray(stage))
  back = torch_export.from_torch_state_dict(net.state_dict(), "swin_tiny", **fields)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


def test_simmim_masking_matches_timm_with_the_token_written_in():
  """SimMIM order: patch_embed (conv + LN) -> masked positions := mask token -> stages -> norm."""
  torch, timm = _need("torch"), _need("timm")
  size, window = CASES[0]
  fields = {**TINY, "window_size": window}
  model = models.get_backbone("swin_tiny", **fields)
  variables = _random_variables(model, size)
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  n = (size // 4) ** 2
  mask = rng.random((2, n)) < 0.6
  token = rng.normal(size=(16,)).astype(np.float32)
  ours = _apply(model)(variables, x, token_mask=mask, mask_token=token)["pooled"]
  net = _timm(torch, timm, torch_export.torch_model_code(
      {"name": "swin_tiny", **fields, "img_size": size}),
      torch_export.to_torch_state_dict(variables, "swin_tiny", **fields))
  with torch.no_grad():
    h = net.patch_embed(torch.from_numpy(x).permute(0, 3, 1, 2))  # [B, h, w, C], normed
    w = torch.from_numpy(mask).reshape(2, size // 4, size // 4, 1).float()
    h = h * (1 - w) + torch.from_numpy(token) * w  # SwinTransformerForSimMIM.forward
    theirs = net.norm(net.layers(h)).mean(dim=(1, 2)).numpy()
  _close(theirs, np.asarray(ours))


def test_swin_tiny_224_matches_timm_both_ways():
  torch, timm = _need("torch"), _need("timm")
  model = models.get_backbone("swin_tiny")
  variables = _random_variables(model, 224)
  x = np.random.default_rng(3).normal(size=(1, 224, 224, 3)).astype(np.float32)
  net = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, pretrained=False).eval()
  n_timm = sum(p.numel() for p in net.parameters())
  leaves = jax.tree.leaves(variables)
  assert n_timm == sum(int(np.prod(a.shape)) for a in leaves) == 27_519_354
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  # ours -> timm
  sd = torch_export.to_torch_state_dict(variables, "swin_tiny_patch4_window7_224")
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    theirs = net(xt).numpy()
  _close(theirs, np.asarray(_apply(model)(variables, x)["pooled"]))
  # timm (its own initialisation) -> ours: same outputs from the same (cached) jitted forward.
  fresh = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0).eval()
  imported = torch_export.from_torch_state_dict(fresh.state_dict(), "swin_tiny")
  with torch.no_grad():
    _close(fresh(xt).numpy(), np.asarray(_apply(model)(imported, x)["pooled"]))
  # And its stock 1000-class model takes our export with a linear classifier (head.fc.*).
  clf = heads.LinearClassifier(num_classes=1000)
  clf_vars = clf.init(KEY, jnp.zeros((1, 768)), train=False)
  stock = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
  stock.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in torch_export.to_torch_state_dict(
      imported, "swin_tiny", classifier=clf_vars).items()}, strict=True)


def _microsoft_state_dict(net):
  """A timm model's weights in Microsoft's layout, with the buffers Microsoft's files save: the
  merging of stage i+1 moved to the end of stage i, `relative_position_index` of every block,
  `attn_mask` of every shifted block (taken from timm's own non-persistent buffers), a head."""
  out = {}
  for key, value in net.state_dict().items():
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
    out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else key] = value
  for name, module in net.named_modules():
    if hasattr(module, "relative_position_index"):
      out[f"{name}.relative_position_index"] = module.relative_position_index
    if getattr(module, "attn_mask", None) is not None:
      out[f"{name}.attn_mask"] = module.attn_mask
  return out


def test_import_microsoft_layout_built_from_timm():
  torch, timm = _need("torch"), _need("timm")
  size, window = CASES[0]
  fields = {**TINY, "window_size": window}
  net = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=size,
                          window_size=window, embed_dim=16, depths=(2, 2, 2, 2),
                          num_heads=(1, 2, 2, 4)).eval()
  microsoft = _microsoft_state_dict(net)
  microsoft["head.weight"] = microsoft.pop("head.fc.weight")
  microsoft["head.bias"] = microsoft.pop("head.fc.bias")
  assert any(k.endswith("attn_mask") for k in microsoft)
  assert "layers.0.downsample.reduction.weight" in microsoft
  moby = {f"encoder.{k}": v for k, v in microsoft.items()}
  moby.update({f"encoder_k.{k}": torch.zeros_like(v) for k, v in microsoft.items()})
  imported = torch_export.from_torch_state_dict(moby, "swin_tiny", **fields)
  x = np.random.default_rng(4).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = net.forward_head(net.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)),
                              pre_logits=True).numpy()
  _close(theirs, np.asarray(_apply(models.get_backbone("swin_tiny", **fields))(imported,
                                                                               x)["pooled"]))


def test_import_pth_checkpoint_file(tmp_path):
  """A MoBY-style `.pth` ({"model": {"encoder.…"}}) reads with weights_only=True."""
  torch, timm = _need("torch"), _need("timm")
  fields = {**TINY, "window_size": 2}
  net = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=32,
                          window_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
  path = str(tmp_path / "moby.pth")
  torch.save({"model": {f"encoder.{k}": v for k, v in _microsoft_state_dict(net).items()},
              "epoch": 300}, path)
  got = torch_export.import_backbone(path, "swin_tiny", **fields)
  want = torch_export.from_torch_state_dict(net.state_dict(), "swin_tiny", **fields)
  jax.tree.map(np.testing.assert_array_equal, got, want)
