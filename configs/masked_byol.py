"""Masked BYOL (M-BYOL, "An improved baseline for masked contrastive learning"), ViT-B/16 on
ImageNet-1k, 300 epochs (the paper reports M-BYOL on ImageNet-100: 91.7 % fine-tuning at 800
epochs, Sec. 3.5; its ImageNet-1k tables show M-MoCo only).

  python -m ssl_jax.main --config=configs/masked_byol.py --workdir=...
  python -m ssl_jax.main --config=configs/masked_byol.py:in100 \
      --config.data.source_args.root=/data/imagenet100/train --workdir=...   (Table 1b, n = 8)
  python -m ssl_jax.main --config=configs/masked_byol.py:in100,n=4,m=8 --workdir=...  (Fig. 4)
  python -m ssl_jax.main --config=configs/masked_byol.py:demo --workdir=/tmp/mbyol  (CPU)

Recipe: the Masked MoCo-v3 recipe (configs/masked_mocov3.py; AdamW β = (0.9, 0.95), lr 1.5e-4 ×
bs/256, wd 0.1, batch 4096, warmup 20 epochs at 300 / 40 at 800, n = 8, m = 1, LN heads, light
augmentation) with BYOL's loss ‖q̄ − k̄‖² (Eq. 2) instead of InfoNCE, and a predictor whose output
layer has no norm (Sec. 3.1: "critical" for BYOL). The EMA base is not given by the paper:
0.99 cosine → 1 as MoCo v3's momentum (FIDELITY row 13, our choice).

Variants: `in100` (ViT-S/16 with MoCo v3's 12 heads, batch 1024, 200 epochs, warmup 20 — our
choice; an image folder `root/<wnid>/<image>.JPEG` of the 100 classes of Tian et al. 2019), `n=`,
`m=`, `aug=light|medium|strong`, `epochs=`, `demo`, `test` (n = 4 unless `n=` is given).
"""
from ssl_jax import config_lib

AUGMENTATIONS = ("light", "medium", "strong")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "in100", "epochs", "n", "m", "aug"))
  in100 = bool(args.get("in100"))
  epochs = args.get("epochs", 200 if in100 else 300)
  aug = args.get("aug", "light")
  if aug not in AUGMENTATIONS:
    raise config_lib.ConfigError(f"config variant aug={aug!r} must be one of {AUGMENTATIONS}")
  c = config_lib.base_config()
  c.method = "masked_byol"
  c.method_args = config_lib.ConfigDict({
      "num_chunks": 8, "target_chunks": 1, "head_norm": "ln", "cross_attention_blocks": 0,
      "projector_hidden": 4096, "predictor_hidden": 4096, "projector_dim": 256,
      "momentum": 0.99, "freeze_patch_embed": False})
  c.model = config_lib.ConfigDict({"name": "vit_base", "patch_size": 16, "pos_embed": "sincos"})
  config_lib.imagenet_data(c)
  c.data.image_size = 224
  c.data.views = f"masked_{aug}"
  c.optim.name = "adamw"
  c.optim.base_lr = 1.5e-4
  c.optim.weight_decay = 0.1
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.warmup_epochs = 40.0 if epochs >= 800 else 20.0
  c.optim.exclude_from_decay = "none"  # as Masked MoCo-v3 (MoCo v3's AdamW)
  c.train.batch_size = 4096
  c.train.num_epochs = float(epochs)
  if in100:
    c.model = config_lib.ConfigDict({"name": "vit_small", "patch_size": 16, "num_heads": 12,
                                     "pos_embed": "sincos"})
    c.data.source = "image_folder"
    c.data.source_args = config_lib.ConfigDict({"root": ""})
    c.train.batch_size = 1024
  config_lib.apply_size_variant(c, args, vit=True)
  if args.get("demo") or args.get("test"):
    c.model.pos_embed = "sincos"
    if args.get("test"):
      c.method_args.num_chunks = 4  # 16 patches at 32 px with patch 8
  c.method_args.num_chunks = int(args.get("n", c.method_args.num_chunks))
  c.method_args.target_chunks = int(args.get("m", c.method_args.target_chunks))
  return c
