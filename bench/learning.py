"""Does each method learn? Tiny pretraining runs, then kNN + linear probe on held-out data.

Pretrains a ResNet-18 (width 16) and a tiny ViT with each method for a fixed number of steps on
the built-in photos (or Fashion-MNIST), then evaluates frozen features with the weighted kNN
(k=20, T=0.07) and the feature-level linear probe (BN without affine, SGD) on a held-out split,
next to the same evaluation of the randomly initialised backbone and of raw pixels.

  python bench/learning.py                              # <= 20 min on 2 CPU cores
  python bench/learning.py --methods=byol,detcon_b --extra_methods= --backbones=resnet

Data: "photos" pretrains on crops of the left 75 % of scikit-image's photos (label = photo, not
used by pretraining) and probes on crops of the held-out right 25 %; "fashion_mnist" pretrains on
the train split and probes on a test-split subset. DetCon-B/S need masks: FH masks of the photos
(computed once into a cache, as the `:demo` configs) or a spatial grid on Fashion-MNIST.
Each run uses its method's `:demo` config (the paper's recipe, shrunk) with the model, image
size, batch and step count set here. Prints one table row per (backbone, method).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's ssl_jax, not another editable install's

from ssl_jax import config_lib, registry, train  # noqa: E402
from ssl_jax.data import pipeline  # noqa: E402
from ssl_jax.evaluate import features, knn, linear  # noqa: E402

BACKBONES = {
    # 32 px inputs: the CIFAR-style stem keeps a 4x4 final map instead of 1x1.
    "resnet": {"name": "resnet18", "width": 16, "small_image_stem": True},
    # Mean of the patch tokens as the image representation: DetCon's loss only reaches the
    # patch tokens (it pools the feature map by masks), so a CLS token would stay untrained.
    "vit": {"name": "vit_tiny", "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4,
            "pos_embed": "sincos", "pool": "mean"},
}
METHOD_CONFIGS = {"simclr": "simclr", "byol": "byol", "mocov2": "mocov2", "mocov3": "mocov3",
                  "detcon_b": "detcon_b", "detcon_s": "detcon_s", "mae": "mae", "ccmim": "ccmim",
                  "simmim": "simmim", "mimco": "mimco", "maskco": "maskco",
                  "masked_mocov3": "masked_mocov3", "masked_byol": "masked_byol"}
# Methods that drop, mask or chunk patch tokens: ViT rows only (32 px, patch 4: 64 patches).
VIT_ONLY = {"mae", "ccmim", "simmim", "mimco", "masked_mocov3", "masked_byol"}
# Two-stage methods: the method whose run (same backbone, same bench) is the frozen teacher; it is
# pretrained first when this bench has not run it yet.
TEACHERS = {"mimco": "mocov3"}
SHORT_RUN_LR = {"lars": 1.0, "sgd": 0.1, "adamw": 2e-3}
# MaskCo reaches the backbone through one masked box per image and the Mask Prediction Head; in
# 200-step runs SGD 0.1 barely moves it and 1.0 diverges from useful features: 0.3 (lr sweep).
METHOD_LR_SCALE = {"maskco": 3.0}
PROBE = dict(epochs=30, batch_size=128, lr=0.1, weight_decay=1e-4, optimizer="sgd",
             normalize="bn_noaffine")


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def data_sources(dataset: str, image_size: int) -> dict:
  """Pretraining source args and the probe's (train, test) sources."""
  if dataset == "photos":
    pretrain = ("builtin_photos", {"split": "train", "num_per_photo": 64, "crop_size": 64})
    probe_train = registry.get_source("builtin_photos", split="train", num_per_photo=64,
                                      crop_size=image_size)
    probe_test = registry.get_source("builtin_photos", split="probe", num_per_photo=32,
                                     crop_size=image_size)
    return {"pretrain": pretrain, "probe": (probe_train, probe_test, 0, 0)}
  if dataset == "fashion_mnist":
    pretrain = ("fashion_mnist", {"split": "train"})
    return {"pretrain": pretrain,
            "probe": (registry.get_source("fashion_mnist", split="train"),
                      registry.get_source("fashion_mnist", split="test"), 5000, 2000)}
  raise ValueError(f"--dataset={dataset!r} must be 'photos' or 'fashion_mnist'")


def pretrain_config(method: str, backbone: str, dataset: str, steps: int, batch_size: int,
                    image_size: int, lr_scale: float = 1.0, vit_optimizer: str = ""):
  config = load_config(METHOD_CONFIGS[method], "demo")
  source, args = data_sources(dataset, image_size)["pretrain"]
  with config.unlocked():
    config.model = config_lib.ConfigDict(BACKBONES[backbone])
    config.data.image_size = image_size
    config.train.batch_size = batch_size
    config.train.total_steps = steps
    config.train.log_every_steps = max(1, steps // 4)
    config.train.checkpoint_every_steps = steps
    config.train.progress_bar = False
    config.optim.warmup_steps = max(1, steps // 10)
    config.optim.warmup_epochs = 0.0
    config.eval = config_lib.ConfigDict()
    # The papers' rates (× batch/256) are tuned for hundreds of epochs at batch 4096; at batch
    # 32 for a few hundred steps they barely move the weights, so each optimizer family gets
    # one fixed peak rate (same recipe otherwise), scaled by --lr_scale.
    config.optim.lr_rule = "none"
    if backbone == "vit" and vit_optimizer:
      # ViTs are trained with AdamW in MoCo v3 / MAE; LARS recipes are ResNet recipes.
      config.optim.name = vit_optimizer
    config.optim.base_lr = (SHORT_RUN_LR[config.optim.name] * lr_scale
                            * METHOD_LR_SCALE.get(method, 1.0))
    if method.startswith("detcon"):
      if dataset == "photos":
        config.data.source_args.precompute_args = config_lib.ConfigDict(args)
      else:
        config.data.source, config.data.source_args = source, config_lib.ConfigDict(args)
        config.data.masks = "grid"
    else:
      config.data.source, config.data.source_args = source, config_lib.ConfigDict(args)
    if "mask_patch_size" in config.method_args:
      # SimMIM's 32 px of 224 at this resolution: 16 mask patches per image, as the :demo configs.
      patch = BACKBONES[backbone].get("patch_size", 1)
      config.method_args.mask_patch_size = max(patch, image_size // 4 // patch * patch)
    if method == "maskco":  # negatives in groups of (up to) 32 images that divide the batch
      config.method_args.negatives_group_size = math.gcd(
          config.method_args.negatives_group_size, batch_size)
  return config


def eval_images(source, image_size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
  images, labels = [], []
  for batch in pipeline.eval_batches(source, image_size=image_size, batch_size=256, limit=limit):
    images.append(batch["image"][batch["valid"]])
    labels.append(batch["label"][batch["valid"]])
  return np.concatenate(images), np.concatenate(labels)


def probe(features: tuple[np.ndarray, np.ndarray], labels: tuple[np.ndarray, np.ndarray],
          num_classes: int, seed: int = 0, epochs: int = PROBE["epochs"]) -> dict[str, float]:
  (x_train, x_test), (y_train, y_test) = features, labels
  knn_acc = knn.knn_accuracy(x_train, y_train, x_test, y_test, num_classes, k=20,
                             temperature=0.07)["top1"]
  p = linear.fit_linear_probe(x_train, y_train, num_classes, rng=jax.random.PRNGKey(seed),
                              **{**PROBE, "epochs": epochs})
  lin = linear.evaluate_linear_probe(p, x_test, y_test)["top1"]
  return {"knn": 100 * float(knn_acc), "linear": 100 * float(lin)}


def encoded(method, params, state, images: np.ndarray) -> np.ndarray:
  return features.extract_features(method.encode, images, 256, args=(params, state))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="photos", choices=["photos", "fashion_mnist"])
  parser.add_argument("--methods", default="byol,mocov3,detcon_b",
                      help="run on every backbone, first")
  parser.add_argument("--extra_methods", default="simclr,mocov2,detcon_s",
                      help="then on the first backbone, each only while the budget allows")
  parser.add_argument("--backbones", default="resnet,vit")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--budget_minutes", type=float, default=19.0,
                      help="skip an extra method whose run would end past this")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--lr_scale", type=float, default=1.0,
                      help="multiplies each method's base_lr")
  parser.add_argument("--vit_optimizer", default="",
                      help="e.g. adamw: every method's optimizer for the ViT ('' = its own)")
  parser.add_argument("--probe_epochs", type=int, default=100)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--out", default="", help="optional JSON file for the table")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  workroot = args.workdir or tempfile.mkdtemp(prefix="ssl_jax_learning_")
  probe_train, probe_test, n_train, n_test = data_sources(args.dataset, args.image_size)["probe"]
  x_train, y_train = eval_images(probe_train, args.image_size, n_train)
  x_test, y_test = eval_images(probe_test, args.image_size, n_test)
  num_classes = int(max(y_train.max(), y_test.max()) + 1)
  labels = (y_train, y_test)
  rows = []

  def add(backbone, method, result, seconds):
    rows.append({"backbone": backbone, "method": method, **result, "seconds": seconds})
    print(f"{backbone:8s} {method:12s} kNN {result['knn']:6.2f}  linear {result['linear']:6.2f}"
          f"  ({seconds:.0f} s)", flush=True)

  pixels = tuple(x.reshape(len(x), -1).astype(np.float32) / 255.0 for x in (x_train, x_test))
  add("-", "raw pixels", probe(pixels, labels, num_classes, epochs=args.probe_epochs), 0.0)
  backbones = args.backbones.split(",")
  runs = [(b, m) for b in backbones for m in args.methods.split(",") if m]
  extra = [(backbones[0], m) for m in args.extra_methods.split(",") if m]
  last_seconds = {}
  for backbone, method in runs + extra:
    if method in VIT_ONLY and backbone != "vit":
      print(f"{backbone:8s} {method:12s} skipped: needs the ViT backbone", flush=True)
      continue
    if (backbone, method) in extra:
      projected = time.perf_counter() - t0 + last_seconds.get(backbone, 0.0)
      if projected > 60 * args.budget_minutes:
        print(f"{backbone:8s} {method:12s} skipped: would end after {projected / 60:.1f} min"
              f" > --budget_minutes={args.budget_minutes}", flush=True)
        continue
    start = time.perf_counter()
    config = pretrain_config(method, backbone, args.dataset, args.steps, args.batch_size,
                             args.image_size, args.lr_scale, args.vit_optimizer)
    if method in TEACHERS:
      teacher = TEACHERS[method]
      teacher_dir = os.path.join(workroot, f"{backbone}_{teacher}")
      if not os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
        t_config = pretrain_config(teacher, backbone, args.dataset, args.steps, args.batch_size,
                                   args.image_size, args.lr_scale, args.vit_optimizer)
        t_ts = train.run(t_config, teacher_dir)["state"]
        t_method = registry.get_method(t_config.method).make(t_config)
        feats = tuple(encoded(t_method, t_ts["params"], t_ts["state"], x)
                      for x in (x_train, x_test))
        add(backbone, f"{teacher} (teacher)", probe(feats, labels, num_classes,
                                                    epochs=args.probe_epochs),
            time.perf_counter() - start)
      with config.unlocked():
        config.method_args.teacher = teacher_dir
        config.method_args.teacher_command = ""
    out = train.run(config, os.path.join(workroot, f"{backbone}_{method}"))
    # The method's own `encode` gives the frozen features (eval mode, BN running statistics).
    m = registry.get_method(config.method).make(config)
    if not any(r["backbone"] == backbone and r["method"] == "random init" for r in rows):
      # Random init: the trainer's initial state (before any step), same architecture and seed.
      setup0 = train.build(config)
      ts0 = jax.device_get(setup0.init_state(setup0.zeros_batch()))
      feats = tuple(encoded(m, ts0["params"], ts0["state"], x) for x in (x_train, x_test))
      add(backbone, "random init", probe(feats, labels, num_classes, epochs=args.probe_epochs),
          0.0)
    ts = out["state"]
    feats = tuple(encoded(m, ts["params"], ts["state"], x) for x in (x_train, x_test))
    last_seconds[backbone] = time.perf_counter() - start
    add(backbone, method, probe(feats, labels, num_classes, epochs=args.probe_epochs),
        last_seconds[backbone])
  total = time.perf_counter() - t0
  print(f"\n{args.dataset}: {args.steps} steps x batch {args.batch_size} at {args.image_size} px,"
        f" probe {len(x_train)} train / {len(x_test)} held-out, {num_classes} classes;"
        f" total {total / 60:.1f} min")
  print("| backbone | method | kNN top-1 % | linear top-1 % |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['backbone']} | {r['method']} | {r['knn']:.1f} | {r['linear']:.1f} |")
  result = {"args": vars(args), "rows": rows, "total_seconds": total}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
