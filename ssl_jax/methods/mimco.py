"""MimCo: masked image modeling pre-training with a contrastive teacher (Zhou et al., MM 2022).

Two stages. Stage 1 is any contrastive pretraining (a MoCo v3 workdir of ours, our safetensors
export, or a released MoCo v3 / MoBY PyTorch file); its backbone is MimCo's teacher f'. Stage 2
(this method, paper Sec. 3 and Algorithm 1):

1. View: SimMIM's light augmentation (crop 0.67–1, flip, normalisation), one view per image.
2. Masking: SimMIM's random mask m (32×32 mask patches, ratio 0.6; `simmim.random_mask`); the
   student f sees the masked image (mask token replacing patch embeddings, as SimMIM), the teacher
   the full one.
3. Teacher: a frozen constant (`load_constants`): never trained, passed to the step outside the
   train state, so it is never in a checkpoint; the trainer records its source and sha256 in
   config.json. Its final feature map f'(x) is taken in eval mode under stop_gradient.
4. Patch-level loss (Eq. 1–2, `losses.masked_info_nce`): q = p₂ᵖ(p₁ᵖ(f(x, m))) and
   k⁺ = p₃ᵖ(f'(x)) at every feature-map position (ViT: the patch tokens, stride p; Swin: the
   last stage, stride 32; the mask is taken at that grid, so `mask_patch_size` must be a multiple
   of the stride); InfoNCE of each masked position against its own key and a queue of K = 4096
   negatives, τ 0.2, averaged over the masked positions. The projector p₁ᵖ, predictor p₂ᵖ and
   momentum projector p₃ᵖ are 2-layer 1×1 convolutions (Linear → BN → ReLU → Linear per position,
   BN over all positions of the batch: MoBY's MLP as a 1×1 conv).
   Queue entries: the text says "the average feature of all patch features of the teacher", the
   pseudo-code enqueues `mean(z_k^p[m])` (masked patches only). We follow the text: per image,
   the mean over ALL positions of p₃ᵖ(f'(x)), L2-normalised when enqueued (one entry per image,
   `ops.queue.enqueue`). Reason: the queue holds whole-image negatives for other images' patches;
   the full teacher view is the image's summary, and the masked subset is an arbitrary sample
   of it.
5. Image-level loss (Eq. 3–4): q = p₂ᴵ(p₁ᴵ(avg f(x, m))), k⁺ = p₃ᴵ(avg f'(x)) with the global
   average of the feature map (the pseudo-code's `avg`, not a CLS token); InfoNCE against a second
   queue of 4096 past k⁺, τ 0.2 (`losses.info_nce` with `negatives`); 2-layer MLP heads.
6. Total: patch_weight · L_patch + image_weight · L_image.
7. After the optimizer step the momentum projectors p₃ = EMA(p₁) (`base.update_target` on
   `patch_projector` / `image_projector`), momentum cosine from `momentum` to 1 (MoBY's rule).

Our choices where the paper is silent (FIDELITY row 21; configs/mimco.py and docs/mimco.md):
loss weights 1 and 1; momentum 0.99 → 1 cosine (MoBY); image heads 4096 → 256 (MoBY), patch heads
2048 → 256 (PixPro's pixel projector: they run at every position); the teacher's `part` defaults
to the online network; teacher and student must have the same feature width and grid (the
momentum projectors are EMA copies of the student's projectors and positions are matched one to
one).

Ablations (`method_args`): `patch_loss="l1"` regresses the teacher's features instead (MaskFeat
style, Table 7: ℓ1 between p₂ᵖ(p₁ᵖ(f(x, m))) and the teacher's patch features normalised per
position without affine, our choice since feature scales differ between teachers; no patch
queue, no momentum patch projector); `image_weight=0` / `patch_weight=0` drop a loss with its
heads and queue (Table 8); `masking=False` feeds the full image to the student and counts every
position in the patch loss (Table 11: distillation); `mask_ratio` (Table 5).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import losses, optim, registry, weights
from ssl_jax.methods import base, simmim
from ssl_jax.models import swin
from ssl_jax.models.heads import MLP
from ssl_jax.ops import queue as queue_lib

RANDOM_TEACHER = "random"
PATCH_LOSSES = ("contrastive", "l1")


# ---------------------------------------------------------------------------------------------
# The teacher: where it comes from and what architecture it has.

def _given_teacher_model(config) -> dict:
  model = config.method_args.get("teacher_model")
  model = dict(model.to_dict()) if model is not None else {}
  return model if model.get("name") else {}


def _canonical_safetensors(data: bytes) -> bytes:
  """The same safetensors file with its JSON header keys sorted: safetensors writes the metadata
  in hash-map order, which differs between processes, and the file's sha256 is its identity."""
  size = int.from_bytes(data[:8], "little")
  header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":"))
  header = header.encode()
  if len(header) > size:  # not the compact form safetensors writes: leave it as it is
    return data
  return data[:8] + header + b" " * (size - len(header)) + data[8 + size:]


def random_teacher_file(model: dict, seed: int, image_size: int, cache_dir: str | None = None
                        ) -> str:
  """A randomly initialised backbone `model` written once as a safetensors export (the `:test`
  teacher); the same (model, seed, image size) always gives the same file and bytes."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
  from ssl_jax.export import torch as torch_export  # pylint: disable=import-outside-toplevel
  from ssl_jax.metrics import console  # pylint: disable=import-outside-toplevel
  spec = json.dumps({"model": model, "seed": seed, "image_size": image_size}, sort_keys=True,
                    default=str)
  digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
  path = os.path.join(cache_dir or sources.default_cache_dir(),
                      f"mimco_random_teacher_{digest}.safetensors")
  if os.path.exists(path):
    return path
  name, fields = torch_export.parse_arch(model)
  module = registry.get_backbone(name, **{k: v for k, v in fields.items() if k != "img_size"})
  variables = module.init(jax.random.PRNGKey(seed),
                          jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
  state_dict = torch_export.to_torch_state_dict(jax.device_get(variables), model)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = save(state_dict, metadata={
      "format": "pt", "arch": name, "arch_fields": json.dumps(fields, sort_keys=True, default=str),
      "note": f"randomly initialised MimCo test teacher, seed {seed}"})
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(_canonical_safetensors(data))
  os.replace(tmp, path)
  console(f"mimco: wrote a randomly initialised {name} teacher (seed {seed}) to {path}")
  return path


def teacher_source(config) -> str:
  """The teacher's path: `method_args.teacher`, or for "random" the cached random teacher."""
  a = config.method_args
  if a.teacher == RANDOM_TEACHER:
    return random_teacher_file(_given_teacher_model(config), int(a.get("teacher_seed", 0)),
                               int(config.data.image_size))
  return a.teacher


def teacher_model_config(config) -> dict:
  """The teacher's architecture {"name", **fields}: recorded by a workdir or by our safetensors
  export; otherwise (a PyTorch release, a foreign safetensors, "random")
  `method_args.teacher_model`. Reads metadata only, never the weights."""
  a = config.method_args
  src = a.teacher
  model: dict = {}
  if src != RANDOM_TEACHER and weights.is_workdir(src):
    model = weights.model_config_of_workdir(src)
  elif src.endswith(".safetensors") and os.path.exists(src):
    model = weights.safetensors_arch(src) or {}
  model = model or _given_teacher_model(config)
  if not model:
    raise weights.WeightsError(
        f"config.method_args.teacher={src!r} does not record its architecture: set "
        "config.method_args.teacher_model.name (e.g. vit_small with patch_size=16, "
        "pos_embed=sincos for a MoCo v3 ViT-S release; swin_tiny for MoBY's Swin-T)")
  return {k: v for k, v in model.items() if k not in ("img_size", "dtype")}


# ---------------------------------------------------------------------------------------------

def validate(config) -> None:
  a = config.method_args
  backbone = base.make_backbone(config)
  simmim.check_backbone(backbone, "MimCo")
  if not a.teacher:
    raise ValueError("config.method_args.teacher is empty: name the stage-1 contrastive teacher "
                     "(a MoCo v3 workdir, our .safetensors export, or a MoCo v3 / MoBY .pth with "
                     "config.method_args.teacher_model)")
  if a.teacher == RANDOM_TEACHER and not _given_teacher_model(config):
    raise ValueError("config.method_args.teacher='random' needs "
                     "config.method_args.teacher_model.name")
  if a.teacher_part not in weights.PARTS:
    raise ValueError(f"config.method_args.teacher_part={a.teacher_part!r} must be one of "
                     f"{weights.PARTS}")
  if a.patch_loss not in PATCH_LOSSES:
    raise ValueError(f"config.method_args.patch_loss={a.patch_loss!r} must be one of "
                     f"{PATCH_LOSSES}")
  if a.patch_weight < 0 or a.image_weight < 0 or a.patch_weight + a.image_weight <= 0:
    raise ValueError(f"config.method_args.patch_weight={a.patch_weight} and image_weight="
                     f"{a.image_weight} must be >= 0 with at least one positive")
  if a.temperature <= 0:
    raise ValueError(f"config.method_args.temperature={a.temperature} must be > 0")
  if not 0.0 <= a.momentum <= 1.0:
    raise ValueError(f"config.method_args.momentum={a.momentum} must be in [0, 1]")
  if a.queue_size < 1 or a.queue_size % config.train.batch_size:
    raise ValueError(f"config.method_args.queue_size={a.queue_size} must be a positive multiple "
                     f"of config.train.batch_size={config.train.batch_size}")
  stride = simmim.feature_stride(backbone)
  if config.data.image_size % stride:
    raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by the "
                     f"encoder stride {stride}")
  if a.masking:
    simmim.validate_masking(config, backbone)
    if a.patch_weight > 0 and a.mask_patch_size % stride:
      raise ValueError(f"config.method_args.mask_patch_size={a.mask_patch_size} must be a "
                       f"multiple of the encoder stride {stride} so that every feature-map "
                       "position is wholly masked or wholly visible")


def batch_spec(config):
  """One view of every image (`base.view_batch_spec`)."""
  return base.view_batch_spec(config, num_views=1)


class MimCoNet(nn.Module):
  """Student: backbone (with SimMIM's mask token) → feature map → patch and image heads.

  Parameters: `backbone`, `mask_token` [C] (with masking), `patch_projector`, `patch_predictor`
  (with the patch loss), `image_projector`, `image_predictor` (with the image loss).
  """
  backbone: nn.Module
  patch_projector: nn.Module | None
  patch_predictor: nn.Module | None
  image_projector: nn.Module | None
  image_predictor: nn.Module | None
  masking: bool = True

  def setup(self):
    if self.masking:
      self.mask_token = self.param("mask_token", simmim.mask_token_init(self.backbone),
                                   (int(self.backbone.embed_dim),), jnp.float32)

  def __call__(self, x, token_mask, *, train: bool):
    """x: [B, H, W, 3]; token_mask: [B, (H/p)·(W/p)] bool or None ->
    dict(feature_map [B, h, w, C], pooled [B, C] float32, patch [B, h·w, D_p], image [B, D])."""
    masked = self.masking and token_mask is not None
    out = self.backbone(x, train=train, token_mask=token_mask if masked else None,
                        mask_token=self.mask_token if masked else None)
    fmap = out["feature_map"]
    b, h, w, c = fmap.shape
    res = {"feature_map": fmap, "pooled": out["pooled"]}
    if self.patch_projector is not None:
      z = self.patch_projector(fmap.reshape(b * h * w, c), train=train)
      res["patch"] = self.patch_predictor(z, train=train).reshape(b, h * w, -1)
    if self.image_projector is not None:
      z = self.image_projector(jnp.mean(fmap.astype(jnp.float32), axis=(1, 2)), train=train)
      res["image"] = self.image_predictor(z, train=train)
    return res

  def encode(self, x, *, train: bool = False):
    return self.backbone(x, train=train)["pooled"].astype(jnp.float32)


def feature_dim(backbone: nn.Module) -> int:
  """Channels of the backbone's final feature map."""
  if isinstance(backbone, swin.SwinTransformer):
    return int(backbone.embed_dim) * 2 ** (len(tuple(backbone.depths)) - 1)
  return int(backbone.embed_dim)


def mask_at_stride(token_mask: jax.Array, grid: int, scale: int) -> jax.Array:
  """[B, g·g] model-patch mask -> [B, (g/s)²] mask of the feature map with stride s·p: a cell is
  masked when all its s×s patches are (validation makes every cell wholly one or the other)."""
  b = token_mask.shape[0]
  cells = token_mask.reshape(b, grid // scale, scale, grid // scale, scale)
  return jnp.all(cells, axis=(2, 4)).reshape(b, -1)


def _standardized(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """Per-position normalisation over channels without affine (the ℓ1 ablation's target)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + epsilon)


def networks(config) -> dict:
  """The student `net` (MimCoNet) and its projectors as stand-alone modules (the momentum
  projectors apply them to the EMA parameters): {"net", "patch_projector", "image_projector"}."""
  a = config.method_args
  dtype = base.compute_dtype(config)
  backbone = base.make_backbone(config)
  use_patch, use_image = a.patch_weight > 0, a.image_weight > 0
  contrastive = a.patch_loss == "contrastive"

  def head(hidden, out):  # MoBY's MLP: Linear → BN → ReLU → Linear
    return MLP(hidden, out, num_layers=2, norm="bn", dtype=dtype)

  patch_projector = head(a.patch_hidden, a.projector_dim) if use_patch else None
  patch_predictor = (head(a.patch_hidden, a.projector_dim if contrastive else
                          feature_dim(backbone)) if use_patch else None)
  image_projector = head(a.projector_hidden, a.projector_dim) if use_image else None
  image_predictor = head(a.predictor_hidden, a.projector_dim) if use_image else None
  net = MimCoNet(backbone, patch_projector, patch_predictor, image_projector, image_predictor,
                 masking=bool(a.masking))
  return {"net": net, "patch_projector": patch_projector, "image_projector": image_projector}


def make(config) -> base.Method:
  a = config.method_args
  dtype = base.compute_dtype(config)
  use_patch, use_image = a.patch_weight > 0, a.image_weight > 0
  contrastive = a.patch_loss == "contrastive"
  nets = networks(config)
  net, patch_projector, image_projector = (nets["net"], nets["patch_projector"],
                                           nets["image_projector"])
  backbone = net.backbone
  ema_keys = (("patch_projector",) if use_patch and contrastive else ()) + (
      ("image_projector",) if use_image else ())
  size = int(config.data.image_size)
  patch = int(backbone.patch_size)
  stride = simmim.feature_stride(backbone)
  total_steps = config.train.total_steps

  @functools.lru_cache(maxsize=None)
  def teacher_backbone() -> nn.Module:
    """Built on first use (in `load_constants` or when the step is traced), never in `make`:
    rebuilding the method to export a MimCo workdir must not need the teacher."""
    model = teacher_model_config(config)
    fields = {k: v for k, v in model.items() if k != "name"}
    return registry.get_backbone(model["name"], dtype=dtype, **fields)

  def init(rng, batch):
    params_rng, dropout_rng, patch_rng, image_rng = jax.random.split(rng, 4)
    x = base.dummy_images(batch)
    token_mask = jnp.zeros((x.shape[0], (size // patch) ** 2), bool)
    variables = net.init({"params": params_rng, "dropout": dropout_rng}, x, token_mask,
                         train=True)
    params, stats = variables["params"], variables.get("batch_stats", {})
    state = {"batch_stats": stats, "target": base.init_target(params, stats, keys=ema_keys)}
    if use_patch and contrastive:
      state["patch_queue"], state["patch_queue_ptr"] = queue_lib.init_queue(
          patch_rng, a.queue_size, a.projector_dim)
    if use_image:
      state["image_queue"], state["image_queue_ptr"] = queue_lib.init_queue(
          image_rng, a.queue_size, a.projector_dim)
    return params, state

  def momentum_projection(module, target, name, x):
    """p₃ = the EMA copy of projector `name` applied to teacher features (train-mode BN with its
    own running statistics, as MoBY's `projector_k`); no gradient."""
    out, stats = base.apply_train(module, target["params"][name], target["batch_stats"][name], x)
    return jax.lax.stop_gradient(out.astype(jnp.float32)), stats

  def loss_and_aux(params, state, batch, rng, step, constants=None):
    del step
    if constants is None or "teacher" not in constants:
      raise ValueError("MimCo needs its teacher: pass the constants of `load_constants(config)`")
    view_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)
    # Step 1) weak augmentation (SimMIM's crop + flip, normalisation).
    x = base.augmented_views(view_rng, batch["image"], config.data.views)[:, 0]
    b = x.shape[0]
    # Step 2) SimMIM's random mask m at the model patch grid.
    token_mask = simmim.random_mask(mask_rng, b, config, backbone) if a.masking else None
    # Step 3) student f(x, m) on the masked image, frozen teacher f'(x) on the full image.
    out, stats = base.apply_train(net, params, state["batch_stats"], x, token_mask,
                                  rngs={"dropout": dropout_rng})
    teacher = jax.lax.stop_gradient(
        teacher_backbone().apply(constants["teacher"], x, train=False)["feature_map"])
    teacher = teacher.astype(jnp.float32)
    if teacher.shape != out["feature_map"].shape:
      raise ValueError(f"config.method_args.teacher gives a feature map {teacher.shape} but the "
                       f"student's is {out['feature_map'].shape}: MimCo needs the same width and "
                       "grid (same architecture family and patch size)")
    _, h, w, c = teacher.shape
    positions = (mask_at_stride(token_mask, size // patch, stride // patch) if a.masking
                 else jnp.ones((b, h * w), bool))
    target = state["target"]
    new_target = {"params": target["params"], "batch_stats": dict(target["batch_stats"])}
    new_state = {"batch_stats": stats, "target": new_target}
    metrics = {"masked_fraction": jnp.mean(positions.astype(jnp.float32))}
    loss = jnp.zeros((), jnp.float32)
    # Step 4) patch level: masked positions against the teacher's keys (Eq. 1-2).
    if use_patch:
      if contrastive:
        k, new_target["batch_stats"]["patch_projector"] = momentum_projection(
            patch_projector, target, "patch_projector", teacher.reshape(b * h * w, c))
        k = k.reshape(b, h * w, -1)
        patch_loss = losses.masked_info_nce(out["patch"], k, positions, state["patch_queue"],
                                            a.temperature)
        # One entry per image: the mean of its projected teacher features over all positions.
        new_state["patch_queue"], new_state["patch_queue_ptr"] = queue_lib.enqueue(
            state["patch_queue"], state["patch_queue_ptr"], jnp.mean(k, axis=1))
      else:
        patch_loss = losses.masked_feature_l1(out["patch"],
                                              _standardized(teacher.reshape(b, h * w, c)),
                                              positions)
      loss = loss + a.patch_weight * patch_loss
      metrics["patch_loss"] = patch_loss
    # Step 5) image level: global average of the masked image vs the full image (Eq. 3-4).
    if use_image:
      k, new_target["batch_stats"]["image_projector"] = momentum_projection(
          image_projector, target, "image_projector", jnp.mean(teacher, axis=(1, 2)))
      image_loss = losses.info_nce(out["image"], k, a.temperature, negatives=state["image_queue"])
      new_state["image_queue"], new_state["image_queue_ptr"] = queue_lib.enqueue(
          state["image_queue"], state["image_queue_ptr"], k)
      loss = loss + a.image_weight * image_loss
      metrics["image_loss"] = image_loss
    metrics["features"] = jax.lax.stop_gradient(out["pooled"])
    return loss, (new_state, metrics)

  def after_update(state, params, step):
    # Step 6) momentum projectors p₃ ← m·p₃ + (1 − m)·p₁, m cosine from `momentum` to 1.
    return base.update_target(state, params, optim.ema_momentum(step, total_steps, a.momentum),
                              keys=ema_keys)

  def load_constants(config_) -> base.Constants:
    """The teacher's backbone variables, loaded once per run (never trained, never saved)."""
    a_ = config_.method_args
    src = teacher_source(config_)
    if not (os.path.exists(src) or weights.is_workdir(src)):
      make_it = a_.get("teacher_command", "")
      raise weights.WeightsError(
          f"config.method_args.teacher={src!r} does not exist" +
          (f"; make it with: {make_it}" if make_it else
           " (a MoCo v3 workdir, a .safetensors export or a MoCo v3 / MoBY .pth)"))
    step_ = int(a_.teacher_step) or None
    variables, _ = weights.load_backbone(src, model=teacher_model_config(config_), step=step_,
                                         part=a_.teacher_part)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    got = jax.eval_shape(lambda v, x: teacher_backbone().apply(v, x, train=False), variables, x)
    want = jax.eval_shape(lambda x: backbone.init_with_output(
        jax.random.PRNGKey(0), x, train=False)[0], x)
    if got["feature_map"].shape != want["feature_map"].shape:
      raise weights.WeightsError(
          f"config.method_args.teacher={src!r}: its feature map at {size} px is "
          f"{got['feature_map'].shape[1:]}, the student's (config.model) "
          f"{want['feature_map'].shape[1:]}; MimCo needs the same width and grid")
    source = ({"source": src, "step": step_, "part": a_.teacher_part}
              if weights.is_workdir(src) else src)
    return base.Constants(tree={"teacher": variables}, sources={"teacher": source})

  return base.Method(init=init, loss_and_aux=loss_and_aux, after_update=after_update,
                     backbone=backbone, batch_spec=batch_spec, load_constants=load_constants,
                     **base.eval_functions(net, MimCoNet.encode, target=False))

