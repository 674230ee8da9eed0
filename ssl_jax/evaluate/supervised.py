"""The one supervised loop: linear evaluation and fine-tuning train through it (resumable).

A protocol (`linear_eval.make_protocol`, `finetune.make_protocol`) says WHAT is trained: its
parameters (a head on a frozen backbone, or backbone + head), its loss, its eval-mode logits, its
optimizer and its train view. Everything else is here and shared:
  * data: the train split through the pretraining pipeline (`pipeline.train_dataset`: per-process
    shard, reshuffled every epoch, per-element seeded views, skipped records counted) with the
    protocol's view (`ssl_jax.data.supervised_views.TrainView`); the test split through
    `features.source_features` (resize, centre crop, one ordered pass);
  * one jitted sharded step (`train_step`): the step's key is `fold_in(PRNGKey(seed), step)`;
    optax update; optional EMA of the weights (timm `ModelEma`: ξ ← d·ξ + (1 − d)·θ every step);
    a non-finite step leaves the state untouched and stops the run (`ssl_jax.loop`);
  * the loop (`ssl_jax.loop.run_steps`): metrics.jsonl and one console line per log step, a
    progress bar, evaluation every `eval.every_epochs` and at the end, orbax checkpoints of the
    state *and* the data iterator every `train.checkpoint_every_steps`, at the end and on SIGTERM.
    Rerunning the same command resumes from the latest checkpoint with exactly the next batch, so
    an interrupted evaluation ends with the accuracy of an uninterrupted one.
Frozen arrays (the linear protocol's backbone) are a separate, un-donated argument of the step
("constants"), never checkpointed; `config.json` records the backbone source's sha256 and a
resumed run refuses a changed backbone.

Workdir: config.json, metrics.jsonl, checkpoints/, `<protocol>_summary.json` (final top-1/top-5).

Train state (a plain dict, saved whole): step int32; params (what is trained); opt_state; state
(batch-norm statistics the forward updates); ema ({"params", "state"} or {} when off).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from ssl_jax import checkpoint, config_lib, loop, optim, parallel, paths, registry, weights
from ssl_jax.config_lib import ConfigError
from ssl_jax.data import pipeline
from ssl_jax.data import supervised_views as views
from ssl_jax.data.randaugment import RandAugment
from ssl_jax.data.views import ColorSpec
from ssl_jax.evaluate import features as features_lib
from ssl_jax.evaluate.knn import topk_accuracy
from ssl_jax.metrics import MetricsWriter, console, format_metrics

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclasses.dataclass
class Data:
  """The two splits and the run length: steps from `config.train` epochs and the split size
  (`config_lib.steps_from_epochs`)."""
  train: Any
  test: Any
  num_classes: int
  total_steps: int
  steps_per_epoch: int
  warmup_steps: int


@dataclasses.dataclass
class Protocol:
  """What a supervised protocol trains (the loop is `run`).

  name: metric prefix and file stem ("linear_eval", "finetune").
  init(rng) -> (params, state): what the optimizer trains, and the non-trained variables the
    forward updates (batch-norm statistics; {} when none).
  loss_fn(params, state, constants, batch, rng) -> (loss, (state, metrics)): batch is the device
    batch of `view.output_spec()`; metrics is a dict of scalars.
  logits_fn(params, state, constants, images) -> [B, C] or {head: [B, C]}: eval mode, images
    uint8 [B, H, W, 3].
  tx, schedule: the optimizer (`make_optimizer`) and its lr schedule (for the log).
  view: the host half of the train view.
  constants: frozen arrays (host or device), passed to every step un-donated; never saved.
  summary: what the summary file records about the protocol (features, model, ...).
  """
  name: str
  init: Callable[[jax.Array], tuple[Any, Any]]
  loss_fn: Callable[..., tuple[jax.Array, tuple[Any, dict]]]
  logits_fn: Callable[..., Any]
  tx: optax.GradientTransformation
  schedule: Callable
  view: views.TrainView
  constants: Any = None
  summary: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Config pieces every protocol reads

# Architecture fields `config.backbone.model` may set (unset: None, ignored): for a workdir or our
# export the recorded architecture is used, a foreign file needs at least the name.
_MODEL_FIELDS = {"name": str, "patch_size": int, "embed_dim": int, "depth": int,
                 "num_heads": int, "window_size": int, "width": int, "small_image_stem": bool,
                 "pool": str}


def base_config(protocol: str) -> ml_collections.ConfigDict:
  """The sections every evaluation config has, with neutral defaults (no augmentation beyond
  crop + flip, no smoothing/mixup/EMA); `configs/linear_eval.py` and `configs/finetune.py` set
  their papers' values on top."""
  c = ml_collections.ConfigDict()
  c.protocol = protocol
  # Where the backbone comes from: a pretraining workdir, or a safetensors/PyTorch file with
  # `model` naming the architecture (e.g. model.name=vit_base, model.patch_size=16).
  c.backbone = ml_collections.ConfigDict({
      "workdir": "", "step": 0, "part": "online", "safetensors": "",
      "model": ml_collections.ConfigDict(
          {k: ml_collections.config_dict.placeholder(t) for k, t in _MODEL_FIELDS.items()})})
  c.data = ml_collections.ConfigDict({
      "source": "tfds",
      # split: tfds syntax ("train[:10%]"); classes: "" or an ImageNet subset ("imagenet100",
      # then num_classes=100) or a file of wnids (`ssl_jax.data.imagenet`).
      "train_args": ml_collections.ConfigDict({"name": "imagenet2012", "split": "train",
                                               "data_dir": "", "classes": ""}),
      "test_args": ml_collections.ConfigDict({"name": "imagenet2012", "split": "validation",
                                              "data_dir": "", "classes": ""}),
      "num_classes": 1000,
      "image_size": 224,
      "crop_fraction": 224 / 256,      # eval: resize to 256, centre crop 224
      "crop_scale": (0.08, 1.0),       # train: RandomResizedCrop scale
      "interpolation": "bilinear",     # of the train crop (and RandAugment's geometric ops)
      "randaugment": "",               # timm policy, e.g. "rand-m9-mstd0.5-inc1"; "" off
      "reprob": 0.0,                   # random erasing probability
      "remode": "pixel",               # random erasing fill
      "color_jitter": (0.0, 0.0, 0.0, 0.0),  # brightness, contrast, saturation, hue (device)
      "lighting": 0.0,                 # AlexNet PCA lighting std (device)
      "num_workers": 8,
      "prefetch": 4,
  })
  c.optim = ml_collections.ConfigDict({
      "name": "sgd", "base_lr": 0.1, "lr_rule": "linear", "warmup_steps": 0,
      "warmup_epochs": 0.0, "schedule": "cosine", "lr_drops": (), "end_lr": 0.0,
      "weight_decay": 0.0, "momentum": 0.9, "nesterov": False, "b1": 0.9, "b2": 0.999,
      "eps": 1e-8, "grad_clip": 0.0, "exclude_from_decay": "bias_and_norm",
      "layer_decay": 0.0})
  c.train = ml_collections.ConfigDict({
      "batch_size": 256, "num_epochs": 100.0, "total_steps": 0, "seed": 0,
      "log_every_steps": 100, "checkpoint_every_steps": 1000, "keep_checkpoints": 2,
      "progress_bar": True, "label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
      "ema_decay": 0.0})
  c.eval = ml_collections.ConfigDict({"batch_size": 256, "every_epochs": 10, "limit": 0})
  c.sharding = ml_collections.ConfigDict({"fsdp": False})
  return c


def apply_size_variant(c: ml_collections.ConfigDict, demo: bool) -> None:
  """`demo` (CPU minutes at 64 px) / `test` (seconds at 32 px) on the built-in photos: train
  crops vs held-out probe crops of ten photos (`sources.BuiltinPhotos`), in one process."""
  per_photo = {"train": 64, "probe": 16} if demo else {"train": 8, "probe": 4}
  c.data.source = "builtin_photos"
  for field, split in (("train_args", "train"), ("test_args", "probe")):
    c.data[field] = ml_collections.ConfigDict({"split": split, "num_per_photo": per_photo[split],
                                               "crop_size": 96 if demo else 48})
  c.data.update(num_classes=10, image_size=64 if demo else 32, num_workers=0, prefetch=2)
  c.train.update(batch_size=64 if demo else 16, log_every_steps=20 if demo else 2,
                 checkpoint_every_steps=100 if demo else 4, progress_bar=demo)
  c.eval.batch_size = 64 if demo else 16

def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks the shared sections of an evaluation config; ConfigError names the field."""
  t, o, d, e = config.train, config.optim, config.data, config.eval

  def require(cond, message):
    if not cond:
      raise ConfigError(message)

  require(t.batch_size > 0 and t.batch_size % num_devices == 0,
          f"config.train.batch_size={t.batch_size} must be a positive multiple of the "
          f"{num_devices} devices")
  require(e.batch_size > 0 and e.batch_size % num_devices == 0,
          f"config.eval.batch_size={e.batch_size} must be a positive multiple of the "
          f"{num_devices} devices")
  require(t.total_steps >= 0 and (t.total_steps > 0 or t.num_epochs > 0),
          "set config.train.total_steps or config.train.num_epochs to a positive value")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    require(t[field] > 0, f"config.train.{field}={t[field]} must be positive")
  require(0.0 <= t.label_smoothing < 1.0,
          f"config.train.label_smoothing={t.label_smoothing} must be in [0, 1)")
  require(t.mixup_alpha >= 0 and t.cutmix_alpha >= 0,
          "config.train.mixup_alpha and config.train.cutmix_alpha must be >= 0")
  require(0.0 <= t.ema_decay < 1.0, f"config.train.ema_decay={t.ema_decay} must be in [0, 1)"
          " (0: no EMA of the weights)")
  require(o.name in config_lib.OPTIMIZERS,
          f"config.optim.name={o.name!r} must be one of {config_lib.OPTIMIZERS}")
  require(o.base_lr > 0, f"config.optim.base_lr={o.base_lr} must be positive")
  require(o.schedule in config_lib.SCHEDULES,
          f"config.optim.schedule={o.schedule!r} must be one of {config_lib.SCHEDULES}")
  drops = tuple(o.get("lr_drops", ()) or ())
  require((o.schedule == "piecewise") == bool(drops),
          f"config.optim.lr_drops={drops} (epochs where the lr drops ×0.1) goes with "
          f"config.optim.schedule='piecewise' (got {o.schedule!r})")
  require(not drops or o.name != "lars",
          "config.optim.lr_drops: step decay is implemented for sgd and adamw, not lars")
  require(d.image_size > 0, f"config.data.image_size={d.image_size} must be positive")
  require(d.interpolation in INTERPOLATIONS,
          f"config.data.interpolation={d.interpolation!r} must be one of {INTERPOLATIONS}")
  require(0.0 <= d.reprob <= 1.0, f"config.data.reprob={d.reprob} must be in [0, 1]")
  require(d.remode in views.ERASE_MODES,
          f"config.data.remode={d.remode!r} must be one of {views.ERASE_MODES}")
  if d.randaugment:
    try:
      RandAugment.from_policy(d.randaugment)
    except ValueError as err:
      raise ConfigError(f"config.data.randaugment: {err}") from err
  require(config.backbone.part in weights.PARTS,
          f"config.backbone.part={config.backbone.part!r} must be one of {weights.PARTS}")


def train_view(config: ml_collections.ConfigDict) -> views.TrainView:
  """The host half of the train view from `config.data`."""
  d = config.data
  ra = (RandAugment.from_policy(d.randaugment, interpolation=d.interpolation)
        if d.randaugment else None)
  erasing = views.RandomErasing(probability=float(d.reprob), mode=d.remode) if d.reprob else None
  return views.TrainView(int(d.image_size), tuple(float(s) for s in d.crop_scale),
                         d.interpolation, ra, erasing)


def train_images(config: ml_collections.ConfigDict, rng: jax.Array, batch: Mapping[str, jax.Array]
                 ) -> jax.Array:
  """The device half of the train view (`supervised_views.device_images`) from `config.data`."""
  d = config.data
  jitter = tuple(d.get("color_jitter", ()) or ())
  color = (ColorSpec(*jitter, jitter_p=1.0, jitter_style="torchvision") if any(jitter)
           else None)
  return views.device_images(rng, batch, color=color, lighting=float(d.get("lighting", 0.0)),
                             erase_mode=d.remode)


def make_data(config: ml_collections.ConfigDict, train_source=None, test_source=None) -> Data:
  """The sources of `config.data` (or the given ones) and the run length."""
  d = config.data

  def source(given, field):
    if given is not None:
      return given
    try:
      return registry.get_source(d.source, **d[field].to_dict())
    except config_lib.UserError:
      raise
    except (ValueError, TypeError, FileNotFoundError) as err:
      raise ConfigError(f"config.data.{field} (source {d.source!r}): {err}") from err

  train, test = source(train_source, "train_args"), source(test_source, "test_args")
  told = int(getattr(train, "num_classes", 0) or 0)
  num_classes = int(d.get("num_classes", 0) or told)
  if num_classes <= 0:
    raise ConfigError("config.data.num_classes must be set (the source does not tell it)")
  if told and told != num_classes:
    raise ConfigError(f"config.data.num_classes={num_classes} but the training source has "
                      f"{told} classes (a class subset such as classes=imagenet100 needs "
                      f"--config.data.num_classes={told})")
  first = train[0]
  if "error" not in first and "label" not in first:
    raise ConfigError(f"config.data.train_args: the records of {train!r} carry no label; a "
                      "supervised protocol needs a labelled source")
  if "label" in first and not 0 <= int(first["label"]) < num_classes:
    raise ConfigError(f"config.data.num_classes={num_classes} but the first training record has "
                      f"label {int(first['label'])}")
  steps = config_lib.steps_from_epochs(
      config.train.num_epochs, int(config.train.total_steps or 0), len(train),
      config.train.batch_size, config.optim.get("warmup_epochs", 0.0),
      int(config.optim.get("warmup_steps", 0) or 0))
  return Data(train, test, num_classes, steps["total_steps"], steps["steps_per_epoch"],
              steps["warmup_steps"])


def make_optimizer(config: ml_collections.ConfigDict, data: Data, trainable_mask: Any = None
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """`optim.make_optimizer` on `config.optim` with the warmup resolved from epochs.

  `config.optim.lr_drops` (epochs, with schedule "piecewise") is the step decay of MoCo's and
  OpenSelfSup's linear protocols: the lr is multiplied by 0.1 at each listed epoch. It is built as
  the optimizer at a constant unit lr followed by the schedule as a multiplier, which is exactly
  lr(t)·update for SGD and AdamW (their lr is the last factor of the chain).
  """
  fields = config.optim.to_dict()
  drops = tuple(fields.pop("lr_drops", ()) or ())
  cfg = ml_collections.ConfigDict({**fields, "warmup_steps": data.warmup_steps})
  bs = config.train.batch_size
  if not drops:
    return optim.make_optimizer(cfg, data.total_steps, bs, trainable_mask)
  fractions = tuple(round(e * data.steps_per_epoch) / data.total_steps for e in drops)
  schedule = optim.warmup_piecewise(optim.scale_lr(cfg.base_lr, bs, cfg.lr_rule),
                                    data.warmup_steps, data.total_steps, drops=fractions)
  with cfg.unlocked():
    cfg.update(base_lr=1.0, lr_rule="none", schedule="constant", warmup_steps=0)
  tx, _ = optim.make_optimizer(cfg, data.total_steps, bs, trainable_mask)
  return optax.chain(tx, optax.scale_by_schedule(schedule)), schedule


def load_backbone(backbone_cfg: ml_collections.ConfigDict,
                  overrides: dict | None = None) -> tuple[Any, dict, dict]:
  """(Linen backbone module, variables {"params", "batch_stats"?}, model config).

  Args:
    backbone_cfg: `config.backbone` with either `workdir` (+ `step`, 0 = latest, and `part`,
      "online" or "target") or `safetensors` (a file written by `python -m ssl_jax.export`, any
      torchvision ResNet / timm ViT state dict, or a PyTorch file), and `model`: the fields of
      the architecture that are set (unset placeholders are None and ignored); for a workdir or
      our export they default to the recorded ones.
    overrides: model fields the protocol sets (fine-tuning's `drop_path_rate`).
  """
  source = backbone_cfg.get("workdir") or backbone_cfg.get("safetensors")
  if not source:
    raise weights.WeightsError("set config.backbone.workdir (a pretraining workdir) or "
                               "config.backbone.safetensors (an exported or PyTorch file)")
  given = backbone_cfg.get("model") or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  model = {k: v for k, v in given.items() if v is not None and v != ""}
  model.update(overrides or {})
  variables, model = weights.load_backbone(
      source, model=model, step=int(backbone_cfg.get("step", 0) or 0) or None,
      part=backbone_cfg.get("part", "online"))
  kwargs = {k: v for k, v in model.items() if k not in ("name", "img_size")}
  try:
    module = registry.get_backbone(model["name"], **kwargs)
  except ValueError as e:
    raise weights.WeightsError(f"config.backbone.model: {e}") from e
  return module, jax.tree.map(jnp.asarray, variables), model


# ---------------------------------------------------------------------------------------------
# The step and the evaluation pass

@dataclasses.dataclass
class Setup:
  """Everything `run` builds before the loop (tests reuse it).

  train_step(ts, batch, constants) is jitted with the state donated; `step(ts, batch)` passes
  this run's constants. `evaluate(ts)` is one pass over the test split (and its EMA twin).
  """
  config: ml_collections.ConfigDict
  mesh: Any
  data: Data
  protocol: Protocol
  batch_spec: dict[str, jax.ShapeDtypeStruct]
  state_sharding: Any
  train_step: Callable
  init_state: Callable[[], Any]
  constants: Any
  logits: Callable

  def step(self, ts, batch):
    return self.train_step(ts, batch, self.constants)

  def device_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return loop.device_batch(local, self.mesh, self.batch_spec)

  def accuracy(self, params, state) -> dict[str, float]:
    """Top-1/top-5 of the protocol's logits on the test split (`name/top1`, or
    `name/<head>/top1` for several heads)."""
    c = self.config
    logits, labels = features_lib.source_features(
        self.logits, self.data.test, image_size=c.data.image_size,
        batch_size=c.eval.batch_size, limit=int(c.eval.get("limit", 0) or 0),
        crop_fraction=c.data.crop_fraction, args=(params, state, self.constants), mesh=self.mesh)
    if isinstance(logits, Mapping):
      return {f"{head}/{k}": float(v) for head, x in logits.items()
              for k, v in topk_accuracy(x, labels).items()}
    return {k: float(v) for k, v in topk_accuracy(logits, labels).items()}

  def evaluate(self, ts) -> dict[str, float]:
    name = self.protocol.name
    out = {f"{name}/{k}": v for k, v in self.accuracy(ts["params"], ts["state"]).items()}
    if ts["ema"]:
      ema = self.accuracy(ts["ema"]["params"], ts["ema"]["state"])
      out.update({f"{name}_ema/{k}": v for k, v in ema.items()})
    return out


def build(config: ml_collections.ConfigDict, make_protocol: Callable[..., Protocol], *,
          train_source=None, test_source=None, mesh=None) -> Setup:
  """Validates the config, builds the data, the protocol and the sharded train step."""
  mesh = mesh or parallel.make_mesh()
  validate(config, mesh.size)
  if config.train.batch_size % jax.process_count():
    raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not divisible by "
                      f"the {jax.process_count()} processes")
  data = make_data(config, train_source, test_source)
  protocol = make_protocol(config, data)
  bs = config.train.batch_size
  spec = {k: jax.ShapeDtypeStruct((bs,) + shape, dtype)
          for k, (shape, dtype) in protocol.view.output_spec().items()}
  base_key = jax.random.PRNGKey(config.train.seed)
  init_key = jax.random.fold_in(base_key, 2**31 - 1)  # step keys are fold_in(base_key, step)
  ema_decay = float(config.train.ema_decay)
  fsdp = bool(config.get("sharding", {}).get("fsdp", False))

  def init_state():
    params, state = protocol.init(init_key)
    ema = {"params": params, "state": state} if ema_decay else {}
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": protocol.tx.init(params), "state": state, "ema": ema}

  abstract_state = jax.eval_shape(init_state)
  state_sharding = parallel.state_shardings(abstract_state, mesh, fsdp)
  constants = protocol.constants
  const_sharding = parallel.state_shardings(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), constants), mesh, fsdp)
  constants = jax.device_put(constants, const_sharding)

  def train_step(ts, batch, consts):
    step = ts["step"]
    rng = jax.random.fold_in(base_key, step)
    grad_fn = jax.value_and_grad(protocol.loss_fn, has_aux=True)
    (loss, (state, metrics)), grads = grad_fn(ts["params"], ts["state"], consts, batch, rng)

    def apply():
      updates, opt_state = protocol.tx.update(grads, ts["opt_state"], ts["params"])
      params = optax.apply_updates(ts["params"], updates)
      ema = ts["ema"]
      if ema:
        ema = optim.ema_update(ema, {"params": params, "state": state}, ema_decay)
      return {"step": step + 1, "params": params, "opt_state": opt_state, "state": state,
              "ema": ema}, updates

    new, finite, grad_norm = loop.update_if_finite(apply, ts, loss, grads)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite,
                   lr=protocol.schedule(step))
    return new, metrics

  jitted = jax.jit(train_step,
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh), const_sharding),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))
  logits = jax.jit(protocol.logits_fn)
  return Setup(config=config, mesh=mesh, data=data, protocol=protocol, batch_spec=spec,
               state_sharding=state_sharding, train_step=jitted,
               init_state=jax.jit(init_state, out_shardings=state_sharding),
               constants=constants, logits=logits)


# ---------------------------------------------------------------------------------------------
# The run

def summary_file(name: str) -> str:
  return f"{name}_summary.json"


def backbone_provenance(config) -> dict:
  """{"backbone": weights.describe(...)} of `config.backbone`'s source ({} when none is set)."""
  b = config.backbone
  source = b.get("workdir") or b.get("safetensors")
  return {"backbone": weights.describe(source, int(b.step or 0) or None, b.part)} if source else {}


def run(config: ml_collections.ConfigDict, workdir: str, make_protocol: Callable[..., Protocol],
        backbone_of: Callable[[ml_collections.ConfigDict], tuple[Any, dict, dict]], *,
        backbone: tuple[Any, dict, dict] | None = None, train_source=None, test_source=None,
        mesh=None, max_steps: int | None = None) -> dict:
  """Trains the protocol (resuming from `workdir`), evaluates, writes the summary.

  Args:
    config: an evaluation config (`configs/linear_eval.py`, `configs/finetune.py`).
    workdir: output folder; holding checkpoints of this evaluation, the run resumes.
    make_protocol: (config, Data, backbone=(module, variables, model)) -> Protocol.
    backbone_of: config -> (module, variables, model): loads `config.backbone` (first, so a bad
      weight source is reported before any data is opened; config.json records its sha256).
    backbone: (module, variables, model) instead of loading (tests, notebooks).
    train_source, test_source: override `config.data` (tests, notebooks).
    mesh: device mesh (default all devices).
    max_steps: stop after this many steps of the schedule (as a preemption would).

  Returns:
    The summary: {"<name>/top1", "<name>/top5", ..., "step", "epochs", "complete", ...}; only a
    complete run writes `<name>_summary.json`.
  """
  parallel.initialize_distributed()
  mesh = mesh or parallel.make_mesh()
  validate(config, mesh.size)  # before loading any weights
  provenance = {}
  if backbone is None:
    backbone = backbone_of(config)
    provenance = backbone_provenance(config)
  setup = build(config, functools.partial(make_protocol, backbone=backbone),
                train_source=train_source, test_source=test_source, mesh=mesh)
  data, protocol = setup.data, setup.protocol
  workdir = paths.check_workdir(workdir)
  is_main = jax.process_index() == 0
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  resumed = manager.latest_step() is not None
  if is_main:
    loop.write_run_config(workdir, config, provenance, resumed)
  total = data.total_steps
  if resumed:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(setup.init_state), setup.state_sharding)
    start, ts = checkpoint.restore(manager, abstract)
    if start > total:
      manager.close()
      raise ConfigError(f"{workdir} holds a checkpoint at step {start}, past the {total} steps "
                        "this config schedules (config.train.num_epochs / total_steps or the "
                        "data changed); evaluate into a new workdir")
  else:
    start, ts = 0, setup.init_state()
  data_it = iter(pipeline.train_dataset(
      data.train, seed=config.train.seed, batch_size=config.train.batch_size,
      transform=protocol.view, num_workers=config.data.num_workers,
      prefetch=config.data.prefetch, process_index=jax.process_index(),
      process_count=jax.process_count(), start_step=start))
  stop_at = total if max_steps is None else min(total, max_steps)
  if is_main:
    what = f"resuming at step {start}" if start else "starting"
    console(f"{protocol.name}: {what}, {stop_at - start} of {total} steps of batch "
            f"{config.train.batch_size} ({data.steps_per_epoch} per epoch, {data.num_classes} "
            f"classes, {len(data.train)} train / {len(data.test)} test records), workdir "
            f"{workdir}")
  writer = MetricsWriter(workdir, enabled=is_main)
  every = int(config.eval.get("every_epochs", 0) or 0) * data.steps_per_epoch
  periodic = [loop.Periodic(every_steps=every or total, run=setup.evaluate)]
  try:
    outcome = loop.run_steps(
        setup.step, ts, data_it, to_device=setup.device_batch, start=start, stop_at=stop_at,
        total=total, manager=manager, workdir=workdir, writer=writer,
        batch_size=config.train.batch_size, log_every=config.train.log_every_steps,
        checkpoint_every=config.train.checkpoint_every_steps, periodic=periodic,
        show_bar=bool(config.train.progress_bar), host_counters=pipeline.HOST_COUNTERS,
        extra_metrics=lambda s: {"epoch": s / data.steps_per_epoch})
    result = outcome.evals
    if outcome.step == total and not result:  # resumed after the last step: evaluate again
      result = setup.evaluate(outcome.state)
      writer.write(total, result)
      if is_main:
        console(format_metrics(total, total, result))
  finally:
    manager.close()
    writer.close()
  summary = {**result, **protocol.summary, "step": outcome.step, "total_steps": total,
             "epochs": outcome.step / data.steps_per_epoch, "complete": outcome.step == total,
             "num_train": len(data.train), "num_test": len(data.test),
             "num_classes": data.num_classes}
  if summary["complete"] and is_main:
    paths.write_atomic(epath.Path(workdir) / summary_file(protocol.name),
                       json.dumps(summary, indent=2, sort_keys=True, default=str))
  return {**summary, "state": outcome.state}
