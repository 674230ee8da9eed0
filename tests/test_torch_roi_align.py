"""`ops.roi_align` against `torchvision.ops.roi_align` (forward and the gradient w.r.t. features).

Needs the export-verification environment (torch + torchvision); skipped in the main one, a
failure under `SSL_JAX_REQUIRE_TORCH=1` (`make test-export`):
  SSL_JAX_REQUIRE_TORCH=1 .venv-export/bin/python -m pytest -q tests/test_torch_roi_align.py
Our boxes are (y0, x0, y1, x1); torchvision's are (x1, y1, x2, y2): converted here.
"""
import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.ops.roi_align import roi_align


def _need(module: str):
  """The module, or a skip with the reason; under `make test-export` (CI) missing is a failure."""
  if os.environ.get("SSL_JAX_REQUIRE_TORCH") == "1":
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=f"{module} lives in .venv-export (make test-export)")


def _torchvision_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                           requires_grad=False):
  """features [B, H, W, C], boxes [B, K, 4] (y0, x0, y1, x1) -> ([B, K, oh, ow, C], input)."""
  torch = _need("torch")
  torchvision = _need("torchvision")
  x = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))
  x.requires_grad_(requires_grad)
  rois = [torch.from_numpy(np.ascontiguousarray(b[:, [1, 0, 3, 2]])) for b in boxes]
  out = torchvision.ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
  b, k = boxes.shape[:2]
  return out.reshape(b, k, features.shape[-1], *output_size).permute(0, 1, 3, 4, 2), x


def _boxes(rng, b, k, image_h, image_w, kind):
  if kind == "inside":      # inside the image (the adaptive ratio is exact there)
    lo_y, hi_y, lo_x, hi_x = 0, image_h, 0, image_w
  else:                     # partly or wholly outside
    lo_y, hi_y, lo_x, hi_x = -image_h, 2 * image_h, -image_w, 2 * image_w
  ys = np.sort(rng.uniform(lo_y, hi_y, (b, k, 2)), -1)
  xs = np.sort(rng.uniform(lo_x, hi_x, (b, k, 2)), -1)
  boxes = np.stack([ys[..., 0], xs[..., 0], ys[..., 1], xs[..., 1]], -1)
  if kind == "mixed":
    boxes[:, 0] = (0, 0, image_h, image_w)                          # the whole image, on its border
    boxes[:, 1] = (10, 20, 10.5, 20.25)                             # tiny
    boxes[:, 2] = (1.2 * image_h, -0.8 * image_w, 1.5 * image_h, -0.5 * image_w)  # all outside
    if k > 3:
      boxes[:, 3] = (image_h - 3, image_w - 2, image_h + 40, image_w + 30)  # over the corner
  return boxes.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted(output_size, spatial_scale, sampling_ratio, aligned):
  return jax.jit(functools.partial(roi_align, output_size=output_size,
                                   spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                   aligned=aligned))


# (batch, K, feature H×W, stride, output size, sampling ratio, aligned, boxes)
CASES = [
    (2, 17, (7, 7), 32, (7, 7), 2, True, "mixed"),      # MaskCo: 17 key boxes on a 7×7 C5
    (2, 17, (14, 14), 16, (7, 7), 2, True, "mixed"),    # dilated conv5
    (1, 1, (7, 7), 32, (1, 1), 2, True, "inside"),      # batch 1, K = 1
    (2, 5, (5, 6), 16, (7, 7), 1, True, "mixed"),
    (2, 5, (5, 6), 32, (1, 1), 1, False, "mixed"),
    (1, 4, (6, 5), 16, (2, 3), 2, False, "mixed"),
    (2, 6, (7, 7), 32, (7, 7), 0, True, "inside"),      # torchvision's adaptive default
    (1, 6, (9, 8), 16, (3, 3), -1, False, "inside"),
]


@pytest.mark.parametrize("b,k,hw,stride,out,ratio,aligned,kind", CASES)
def test_roi_align_matches_torchvision(b, k, hw, stride, out, ratio, aligned, kind):
  rng = np.random.default_rng(b * 100 + k)
  features = rng.normal(size=(b, *hw, 8)).astype(np.float32)
  boxes = _boxes(rng, b, k, hw[0] * stride, hw[1] * stride, kind)
  theirs, _ = _torchvision_roi_align(features, boxes, out, 1 / stride, ratio, aligned)
  ours = np.asarray(_jitted(out, 1 / stride, ratio, aligned)(features, boxes))
  assert ours.shape == tuple(theirs.shape)
  np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,ratio,aligned", [(32, 2, True), (16, 1, False)])
def test_roi_align_feature_gradient_matches_torchvision(stride, ratio, aligned):
  rng = np.random.default_rng(7)
  features = rng.normal(size=(2, 7, 7, 4)).astype(np.float32)
  boxes = _boxes(rng, 2, 5, 7 * stride, 7 * stride, "mixed")
  cotangent = rng.normal(size=(2, 5, 7, 7, 4)).astype(np.float32)
  torch = _need("torch")
  theirs, x = _torchvision_roi_align(features, boxes, (7, 7), 1 / stride, ratio, aligned,
                                     requires_grad=True)
  (theirs * torch.from_numpy(cotangent)).sum().backward()
  fn = _jitted((7, 7), 1 / stride, ratio, aligned)
  ours = jax.jit(jax.grad(lambda f: jnp.sum(fn(f, boxes) * cotangent)))(features)
  np.testing.assert_allclose(ours, x.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
