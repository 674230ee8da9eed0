"""Linear evaluation of a frozen pretrained backbone on ImageNet (the papers' headline metric).

  python -m ssl_jax.evaluate --config=configs/linear_eval.py \\
      --config.backbone.workdir=gs://bucket/byol --workdir=gs://bucket/byol/linear
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:vit \\
      --config.backbone.workdir=gs://bucket/mocov3 --workdir=...
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:vit \\
      --config.backbone.safetensors=vit_b.safetensors --config.backbone.model.name=vit_base \\
      --config.backbone.model.patch_size=16 --workdir=...
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:multilayer \\
      --config.backbone.workdir=gs://bucket/maskco --workdir=...
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:demo \\
      --config.backbone.workdir=/tmp/byol_demo --workdir=/tmp/byol_demo/linear   (CPU, minutes)

Rerunning a command resumes from the latest checkpoint in --workdir (SIGTERM saves one); the
result is the same as an uninterrupted run's. A 10 % ImageNet evaluation:
`--config.data.train_args.split='train[:10%]'`; ImageNet-100 (CMC's classes):
`--config.data.train_args.classes=imagenet100 --config.data.test_args.classes=imagenet100
--config.data.num_classes=100`.

Every variant: frozen backbone in eval mode, random-resized-crop 0.08–1 + flip for training,
resize to 256/224 of the crop and centre crop for evaluation, top-1/top-5, one recipe each:
  (default) = `moco`: MoCo v1/v2's `main_lincls.py` (ResNet): 100 epochs, batch 256, SGD
    momentum 0.9, lr 30 (no batch rule), wd 0, lr ×0.1 at epochs 60 and 80; global-average-pooled
    features, no BN before the head. Reproduces MoCo v2 800 ep: 71.1 % top-1 (MoCo v2 Table 2).
  `vit`: MoCo v3's `main_lincls.py` (`CONFIG.md`, `--lr=3`): 90 epochs, batch 1024, SGD momentum
    0.9, lr 3 × bs/256 (= 12), wd 0, cosine (per step; MoCo v3 steps it per epoch); the CLS token
    after the final norm and NO BatchNorm before the head (MoCo v3's linear head is a plain
    `nn.Linear`; MAE's probe has the BN: `mae`). MoCo v3 ViT-B 300 ep: 76.7 %.
  `mae`: MAE's `main_linprobe.py`: LARS (bias/norm excluded), lr 0.1 × bs/256, batch 16384,
    90 epochs with 10 of warmup, cosine, wd 0, BatchNorm without affine (ε 1e-6) before the head,
    CLS token, bicubic crops. MAE ViT-B 1600 ep: 68.0 %. ccMIM probes the mean of the patch tokens
    with this recipe (`--config.head.features=avg`; ccMIM ViT-B 800 ep: 68.9 %). Masked MoCo's
    probe (ImageNet-100): LARS blr 1.0, batch 4096, 100 epochs (`--config.optim.base_lr=1.0
    --config.train.batch_size=4096 --config.train.num_epochs=100`).
  `multilayer`: MaskCo's multi-layer protocol, OpenSelfSup's `r50_multihead.py`, which MaskCo
    says it uses unchanged: one linear head per ResNet-50 stage conv1…conv5 on OpenSelfSup's
    specified average pools (12/6/4/3/2 cells: ≈ 9k dims), BatchNorm without affine, 90 epochs,
    batch 256, SGD nesterov momentum 0.9, wd 1e-4 (on every head parameter, as torch's SGD), lr
    ×0.1 at epochs 30 and 60; colour jitter 0.4/0.4/0.4/0 and PCA lighting 0.1 on the train crops.
    lr: the config file's 0.01 (the paper's text says 0.1: `--config.optim.base_lr=0.1`).
    MaskCo 200 ep (Table 7): conv1 15.4, conv2 33.6, conv3 45.8, conv4 59.6, conv5 65.1 %.
  `demo` / `test`: the built-in photos (train crops vs held-out probe crops) at 64 / 32 px.
Cost at ImageNet scale: a forward pass of the frozen backbone per image and epoch (ResNet-50,
100 epochs: ~10 h on 8 V100s).
"""
from ssl_jax import config_lib
from ssl_jax.evaluate import supervised

VARIANTS = ("moco", "vit", "mae", "multilayer", "demo", "test")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, VARIANTS)
  c = supervised.base_config("linear")
  # kind: "linear" or "multilayer"; features: "" = the backbone's default (ResNet "pooled",
  # ViT "cls") or "avg"; batch_norm: BN without affine before the head (MAE); pool/pool_sizes:
  # the multi-layer heads' pooling ("specified" = OpenSelfSup's at 224 px, or "adaptive").
  c.head = config_lib.ConfigDict({"kind": "linear", "features": "", "batch_norm": False,
                                  "bn_epsilon": 1e-6, "pool": "adaptive", "pool_sizes": {}})
  # `moco` (the default): MoCo v1/v2 main_lincls.
  c.optim.update({"name": "sgd", "base_lr": 30.0, "lr_rule": "none", "schedule": "piecewise",
                  "lr_drops": (60.0, 80.0), "weight_decay": 0.0, "momentum": 0.9})
  c.train.update({"batch_size": 256, "num_epochs": 100.0})
  if args.get("vit"):
    c.optim.update({"base_lr": 3.0, "lr_rule": "linear", "schedule": "cosine", "lr_drops": ()})
    c.train.update({"batch_size": 1024, "num_epochs": 90.0})
  if args.get("mae"):
    c.optim.update({"name": "lars", "base_lr": 0.1, "lr_rule": "linear", "schedule": "cosine",
                    "lr_drops": (), "warmup_epochs": 10.0})
    c.train.update({"batch_size": 16384, "num_epochs": 90.0})
    c.head.batch_norm = True
    c.data.interpolation = "bicubic"
  if args.get("multilayer"):
    c.head.update({"kind": "multilayer", "batch_norm": True, "pool": "specified"})
    c.optim.update({"base_lr": 0.01, "nesterov": True, "weight_decay": 1e-4,
                    "exclude_from_decay": "none", "lr_drops": (30.0, 60.0)})
    c.train.num_epochs = 90.0
    c.data.color_jitter = (0.4, 0.4, 0.4, 0.0)
    c.data.lighting = 0.1
  if args.get("demo") or args.get("test"):
    demo = bool(args.get("demo"))
    supervised.apply_size_variant(c, demo)
    c.head.pool = "adaptive"
    c.head.batch_norm = True  # tiny runs: standardised features make one lr fit every backbone
    c.optim.update({"name": "sgd", "base_lr": 0.1 if demo else 0.5, "lr_rule": "none",
                    "schedule": "cosine", "lr_drops": (), "warmup_epochs": 0.0})
    c.train.num_epochs = 30.0 if demo else 2.0
    c.eval.every_epochs = 10 if demo else 0
  return c
