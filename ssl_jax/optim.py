"""Optimizers, learning-rate schedules and EMA schedules, all from optax pieces.

`make_optimizer(config.optim, total_steps, batch_size, trainable_mask)` is the one entry point of
the trainer. Conventions (BYOL / SimCLR / MoCo v3 / MAE official code):
  * lr = base_lr · batch_size / 256 ("linear" rule), then linear warmup from 0 and a schedule.
  * `exclude_from_decay`:
      "bias_and_norm" (default): parameters with ndim ≤ 1 (biases, BN/LN scales and offsets)
        get no weight decay and, for LARS, no trust-ratio adaptation (BYOL, SimCLR, MoCo v3 LARS).
      "bias_norm_and_tokens": additionally leaves named cls_token / pos_embed / mask_token /
        dist_token (timm's `no_weight_decay()`, used by MAE/BEiT fine-tuning).
      "none": every parameter is decayed (MoCo v3's ViT AdamW and MAE pretraining decay
        cls_token; MoCo v3 ViT decays even biases and norms).
  * `trainable_mask`: False leaves get a zero update and no optimizer state (MoCo v3 frozen
    patch embedding, MimCo frozen teacher).
  * `layer_decay`: per-leaf lr multiplier decay^(L+1−layer_id) (BEiT/MAE fine-tuning).
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

NAMES = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "piecewise", "constant")
EXCLUDE_FROM_DECAY = ("bias_and_norm", "bias_norm_and_tokens", "none")
# timm's ViT.no_weight_decay() names; also the embeddings that get layer id 0.
TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "dist_token")
# Not decayed under "bias_norm_and_tokens" (timm's / SimMIM's `no_weight_decay`): the tokens and
# Swin's relative position bias tables. (Only TOKEN_NAMES get layer id 0 in layer decay.)
NO_DECAY_NAMES = TOKEN_NAMES + ("relative_position_bias_table", "absolute_pos_embed")
_BLOCK = re.compile(r"^(?:blocks|block|encoderblock|layer)_(\d+)$")
_SWIN_STAGE = re.compile(r"^layers_(\d+)$")  # Swin: layers_i/{downsample, blocks_j}


def scale_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
  """Peak learning rate from the base rate: "linear" base·bs/256, "sqrt" base·√(bs/256), "none"."""
  if rule == "linear":
    return base_lr * batch_size / 256
  if rule == "sqrt":
    return base_lr * math.sqrt(batch_size / 256)
  if rule == "none":
    return base_lr
  raise ValueError(f"config.optim.lr_rule={rule!r} must be one of ('linear', 'sqrt', 'none')")


def _warmup_then(peak_lr: float, warmup_steps: int, after: optax.Schedule) -> optax.Schedule:
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  end_lr: float = 0.0) -> optax.Schedule:
  """lr(t) = peak·t/warmup for t < warmup, then end + (peak−end)·(1+cos(π(t−w)/(T−w)))/2.

  Identical to BYOL's `learning_rate_schedule` (step 0 has lr 0, step `warmup` has the peak,
  step T has end_lr and later steps stay there).
  """
  decay_steps = total_steps - max(warmup_steps, 0)
  if decay_steps <= 0:
    return _warmup_then(peak_lr, warmup_steps, optax.constant_schedule(peak_lr))
  alpha = 0.0 if peak_lr == 0 else end_lr / peak_lr
  return _warmup_then(peak_lr, warmup_steps,
                      optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=alpha))


def warmup_piecewise(peak_lr: float, warmup_steps: int, total_steps: int,
                     drops: tuple[float, ...] = (0.96, 0.98), factor: float = 0.1
                     ) -> optax.Schedule:
  """Linear warmup, then peak·factor^k where k = #{d in drops : t ≥ round(d·T)} (DetCon COCO)."""
  # join_schedules hands `after` the steps since the end of warmup; the drops are absolute.
  boundaries = jnp.asarray([int(round(d * total_steps)) - max(warmup_steps, 0) for d in drops],
                           jnp.int32)

  def after(step):
    k = jnp.sum(jnp.asarray(step)[..., None] >= boundaries, axis=-1)
    return peak_lr * jnp.power(factor, k.astype(jnp.float32))

  return _warmup_then(peak_lr, warmup_steps, after)


def _schedule(cfg, total_steps: int, batch_size: int) -> optax.Schedule:
  peak = scale_lr(cfg.base_lr, batch_size, cfg.get("lr_rule", "linear"))
  warmup = int(cfg.get("warmup_steps", 0))
  name = cfg.get("schedule", "cosine")
  if name == "cosine":
    return warmup_cosine(peak, warmup, total_steps, cfg.get("end_lr", 0.0) or 0.0)
  if name == "piecewise":
    return warmup_piecewise(peak, warmup, total_steps)
  if name == "constant":
    return _warmup_then(peak, warmup, optax.constant_schedule(peak))
  raise ValueError(f"config.optim.schedule={name!r} must be one of {SCHEDULES}")


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))


def decay_mask(params: Any, exclude: str = "bias_and_norm") -> Any:
  """Pytree of bool: True where weight decay (and LARS trust-ratio adaptation) applies."""
  if exclude not in EXCLUDE_FROM_DECAY:
    raise ValueError(f"config.optim.exclude_from_decay={exclude!r} must be one of"
                     f" {EXCLUDE_FROM_DECAY}")

  def keep(path, x):
    if exclude == "none":
      return True
    if jnp.ndim(x) <= 1:
      return False
    return not (exclude == "bias_norm_and_tokens" and _leaf_name(path) in NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(keep, params)


def _names(path) -> list[str]:
  return [str(getattr(e, "key", getattr(e, "name", e))) for e in path]


def _layer_id(path, num_layers: int, swin_depths: tuple[int, ...] = ()) -> int:
  names = _names(path)
  for k, name in enumerate(names):
    if name in TOKEN_NAMES or name in ("patch_embed", "embedding"):
      return 0
    stage = _SWIN_STAGE.match(name)
    if stage and k + 1 < len(names):
      return _swin_layer_id(int(stage.group(1)), names[k + 1], swin_depths)
    match = _BLOCK.match(name)
    if match:
      return int(match.group(1)) + 1
  return num_layers + 1


def _swin_layer_id(stage: int, child: str, depths: tuple[int, ...]) -> int:
  """SimMIM's `get_swin_layer` (BEiT-style ids over all Σdepths blocks) in timm's layout.

  Block j of stage i: Σdepths[:i] + j + 1. SimMIM's Microsoft layout has the patch merging at
  the END of stage i − 1 and gives it Σdepths[:i] (the id of the block before it); timm's
  `layers_i/downsample` is that same module, so it gets Σdepths[:i] too.
  """
  before = sum(depths[:stage])
  block = _BLOCK.match(child)
  if child.startswith("blocks_") and block:
    return before + int(block.group(1)) + 1
  return before  # downsample


def _swin_depths(params: Any) -> tuple[int, ...]:
  """Blocks per Swin stage read from the `layers_i/blocks_j` names (empty when not a Swin)."""
  found: dict[int, int] = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    names = _names(path)
    for k in range(len(names) - 1):
      stage, block = _SWIN_STAGE.match(names[k]), re.match(r"^blocks_(\d+)$", names[k + 1])
      if stage and block:
        i = int(stage.group(1))
        found[i] = max(found.get(i, 0), int(block.group(1)) + 1)
  return tuple(found.get(i, 0) for i in range(max(found) + 1)) if found else ()


def _num_blocks(params: Any) -> int:
  depths = _swin_depths(params)
  if depths:
    return sum(depths)
  found = [int(m.group(1)) for path, _ in jax.tree_util.tree_leaves_with_path(params)
           for e in path
           if (m := _BLOCK.match(str(getattr(e, "key", getattr(e, "name", e)))))]
  return max(found) + 1 if found else 0


def layer_decay_multipliers(params: Any, num_layers: int, decay: float) -> Any:
  """BEiT/MAE layer-wise lr decay: multiplier decay^(num_layers + 1 − layer_id) per leaf.

  layer_id is 0 for patch_embed / cls_token / pos_embed / mask_token, i+1 for a leaf under
  `blocks_i` (`encoderblock_i`, `block_i`, `layer_i`), num_layers + 1 for everything else (final
  norm, head). Swin (`layers_i/blocks_j`, `layers_i/downsample`): block j of stage i has
  Σdepths[:i] + j + 1 and the patch merging opening stage i has Σdepths[:i] (SimMIM's
  `get_swin_layer`), with num_layers = Σdepths; the depths are read from the names.

  Args:
    params: pytree of parameters (arrays or ShapeDtypeStructs; only the paths are read).
    num_layers: L, the number of transformer blocks.
    decay: e.g. 0.75 for ViT-B in MAE fine-tuning.

  Returns:
    Pytree of Python floats with the structure of `params`.
  """
  depths = _swin_depths(params)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(decay ** (num_layers + 1 - _layer_id(path, num_layers, depths))),
      params)


def _scale_by_layer_decay(decay: float, num_layers: int | None) -> optax.GradientTransformation:
  def scale(updates, params):
    del params
    layers = num_layers if num_layers else _num_blocks(updates)
    mults = layer_decay_multipliers(updates, layers, decay)
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults)
  return optax.stateless(scale)


def make_optimizer(optim_cfg, total_steps: int, batch_size: int, trainable_mask: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer and its lr schedule from `config.optim`.

  Args:
    optim_cfg: ConfigDict with name, base_lr, lr_rule, warmup_steps, schedule, end_lr,
      weight_decay, momentum, nesterov, b1, b2, eps, exclude_from_decay, grad_clip (0/None:
      off), layer_decay (optional; num_layers optional, else counted from the param names).
    total_steps: T, steps of the whole run.
    batch_size: global batch size (for the lr rule).
    trainable_mask: optional pytree of bool matching the params; False leaves are frozen.

  Returns:
    (GradientTransformation, schedule mapping step -> lr before layer-decay multipliers).
  """
  name = optim_cfg.name
  schedule = _schedule(optim_cfg, total_steps, batch_size)
  wd = float(optim_cfg.get("weight_decay", 0.0) or 0.0)
  exclude = optim_cfg.get("exclude_from_decay", "bias_and_norm")
  if exclude not in EXCLUDE_FROM_DECAY:
    raise ValueError(f"config.optim.exclude_from_decay={exclude!r} must be one of"
                     f" {EXCLUDE_FROM_DECAY}")
  mask = lambda p: decay_mask(p, exclude)  # noqa: E731  (callable: works under multi_transform)
  momentum = optim_cfg.get("momentum", 0.9)
  if name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd, mask=mask),
                     optax.sgd(schedule, momentum=momentum or None,
                               nesterov=bool(optim_cfg.get("nesterov", False))))
  elif name == "lars":
    # Same order as BYOL's LARS: (g + wd·w) → trust ratio η‖w‖/‖g + wd·w‖ → ×lr → momentum.
    tx = optax.lars(schedule, weight_decay=wd, weight_decay_mask=mask,
                    trust_coefficient=optim_cfg.get("trust_coefficient", 1e-3), eps=0.0,
                    trust_ratio_mask=mask, momentum=momentum,
                    nesterov=bool(optim_cfg.get("nesterov", False)))
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                     eps=optim_cfg.get("eps", 1e-8), weight_decay=wd, mask=mask)
  else:
    raise ValueError(f"config.optim.name={name!r} must be one of {NAMES}")

  clip = optim_cfg.get("grad_clip", 0.0)
  if clip:
    # Inside the trainable branch: the global norm is over the trained parameters only.
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if trainable_mask is not None:
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  parts = [tx]
  layer_decay = optim_cfg.get("layer_decay", None)
  if layer_decay:
    parts.append(_scale_by_layer_decay(layer_decay, optim_cfg.get("num_layers", None)))
  return optax.chain(*parts), schedule


def ema_momentum(step: jax.Array, total_steps: int, base: float) -> jax.Array:
  """BYOL target decay τ(k) = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2: τ_base at 0, 1 at K.

  Args:
    step: scalar int (traced) training step k.
    total_steps: K.
    base: τ_base (0.99 / 0.996).

  Returns:
    Scalar float32.
  """
  frac = jnp.asarray(step, jnp.float32) / float(max(total_steps, 1))
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def ema_update(target: Any, online: Any, momentum: jax.Array) -> Any:
  """ξ ← m·ξ + (1 − m)·θ leaf by leaf (pure; returns the new target tree, dtypes kept)."""
  return jax.tree.map(lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype),
                      target, online)
