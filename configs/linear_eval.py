"""Linear evaluation of a frozen pretrained backbone on ImageNet (the papers' headline metric).

  python -m ssl_jax.evaluate --config=configs/linear_eval.py \\
      --config.backbone.workdir=gs://bucket/byol --workdir=gs://bucket/byol/linear
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:vit \\
      --config.backbone.workdir=gs://bucket/mocov3 --workdir=...
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:vit \\
      --config.backbone.safetensors=vit_b.safetensors --config.backbone.model.name=vit_base \\
      --config.backbone.model.patch_size=16 --workdir=...
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:demo \\
      --config.backbone.workdir=/tmp/byol_demo --workdir=/tmp/byol_demo/linear   (CPU, minutes)

Variants (one recipe each, all: frozen backbone in eval mode, random-resized-crop 0.08-1 + flip
for training, resize to 256/224 of the crop and centre crop for eval, top-1/top-5):
  (default) ResNet, MoCo v1/v2's protocol: 100 epochs, batch 256, SGD momentum 0.9, lr 30,
    wd 0 (MoCo's step schedule at 60/80 replaced by cosine, as MoCo v2's "cos" option);
    global-average-pooled features, no BN before the head. MoCo v2 800 ep: 71.1 % top-1.
  `vit`: MoCo v3's `CONFIG.md`: 90 epochs, batch 1024, SGD momentum 0.9, lr 3 × bs/256 (= 12),
    wd 0, cosine; CLS token (`--config.head.features=avg` for average pooling) with BN without
    affine before the head (MAE). MoCo v3 ViT-B 300 ep: 76.7 %.
  `mae`: MAE's `main_linprobe`: LARS, base lr 0.1 × bs/256, batch 16384, 90 epochs, 10 warmup,
    wd 0, BN without affine. MAE ViT-B 1600 ep: 68.0 %.
  `demo` / `test`: the built-in photos (train crops vs held-out probe crops) at 64 / 32 px.
Cost at ImageNet scale: a forward pass of the frozen backbone per image and epoch (ResNet-50,
100 epochs: ~10 h on 8 V100s).
"""
from ml_collections import ConfigDict

from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "vit", "mae"))
  c = ConfigDict()
  c.protocol = "linear"
  # Where the frozen backbone comes from: a pretraining workdir, or a safetensors export with
  # `model` naming the architecture ({"name": "resnet50"} / {"name": "vit_base", ...}).
  c.backbone = ConfigDict({"workdir": "", "step": 0, "part": "online", "safetensors": "",
                           "model": ConfigDict()})
  c.data = ConfigDict({
      "source": "tfds",
      "train_args": ConfigDict({"name": "imagenet2012", "split": "train", "data_dir": ""}),
      "test_args": ConfigDict({"name": "imagenet2012", "split": "validation", "data_dir": ""}),
      "num_classes": 1000,
      "image_size": 224,
      "crop_fraction": 224 / 256,   # eval: resize to 256, centre crop 224
      "crop_scale": (0.08, 1.0),    # train: RandomResizedCrop scale
  })
  # features: "" = the backbone's default (ResNet pooled, ViT "cls"), or "avg" for ViT.
  # batch_norm: None = on for ViTs (MAE/MoCo v3), off for ResNets.
  c.head = ConfigDict({"features": "", "batch_norm": None, "bn_epsilon": 1e-6})
  c.optim = ConfigDict({"name": "sgd", "base_lr": 30.0, "lr_rule": "none", "warmup_steps": 0,
                        "warmup_epochs": 0.0, "schedule": "cosine", "end_lr": 0.0,
                        "weight_decay": 0.0, "momentum": 0.9, "nesterov": False,
                        "exclude_from_decay": "bias_and_norm"})
  c.train = ConfigDict({"batch_size": 256, "num_epochs": 100.0, "total_steps": 0, "seed": 0,
                        "log_every_steps": 100})
  c.eval = ConfigDict({"batch_size": 256, "every_epochs": 10, "limit": 0})

  if args.get("vit") or args.get("mae"):
    c.train.num_epochs = 90.0
    if args.get("mae"):
      c.optim.update({"name": "lars", "base_lr": 0.1, "lr_rule": "linear", "warmup_epochs": 10.0})
      c.train.batch_size = 16384
    else:
      c.optim.update({"base_lr": 3.0, "lr_rule": "linear"})
      c.train.batch_size = 1024
  if args.get("demo") or args.get("test"):
    demo = bool(args.get("demo"))
    c.data.source = "builtin_photos"
    c.data.train_args = ConfigDict({"split": "train", "num_per_photo": 64 if demo else 8,
                                    "crop_size": 96 if demo else 48})
    c.data.test_args = ConfigDict({"split": "probe", "num_per_photo": 16 if demo else 4,
                                   "crop_size": 96 if demo else 48})
    c.data.num_classes = 10
    c.data.image_size = 64 if demo else 32
    c.optim.update({"name": "sgd", "base_lr": 0.1 if demo else 0.5, "lr_rule": "none",
                    "warmup_epochs": 0.0})
    c.head.batch_norm = True  # tiny runs: standardised features make one lr fit every backbone
    c.train.batch_size = 64 if demo else 16
    c.train.num_epochs = 30.0 if demo else 2.0
    c.train.log_every_steps = 20 if demo else 2
    c.eval.batch_size = 64 if demo else 16
    c.eval.every_epochs = 10 if demo else 0
  return c
