"""ccMIM: contrasting-aided contextual masked image modelling (Zhang et al., ICLR 2023).

MAE (`methods/mae.py`) with two changes (Sec. 3.2, Fig. 1), in the official code's form
(Sherrylone/ccMIM `models_ccmim.py`, `engine_pretrain.py`):
  1. *Which* patches are hidden: a no-gradient forward of the *current* encoder over all tokens
     gives each patch an importance a_i = Σ_blocks mean_heads attn[b, h, 1 + i, 0] (patch query i
     → CLS key; official `Attention` returns `attn.mean(1)[:, 1:, 0]` and `get_mask_idx` sums it
     over all blocks); the patches are sorted by softmax(a)/softmax(u), u ~ U[0, 1) (importance
     sampling, `ops.patches.importance_sampling`) and the least important 25 % stay visible, so
     the masked set holds the semantically rich patches and reconstruction is harder.
  2. A contrast between the two sets: the encoder also encodes the *masked* set (with its own
     CLS token); the CLS of the visible set (student) is pulled to the CLS of the masked set
     (teacher, stop-gradient) by an InfoNCE over the global batch,
     L = L_recons + λ · L_contrast (Eq. 10), L_recons = MAE's norm-pix MSE on the masked patches
     reconstructed from the visible set (Eq. 9).

Where the paper's text and the official code differ (FIDELITY rows 14-20), and our default:

| # | point | paper text | official code (our default) | option |
|---|---|---|---|---|
| 14 | λ | 0.2 | 0.1 | `:paper`, `method_args.contrast_weight` |
| 15 | decoder | "two-layer, as MAE" | 8 blocks × 512, 16 heads | `:paper` 2 blocks |
| 16 | batch | 1024 | 4096 (lr = blr · bs/256 either way) | `:paper` 1024 |
| 17 | τ of the CLS loss | unspecified | 0.5 (an unused attribute says 0.2) | `method_args.temperature` |
| 18 | CLS loss | Eq. 7: visible–visible negatives + SG(masked)–visible | visible queries vs all-gathered masked keys, cross-entropy × 2τ (MoCo v3 form) | `contrast="eq7"`; Eq. 8 L_align (1 − cos(SG(h^M), p(h^V)), predictor p): `contrast="align"` |
| 18b | projector on the CLS | "projector head" in the contrastive branch | defined (Linear-BN-ReLU-Linear-BN, 256) but never called: the normed CLS tokens are contrasted directly | `projector=True` (`:paper`) |
| 19 | importance | Eq. 4: softmax over patches of head-mean q_CLS·K/√D (CLS query → patch keys) | patch queries → CLS key `attn[:, 1:, 0]`, head mean, summed over all blocks, no-grad forward of the current encoder in the same step | `importance="paper"`: CLS query → patch keys, same head mean (of probabilities) and block sum (`:paper`) |
| 20 | augmentation | "only random resized crop" | crop (0.2, 1) bicubic + flip | — (no flip-free recipe yet) |

Direction of the attention read (row 19), verified in `basic_module.Attention.forward`:
`attn = softmax(q @ kᵀ · scale)` is [B, heads, queries, keys]; `avg_attn = attn.mean(dim=1)`;
it returns `avg_attn[:, 1:, 0]`: rows = queries 1…N (the patches), column 0 = the CLS *key*.
So the official score of patch i is how much patch i attends to the CLS token, not the CLS
query's attention to patch i that Eq. 4 writes. At initialisation both are ≈ depth/(N+1), far
below the noise's range of 1, so the masking starts nearly random (the paper's Sec. 4.3).

Dividing strategies (Table 5 ablation, `method_args.dividing`): "importance_sampling" (default),
"importance" (no noise: the top 75 % by importance are masked), "random" (MAE's, the official
`--random`), "block" (BEiT's, min 16 patches per block). All hide the same number of patches.
"random" and "block" skip the importance forward (as the official `--random` does).

Stop-gradients: the importance forward runs on stop-gradient parameters (official
`torch.no_grad()` on detached tokens); the masked set's representation is stop-gradient in every
contrast form (official: `concat_all_gather` runs under `no_grad`, so no gradient reaches the
masked branch; Eq. 7/8 write SG(h^M)). Only the visible branch and the decoder are trained by
the reconstruction, and the visible CLS (+ projector/predictor) by the contrast.

Online probe ("features"): the pooled output of the importance forward, i.e. of the *full*
unmasked image with the current weights (free: that forward runs anyway); with "random"/"block"
dividing, the pooled output of the visible set, as MAE.

The encoder is a plain ViT under `params["backbone"]`; decoder, projector and predictor sit
beside it, so `encoder(params, state)` is exactly the backbone's variables.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.methods import base, mae
from ssl_jax.models import vit
from ssl_jax.models.heads import MLP
from ssl_jax.ops import patches

DIVIDING = ("importance_sampling", "importance", "random", "block")
IMPORTANCE = {"code": "cls_key", "paper": "cls_query"}  # -> ViT `return_attention`
CONTRAST = ("code", "eq7", "align")


def validate(config) -> None:
  mae.validate_encoder_decoder(config)
  a = config.method_args
  if a.dividing not in DIVIDING:
    raise ValueError(f"config.method_args.dividing={a.dividing!r} must be one of {DIVIDING}")
  if a.importance not in IMPORTANCE:
    raise ValueError(f"config.method_args.importance={a.importance!r} must be one of "
                     f"{tuple(IMPORTANCE)}")
  if a.contrast not in CONTRAST:
    raise ValueError(f"config.method_args.contrast={a.contrast!r} must be one of {CONTRAST}")
  if a.temperature <= 0:
    raise ValueError(f"config.method_args.temperature={a.temperature} must be > 0")
  if a.contrast_weight < 0:
    raise ValueError(f"config.method_args.contrast_weight={a.contrast_weight} must be >= 0")


def batch_spec(config):
  """One view of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=1)


def _heads(config, embed_dim: int):
  """(projector or None, predictor or None), the official projector's shape when enabled."""
  a, dtype = config.method_args, base.compute_dtype(config)
  projector = predictor = None
  out_dim = embed_dim
  if a.projector:
    # Official (defined, unused) projector: Linear(D, D, no bias) → BN → ReLU →
    # Linear(D, 256, no bias) → BN without affine.
    projector = MLP(a.projector_hidden or embed_dim, a.projector_dim, num_layers=2, norm="bn",
                    last_norm="bn_noaffine", use_bias=False, dtype=dtype)
    out_dim = a.projector_dim
  if a.contrast == "align":
    # Eq. 8's p(·): SimSiam's two-layer predictor (Linear → BN → ReLU → Linear).
    predictor = MLP(a.predictor_hidden, out_dim, num_layers=2, norm="bn", dtype=dtype)
  return projector, predictor


def make_forward(config):
  """forward(params, state, batch, rng) -> (outputs, new_batch_stats).

  outputs: `x` [B, H, W, 3] normalised view; `importance` [B, N] float32 (None for random/block
  dividing); `masking` (`ops.patches.Masking`); `pred` [B, N, p·p·3]; `target_patches`
  [B, N, p·p·3]; `h_vis` [B, C] the visible set's CLS (after the projector if any), `h_mask`
  [B, C] the masked set's (stop-gradient), `p_vis` [B, C] the predictor's output ("align" only,
  else None); `features` [B, D] stop-gradient probe features.
  The rng is split into (view, mask, stochastic-depth) keys in that order; the stochastic-depth
  key is split again for the importance, visible and masked passes.
  """
  a = config.method_args
  backbone = base.make_backbone(config)
  p = backbone.patch_size
  decoder = mae.make_decoder(config, p)
  projector, predictor = _heads(config, backbone.embed_dim)
  sg = jax.lax.stop_gradient

  def head(module, name, params, stats, h):
    if module is None:
      return h, stats
    out, new = base.apply_train(module, params[name], stats[name], h)
    return out.astype(jnp.float32), {**stats, name: new}

  def forward(params, state, batch, rng):
    k_view, k_mask, k_drop = jax.random.split(rng, 3)
    k_imp, k_vis, k_msk = jax.random.split(k_drop, 3)
    x = base.augmented_views(k_view, batch["image"], config.data.views)[:, 0]
    b, h, w, _ = x.shape
    grid = (h // p, w // p)
    n = grid[0] * grid[1]
    stats = state["batch_stats"]
    importance = None
    # Step 1) divide the patches. Importance: a no-grad forward of the current encoder over all
    # tokens, attention summed over blocks (official `get_mask_idx`).
    if a.dividing in ("importance_sampling", "importance"):
      full = backbone.apply({"params": sg(params["backbone"])}, x, train=True,
                            return_attention=IMPORTANCE[a.importance], rngs={"dropout": k_imp})
      importance = patches.attention_importance(full["cls_attention"], "sum")
      features = full["pooled"]  # no gradient either: computed from stop-gradient parameters
      if a.dividing == "importance_sampling":
        masking = patches.importance_sampling(k_mask, importance, a.mask_ratio)
      else:
        masking = patches.importance_masking(importance, a.mask_ratio)
    elif a.dividing == "random":
      masking = patches.random_masking(k_mask, b, n, a.mask_ratio)
    else:
      masking = patches.block_masking(k_mask, b, grid, a.mask_ratio)
    # Step 2) encode the visible set and the masked set, each with the CLS token.
    vis = mae.encode_patches(backbone, params["backbone"], x, masking.keep_indices, k_vis)
    msk = mae.encode_patches(backbone, params["backbone"], x, masking.mask_indices, k_msk)
    if importance is None:
      features = sg(vis["pooled"])
    # Step 3) the visible set reconstructs the masked patches.
    pred = decoder.apply({"params": params["decoder"]}, vis["tokens"], masking.restore, grid)
    # Step 4) the two sets' CLS tokens in contrastive space; the masked set is the teacher.
    h_vis, stats = head(projector, "projector", params, stats,
                        vis["tokens"][:, 0].astype(jnp.float32))
    h_mask, stats = head(projector, "projector", params, stats,
                         msk["tokens"][:, 0].astype(jnp.float32))
    p_vis, stats = (head(predictor, "predictor", params, stats, h_vis) if predictor is not None
                    else (None, stats))
    return {"x": x, "importance": importance, "masking": masking, "pred": pred,
            "target_patches": vit.patchify(x, p), "h_vis": h_vis, "h_mask": sg(h_mask),
            "p_vis": p_vis, "features": features}, stats

  def init(rng, batch):
    k_net, k_proj, k_pred = jax.random.split(rng, 3)
    x = base.dummy_images(batch)
    params = mae.init_encoder_decoder(k_net, backbone, decoder, x)
    stats = {}
    h = jnp.zeros((x.shape[0], backbone.embed_dim), jnp.float32)
    for name, module, key in (("projector", projector, k_proj), ("predictor", predictor, k_pred)):
      if module is None:
        continue
      variables = module.init({"params": key}, h, train=True)
      params[name], stats[name] = variables["params"], variables["batch_stats"]
      h = jnp.zeros((x.shape[0], module.out_dim), jnp.float32)
    return params, {"batch_stats": stats}

  return forward, init, backbone


def contrast_loss(config, outputs) -> jax.Array:
  """L_contrast of the configured form from `forward`'s outputs (h_mask is already SG)."""
  a = config.method_args
  if a.contrast == "code":
    # Official `forward_alignment_loss`: CE(v·mᵀ/τ, diagonal) over the global batch, × 2τ.
    return 2.0 * a.temperature * losses.info_nce(outputs["h_vis"], outputs["h_mask"],
                                                 a.temperature)
  if a.contrast == "eq7":
    return losses.ccmim_nce(outputs["h_vis"], outputs["h_mask"], a.temperature)
  # Eq. 8: mean(1 − cos(SG(h^M), p(h^V))) = byol_loss / 2.
  return 0.5 * losses.byol_loss(outputs["p_vis"], outputs["h_mask"])


def make(config) -> base.Method:
  a = config.method_args
  forward, init, backbone = make_forward(config)

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step, constants
    out, stats = forward(params, state, batch, rng)
    reconstruction = losses.masked_patch_mse(out["pred"], out["target_patches"],
                                             out["masking"].mask, norm_pix=a.norm_pix_loss)
    contrast = contrast_loss(config, out)
    loss = reconstruction + a.contrast_weight * contrast  # Eq. 10
    metrics = {"reconstruction": reconstruction, "contrast": contrast,
               "features": out["features"]}
    if out["importance"] is not None:
      # Mean importance of the masked patches over that of all patches: 1 for random masking,
      # above 1 once the masked set holds the important patches (the paper's Fig. 3a).
      imp, mask = out["importance"], out["masking"].mask
      masked_mean = jnp.sum(imp * mask, axis=-1) / jnp.sum(mask, axis=-1)
      metrics["masked_importance_ratio"] = jnp.mean(masked_mean / jnp.mean(imp, axis=-1))
    return loss, ({**state, "batch_stats": stats}, metrics)

  def after_update(state, params, step):
    del params, step
    return state

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=backbone, batch_spec=batch_spec, **mae.eval_functions(backbone))
