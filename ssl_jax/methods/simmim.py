"""SimMIM: a simple framework for masked image modeling (Xie et al., CVPR 2022).

Paper Sec. 3, with the semantics of the official code (microsoft/SimMIM `models/simmim.py`,
`data/data_simmim.py`):

1. View: one random resized crop (scale 0.67–1, ratio 3/4–4/3) with a horizontal flip and ImageNet
   normalisation, no colour augmentation (the "simmim" recipe of `data/views.py`).
2. Masking (Sec. 3.1, `MaskGenerator`): the image is cut into 32×32 mask patches and
   ceil(0.6·T) of the T mask patches are masked, uniformly per image, each spread over the model
   patches it covers (`ops.patches.simmim_mask`: 2×2 patches of a ViT/16, 8×8 of Swin's 4-pixel
   patches).
3. Encoder: the embeddings of the masked patches are replaced by one learnable mask token
   (`VisionTransformerForSimMIM` / `SwinTransformerForSimMIM.forward`). The token is this
   method's parameter (`params["mask_token"]`, outside `params["backbone"]`), handed to the
   backbone's `token_mask`/`mask_token` inputs, so `encoder(...)` exports a plain timm backbone.
   ViT: replaced before the position embedding is added; Swin: after the patch embedding norm.
4. Prediction head (Sec. 3.3): one linear layer, a 1×1 convolution of the final feature map to
   stride²·3 channels and a pixel shuffle (`models.decoder.LinearPixelDecoder`): stride = p = 16
   on a ViT/16's patch tokens, 32 on Swin's last stage.
5. Loss (Eq. 1, `losses.masked_pixel_l1`): ℓ1 between the prediction and the normalised input
   pixels, averaged over the masked pixels (upsampled from the model patch grid) and channels.

Backbone differences from the official ViT (`configs/simmim.py` and docs/simmim.md list them):
SimMIM's ViT-B is BEiT's, with no absolute position embedding but a relative position bias shared
by all blocks, layer scale 0.1, q/v biases only and truncated-normal init; ours is timm's ViT
(no relative bias: a learned absolute position embedding instead, no layer scale, a full qkv
bias, MAE's xavier init). The Swin is timm's Swin, the same network as SimMIM's.

Mask-token init as the official code: ViT `trunc_normal_(std=.02, a=-.02, b=.02)` (cut at ±1σ),
Swin `trunc_normal_(std=.02)` (cut at ±2, i.e. a plain normal(0.02)).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.methods import base
from ssl_jax.models import decoder as decoder_lib
from ssl_jax.models import swin, vit
from ssl_jax.ops import patches


# ---------------------------------------------------------------------------------------------
# Pieces MimCo shares: which backbones take a mask token, its init, strides, the mask itself.

def check_backbone(backbone: nn.Module, method: str) -> None:
  if not isinstance(backbone, (vit.VisionTransformer, swin.SwinTransformer)):
    raise ValueError(f"config.model.name: {method} masks patch embeddings and needs a ViT or Swin "
                     f"backbone (vit_*, swin_*), got {type(backbone).__name__}")


def feature_stride(backbone: nn.Module) -> int:
  """Pixels per cell of the backbone's `feature_map`: p for a ViT, p·2^(stages−1) for a Swin."""
  if isinstance(backbone, swin.SwinTransformer):
    return int(backbone.patch_size) * 2 ** (len(tuple(backbone.depths)) - 1)
  return int(backbone.patch_size)


def mask_token_init(backbone: nn.Module):
  """The official initialisation of the mask token for this backbone (module docstring)."""
  if isinstance(backbone, vit.VisionTransformer):
    return nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)
  return nn.initializers.normal(0.02)


def validate_masking(config, backbone: nn.Module) -> None:
  """config.method_args.mask_ratio / mask_patch_size against the image and the model patch."""
  a, size, p = config.method_args, config.data.image_size, int(backbone.patch_size)
  if not 0.0 < a.mask_ratio <= 1.0:
    raise ValueError(f"config.method_args.mask_ratio={a.mask_ratio} must be in (0, 1]")
  if a.mask_patch_size < 1 or a.mask_patch_size % p:
    raise ValueError(f"config.method_args.mask_patch_size={a.mask_patch_size} must be a positive "
                     f"multiple of config.model.patch_size={p}")
  if size % a.mask_patch_size:
    raise ValueError(f"config.data.image_size={size} is not divisible by "
                     f"config.method_args.mask_patch_size={a.mask_patch_size}")


def random_mask(rng: jax.Array, batch_size: int, config, backbone: nn.Module) -> jax.Array:
  """SimMIM's mask for a batch: [B, (H/p)·(W/p)] bool over the model patch grid, True = masked."""
  a = config.method_args
  return patches.simmim_mask(rng, batch_size, config.data.image_size, int(backbone.patch_size),
                             int(a.mask_patch_size), float(a.mask_ratio))


# ---------------------------------------------------------------------------------------------

def validate(config) -> None:
  backbone = base.make_backbone(config)
  check_backbone(backbone, "SimMIM")
  validate_masking(config, backbone)
  if config.data.image_size % feature_stride(backbone):
    raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by the "
                     f"encoder stride {feature_stride(backbone)}")


def batch_spec(config):
  """One view of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=1)


class SimMIMNet(nn.Module):
  """backbone with mask tokens → final feature map → linear pixel decoder.

  Parameters: `backbone`, `mask_token` [C] (C = the patch embedding width), `decoder`.
  """
  backbone: nn.Module
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.mask_token = self.param("mask_token", mask_token_init(self.backbone),
                                 (int(self.backbone.embed_dim),), jnp.float32)
    self.decoder = decoder_lib.LinearPixelDecoder(feature_stride(self.backbone), dtype=self.dtype)

  def __call__(self, x, token_mask, *, train: bool):
    """x: [B, H, W, 3] float; token_mask: [B, (H/p)·(W/p)] bool ->
    dict(pred [B, H, W, 3] float32 reconstruction, pooled [B, C] float32)."""
    out = self.backbone(x, train=train, token_mask=token_mask, mask_token=self.mask_token)
    return {"pred": self.decoder(out["feature_map"]), "pooled": out["pooled"]}

  def encode(self, x, *, train: bool = False):
    return self.backbone(x, train=train)["pooled"].astype(jnp.float32)


def make(config) -> base.Method:
  net = SimMIMNet(base.make_backbone(config), dtype=base.compute_dtype(config))
  backbone = net.backbone
  p = int(backbone.patch_size)
  grid = (config.data.image_size // p,) * 2

  def init(rng, batch):
    params_rng, dropout_rng = jax.random.split(rng)
    x = base.dummy_images(batch)
    token_mask = jnp.zeros((x.shape[0], grid[0] * grid[1]), bool)
    variables = net.init({"params": params_rng, "dropout": dropout_rng}, x, token_mask,
                         train=True)
    return variables["params"], {"batch_stats": variables.get("batch_stats", {})}

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    view_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)
    # Step 1) the view: host crop + flip, ImageNet normalisation (no colour augmentation).
    x = base.augmented_views(view_rng, batch["image"], config.data.views)[:, 0]
    # Step 2) random masking at 32×32 mask-patch granularity (Sec. 3.1).
    token_mask = random_mask(mask_rng, x.shape[0], config, backbone)
    # Step 3) encoder with the mask token, linear decoder to pixels (Sec. 3.3).
    out, stats = base.apply_train(net, params, state["batch_stats"], x, token_mask,
                                  rngs={"dropout": dropout_rng})
    # Step 4) ℓ1 on the masked pixels (Eq. 1; targets are the normalised input pixels).
    pixel_mask = patches.mask_to_pixels(token_mask, grid, p)
    loss = losses.masked_pixel_l1(out["pred"], x, pixel_mask)
    metrics = {"l1": loss, "features": jax.lax.stop_gradient(out["pooled"])}
    return loss, ({"batch_stats": stats}, metrics)

  def after_update(state, params, step):
    del params, step
    return state

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=backbone, batch_spec=batch_spec,
                     **base.eval_functions(net, SimMIMNet.encode, target=False))

