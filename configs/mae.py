"""MAE (He et al., 2022) ViT-B/16 on ImageNet, 800 epochs, batch 4096 (official `PRETRAIN.md`).

  python -m ssl_jax.main --config=configs/mae.py --workdir=gs://bucket/mae
  python -m ssl_jax.main --config=configs/mae.py:epochs=1600 --workdir=...   (paper's longest)
  python -m ssl_jax.main --config=configs/mae.py:demo --workdir=/tmp/mae_demo   (CPU, minutes)
  python -m ssl_jax.evaluate --config=configs/finetune.py --config.model.features=avg \\
      --config.backbone.workdir=gs://bucket/mae --workdir=gs://bucket/mae/finetune
  python -m ssl_jax.evaluate --config=configs/linear_eval.py:mae \\
      --config.backbone.workdir=gs://bucket/mae --workdir=gs://bucket/mae/linear

Expected (MAE README, ViT-B/16 1600 ep): 83.6 % fine-tune (global-pool features, hence
`features=avg` above), 68.0 % linear (CLS token, MAE's `main_linprobe`).

Recipe (FIDELITY row 24, `PRETRAIN.md` + `main_pretrain.py`): 75 % random masking, norm-pix
MSE on the masked patches, decoder 8 blocks × 512 wide × 16 heads, fixed 2-D sin-cos positions;
AdamW β (0.9, 0.95), lr = 1.5e-4 × bs/256, wd 0.05 on every parameter of ≥ 2 dimensions (timm's
`add_weight_decay`: biases and norms excluded, cls/mask tokens decayed), 40 warmup epochs +
half-cosine to 0, batch 4096, 800 epochs; random resized crop (0.2, 1), bicubic, flip, no colour.
`:demo`/`:test` shrink the model, data and run (`config_lib.apply_size_variant`); the demo
raises the base lr to 1e-3 (1.5e-4 is tuned for 800 epochs at batch 4096 and barely moves a tiny
model in a few hundred steps). Cost: ViT-B 800 epochs ≈ 42 h on 64 V100s (PRETRAIN.md, ViT-L).
"""
from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs"))
  c = config_lib.base_config()
  c.method = "mae"
  c.method_args = config_lib.ConfigDict({
      "mask_ratio": 0.75, "norm_pix_loss": True,
      "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16})
  c.model = config_lib.ConfigDict({"name": "vit_base", "patch_size": 16, "pos_embed": "sincos"})
  config_lib.mae_recipe(c)
  c.data.views = "mae"
  c.train.batch_size = 4096
  c.train.num_epochs = float(args.get("epochs", 800))
  config_lib.apply_mae_size_variant(c, args)
  return c
