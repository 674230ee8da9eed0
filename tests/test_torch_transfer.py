"""Detection transfer (docs/transfer.md): an exported ResNet-50 is a torchvision Mask R-CNN
backbone. Its `backbone.body` (an IntermediateLayerGetter over torchvision's ResNet-50) loads the
export strictly, with trainable BN (no pretrained weights given to torchvision) and with the
FrozenBatchNorm2d of torchvision's detection recipes, and returns our stage maps C2…C5.

Needs torch/torchvision (the export environment, `make test-export`):
  SSL_JAX_REQUIRE_TORCH=1 .venv-export/bin/python -m pytest -q tests/test_torch_transfer.py
In the main environment it is skipped.
"""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.export.__main__ import export

KEY = jax.random.key(0, impl="rbg")


def _need(module: str):
  """The module, or a skip with the reason; under `make test-export` (CI) missing is a failure."""
  if os.environ.get("SSL_JAX_REQUIRE_TORCH") == "1":
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=f"{module} lives in .venv-export (make test-export)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A randomly initialised full ResNet-50 (NumPy values, no compile), exported as
  `python -m ssl_jax.export` writes it, and the file's tensors as torch tensors."""
  _need("torch")
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  model = models.get_backbone("resnet50")
  abstract = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 64, 64, 3)), train=False))
  rng = np.random.default_rng(0)

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):  # running variances must be positive
      return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
    return (0.05 * rng.normal(size=a.shape)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, abstract)
  path = str(tmp_path_factory.mktemp("transfer") / "resnet50.safetensors")
  export(variables, "resnet50", path)
  return model, variables, load_file(path)


def _body_outputs(body, x):
  torch = _need("torch")
  body.eval()
  with torch.no_grad():
    return [v.numpy().transpose(0, 2, 3, 1) for v in body(torch.from_numpy(
        np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).values()]


def test_maskrcnn_backbone_loads_the_export_strictly(exported):
  _need("torchvision")
  import torchvision  # pylint: disable=import-outside-toplevel
  model, variables, state_dict = exported
  assert not any(k.startswith("fc.") for k in state_dict)  # a backbone: no classifier
  detector = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None,
                                                                weights_backbone=None)
  body = detector.backbone.body
  result = body.load_state_dict(state_dict, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  for name, tensor in body.state_dict().items():
    np.testing.assert_array_equal(tensor.numpy(), state_dict[name].numpy(), err_msg=name)
  # The body's four outputs are the FPN's inputs C2..C5: our stage maps, eval mode.
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ours = jax.jit(lambda v, x: model.apply(v, x, train=False)["stages"])(variables, x)
  for i, (got, want) in enumerate(zip(_body_outputs(body, x), ours)):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-3, atol=1e-3,
                               err_msg=f"C{i + 2}")


def test_frozen_bn_detection_backbone_loads_the_export_strictly(exported):
  """torchvision's detection recipes freeze BN (FrozenBatchNorm2d) and the stem + layer1 of a
  pretrained backbone: the export loads there too (FrozenBatchNorm2d drops the
  num_batches_tracked entries the export carries) and gives the same maps."""
  torchvision = _need("torchvision")
  detection = torchvision.models.detection
  frozen_bn = torchvision.ops.misc.FrozenBatchNorm2d
  _, _, state_dict = exported
  backbone = detection.backbone_utils.resnet_fpn_backbone(
      backbone_name="resnet50", weights=None, norm_layer=frozen_bn, trainable_layers=3)
  result = backbone.body.load_state_dict(state_dict, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  detector = detection.MaskRCNN(backbone, num_classes=91)
  trainable = {n.split(".")[2] for n, p in detector.named_parameters()
               if n.startswith("backbone.body.") and p.requires_grad}
  assert trainable == {"layer2", "layer3", "layer4"}
  x = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype(np.float32)
  reference = torchvision_resnet50_stages(state_dict, x)
  for got, want in zip(_body_outputs(backbone.body, x), reference):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def torchvision_resnet50_stages(state_dict, x):
  """C2..C5 of a plain torchvision ResNet-50 holding the export (trainable-BN layout)."""
  torch = _need("torch")
  torchvision = _need("torchvision")
  net = torchvision.models.resnet50()
  net.fc = torch.nn.Identity()
  net.load_state_dict(state_dict, strict=True)
  net.eval()
  with torch.no_grad():
    h = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    h = net.maxpool(net.relu(net.bn1(net.conv1(h))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
      h = layer(h)
      out.append(h.numpy().transpose(0, 2, 3, 1))
  return out
