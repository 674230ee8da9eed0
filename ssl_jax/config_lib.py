"""Config pieces shared by `configs/*.py`, and validation with field-named errors.

A config is an `ml_collections.ConfigDict` with the sections of DESIGN.md "Config":
`method`, `method_args`, `model`, `data`, `optim`, `train`, `eval`, `sharding`, `dtype`.
`validate(config, num_devices)` runs before anything is compiled and raises `ConfigError`
whose message names the offending field (`config.train.batch_size=100 is not divisible ...`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import ml_collections

from ssl_jax.errors import UserError

ConfigDict = ml_collections.ConfigDict

DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "piecewise", "constant")
MASK_TYPES = (None, "fh", "grid", "gt")


class ConfigError(UserError, ValueError):
  """A config value is invalid; the message names the field and what to do."""


def base_config() -> ConfigDict:
  """Every section with its defaults; method configs override what their paper sets."""
  c = ConfigDict()
  c.method = ""
  c.method_args = ConfigDict()
  c.model = ConfigDict({"name": "resnet50"})
  c.data = ConfigDict({
      "source": "builtin_photos",
      "source_args": ConfigDict(),
      "image_size": 224,
      "views": "byol",           # recipe name in ssl_jax.data.views
      "masks": None,             # None | "fh" | "grid" | "gt"  (DetCon)
      "max_segments": 64,        # ids per image after compaction (DetCon)
      "grid": (5, 5),            # cells of the spatial-grid masks (masks="grid"; DetCon Fig. 7)
      "num_boxes": 0,            # MaskCo: boxes in the key view (> 0 selects MaskCo's views)
      "box_side": (32 / 224, 128 / 224),  # MaskCo: box side range, fraction of image_size
      "local_views": 0,          # multi-crop: number of small local views (0: none)
      "local_image_size": 96,
      "local_recipe": "multicrop_local",
      "num_workers": 0,          # grain worker processes (0: in-process)
      "prefetch": 2,
  })
  c.optim = ConfigDict({
      "name": "lars",
      "base_lr": 0.2,
      "lr_rule": "linear",       # lr = base_lr * batch_size / 256
      "warmup_steps": 0,
      "warmup_epochs": 0.0,      # converted to steps when the dataset size is known
      "schedule": "cosine",
      "end_lr": 0.0,
      "weight_decay": 1.5e-6,
      "momentum": 0.9,
      "nesterov": False,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "grad_clip": 0.0,
      "exclude_from_decay": "bias_and_norm",
  })
  c.train = ConfigDict({
      "batch_size": 4096,        # global, over all devices and hosts
      "total_steps": 0,          # 0: derive from num_epochs and the dataset size
      "num_epochs": 300.0,
      "checkpoint_every_steps": 1000,
      "keep_checkpoints": 3,
      "log_every_steps": 50,
      "seed": 0,
      "progress_bar": True,
  })
  c.eval = ConfigDict()          # name -> evaluator settings, e.g. c.eval.knn
  # Start the backbone from trained weights (big_vision's `model_init`): a pretraining workdir,
  # a safetensors export or a PyTorch file (torchvision / timm layout). `model` names the
  # architecture of a file without our export metadata; `step` 0 = latest; `part` online/target.
  c.init_from = ConfigDict({"source": "", "step": 0, "part": "online"})
  c.sharding = ConfigDict({"fsdp": False})
  c.dtype = "float32"
  return c


def max_segments(config: ConfigDict) -> int:
  """Segment ids kept per image (`config.data.max_segments`), the one place it is read."""
  return int(config.data.max_segments)


def steps_from_epochs(num_epochs: float, total_steps: int, num_records: int, batch_size: int,
                      warmup_epochs: float = 0.0, warmup_steps: int = 0) -> dict[str, int]:
  """Epochs -> steps, the one conversion used by pretraining, linear evaluation and fine-tuning.

  An epoch is `num_records // batch_size` steps (at least 1; incomplete batches are dropped).
  A positive `total_steps` / `warmup_steps` wins over the epoch count; warmup never exceeds the
  run. Returns {"total_steps", "steps_per_epoch", "warmup_steps"}.
  """
  steps_per_epoch = max(1, num_records // batch_size)
  total = int(total_steps) if total_steps > 0 else max(1, int(round(num_epochs * steps_per_epoch)))
  warmup = int(warmup_steps) if warmup_steps > 0 else int(round(warmup_epochs * steps_per_epoch))
  return {"total_steps": total, "steps_per_epoch": steps_per_epoch,
          "warmup_steps": min(warmup, total)}


def resolve_steps(config: ConfigDict, num_records: int) -> int:
  """Fills `train.total_steps` and `optim.warmup_steps` of a config in place from its epochs and
  the dataset size (`steps_from_epochs`); returns the steps per epoch."""
  steps = steps_from_epochs(config.train.get("num_epochs", 0.0),
                            config.train.get("total_steps", 0) or 0, num_records,
                            config.train.batch_size, config.optim.get("warmup_epochs", 0.0),
                            config.optim.get("warmup_steps", 0) or 0)
  with config.unlocked():
    config.train.total_steps = steps["total_steps"]
    config.optim.warmup_steps = steps["warmup_steps"]
  return steps["steps_per_epoch"]


def knn_eval(source: str, every_steps: int, **source_args: Any) -> ConfigDict:
  """A kNN evaluator section: train split of `source` as memory bank, held-out split as queries."""
  return ConfigDict({
      "every_steps": every_steps,
      "source": source,
      "train_args": ConfigDict(source_args.get("train_args", {})),
      "test_args": ConfigDict(source_args.get("test_args", {})),
      "image_size": source_args.get("image_size", 0),  # 0: the pretraining image size
      "k": 20,
      "temperature": 0.07,
      "batch_size": 256,
      "max_train": 0,            # 0: all
  })


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate(config: ConfigDict, num_devices: int) -> None:
  """Checks the config before any compile; raises ConfigError naming the field."""
  from ssl_jax import registry  # pylint: disable=import-outside-toplevel

  _require(config.method in registry.METHODS,
           f"config.method={config.method!r} is unknown; known methods: {sorted(registry.METHODS)}")
  _require(config.dtype in DTYPES, f"config.dtype={config.dtype!r} must be one of {DTYPES}")
  t, o, d = config.train, config.optim, config.data
  _require(t.batch_size > 0, f"config.train.batch_size={t.batch_size} must be positive")
  _require(t.batch_size % num_devices == 0,
           f"config.train.batch_size={t.batch_size} is not divisible by the {num_devices} devices;"
           f" use a multiple of {num_devices}")
  _require(t.total_steps >= 0, f"config.train.total_steps={t.total_steps} must be >= 0")
  _require(t.total_steps > 0 or t.num_epochs > 0,
           "set config.train.total_steps or config.train.num_epochs to a positive value")
  for field in ("checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
    _require(t[field] > 0, f"config.train.{field}={t[field]} must be positive")
  _require(o.name in OPTIMIZERS, f"config.optim.name={o.name!r} must be one of {OPTIMIZERS}")
  _require(o.base_lr > 0 and math.isfinite(o.base_lr),
           f"config.optim.base_lr={o.base_lr} must be a positive finite number")
  _require(o.weight_decay >= 0, f"config.optim.weight_decay={o.weight_decay} must be >= 0")
  _require(o.schedule in SCHEDULES,
           f"config.optim.schedule={o.schedule!r} must be one of {SCHEDULES}")
  _require(o.warmup_steps >= 0 and o.warmup_epochs >= 0,
           "config.optim.warmup_steps and config.optim.warmup_epochs must be >= 0")
  _require(d.image_size > 0, f"config.data.image_size={d.image_size} must be positive")
  _require(d.masks in MASK_TYPES, f"config.data.masks={d.masks!r} must be one of {MASK_TYPES}")
  _require(d.num_workers >= 0, f"config.data.num_workers={d.num_workers} must be >= 0")
  from ssl_jax import models  # pylint: disable=import-outside-toplevel
  try:
    models.check_image_size(config.model.to_dict(), d.image_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  _require(max_segments(config) >= 1,
           f"config.data.max_segments={d.max_segments} must be >= 1")
  _require(len(d.grid) == 2 and all(int(g) >= 1 for g in d.grid),
           f"config.data.grid={tuple(d.grid)} must be two positive cell counts (rows, cols)")
  _require(d.num_boxes >= 0, f"config.data.num_boxes={d.num_boxes} must be >= 0")
  _require(d.local_views >= 0 and d.local_image_size > 0,
           f"config.data.local_views={d.local_views} must be >= 0 and "
           f"config.data.local_image_size={d.local_image_size} positive")
  from ssl_jax.data import views  # pylint: disable=import-outside-toplevel
  for field in ("views",) + (("local_recipe",) if d.local_views else ()):
    _require(d[field] in views.recipe_names(),
             f"config.data.{field}={d[field]!r} is not a view recipe; known: "
             f"{', '.join(views.recipe_names())}")
  _require(config.init_from.part in ("online", "target"),
           f"config.init_from.part={config.init_from.part!r} must be 'online' or 'target'")
  for name, ev in config.eval.items():
    _require(ev.get("every_steps", 1) > 0,
             f"config.eval.{name}.every_steps={ev.get('every_steps')} must be positive")
  try:
    registry.get_method(config.method).validate(config)
  except ConfigError:
    raise
  except ValueError as e:  # methods name the field in their messages
    raise ConfigError(str(e)) from e


SIZE_VARIANTS = ("demo", "test")


def parse_arg(arg: str | None, known: Iterable[str] = SIZE_VARIANTS) -> dict[str, Any]:
  """`"demo"` -> {"demo": True}; `"epochs=1000,coco"` -> {"epochs": 1000, "coco": True}.

  `known` lists the variants the config understands (`"epochs"` also as `epochs=N`); anything
  else is refused with that list, so a typo (`:demoo`) never silently runs the full setting.
  """
  known = tuple(known)
  out: dict[str, Any] = {}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if key not in known:
      raise ConfigError(f"config variant {part!r} is unknown; known variants: "
                        f"{', '.join(sorted(known))}")
    if not sep:
      out[key] = True
      continue
    for cast in (int, float):
      try:
        out[key] = cast(value)
        break
      except ValueError:
        continue
    else:
      out[key] = value
  return out


def imagenet_data(config: ConfigDict, split: str = "train") -> None:
  """ImageNet from tfds (array_record; see README "Getting ImageNet ready")."""
  config.data.source = "tfds"
  config.data.source_args = ConfigDict({"name": "imagenet2012", "split": split,
                                        "data_dir": ""})
  config.data.num_workers = 8
  config.data.prefetch = 4


def mae_recipe(config: ConfigDict) -> None:
  """MAE's optimiser and data (`PRETRAIN.md`, `main_pretrain.py`), shared by MAE and ccMIM:
  ImageNet at 224 px, AdamW β (0.9, 0.95), lr 1.5e-4 × bs/256, wd 0.05 on parameters of ≥ 2
  dimensions (biases and norms excluded), 40 warmup epochs + cosine."""
  imagenet_data(config)
  config.data.image_size = 224
  config.optim.name = "adamw"
  config.optim.base_lr = 1.5e-4
  config.optim.weight_decay = 0.05
  config.optim.b1, config.optim.b2 = 0.9, 0.95
  config.optim.warmup_epochs = 40.0
  config.optim.exclude_from_decay = "bias_and_norm"


def apply_mae_size_variant(config: ConfigDict, args: dict[str, Any]) -> bool:
  """`apply_size_variant` for the MAE family: also a tiny decoder (at most the config's depth),
  fixed sin-cos positions, and base lr 1e-3 for the demo (1.5e-4 is tuned for 800 epochs at
  batch 4096 and barely moves a tiny model in a few hundred steps). Returns whether a size
  variant applied."""
  apply_size_variant(config, args, vit=True)
  if not (args.get("demo") or args.get("test")):
    return False
  demo = bool(args.get("demo"))
  config.model.pos_embed = "sincos"
  config.method_args.update({
      "decoder_dim": 64 if demo else 32, "decoder_heads": 4 if demo else 2,
      "decoder_depth": min(config.method_args.decoder_depth, 2 if demo else 1)})
  if demo:
    config.optim.base_lr = 1e-3
  return True


def apply_size_variant(config: ConfigDict, args: dict[str, Any], vit: bool = False) -> None:
  """`demo` (CPU minutes on the built-in photos) and `test` (seconds, tiny model) variants.

  Both keep the method's own recipe (views, losses, optimizer family, the ResNet's
  `zero_init_residual`) and shrink the model, the resolution, the batch and the run; `demo` adds
  a kNN probe on held-out photo regions.
  """
  if not (args.get("demo") or args.get("test")):
    return
  demo = bool(args.get("demo"))
  if vit:
    config.model = ConfigDict({"name": "vit_tiny", "patch_size": 8 if demo else 8,
                               "embed_dim": 64 if demo else 32, "depth": 4 if demo else 2,
                               "num_heads": 4 if demo else 2})
  else:
    zero_init = config.model.get("zero_init_residual")
    config.model = ConfigDict({"name": "resnet18", "width": 16 if demo else 8,
                               "small_image_stem": not demo})
    if zero_init is not None:
      config.model.zero_init_residual = zero_init
  config.data.source = "builtin_photos"
  config.data.source_args = ConfigDict({"split": "train", "num_per_photo": 64 if demo else 8,
                                        "crop_size": 96 if demo else 48})
  config.data.image_size = 64 if demo else 32
  config.data.num_workers = 0
  config.train.batch_size = 64 if demo else 16
  config.train.total_steps = 0
  config.train.num_epochs = 60.0 if demo else 2.0
  config.train.log_every_steps = 20 if demo else 2
  config.train.checkpoint_every_steps = 200 if demo else 4
  config.train.progress_bar = demo
  config.optim.warmup_epochs = 5.0 if demo else 0.0
  config.optim.warmup_steps = 0
  heads = {"projector_hidden": 256 if demo else 64, "predictor_hidden": 256 if demo else 64,
           "projector_dim": 64 if demo else 32}
  for key, value in heads.items():
    if key in config.method_args:
      config.method_args[key] = value
  if demo:
    config.eval.knn = knn_eval(
        "builtin_photos", every_steps=100000,
        train_args={"split": "train", "num_per_photo": 32, "crop_size": 96},
        test_args={"split": "probe", "num_per_photo": 16, "crop_size": 96})


def epoch_preset(table: dict[int, dict[str, Any]], epochs: Any, config_name: str
                 ) -> dict[str, Any]:
  """The row of an official per-epoch hyper-parameter table (BYOL's `_LR_PRESETS`, ...).

  Only the table's epoch counts have official values: another count is refused (as the
  official BYOL config's `assert num_epochs in [40, 100, 300, 1000]`), never mapped to a
  neighbouring row.
  """
  if epochs not in table:
    rows = ", ".join(str(e) for e in sorted(table))
    raise ConfigError(
        f"config variant epochs={epochs}: {config_name} has official presets for {rows} epochs "
        f"only; pick one of them (and override config.train.num_epochs, config.optim.base_lr, "
        f"config.optim.weight_decay, config.method_args.ema_base yourself for another length)")
  return table[epochs]


# BYOL (deepmind-research byol/configs/byol.py `_LR_PRESETS`, `_WD_PRESETS`, `_EMA_PRESETS`); the
# DetCon paper (App. A.3) gives DetCon-B the 300- and 1000-epoch rows.
BYOL_PRESETS = {
    40: {"base_lr": 0.45, "weight_decay": 1e-6, "ema_base": 0.97},
    100: {"base_lr": 0.45, "weight_decay": 1e-6, "ema_base": 0.99},
    300: {"base_lr": 0.3, "weight_decay": 1e-6, "ema_base": 0.99},
    1000: {"base_lr": 0.2, "weight_decay": 1.5e-6, "ema_base": 0.996},
}
DETCON_B_PRESETS = {e: BYOL_PRESETS[e] for e in (300, 1000)}

DETCON_VARIANTS = ("demo", "test", "epochs", "coco", "grid", "fh_scale")
# DetCon Sec. 3.2: FH with s ∈ {500, 1000, 1500} and min size c = s on COCO, s = c = 1000 on
# ImageNet.
DETCON_COCO_FH_SCALES = (500, 1000, 1500)


def detcon_config(method: str, args: dict[str, Any]) -> ConfigDict:
  """configs/detcon_b.py and detcon_s.py: they differ in heads, EMA and presets only."""
  variant_b = method == "detcon_b"
  coco, grid = bool(args.get("coco")), bool(args.get("grid"))
  # DetCon-S on COCO: 1296 epochs, one point of its Fig. 6 range (324-5184); DetCon-B has no COCO
  # row in the paper and keeps its ImageNet 1000-epoch preset.
  epochs = args.get("epochs", 1296 if coco and not variant_b else 1000)
  fh_scale = args.get("fh_scale", 1000)
  c = base_config()
  c.method = method
  c.method_args = ConfigDict({
      "projector_hidden": 4096 if variant_b else 2048,
      "projector_dim": 256 if variant_b else 128,
      "temperature": 0.1,
      "num_samples": 16,
      "mask_pooling": "hard",
      "sample_from": "view",
  })
  if variant_b:
    preset = epoch_preset(DETCON_B_PRESETS, epochs, "DetCon-B")
    c.method_args.predictor_hidden = 4096
    c.method_args.ema_base = preset["ema_base"]
  else:  # SimCLR's optimisation at every length (DetCon App. A.3)
    preset = {"base_lr": 0.3, "weight_decay": 1e-6}
  # The official ResNets zero the last BN γ of each residual block (Haiku / SimCLR v1).
  c.model = ConfigDict({"name": "resnet50", "zero_init_residual": True})
  if coco:
    if fh_scale not in DETCON_COCO_FH_SCALES:
      raise ConfigError(f"config variant fh_scale={fh_scale}: COCO masks use the paper's scales "
                        f"{DETCON_COCO_FH_SCALES} (min size = scale)")
    # COCO train2017 is one flat folder of JPEGs: an unlabelled image folder.
    images = ("image_folder", {"root": ""})
  else:
    if "fh_scale" in args:
      raise ConfigError("config variant fh_scale: ImageNet masks use scale = min size = 1000 "
                        "(DetCon Sec. 3.2); fh_scale picks among COCO's, add `coco`")
    images = ("tfds", {"name": "imagenet2012", "split": "train", "data_dir": ""})
  if grid:  # spatial-grid masks are made on the fly: the plain image source, no precompute
    c.data.source = images[0]
    c.data.source_args = ConfigDict(images[1])
  else:
    c.data.source = "fh_masks"
    c.data.source_args = ConfigDict({"path": "", "scale": fh_scale, "min_size": fh_scale})
  c.data.num_workers = 8
  c.data.prefetch = 4
  c.data.image_size = 224
  c.data.views = method
  c.data.masks = "grid" if grid else "fh"
  c.data.max_segments = 256
  c.optim.name = "lars"
  c.optim.base_lr = preset["base_lr"]
  c.optim.weight_decay = preset["weight_decay"]
  c.optim.warmup_epochs = 10.0
  if coco:
    c.optim.schedule = "piecewise"
  c.train.batch_size = 4096
  c.train.num_epochs = float(epochs)
  if args.get("demo") or args.get("test"):
    apply_size_variant(c, args)
    demo = bool(args.get("demo"))
    if not grid:  # the built-in photos get FH masks computed once into a cache
      c.data.source = "fh_masks"
      c.data.source_args = ConfigDict({
          "path": "", "scale": 100 if demo else 50, "min_size": 50 if demo else 20,
          "precompute_from": "builtin_photos",
          "precompute_args": ConfigDict({"split": "train", "num_per_photo": 64 if demo else 8,
                                         "crop_size": 96 if demo else 48})})
    c.data.max_segments = 32 if demo else 16
    c.method_args.num_samples = 8 if demo else 4
    if demo:
      # DetCon needs a feature grid fine enough to hold several masks: the small-image stem
      # (output stride 8) at 56 px gives 7 x 7 cells and ~6 FH masks per view (64 px with the
      # standard stem gave 2 x 2 and 2 masks, i.e. BYOL). Width 8 keeps 400 steps of batch 32
      # within minutes; peak lr 0.4 x 32/256 = 0.05 (kNN after 400 steps: lr 0.05 0.49,
      # 0.2 0.33, 1.0 0.36 from 0.42 at init, one seed each, 2026-12-02).
      c.model.width, c.model.small_image_stem = 8, True
      c.data.image_size = 56
      c.train.batch_size = 32
      c.train.num_epochs = 20.0  # 640 crops: 20 steps per epoch
      c.train.log_every_steps = 50
      c.optim.warmup_epochs = 2.0
      c.optim.base_lr = 0.4
      # The official BYOL table lowers the EMA for shorter runs (0.97 at 40 epochs); 400 steps
      # is far shorter. 2 seeds: kNN 0.34 -> 0.46 and 0.36 -> 0.42, 160 probe images,
      # 2026-12-02. (The lr and EMA sweeps here ran before the blocks' last BN γ started at 0
      # again, init kNN 0.42 / 0.39: EMA 0.996 gave 0.47 / 0.38 where 0.97 gave 0.55 / 0.36.)
      c.method_args.ema_base = 0.97
  return c


MASKED_VARIANTS = ("demo", "test", "in100", "epochs", "n", "m", "aug")
MASKED_AUGMENTATIONS = ("light", "medium", "strong")


def masked_siamese_config(method: str, args: dict[str, Any]) -> ConfigDict:
  """configs/masked_mocov3.py and masked_byol.py: one recipe (the paper's Masked MoCo-v3 one),
  InfoNCE (τ 0.2) or BYOL's loss."""
  in100 = bool(args.get("in100"))
  epochs = args.get("epochs", 200 if in100 else 300)
  aug = args.get("aug", "light")
  if aug not in MASKED_AUGMENTATIONS:
    raise ConfigError(f"config variant aug={aug!r} must be one of {MASKED_AUGMENTATIONS}")
  c = base_config()
  c.method = method
  c.method_args = ConfigDict({
      "num_chunks": 8, "target_chunks": 1, "head_norm": "ln", "cross_attention_blocks": 0,
      "projector_hidden": 4096, "predictor_hidden": 4096, "projector_dim": 256,
      "momentum": 0.99, "freeze_patch_embed": False})
  if method == "masked_mocov3":
    c.method_args.temperature = 0.2
  c.model = ConfigDict({"name": "vit_base", "patch_size": 16, "pos_embed": "sincos"})
  imagenet_data(c)
  c.data.image_size = 224
  c.data.views = f"masked_{aug}"
  c.optim.name = "adamw"
  c.optim.base_lr = 1.5e-4
  c.optim.weight_decay = 0.1
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.warmup_epochs = 40.0 if epochs >= 800 else 20.0
  c.optim.exclude_from_decay = "none"  # MoCo v3's AdamW decays every parameter
  c.train.batch_size = 4096
  c.train.num_epochs = float(epochs)
  if in100:
    c.model = ConfigDict({"name": "vit_small", "patch_size": 16, "num_heads": 12,
                          "pos_embed": "sincos"})
    c.data.source = "image_folder"
    c.data.source_args = ConfigDict({"root": ""})
    c.train.batch_size = 1024
  apply_size_variant(c, args, vit=True)
  if args.get("demo") or args.get("test"):
    c.model.pos_embed = "sincos"
    if args.get("test"):
      c.method_args.num_chunks = 4  # 16 patches at 32 px with patch 8
  c.method_args.num_chunks = int(args.get("n", c.method_args.num_chunks))
  c.method_args.target_chunks = int(args.get("m", c.method_args.target_chunks))
  return c
