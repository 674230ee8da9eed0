"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2022).

One view per image (MAE's `PRETRAIN.md` recipe: random resized crop (0.2, 1), bicubic, flip, no
colour). Per example, 75 % of the N patches are hidden at random (Sec. 3 "Masking"; the official
`random_masking`, `ops.patches.random_masking`); the ViT encoder sees only the K visible patches
plus its CLS token (Sec. 3 "MAE encoder"); the lightweight decoder (`models.decoder.MAEDecoder`)
fills the hidden positions with its mask token and predicts every patch's pixels (Sec. 3 "MAE
decoder"); the loss is the mean squared error on the *masked* patches only, against per-patch
normalised pixels (Sec. 3 "Reconstruction target", norm-pix on as `PRETRAIN.md`;
`losses.masked_patch_mse`). The target is the patchified network input, i.e. the
ImageNet-normalised image, as the official code (which normalises in the data transform).

The encoder is a plain ViT kept under `params["backbone"]` (fixed 2-D sin-cos positions, as
MAE); the decoder lives beside it under `params["decoder"]`, so `encoder(params, state)` is
exactly the backbone's variables and evaluation/export never see the decoder.

Online probe ("features"): the encoder only ever sees visible patches during training, so the
probe gets the stop-gradient pooled output of *that* forward (the CLS token, or the mean of the
visible patch tokens with `model.pool="mean"`). It costs nothing; a full unmasked forward would
cost four times the encoder's training forward. Expect the online probe to read lower than a
probe on full images (`encode`, linear evaluation) for the same weights.

`make_forward(config)` exposes the step's network outputs (masking, predictions, targets) so tests
rebuild the loss from them; ccMIM (`methods/ccmim.py`) reuses the encoder/decoder pieces.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.methods import base
from ssl_jax.models import vit
from ssl_jax.models.decoder import MAEDecoder
from ssl_jax.ops import patches


def validate_encoder_decoder(config) -> None:
  """Checks shared by MAE and ccMIM: a ViT encoder, a mask ratio that leaves both sets non-empty,
  a decoder whose width fits its heads and sin-cos table."""
  a, m = config.method_args, config.model
  if not str(m.name).startswith("vit_"):
    raise ValueError(f"config.model.name={m.name!r}: {config.method} needs a ViT backbone "
                     "(vit_tiny / vit_small / vit_base): it drops patches")
  grid = config.data.image_size // int(m.get("patch_size", 16))
  n = grid * grid
  if not 0.0 < a.mask_ratio < 1.0:
    raise ValueError(f"config.method_args.mask_ratio={a.mask_ratio} must be in (0, 1)")
  keep = patches.num_visible(n, a.mask_ratio)
  if not 1 <= keep < n:
    raise ValueError(f"config.method_args.mask_ratio={a.mask_ratio} keeps {keep} of the {n} "
                     f"patches ({config.data.image_size} px, patch {m.get('patch_size', 16)}); "
                     "both the visible and the masked set need at least one patch")
  if a.decoder_depth < 1:
    raise ValueError(f"config.method_args.decoder_depth={a.decoder_depth} must be >= 1")
  if a.decoder_dim % 4 or a.decoder_dim % a.decoder_heads:
    raise ValueError(f"config.method_args.decoder_dim={a.decoder_dim} must be divisible by 4 "
                     f"(sin-cos positions) and by config.method_args.decoder_heads="
                     f"{a.decoder_heads}")


def validate(config) -> None:
  validate_encoder_decoder(config)


def batch_spec(config):
  """One view of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=1)


def make_decoder(config, patch_size: int) -> MAEDecoder:
  a = config.method_args
  return MAEDecoder(patch_size=patch_size, embed_dim=a.decoder_dim, depth=a.decoder_depth,
                    num_heads=a.decoder_heads, dtype=base.compute_dtype(config))


def init_encoder_decoder(rng: jax.Array, backbone, decoder: MAEDecoder, images: jax.Array
                         ) -> dict:
  """{"backbone", "decoder"} parameters for images [B, H, W, 3] (shape source only)."""
  k_enc, k_dec = jax.random.split(rng)
  b, h, w, _ = images.shape
  grid = (h // backbone.patch_size, w // backbone.patch_size)
  enc = backbone.init({"params": k_enc}, images, train=False)["params"]
  tokens = jnp.zeros((b, 1 + grid[0] * grid[1], backbone.embed_dim), jnp.float32)
  restore = jnp.broadcast_to(jnp.arange(grid[0] * grid[1], dtype=jnp.int32), (b, grid[0] * grid[1]))
  dec = decoder.init({"params": k_dec}, tokens, restore, grid)["params"]
  return {"backbone": enc, "decoder": dec}


def encode_patches(backbone, params, x: jax.Array, indices: jax.Array, rng: jax.Array,
                   **kwargs) -> dict:
  """The ViT on a subset of patches in train mode: x [B, H, W, 3], indices [B, K] -> its dict
  (`pooled` [B, D], `tokens` [B, 1+K, D], CLS first). `rng` feeds stochastic depth."""
  return backbone.apply({"params": params}, x, train=True, keep_indices=indices,
                        rngs={"dropout": rng}, **kwargs)


def eval_functions(backbone) -> dict[str, Callable]:
  """`encode` / `encoder` / `set_encoder` for a method with the ViT under params["backbone"] and
  no encoder batch statistics: the encoder is exactly the backbone's variables."""

  def encode(params, state, images):
    del state
    out = backbone.apply({"params": params[base.BACKBONE]}, base.normalized(images), train=False)
    return out["pooled"].astype(jnp.float32)

  def encoder(params, state):
    return base.backbone_variables(params, state.get("batch_stats"))

  return {"encode": encode, "encoder": encoder, "target_encoder": None,
          "set_encoder": base.set_backbone}


def make_forward(config):
  """forward(params, batch, rng) -> dict of the step's tensors (tests rebuild the loss from it).

  Keys of the result: `x` [B, H, W, 3] the normalised view, `masking` (`ops.patches.Masking`),
  `pred` [B, N, p·p·3] decoder output, `target_patches` [B, N, p·p·3] = patchify(x), `pooled`
  [B, D] the encoder's pooled output on the visible patches. The rng is split into
  (view, mask, stochastic-depth) keys in that order.
  """
  a = config.method_args
  backbone = base.make_backbone(config)
  p = backbone.patch_size
  decoder = make_decoder(config, p)

  def forward(params, batch, rng):
    k_view, k_mask, k_drop = jax.random.split(rng, 3)
    x = base.augmented_views(k_view, batch["image"], config.data.views)[:, 0]
    b, h, w, _ = x.shape
    grid = (h // p, w // p)
    # Step 1) hide 75 % of the patches at random, per example.
    masking = patches.random_masking(k_mask, b, grid[0] * grid[1], a.mask_ratio)
    # Step 2) encode the visible patches (+ CLS) only.
    enc = encode_patches(backbone, params["backbone"], x, masking.keep_indices, k_drop)
    # Step 3) decode every patch from the visible tokens and the decoder's mask tokens.
    pred = decoder.apply({"params": params["decoder"]}, enc["tokens"], masking.restore, grid)
    return {"x": x, "masking": masking, "pred": pred, "target_patches": vit.patchify(x, p),
            "pooled": enc["pooled"]}

  return forward, backbone, decoder


def make(config) -> base.Method:
  a = config.method_args
  forward, backbone, decoder = make_forward(config)

  def init(rng, batch):
    params = init_encoder_decoder(rng, backbone, decoder, base.dummy_images(batch))
    return params, {"batch_stats": {}}

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    out = forward(params, batch, rng)
    # Step 4) MSE on the masked patches only (norm-pix targets).
    loss = losses.masked_patch_mse(out["pred"], out["target_patches"], out["masking"].mask,
                                   norm_pix=a.norm_pix_loss)
    metrics = {"reconstruction": loss, "features": jax.lax.stop_gradient(out["pooled"])}
    return loss, (state, metrics)

  def after_update(state, params, step):
    del params, step
    return state

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=backbone, batch_spec=batch_spec, **eval_functions(backbone))
