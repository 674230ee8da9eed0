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


def get_config(arg=None):
  return config_lib.masked_siamese_config(
      "masked_byol", config_lib.parse_arg(arg, config_lib.MASKED_VARIANTS))
