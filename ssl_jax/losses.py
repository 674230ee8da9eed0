"""Self-supervised losses shared by the methods: pure functions of arrays.

Every loss is written over the *global* batch. Under `jax.jit` with the inputs sharded over the
"data" mesh axis, XLA inserts the all-gathers that the official pmap code wrote by hand, so the
negatives of a contrastive loss are the whole global batch without any collective in this file.
All losses compute in float32 whatever the input dtype (bf16 logits divided by a small τ lose
too much precision in the softmax).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Official DetCon/SimCLR mask value: large enough that exp(logit - 1e9) is exactly 0 in float32,
# small enough that a fully masked row keeps a finite logsumexp (no NaN gradients).
_INFINITY_PROXY = 1e9


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
  """`x * rsqrt(max(sum(x²), ε))` along `axis` (the official BYOL/DetCon form).

  Args:
    x: [..., D] float.
    axis: the feature axis.
    epsilon: floor on the squared norm; a zero vector stays zero instead of becoming NaN.

  Returns:
    x with unit L2 norm along `axis`, same shape and dtype.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, epsilon))


def _normalized_f32(x: jax.Array) -> jax.Array:
  return l2_normalize(x.astype(jnp.float32))


def info_nce(q: jax.Array, k: jax.Array, temperature: float,
             negatives: jax.Array | None = None) -> jax.Array:
  """InfoNCE cross-entropy of queries against keys; q, k and negatives are L2-normalised here.

  Two forms:
    * `negatives is None` (MoCo v3): logits = q kᵀ / τ, [N, N], the positive of q_i is k_i
      (labels = arange(N)); all other keys of the global batch are negatives. The official
      MoCo v3 loss multiplies this value by 2τ; that factor is the caller's (methods/moco.py).
    * `negatives` given (MoCo v2 queue): logits_i = [q_i·k_i, q_i·negatives_jᵀ] / τ, [N, 1+M],
      label 0.

  Loss = mean_i [ −log softmax(logits_i)[label_i] ].

  Args:
    q: [N, D] float queries (online branch).
    k: [N, D] float keys (momentum branch; the caller applies stop_gradient).
    temperature: τ > 0.
    negatives: optional [M, D] float queue of keys (not sharded; replicated).

  Returns:
    Scalar float32. N is the global batch axis (sharded over "data").
  """
  q, k = _normalized_f32(q), _normalized_f32(k)
  if negatives is None:
    logits = q @ k.T / temperature
    positive = jnp.diagonal(logits)
  else:
    positive = jnp.sum(q * k, axis=-1, keepdims=True) / temperature
    logits = jnp.concatenate([positive, q @ _normalized_f32(negatives).T / temperature], axis=1)
    positive = positive[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positive)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR v1 NT-Xent (normalised temperature-scaled cross entropy), symmetric.

  For anchor z1_i the candidates are [z2_j for all j] ∪ [z1_j for j ≠ i] (2N − 2 negatives); the
  anchor itself is removed by subtracting 1e9 from its logit, as the official code does. Same for
  anchors z2_i. Loss = 1/(2N) Σ_anchors −log softmax(sim/τ)[positive] (the paper's Eq. 1 average).
  The official v1 code returns loss_a + loss_b (each a mean over N), i.e. twice this value.

  Args:
    z1: [N, D] float projections of view 1.
    z2: [N, D] float projections of view 2 (row i is the positive of z1 row i).
    temperature: τ > 0.

  Returns:
    Scalar float32. N is the global batch axis (sharded over "data").
  """
  z1, z2 = _normalized_f32(z1), _normalized_f32(z2)
  self_mask = _INFINITY_PROXY * jnp.eye(z1.shape[0], dtype=jnp.float32)

  def one_direction(a, b):
    logits_ab = a @ b.T / temperature
    logits_aa = a @ a.T / temperature - self_mask
    lse = jnp.logaddexp(jax.nn.logsumexp(logits_ab, axis=-1),
                        jax.nn.logsumexp(logits_aa, axis=-1))
    return jnp.mean(lse - jnp.diagonal(logits_ab))

  return 0.5 * (one_direction(z1, z2) + one_direction(z2, z1))


def byol_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL regression loss: mean_i ‖p̄_i − z̄_i‖² = mean_i (2 − 2·cos(p_i, z_i)).

  `z` is NOT stop-gradiented here: the caller passes the target network's projection (which
  carries no gradient to the online parameters) so this function stays a plain formula.

  Args:
    p: [N, D] float online predictions.
    z: [N, D] float target projections.

  Returns:
    Scalar float32, mean over the global batch axis N.
  """
  cos = jnp.sum(_normalized_f32(p) * _normalized_f32(z), axis=-1)
  return jnp.mean(2.0 - 2.0 * cos)


def detcon_loss(pred1: jax.Array, pred2: jax.Array, target1: jax.Array, target2: jax.Array,
                pind1: jax.Array, pind2: jax.Array, tind1: jax.Array, tind2: jax.Array,
                temperature: float = 0.1) -> jax.Array:
  """DetCon contrastive loss over mask ROIs (paper Eq. 2–3; official `byol_nce_detcon`).

  Flatten the B·R ROIs of each view. For prediction ROI (b, r) of view 1 the logits are

      [pred1_br · target2_uvᵀ for all u, v ;  pred1_br · target1_uvᵀ for all u, v] / τ

  over the global batch (2·B·R entries). In the same-view block the entries with u = b and
  tind1_uv = pind1_br (the ROI itself and duplicates drawn by sampling with replacement) get
  −1e9 and are never positives. Positives are the other view's ROIs of the same image with the
  same id, with labels uniform over them. Each ROI has weight 1/#{r' : pind1_br' = pind1_br}
  (its id's share of the view's samples), and 0 when it has no positive. loss_a is the mean over
  all B×R ROIs of weight · cross-entropy; loss_b swaps the views; the loss is loss_a + loss_b.

  Extension (no effect on the official inputs, whose ids are ≥ 0): a negative id marks an empty
  ROI (no id present, see `ops.mask_pooling.sample_mask_ids`): it has weight 0, is never a
  positive, and as a target it is removed from every row (−1e9) instead of acting as a negative.

  Args:
    pred1, pred2: [B, R, D] float online predictions of views 1 and 2.
    target1, target2: [B, R, D] float target projections (caller applies stop_gradient).
    pind1, pind2: [B, R] int mask ids of the prediction ROIs.
    tind1, tind2: [B, R] int mask ids of the target ROIs (equal to pind* in DetCon).
    temperature: τ (0.1 in DetCon).

  Returns:
    Scalar float32. B is the global batch axis (sharded over "data"); the largest intermediate
    is [B·R, B·R] per logit block.
  """
  b, r, d = pred1.shape
  n = b * r
  image = jnp.repeat(jnp.arange(b), r)
  same_image = image[:, None] == image[None, :]  # [n, n]

  def flat(x):
    return _normalized_f32(x.reshape(n, d))

  def flat_ids(ind):
    return ind.reshape(n).astype(jnp.int32)

  def one_side(pred, pind, t_other, tind_other, t_same, tind_same):
    pred, pind = flat(pred), flat_ids(pind)
    tind_other, tind_same = flat_ids(tind_other), flat_ids(tind_same)
    logits_other = pred @ flat(t_other).T / temperature   # [n, n]
    logits_same = pred @ flat(t_same).T / temperature     # [n, n]
    valid = pind >= 0
    positive = same_image & (pind[:, None] == tind_other[None, :]) & valid[:, None]
    same_obj = same_image & (pind[:, None] == tind_same[None, :])
    logits_other = logits_other - _INFINITY_PROXY * (tind_other < 0)[None, :]
    logits_same = logits_same - _INFINITY_PROXY * (same_obj | (tind_same < 0)[None, :])
    lse = jnp.logaddexp(jax.nn.logsumexp(logits_other, axis=-1),
                        jax.nn.logsumexp(logits_same, axis=-1))
    num_positives = jnp.sum(positive, axis=-1)
    # Cross-entropy with labels uniform over the positives: lse − mean of the positive logits.
    positive_mean = (jnp.sum(jnp.where(positive, logits_other, 0.0), axis=-1)
                     / jnp.maximum(num_positives, 1))
    ids = pind.reshape(b, r)
    area = jnp.sum(ids[:, :, None] == ids[:, None, :], axis=-1).reshape(n)
    weight = (num_positives > 0) / area
    return jnp.mean(weight * (lse - positive_mean))

  loss_a = one_side(pred1, pind1, target2, tind2, target1, tind1)
  loss_b = one_side(pred2, pind2, target1, tind1, target2, tind2)
  return loss_a + loss_b


def masked_patch_mse(pred: jax.Array, target_patches: jax.Array, mask: jax.Array,
                     norm_pix: bool = True) -> jax.Array:
  """MAE's reconstruction loss (He et al. 2022, Sec. 3 "Reconstruction target"; `forward_loss`).

  With norm_pix, each target patch is normalised by its own pixel statistics:
  t̂ = (t − mean(t)) / √(var(t) + 1e-6), var *unbiased* (torch's `.var()` default, ddof = 1)
  as the official code. Then

      loss = Σ_{b,i} mask_bi · mean_p (pred_bip − t̂_bip)² / Σ_{b,i} mask_bi,

  the mean over masked patches only (visible-patch predictions get zero gradient). An all-visible
  mask gives 0 (the official code would give 0/0 = NaN). ccMIM uses the same loss.

  Args:
    pred: [B, N, P] float decoder predictions (P = p·p·3, `vit.patchify` order).
    target_patches: [B, N, P] float, `vit.patchify(images, p)`.
    mask: [B, N] bool or float, 1/True = masked (`Masking.mask`).
    norm_pix: normalise each target patch (MAE `PRETRAIN.md`: on).

  Returns:
    Scalar float32; B is the global batch axis (the sums run over the global batch).
  """
  if pred.shape != target_patches.shape or pred.ndim != 3 or mask.shape != pred.shape[:2]:
    raise ValueError(f"pred {pred.shape} and target_patches {target_patches.shape} must both be "
                     f"[B, N, P] and mask {mask.shape} [B, N]")
  target = target_patches.astype(jnp.float32)
  if norm_pix:
    if target.shape[-1] < 2:
      raise ValueError("norm_pix needs at least 2 values per patch (unbiased variance)")
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_pixel_l1(pred: jax.Array, images: jax.Array, pixel_mask: jax.Array) -> jax.Array:
  """SimMIM's reconstruction loss (Xie et al. 2022, Eq. 1; official `SimMIM.forward`).

      loss = Σ_{b,y,x,c} m_byx · |pred_byxc − image_byxc| / (Σ_{b,y,x} m_byx + 1e-5) / C,

  i.e. the mean absolute error over the masked pixels and all channels, with the official 1e-5
  in the denominator (an all-visible mask gives 0).

  Args:
    pred: [B, H, W, C] float reconstruction (`LinearPixelDecoder` output).
    images: [B, H, W, C] float input images (as normalised for the encoder).
    pixel_mask: [B, H, W] bool or float, 1/True = masked (`ops.patches.mask_to_pixels`).

  Returns:
    Scalar float32; B is the global batch axis.
  """
  if pred.shape != images.shape or pred.ndim != 4 or pixel_mask.shape != pred.shape[:3]:
    raise ValueError(f"pred {pred.shape} and images {images.shape} must both be [B, H, W, C] and "
                     f"pixel_mask {pixel_mask.shape} [B, H, W]")
  m = pixel_mask.astype(jnp.float32)
  err = jnp.abs(pred.astype(jnp.float32) - images.astype(jnp.float32))
  return jnp.sum(err * m[..., None]) / (jnp.sum(m) + 1e-5) / pred.shape[-1]


def spherical_mean(x: jax.Array, axis: int = -2) -> jax.Array:
  """Spherical mean of a set of vectors: the normalised sum of the normalised vectors.

  Masked MoCo/BYOL Eq. 4: k̂ = Σ_j k̄_j / ‖Σ_j k̄_j‖₂ (k̄ = k/‖k‖), the key combining m target
  chunks. Normalising first gives every member the same weight whatever its norm.

  Args:
    x: [..., m, D] float (the set along `axis`, features last).
    axis: the set axis (not the last).

  Returns:
    [...(axis removed)..., D] float32 unit vectors (a zero sum stays zero, as `l2_normalize`).
  """
  if x.ndim < 2 or axis % x.ndim == x.ndim - 1:
    raise ValueError(f"spherical_mean needs x [..., m, D] and a set axis other than the feature "
                     f"axis, got shape {x.shape} and axis={axis}")
  return l2_normalize(jnp.sum(_normalized_f32(x), axis=axis))


def vmf_kappa(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """Concentration κ of a von Mises–Fisher fit to n vectors (Banerjee et al. 2005 approximation).

  Masked MoCo/BYOL's training monitor (its Sec. 3.4): the n chunk representations of an image
  are normalised and treated as vMF samples; with R̄ = ‖(1/n) Σ_j x̄_j‖ (mean resultant length),

      κ ≈ R̄ (D − R̄²) / (1 − R̄²).

  Larger κ = more concentrated. With few samples R̄ is biased upwards (n = 2 random directions
  give R̄ ≈ 1/√2 even in high dimension), so compare κ across training at a fixed n, D.

  Args:
    x: [..., n, D] float, n ≥ 2 samples per set.
    epsilon: floor on 1 − R̄², so identical samples (R̄ = 1) give a large finite κ.

  Returns:
    [...] float32 κ per set.
  """
  if x.ndim < 2 or x.shape[-2] < 2:
    raise ValueError(f"vmf_kappa needs x [..., n, D] with n >= 2 samples, got shape {x.shape}")
  d = x.shape[-1]
  r = jnp.linalg.norm(jnp.mean(_normalized_f32(x), axis=-2), axis=-1)
  r2 = jnp.square(r)
  return r * (d - r2) / jnp.maximum(1.0 - r2, epsilon)


# --- ccMIM ---


def ccmim_nce(h_vis: jax.Array, h_mask: jax.Array, temperature: float) -> jax.Array:
  """ccMIM's NCE loss as written in the paper (Zhang et al. 2023, Eq. 7), an option of the method.

  With v_i = h_vis_i/‖h_vis_i‖ and m_i = h_mask_i/‖h_mask_i‖ (cosine similarity),

      loss = mean_i −log [ e^{m_i·v_i/τ} / ( Σ_{j≠i} e^{v_i·v_j/τ} + Σ_j e^{m_i·v_j/τ} ) ],

  i.e. visible–visible negatives of the visible anchor plus the masked representation of image i
  against every visible one (its positive, j = i, included), exactly the index pattern of Eq. 7.
  The stop-gradient of Eq. 7 (SG on h^M) is the caller's: pass `jax.lax.stop_gradient(h_mask)`.

  The official code does not use this form: it takes the visible queries against the gathered
  masked keys, MoCo v3 style, `2τ · info_nce(h_vis, SG(h_mask), τ)` (FIDELITY row 18).

  Args:
    h_vis: [N, D] float representations of the visible sets (the student).
    h_mask: [N, D] float representations of the masked sets (the teacher).
    temperature: τ > 0.

  Returns:
    Scalar float32; N is the global batch axis. With N = 1 the denominator is the positive alone
    and the loss is 0.
  """
  if h_vis.shape != h_mask.shape or h_vis.ndim != 2:
    raise ValueError(f"h_vis {h_vis.shape} and h_mask {h_mask.shape} must both be [N, D]")
  v, m = _normalized_f32(h_vis), _normalized_f32(h_mask)
  n = v.shape[0]
  logits_vv = v @ v.T / temperature - _INFINITY_PROXY * jnp.eye(n, dtype=jnp.float32)
  logits_mv = m @ v.T / temperature
  lse = jnp.logaddexp(jax.nn.logsumexp(logits_vv, axis=-1), jax.nn.logsumexp(logits_mv, axis=-1))
  return jnp.mean(lse - jnp.diagonal(logits_mv))


# --- MimCo ---


def masked_info_nce(q: jax.Array, k: jax.Array, mask: jax.Array, negatives: jax.Array,
                    temperature: float) -> jax.Array:
  """MimCo's patch-level reconstruction loss (Zhou et al. 2022, Eq. 1).

  For every position i of every image b, with q̄, k̄, n̄ the L2-normalised vectors,

      ℓ_bi = −log [exp(q̄_bi·k̄_bi/τ) / (exp(q̄_bi·k̄_bi/τ) + Σ_j exp(q̄_bi·n̄_j/τ))],

  the positive is the key at the same position and the negatives are the K queue entries only
  (Eq. 1 prints the negative term as q_j·k_j; read as q_i·k_j, the MoBY `contrastive_loss` the
  paper follows). The loss is the mean of ℓ over the masked positions:
  Σ_bi m_bi ℓ_bi / Σ_bi m_bi, so a visible position's prediction has no effect (Eq. 1 averages over
  the M masked patches of an image; every image has the same M under SimMIM's masking, so this is
  also the mean of the per-image means). An all-visible mask gives 0.

  Args:
    q: [B, N, D] float student predictions p₂(p₁(f(x, m))) at the N feature-map positions.
    k: [B, N, D] float keys p₃(f'(x)) of the full image (the caller stops their gradient).
    mask: [B, N] bool or float, True/1 = masked (counted).
    negatives: [K, D] float queue (normalised again here).
    temperature: τ > 0 (0.2).

  Returns:
    Scalar float32; B is the global batch axis.
  """
  if q.shape != k.shape or q.ndim != 3 or mask.shape != q.shape[:2]:
    raise ValueError(f"q {q.shape} and k {k.shape} must both be [B, N, D] and mask {mask.shape} "
                     "[B, N]")
  if negatives.ndim != 2 or negatives.shape[1] != q.shape[2]:
    raise ValueError(f"negatives {negatives.shape} must be [K, D] with D = {q.shape[2]}")
  q, k = _normalized_f32(q), _normalized_f32(k)
  positive = jnp.sum(q * k, axis=-1) / temperature                          # [B, N]
  negative = jnp.einsum("bnd,kd->bnk", q, _normalized_f32(negatives)) / temperature
  lse = jnp.logaddexp(positive, jax.nn.logsumexp(negative, axis=-1))
  m = mask.astype(jnp.float32)
  return jnp.sum(m * (lse - positive)) / jnp.maximum(jnp.sum(m), 1.0)


def masked_feature_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """ℓ1 feature regression over masked positions (MimCo Table 7's MaskFeat-style baseline).

      loss = Σ_bi m_bi · mean_c |pred_bic − target_bic| / Σ_bi m_bi

  (0 for an all-visible mask).

  Args:
    pred: [B, N, C] float student predictions.
    target: [B, N, C] float teacher features (the caller stops their gradient).
    mask: [B, N] bool or float, True/1 = masked (counted).

  Returns:
    Scalar float32; B is the global batch axis.
  """
  if pred.shape != target.shape or pred.ndim != 3 or mask.shape != pred.shape[:2]:
    raise ValueError(f"pred {pred.shape} and target {target.shape} must both be [B, N, C] and "
                     f"mask {mask.shape} [B, N]")
  per_position = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), -1)
  m = mask.astype(jnp.float32)
  return jnp.sum(m * per_position) / jnp.maximum(jnp.sum(m), 1.0)


def maskco_loss(q: jax.Array, k: jax.Array, temperature: float, group_size: int, *,
                inter_negatives: bool = True, intra_negatives: bool = False) -> jax.Array:
  """MaskCo's region-level InfoNCE (Zhao et al., 2021, Eq. 1, Algorithm 1, Appendix A.2).

  Image i has one query (its masked box seen by the online network) and K key boxes (momentum
  network, key view): k[i, 0] is the positive, k[i, 1:] are its K − 1 negative boxes. Images are
  taken in groups of `group_size` consecutive images of the *global* batch (the paper's images
  per GPU, 32), so the negatives never depend on how the batch is split over devices:

    logits_i = [q_i·k_i0,                                     (the positive, label 0)
                q_i·k_jm  for j ≠ i in i's group, m = 1..K−1  (inter-image, `inter_negatives`)
                q_i·k_im  for m = 1..K−1]                     (intra-image, `intra_negatives`)
               / τ
    loss = mean_i [ logsumexp(logits_i) − logits_i[0] ]

  i.e. (K − 1)·(group_size − 1) inter-image negatives (16 × 31 = 496 in the paper) plus K − 1
  intra-image ones for MaskCo(+in) (512 in all). The other images' positive boxes k[j, 0] are not
  negatives: the paper counts "M = 16 negative boxes per image". A group equal to the batch gives
  negatives from the whole global batch. q and k are L2-normalised here (float32).

  Args:
    q: [B, D] float queries (online branch).
    k: [B, K, D] float keys, positive first (the caller applies stop_gradient).
    temperature: τ > 0.
    group_size: images per negative group; divides B (B is the global batch axis, sharded over
      "data"; the grouping follows the global order).
    inter_negatives, intra_negatives: which negatives enter (at least one; Table 6).

  Returns:
    Scalar float32.
  """
  b, num_boxes, d = k.shape
  if q.shape != (b, d):
    raise ValueError(f"maskco_loss: q {q.shape} must be [B, D] = {(b, d)} for k {k.shape}")
  if num_boxes < 2:
    raise ValueError(f"maskco_loss: k has {num_boxes} boxes per image; it needs the positive "
                     "and at least one negative box")
  if group_size < 1 or b % group_size:
    raise ValueError(f"maskco_loss: group_size={group_size} must divide the batch {b}")
  if not (inter_negatives or intra_negatives):
    raise ValueError("maskco_loss: enable inter_negatives, intra_negatives or both")
  if inter_negatives and group_size < 2:
    raise ValueError("maskco_loss: inter_negatives needs group_size >= 2 (other images)")
  n, g = b // group_size, group_size
  q = _normalized_f32(q).reshape(n, g, d)
  k = _normalized_f32(k).reshape(n, g, num_boxes, d)
  positive = jnp.einsum("ngd,ngd->ng", q, k[:, :, 0]) / temperature            # [n, G]
  parts = [positive[..., None]]
  if inter_negatives:
    cross = jnp.einsum("ngd,nhmd->nghm", q, k[:, :, 1:]) / temperature         # [n, G, G, K-1]
    own = jnp.eye(g, dtype=bool)[None, :, :, None]
    parts.append(jnp.where(own, -_INFINITY_PROXY, cross).reshape(n, g, g * (num_boxes - 1)))
  if intra_negatives:
    parts.append(jnp.einsum("ngd,ngmd->ngm", q, k[:, :, 1:]) / temperature)    # [n, G, K-1]
  logits = jnp.concatenate(parts, axis=-1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positive)


def maskco_num_negatives(num_boxes: int, group_size: int, *, inter_negatives: bool = True,
                         intra_negatives: bool = False) -> int:
  """Negatives per query of `maskco_loss`: (K − 1)·((G − 1)·inter + intra)."""
  return (num_boxes - 1) * ((group_size - 1) * int(inter_negatives) + int(intra_negatives))
