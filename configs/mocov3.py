"""MoCo v3 (Chen, Xie, He, 2021) ViT-B/16 on ImageNet, 300 epochs (paper Table 4: 76.7 % linear).

  python -m ssl_jax.main --config=configs/mocov3.py --workdir=...
  python -m ssl_jax.main --config=configs/mocov3.py:model=vit_small --workdir=...   (73.2 %)

Recipe (official `CONFIG.md`, FIDELITY row 23): AdamW lr 1.5e-4 × bs/256, wd 0.1, batch 4096,
40 warmup epochs + cosine, τ 0.2 with the loss scaled by 2τ, momentum 0.99 cosine → 1, 3-layer
BN projector 4096 → 256 (last BN without affine), 2-layer BN predictor, frozen random patch
projection, 2-D sin-cos position embedding, BYOL-style asymmetric augmentations.
"""
from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs", "model"))
  c = config_lib.base_config()
  c.method = "mocov3"
  c.method_args = config_lib.ConfigDict({
      "projector_hidden": 4096, "predictor_hidden": 4096, "projector_dim": 256,
      "temperature": 0.2, "momentum": 0.99, "freeze_patch_embed": True})
  c.model = config_lib.ConfigDict({"name": args.get("model", "vit_base"), "patch_size": 16,
                                   "pos_embed": "sincos"})
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
