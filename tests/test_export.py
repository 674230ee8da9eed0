"""PyTorch export/import: key layout, round trip, errors; real torchvision/timm when installed.

The torch comparisons need the export-verification environment (requirements-export.txt):
  python -m venv .venv-export && .venv-export/bin/pip install -r requirements-export.txt \
      && .venv-export/bin/pip install -e .
  .venv-export/bin/python -m pytest tests/test_export.py
In the main environment they are skipped.
"""
import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.export import torch as torch_export
from ssl_jax.export.__main__ import export
from ssl_jax.models import heads

def _need(module: str):
  """The module, or a skip with the reason; under `make test-export` (CI) missing is a failure."""
  if os.environ.get("SSL_JAX_REQUIRE_TORCH") == "1":
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=f"{module} lives in .venv-export (make test-export)")


KEY = jax.random.key(0, impl="rbg")  # rbg: much cheaper to compile on CPU than threefry


def _random_variables(name, size=64, seed=0, **fields):
  """Full-size trees filled with NumPy values (no compile): round trips need no real init."""
  model = models.get_backbone(name, **fields)
  abstract = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, size, size, 3)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("arch,fields", [("resnet18", {}), ("resnet50", {}),
                                         ("resnet18", {"width": 16, "small_image_stem": True}),
                                         ("vit_small", {}), ("vit_tiny", {"patch_size": 8})])
def test_round_trip_is_identity(arch, fields):
  variables = _random_variables(arch, size=224 if arch.startswith("vit") else 64, **fields)
  sd = torch_export.to_torch_state_dict(variables, arch, **fields)
  back = torch_export.from_torch_state_dict(sd, arch, **fields)
  _assert_trees_equal(back, {k: v for k, v in variables.items()})


def test_resnet50_keys_and_layouts_are_torchvision():
  variables = _random_variables("resnet50")
  sd = torch_export.to_torch_state_dict(variables, "resnet50")
  # torchvision resnet50: 53 convs + 53 BNs × 5 = 318 keys, 320 with fc.
  assert len(sd) == 318
  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(sd["conv1.weight"],
                                np.transpose(p["conv1"]["kernel"], (3, 2, 0, 1)))
  assert sd["conv1.weight"].shape == (64, 3, 7, 7)
  assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
  assert sd["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
  np.testing.assert_array_equal(sd["layer4.0.downsample.1.running_var"],
                                s["layer4_0"]["downsample_1"]["var"])
  np.testing.assert_array_equal(sd["layer3.5.bn3.weight"], p["layer3_5"]["bn3"]["scale"])
  assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["bn1.num_batches_tracked"].ndim == 0
  assert not any(k.startswith("fc.") for k in sd)


def test_vit_keys_and_layouts_are_timm():
  variables = _random_variables("vit_small", size=224)
  sd = torch_export.to_torch_state_dict(variables, "vit_small_patch16_224")
  p = variables["params"]
  assert sd["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
  assert sd["pos_embed"].shape == (1, 197, 384) and sd["cls_token"].shape == (1, 1, 384)
  np.testing.assert_array_equal(sd["blocks.11.attn.qkv.weight"],
                                p["blocks_11"]["attn"]["qkv"]["kernel"].T)
  assert sd["blocks.0.mlp.fc1.weight"].shape == (1536, 384)
  assert {"norm.weight", "norm.bias", "blocks.3.norm2.bias", "blocks.3.attn.proj.bias"} <= set(sd)
  assert len(sd) == 4 + 2 + 12 * 12  # patch_embed w/b, cls, pos, norm w/b, 12 per block


def test_sincos_pos_embed_is_written_and_dropped_on_import():
  fields = {"pos_embed": "sincos", "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
  variables = _random_variables("vit_tiny", size=32, **fields)
  sd = torch_export.to_torch_state_dict(variables, "vit_tiny", img_size=32, **fields)
  from ssl_jax.models import vit
  np.testing.assert_array_equal(sd["pos_embed"], vit.sincos_pos_embed(32, (4, 4)))
  back = torch_export.from_torch_state_dict(sd, "vit_tiny", img_size=32, **fields)
  _assert_trees_equal(back, variables)


def test_import_strips_prefixes_and_drops_classifier():
  variables = _random_variables("resnet18")
  sd = torch_export.to_torch_state_dict(variables, "resnet18")
  # A MoCo checkpoint: base and momentum encoders, a classifier and a predictor around them.
  wrapped = {f"module.base_encoder.{k}": v for k, v in sd.items()}
  wrapped.update({f"module.momentum_encoder.{k}": v * 0 for k, v in sd.items()})
  wrapped["module.base_encoder.fc.weight"] = np.zeros((10, 512), np.float32)
  wrapped["module.predictor.0.weight"] = np.zeros((4, 4), np.float32)
  _assert_trees_equal(torch_export.from_torch_state_dict(wrapped, "resnet18"), variables)
  momentum = torch_export.from_torch_state_dict(wrapped, "resnet18",
                                                prefix_strip="module.momentum_encoder.")
  assert not np.any(momentum["params"]["conv1"]["kernel"])


def test_corrupt_state_dict_names_missing_unexpected_and_shapes():
  sd = torch_export.to_torch_state_dict(_random_variables("resnet18"), "resnet18")
  bad = dict(sd)
  del bad["layer3.1.bn2.running_mean"]
  bad["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  bad["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    torch_export.from_torch_state_dict(bad, "resnet18")
  msg = str(err.value)
  assert "missing keys (1): ['layer3.1.bn2.running_mean']" in msg
  assert "unexpected keys (1): ['layer5.0.conv1.weight']" in msg
  assert "layer1.0.conv1.weight: (64, 64, 1, 1), expected (64, 64, 3, 3)" in msg
  with pytest.raises(ValueError, match="unexpected keys"):  # a ResNet-50 file read as ResNet-18
    torch_export.from_torch_state_dict(
        torch_export.to_torch_state_dict(_random_variables("resnet50"), "resnet50"), "resnet18")


def test_export_rejects_variables_of_another_arch():
  with pytest.raises(ValueError, match="(?s)variables for arch 'resnet50'.*missing keys"):
    torch_export.to_torch_state_dict(_random_variables("resnet18"), "resnet50")
  with pytest.raises(ValueError, match="wrong shapes"):
    torch_export.to_torch_state_dict(_random_variables("resnet18", width=32), "resnet18")
  with pytest.raises(ValueError, match="arch='resnet51' is unknown"):
    torch_export.parse_arch("resnet51")


def test_parse_arch_forms():
  assert torch_export.parse_arch("vit_base_patch8_224") == ("vit_base",
                                                            {"patch_size": 8, "img_size": 224})
  assert torch_export.parse_arch({"name": "resnet18", "width": 8, "dtype": "bfloat16"}) == (
      "resnet18", {"width": 8})


def test_classifier_bn_is_folded_into_fc():
  clf = heads.LinearClassifier(num_classes=3, batch_norm=True)
  x = np.random.default_rng(0).normal(size=(5, 512)).astype(np.float32)
  variables = clf.init(KEY, x, train=False)
  rng = np.random.default_rng(1)
  variables = {"params": variables["params"],
               "batch_stats": {"bn": {"mean": rng.normal(size=512).astype(np.float32),
                                      "var": rng.uniform(0.5, 2, 512).astype(np.float32)}}}
  sd = torch_export.to_torch_state_dict(_random_variables("resnet18"), "resnet18",
                                        classifier=variables)
  logits = x.astype(np.float64) @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]
  bn = variables["batch_stats"]["bn"]
  h = (x - bn["mean"]) / np.sqrt(bn["var"] + 1e-6)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, h @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(clf.apply(variables, x, train=False), logits, rtol=1e-4, atol=1e-4)


def test_export_writes_safetensors_with_metadata(tmp_path):
  from safetensors import safe_open
  from safetensors.numpy import load_file
  variables = _random_variables("resnet18", width=8)
  path = str(tmp_path / "sub" / "r18.safetensors")
  sd = export(variables, {"name": "resnet18", "width": 8}, path, metadata={"step": 7})
  loaded = load_file(path)
  assert set(loaded) == set(sd)
  np.testing.assert_array_equal(loaded["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"])
  with safe_open(path, "np") as f:
    meta = f.metadata()
  assert meta["arch"] == "resnet18" and meta["step"] == "7"
  assert json.loads(meta["arch_fields"]) == {"width": 8}
  back = torch_export.from_torch_state_dict(loaded, "resnet18", width=8)
  _assert_trees_equal(back, variables)
  with pytest.raises(ValueError, match="format='npz'"):
    export(variables, "resnet18", path, fmt="npz")


# ---------------------------------------------------------------- real torchvision / timm


def _randomised(variables, seed):
  """Real init plus random BN affine/statistics (init leaves them at 1/0, hiding layout bugs)."""
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    leaf = path[-1].key
    x = np.asarray(x)
    if leaf in ("scale", "var"):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if leaf in ("bias", "mean"):
      return (rng.normal(size=x.shape) * 0.1).astype(np.float32)
    return x
  return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet50", 64), ("vit_small", 224)])
def test_matches_torchvision_and_timm(arch, size):
  torch = _need("torch")
  model = models.get_backbone(arch)
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(KEY, jnp.asarray(x))
  variables = _randomised(jax.device_get(variables), seed=1)
  ours = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x)["pooled"])
  sd = torch_export.to_torch_state_dict(variables, arch)
  if arch.startswith("resnet"):
    torchvision = _need("torchvision")
    net = getattr(torchvision.models, arch)()
    net.fc = torch.nn.Identity()
  else:
    timm = _need("timm")
    net = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False)
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  net.eval()
  with torch.no_grad():
    theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert theirs.shape == ours.shape
  scale = np.abs(theirs).max()
  assert np.abs(theirs - ours).max() <= 1e-4 * max(scale, 1.0), (np.abs(theirs - ours).max(), scale)
  # And back: the torch module's own state dict imports to the same variables.
  back = torch_export.from_torch_state_dict(net.state_dict(), arch)
  _assert_trees_equal(back, jax.tree.map(np.asarray, variables))


def test_classifier_export_loads_into_stock_resnet18():
  torch = _need("torch")
  torchvision = _need("torchvision")
  variables = _random_variables("resnet18")
  clf = heads.LinearClassifier(num_classes=1000)
  clf_vars = clf.init(KEY, jnp.zeros((1, 512)), train=False)
  sd = torch_export.to_torch_state_dict(variables, "resnet18", classifier=clf_vars)
  net = torchvision.models.resnet18()
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)


def test_import_backbone_from_nested_files(tmp_path):
  """A MoCo-style checkpoint {"state_dict": {"module.base_encoder.<key>": ...}} imports."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  variables = _random_variables("resnet18")
  sd = torch_export.to_torch_state_dict(variables, "resnet18")
  flat = str(tmp_path / "r18.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, flat)
  _assert_trees_equal(torch_export.import_backbone(flat, "resnet18"),
                      jax.tree.map(np.asarray, variables))
  torch = _need("torch")
  nested = str(tmp_path / "moco.pth.tar")
  torch.save({"epoch": 3, "state_dict": {f"module.base_encoder.{k}": torch.from_numpy(np.array(v))
                                         for k, v in sd.items()}}, nested)
  _assert_trees_equal(torch_export.import_backbone(nested, "resnet18"),
                      jax.tree.map(np.asarray, variables))
  bad = str(tmp_path / "bad.pth")
  torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, bad)
  with pytest.raises(ValueError, match="none of"):
    torch_export.load_torch_file(bad)


# ---------------------------------------------------------------- heads (--with_heads)

# (norm, last_norm, use_bias, num_layers): BYOL/SimCLR, MoCo v3 projector, LN head, MoCo v2,
# a one-layer head with a last BN.
MLP_CASES = [("bn", "none", True, 2), ("bn", "bn_noaffine", False, 3), ("ln", "none", True, 2),
             ("none", "none", True, 2), ("none", "bn", True, 1)]


def _mlp_variables(norm, last_norm, use_bias, num_layers, in_dim=6, seed=0):
  """An MLP (hidden 8, out 4) with random weights, BN affine and running statistics."""
  mlp = heads.MLP(hidden_dim=8, out_dim=4, num_layers=num_layers, norm=norm, last_norm=last_norm,
                  use_bias=use_bias)
  abstract = jax.eval_shape(lambda: mlp.init(KEY, jnp.zeros((2, in_dim)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if path[-1].key == "var":
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    return rng.normal(size=a.shape).astype(np.float32)
  return mlp, jax.tree_util.tree_map_with_path(fill, abstract)


def _sequential_reference(sd, prefix, x):
  """The torch Sequential's eval-mode forward written out in NumPy from the state dict alone:
  a module with running statistics is BatchNorm1d (ε 1e-5), a weight+bias pair whose weight is
  1-D is LayerNorm (ε 1e-6), a 2-D weight is Linear; ReLU after every normalised hidden layer."""
  indices = sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})
  for i in range(max(indices) + 1):
    p = {k[len(f"{prefix}{i}."):]: v for k, v in sd.items() if k.startswith(f"{prefix}{i}.")}
    if not p:  # a parameter-free module: ReLU
      x = np.maximum(x, 0.0)
    elif "running_mean" in p:
      x = (x - p["running_mean"]) / np.sqrt(p["running_var"] + 1e-5)
      x = x * p.get("weight", 1.0) + p.get("bias", 0.0)
    elif p["weight"].ndim == 1:
      mu = x.mean(-1, keepdims=True)
      x = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * p["weight"] + p["bias"]
    else:
      x = x @ p["weight"].T + p.get("bias", 0.0)
  return x


@pytest.mark.parametrize("case", MLP_CASES)
def test_heads_export_as_torch_sequential(case):
  norm, last_norm, use_bias, num_layers = case
  mlp, variables = _mlp_variables(*case)
  params = {"backbone": {"conv1": {"kernel": np.zeros((3, 3, 3, 4), np.float32)}},
            "projector": variables["params"]}
  stats = {"projector": variables.get("batch_stats", {})}
  sd, layouts = torch_export.heads_to_torch_state_dict(params, stats)
  # The keys an nn.Sequential of Linear / norm / ReLU has, numbered from 0.
  want, i = set(), 0
  for layer in range(num_layers):
    last = layer == num_layers - 1
    want |= {f"projector.{i}.weight"} | ({f"projector.{i}.bias"} if use_bias else set())
    i += 1
    layer_norm = last_norm if last else norm
    if layer_norm in ("bn", "ln"):
      want |= {f"projector.{i}.weight", f"projector.{i}.bias"}
    if layer_norm in ("bn", "bn_noaffine"):
      want |= {f"projector.{i}.{s}" for s in ("running_mean", "running_var",
                                              "num_batches_tracked")}
    i += layer_norm != "none"
    i += not last  # ReLU
  assert set(sd) == want
  assert sd["projector.0.weight"].shape == ((8, 6) if num_layers > 1 else (4, 6))
  assert set(layouts) == {"projector"} and layouts["projector"].startswith("torch.nn.Sequential(")
  x = np.random.default_rng(5).normal(size=(3, 6)).astype(np.float32)
  np.testing.assert_allclose(_sequential_reference(sd, "projector.", x),
                             mlp.apply(variables, x, train=False), rtol=1e-4, atol=1e-5)


def test_export_heads_writes_the_torch_layout(tmp_path, monkeypatch):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from ssl_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from ssl_jax.export import __main__ as export_cli  # pylint: disable=import-outside-toplevel
  _, proj = _mlp_variables("bn", "none", True, 2)
  _, pred = _mlp_variables("none", "none", True, 2, in_dim=4, seed=1)
  state = {"params": {"backbone": {}, "projector": proj["params"], "predictor": pred["params"],
                      "mask_token": np.ones(5, np.float32)},
           "state": {"batch_stats": {"backbone": {}, "projector": proj["batch_stats"]}}}
  monkeypatch.setattr(checkpoint, "load_state", lambda workdir, step: (7, state))
  (tmp_path / "config.json").write_text(json.dumps({"method": "byol"}))
  out = str(tmp_path / "export" / "heads.safetensors")
  n = export_cli.export_heads(str(tmp_path), None, out)
  sd = load_file(out)
  assert n == len(sd) == 2 + 5 + 2 + 4 + 1  # projector Linear, BN, Linear; predictor; token
  np.testing.assert_array_equal(sd["projector.1.running_var"],
                                proj["batch_stats"]["norm_0"]["var"])
  np.testing.assert_array_equal(sd["predictor.2.weight"], pred["params"]["dense_1"]["kernel"].T)
  np.testing.assert_array_equal(sd["mask_token"], np.ones(5))
  with safe_open(out, "np") as f:
    meta = f.metadata()
  assert meta["step"] == "7" and meta["method"] == "byol"
  assert meta["layout.predictor"] == ("torch.nn.Sequential(torch.nn.Linear(4, 8, bias=True), "
                                      "torch.nn.ReLU(), torch.nn.Linear(8, 4, bias=True))")


def _torch_sequential(torch, mlp, in_dim):
  """The nn.Sequential equivalent of `mlp`, built from its fields (see models/heads.py)."""
  layers, d = [], in_dim
  for _ in range(mlp.num_layers - 1):
    layers.append(torch.nn.Linear(d, mlp.hidden_dim, bias=mlp.use_bias))
    d = mlp.hidden_dim
    if mlp.norm == "bn":
      layers.append(torch.nn.BatchNorm1d(d, eps=mlp.bn_epsilon))
    elif mlp.norm == "ln":
      layers.append(torch.nn.LayerNorm(d, eps=1e-6))  # flax LayerNorm's default ε
    layers.append(torch.nn.ReLU())
  layers.append(torch.nn.Linear(d, mlp.out_dim, bias=mlp.use_bias))
  if mlp.last_norm != "none":
    layers.append(torch.nn.BatchNorm1d(mlp.out_dim, eps=mlp.bn_epsilon,
                                       affine=mlp.last_norm == "bn"))
  return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("case", MLP_CASES)
def test_heads_load_strictly_into_torch_sequential(case):
  torch = _need("torch")
  mlp, variables = _mlp_variables(*case)
  sd, layouts = torch_export.heads_to_torch_state_dict(
      {"projector": variables["params"]}, {"projector": variables.get("batch_stats", {})})
  head = {k[len("projector."):]: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  x = np.random.default_rng(6).normal(size=(3, 6)).astype(np.float32)
  for net in (_torch_sequential(torch, mlp, 6), eval(layouts["projector"], {"torch": torch})):  # pylint: disable=eval-used
    net.load_state_dict(head, strict=True)
    with torch.no_grad():
      theirs = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, mlp.apply(variables, x, train=False), rtol=1e-4,
                               atol=1e-5)
