"""ResNet options against torchvision: `replace_stride_with_dilation` gives torchvision's C5 with
our exported weights; `zero_init_residual` zeroes the same BN weights as torchvision's.

Needs the export-verification environment; skipped in the main one, a failure under
`SSL_JAX_REQUIRE_TORCH=1` (`make test-export`):
  SSL_JAX_REQUIRE_TORCH=1 .venv-export/bin/python -m pytest -q tests/test_torch_resnet_options.py
"""
import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.export import torch as torch_export

KEY = jax.random.key(0, impl="rbg")


def _need(module: str):
  """The module, or a skip with the reason; under `make test-export` (CI) missing is a failure."""
  if os.environ.get("SSL_JAX_REQUIRE_TORCH") == "1":
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=f"{module} lives in .venv-export (make test-export)")


def _random_variables(model, seed=0):
  """Full-size tree filled with NumPy values (no init compile); BN statistics positive."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), KEY,
                          jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if leaf in ("bias", "mean"):
      return (rng.normal(size=s.shape) * 0.1).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("replace", [(False, False, True), (False, True, True)])
def test_dilated_c5_matches_torchvision(replace):
  torch = _need("torch")
  torchvision = _need("torchvision")
  arch = {"name": "resnet50", "replace_stride_with_dilation": replace}
  model = models.get_backbone(**arch)
  variables = _random_variables(model)
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ours = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  sd = torch_export.to_torch_state_dict(variables, arch)
  net = torchvision.models.resnet50(replace_stride_with_dilation=list(replace))
  net.fc = torch.nn.Identity()
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  net.eval()
  trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                              net.layer3, net.layer4)
  with torch.no_grad():
    theirs = trunk(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    pooled = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  stride = 32 // 2 ** sum(replace)
  assert theirs.shape == ours["feature_map"].shape == (2, 64 // stride, 64 // stride, 2048)
  scale = max(np.abs(theirs).max(), 1.0)
  np.testing.assert_allclose(ours["feature_map"], theirs, atol=1e-4 * scale)
  np.testing.assert_allclose(ours["pooled"], pooled, atol=1e-4 * scale)


def test_zero_init_residual_zeroes_the_same_bn_weights_as_torchvision():
  """Bottleneck blocks (ResNet-50; a full init compiles for ~20 s); basic blocks are checked
  value by value in tests/test_resnet_options.py."""
  name = "resnet50"
  torch = _need("torch")
  torchvision = _need("torchvision")
  torch.manual_seed(0)
  net = getattr(torchvision.models, name)(zero_init_residual=True)
  theirs = {k for k, v in net.state_dict().items()
            if k.endswith(".weight") and not k.startswith("fc.") and not torch.any(v != 0)}
  model = models.get_backbone(name, zero_init_residual=True)
  variables = jax.jit(functools.partial(model.init, train=False))(KEY, jnp.zeros((1, 32, 32, 3)))
  sd = torch_export.to_torch_state_dict(variables, name)
  ours = {k for k, v in sd.items() if k.endswith(".weight") and not np.any(v)}
  assert theirs == ours
  assert len(ours) == sum(models.resnet.STAGE_SIZES[int(name[6:])])  # one BN per block
