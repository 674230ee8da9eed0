"""MoCo v3 (Chen, Xie, He, 2021) ViT-B/16 on ImageNet, 300 epochs (paper Table 4: 76.7 % linear).

  python -m ssl_jax.main --config=configs/mocov3.py --workdir=...
  python -m ssl_jax.main --config=configs/mocov3.py:model=vit_small --workdir=...   (73.2 %)

MoCo v3's ViT-S (`vits.py` `vit_small`) has 12 heads of width 32, timm's `vit_small_patch16_224`
6 of width 64: the weights have the same shapes, so the wrong count would load silently.
`:model=vit_small` therefore builds `vit_small` (timm's sizes) with `num_heads=12` set in
`config.model`; exports carry it in their metadata (`arch_fields`), so a model rebuilt from a
workdir or export gets 12 heads.

Recipe (official `CONFIG.md`, FIDELITY row 23): AdamW lr 1.5e-4 × bs/256, wd 0.1, batch 4096,
40 warmup epochs + cosine, τ 0.2 with the loss scaled by 2τ, momentum 0.99 cosine → 1, 3-layer
BN projector 4096 → 256 and 2-layer BN predictor, both ending in a BN without affine (`MoCo_ViT`),
Linear layers without bias, frozen random patch projection, 2-D sin-cos position embedding,
BYOL-style asymmetric augmentations.
"""
from ssl_jax import config_lib

# Heads of MoCo v3's own ViTs (`vits.py`): its ViT-S has 12 (timm's vit_small: 6).
MOCOV3_HEADS = {"vit_small": 12, "vit_base": 12}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs", "model"))
  c = config_lib.base_config()
  c.method = "mocov3"
  c.method_args = config_lib.ConfigDict({
      "projector_hidden": 4096, "predictor_hidden": 4096, "projector_dim": 256,
      "temperature": 0.2, "momentum": 0.99, "freeze_patch_embed": True})
  model = args.get("model", "vit_base")
  if model not in MOCOV3_HEADS:
    raise config_lib.ConfigError(f"config variant model={model!r}: MoCo v3's ViTs here are "
                                 f"{sorted(MOCOV3_HEADS)}")
  c.model = config_lib.ConfigDict({"name": model, "patch_size": 16, "pos_embed": "sincos",
                                   "num_heads": MOCOV3_HEADS[model]})
  config_lib.imagenet_data(c)
  c.data.image_size = 224
  c.data.views = "mocov3"
  c.optim.name = "adamw"
  c.optim.base_lr = 1.5e-4
  c.optim.weight_decay = 0.1
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.warmup_epochs = 40.0
  c.optim.exclude_from_decay = "none"  # the official AdamW decays every parameter
  c.train.batch_size = 4096
  c.train.num_epochs = float(args.get("epochs", 300))
  config_lib.apply_size_variant(c, args, vit=True)
  if args.get("demo") or args.get("test"):
    c.model.pos_embed = "sincos"
  return c
