"""End-to-end fine-tuning on ImageNet, with the recipes the ViT/Swin self-supervised papers report.

  python -m ssl_jax.evaluate --config=configs/finetune.py \\
      --config.backbone.workdir=gs://bucket/mae --workdir=gs://bucket/mae/finetune
  python -m ssl_jax.evaluate --config=configs/finetune.py:simmim \\
      --config.backbone.workdir=gs://bucket/simmim_swin_b --workdir=...
  python -m ssl_jax.evaluate --config=configs/finetune.py:mimco,model=swin_base \\
      --config.backbone.workdir=gs://bucket/mimco_swin_b --workdir=...
  python -m ssl_jax.evaluate --config=configs/finetune.py:demo \\
      --config.backbone.workdir=/tmp/mocov3_demo --workdir=/tmp/mocov3_demo/ft   (CPU, minutes)

Rerunning a command resumes from the latest checkpoint in --workdir (SIGTERM saves one).

Every recipe: AdamW (0.9, 0.999), weight decay on matrices only (biases, norms, cls_token,
pos_embed excluded), linear warmup then cosine, layer-wise lr decay, drop path, RandAugment
`rand-m9-mstd0.5-inc1`, random erasing p 0.25 ('pixel'), mixup α 0.8 + cutmix α 1.0 (switch
probability 0.5), label smoothing 0.1, bicubic train crops, resize 256/224 + centre crop for
evaluation. EMA of the weights: off as in these papers (`--config.train.ema_decay=0.9999` to
evaluate an EMA beside the weights, timm's `--model-ema`).
  (default) = `mae`: MAE `FINETUNE.md` / `main_finetune.py`, ViT-B: blr 5e-4 × bs/256 at batch
    1024, 100 epochs, 5 warmup, min lr 1e-6, wd 0.05, layer decay 0.65, drop path 0.1, MAE's global
    pool (mean of the last block's patch tokens + a new LayerNorm). MAE ViT-B 1600 ep: 83.6 %.
    The same recipe reproduces ccMIM (ViT-B 800 ep: 84.2 %; "the same hyper-parameters as MAE",
    average-pooled patches) and Masked MoCo ("the public repository of MAE", blr 5e-4, wd 0.05,
    layer decay 0.65, 100 epochs; M-MoCo ViT-B 300 ep: 83.8 %, its Table 5).
    `model=vit_large`: blr 1e-3, 50 epochs, layer decay 0.75, drop path 0.2 (MAE ViT-L: 85.9 %;
    needs a ViT-L backbone).
  `simmim`: SimMIM's `simmim_finetune__swin_base__img192_window6__100ep.yaml`, Swin-B at 192 px
    (window 6, the pretraining resolution): lr 1.25e-3 × bs/512 (= 6.25e-4 × bs/256) at batch
    2048, 100 epochs, 20 warmup, min lr 1e-6 (2.5e-7 × bs/512), wd 0.05, layer decay 0.9 over
    SimMIM's Swin layer ids, drop path 0.1, gradient clipping 5.0, Swin's pooled features (final
    norm, average pool). SimMIM Swin-B 100 ep, 192 px: 82.8 % (README). SimMIM's 224 px numbers
    (83.5 % / 84.0 % at 800 ep) fine-tune at window 7 from a 192 px/window 6 pretraining, which
    interpolates the relative-position tables: not implemented here.
  `mimco`: MimCo Sec. 4.2, Swin-T: layer decay 0.75, drop path 0.1, 100 epochs, at 224 px. MimCo
    says it follows iBOT's (BEiT's) fine-tuning protocol without its remaining values; those are
    our choice, BEiT/iBOT's: blr 5e-4 × bs/256 at batch 1024, 5 warmup epochs, wd 0.05, min lr
    1e-6. MimCo Swin-T 100 ep: 81.7 % (Table 1). `model=swin_base`: drop path 0.2 (84.0 %);
    `model=vit_small`: 300 epochs, layer decay 0.75, CLS token (82.5 %); `model=vit_base`: layer
    decay 0.65, CLS token (83.7 %).
  `demo` / `test`: the built-in photos at 64 / 32 px, every recipe switch on.
Cost: ViT-B 100 epochs ≈ 1 day on 32 V100s.
"""
from ssl_jax import config_lib
from ssl_jax.evaluate import supervised

VARIANTS = ("mae", "simmim", "mimco", "model", "demo", "test")
MODELS = {"mae": ("vit_base", "vit_large"), "simmim": ("swin_base",),
          "mimco": ("swin_tiny", "swin_base", "vit_small", "vit_base")}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, VARIANTS)
  recipe = "simmim" if args.get("simmim") else "mimco" if args.get("mimco") else "mae"
  model = args.get("model", MODELS[recipe][0])
  if model not in MODELS[recipe]:
    raise config_lib.ConfigError(f"config variant model={model!r}: the {recipe} recipe has "
                                 f"presets for {MODELS[recipe]}")
  c = supervised.base_config("finetune")
  # features: "global_pool" (MAE), "cls" (MoCo v3 / iBOT), "avg", "pooled" (ResNet, Swin).
  c.model = config_lib.ConfigDict({"drop_path_rate": 0.1, "features": "global_pool"})
  c.data.update({"interpolation": "bicubic", "randaugment": "rand-m9-mstd0.5-inc1",
                 "reprob": 0.25, "remode": "pixel"})
  c.optim.update({"name": "adamw", "base_lr": 5e-4, "lr_rule": "linear", "warmup_epochs": 5.0,
                  "schedule": "cosine", "end_lr": 1e-6, "weight_decay": 0.05, "b1": 0.9,
                  "b2": 0.999, "eps": 1e-8, "exclude_from_decay": "bias_norm_and_tokens",
                  "layer_decay": 0.65})
  c.train.update({"batch_size": 1024, "num_epochs": 100.0, "label_smoothing": 0.1,
                  "mixup_alpha": 0.8, "cutmix_alpha": 1.0})
  if model == "vit_large":
    c.model.drop_path_rate = 0.2
    c.optim.update({"base_lr": 1e-3, "layer_decay": 0.75})
    c.train.num_epochs = 50.0
  if recipe == "simmim":
    c.model.features = "pooled"
    c.data.image_size = 192
    c.optim.update({"base_lr": 6.25e-4, "warmup_epochs": 20.0, "layer_decay": 0.9,
                    "grad_clip": 5.0})
    c.train.batch_size = 2048
  if recipe == "mimco":
    c.model.features = "pooled" if model.startswith("swin") else "cls"
    c.model.drop_path_rate = 0.2 if model == "swin_base" else 0.1
    c.optim.layer_decay = 0.65 if model == "vit_base" else 0.75
    c.train.num_epochs = 300.0 if model == "vit_small" else 100.0
  if args.get("demo") or args.get("test"):
    demo = bool(args.get("demo"))
    supervised.apply_size_variant(c, demo)
    c.model.features = "global_pool" if recipe == "mae" else c.model.features
    c.optim.update({"base_lr": 1e-3, "end_lr": 0.0, "warmup_epochs": 1.0 if demo else 0.0})
    c.train.num_epochs = 20.0 if demo else 2.0
    c.train.ema_decay = 0.99  # exercised in the tiny runs
    c.eval.every_epochs = 5 if demo else 0
  return c
