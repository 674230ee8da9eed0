"""SimMIM (Xie et al., CVPR 2022) on ImageNet: Swin-B 100 epochs at 192 px (paper Table 1 / official
README: 82.8 % fine-tuned at 192 px, 83.5 % at 224), ViT-B/16 800 epochs (83.8 %).

  python -m ssl_jax.main --config=configs/simmim.py --workdir=...                   (Swin-B, 100 ep)
  python -m ssl_jax.main --config=configs/simmim.py:model=vit_base --workdir=...    (ViT-B, 800 ep)
  python -m ssl_jax.main --config=configs/simmim.py:model=swin_tiny --workdir=...
  python -m ssl_jax.main --config=configs/simmim.py:demo --workdir=...   (tiny ViT, CPU minutes)
  python -m ssl_jax.main --config=configs/simmim.py:test --workdir=...   (tiny ViT, seconds)
  python -m ssl_jax.main --config=configs/simmim.py:test,model=swin_tiny --workdir=...  (tiny Swin)

Recipe (microsoft/SimMIM `config.py` + `simmim_pretrain__swin_base__img192_window6__100ep.yaml`,
`simmim_pretrain__vit_base__img224__800ep.yaml`; batch 2048 = 16 GPUs × 128 in its README):
AdamW β (0.9, 0.999), ε 1e-8, wd 0.05 (not on biases, norms, the mask token, ViT cls/pos
tokens), grad-norm clip 5, 10 warmup epochs; mask patch 32, ratio 0.6; crop 0.67–1 + flip.
The official rule is lr = BASE_LR × batch/512; ours is base_lr × batch/256, so base_lr is half
the official BASE_LR (Swin-B 2e-4 → 1e-4, ViT-B 1e-4 → 5e-5).
  * swin_base (default) / swin_tiny: 192 px, window 6, drop path 0, cosine to MIN_LR 1e-5 × 2048/512
    = 4e-5 (`end_lr` is absolute: rescale it if you change the batch). Swin-T has no official
    config: it gets Swin-B's recipe (our choice).
  * vit_base: 224 px, drop path 0.1. Official schedule: ×0.1 at epoch 700 (multistep); our
    optimizer has no configurable step schedule yet, so this preset decays by cosine to 0 (a
    deviation, see docs/simmim.md).
Deviations (docs/simmim.md): warmup starts at 0, not WARMUP_LR (5e-7 × bs/512); Swin's relative
position bias tables are weight-decayed (the official code exempts them); our ViT is timm's (a
learned absolute position embedding instead of BEiT's shared relative position bias, no layer
scale, full qkv bias); the mask token is not decayed (SimMIM's ViT decays its [1, 1, D] token).
Features for evaluation: the mean of the final patch tokens (`pool="mean"` for the ViT; SimMIM's
loss never reaches the CLS token).

Cost: forward+backward ≈ 3 × 11.3 GFLOPs per Swin-B image at 192 px → ≈ 4.3e18 FLOPs for 100
epochs of 1.28 M images; ViT-B/16 at 224 (17.6 GFLOPs) for 800 epochs ≈ 5.4e19.
"""
from ssl_jax import config_lib

PRESETS = {
    # name: (model fields, image size, base_lr per 256, end_lr, epochs, drop path)
    "swin_base": ({"name": "swin_base", "window_size": 6}, 192, 1e-4, 4e-5, 100, 0.0),
    "swin_tiny": ({"name": "swin_tiny", "window_size": 6}, 192, 1e-4, 4e-5, 100, 0.0),
    "vit_base": ({"name": "vit_base", "patch_size": 16, "pos_embed": "learned", "pool": "mean"},
                 224, 5e-5, 0.0, 800, 0.1),
}
# :demo / :test Swins (the ViTs come from config_lib.apply_size_variant).
SMALL_SWINS = {
    "demo": {"name": "swin_tiny", "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4),
             "window_size": 4, "patch_size": 4},
    "test": {"name": "swin_tiny", "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
             "window_size": 4, "patch_size": 4},
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs", "model"))
  name = args.get("model", "swin_base")
  if name not in PRESETS:
    raise config_lib.ConfigError(f"configs/simmim.py:model={name} is unknown; presets: "
                                 f"{', '.join(sorted(PRESETS))}")
  model, image_size, base_lr, end_lr, epochs, drop_path = PRESETS[name]
  c = config_lib.base_config()
  c.method = "simmim"
  c.method_args = config_lib.ConfigDict({"mask_patch_size": 32, "mask_ratio": 0.6})
  c.model = config_lib.ConfigDict({**model, "drop_path_rate": drop_path})
  config_lib.imagenet_data(c)
  c.data.image_size = image_size
  c.data.views = "simmim"
  c.optim.name = "adamw"
  c.optim.base_lr = base_lr
  c.optim.end_lr = end_lr
  c.optim.weight_decay = 0.05
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.grad_clip = 5.0
  c.optim.warmup_epochs = 10.0
  c.optim.exclude_from_decay = "bias_norm_and_tokens"
  c.train.batch_size = 2048
  c.train.num_epochs = float(args.get("epochs", epochs))
  small = "demo" if args.get("demo") else "test" if args.get("test") else None
  if small:
    config_lib.apply_size_variant(c, args, vit=True)
    c.optim.end_lr = 0.0
    if args.get("model", "vit").startswith("swin"):  # :demo / :test default to the tiny ViT
      c.model = config_lib.ConfigDict(SMALL_SWINS[small])
    else:
      c.model.pool = "mean"
    # 32 px of 224 is 1/7 of the image; at 64 / 32 px the mask patch shrinks to 16 / 8 px so an
    # image still has 16 mask patches (10 masked at ratio 0.6).
    c.method_args.mask_patch_size = c.data.image_size // 4
  return c
