"""DetCon-S (Hénaff et al., 2021) on ImageNet with FH masks: ResNet-50, SimCLR-style, batch 4096.

Reproduces Fig. 4 / Table 1 (DetCon-S 1000 ep: COCO 1x AP^bb 41.8): pretraining only.
Precompute masks as in configs/detcon_b.py, then:

  python -m ssl_jax.main --config=configs/detcon_s.py --workdir=... \\
      --config.data.source_args.path=$DATA/imagenet_fh

SimCLR v1 optimisation (LARS lr 0.3 x bs/256, wd 1e-6, 10 warmup epochs, cosine), projector
2048 -> 128, no predictor and no EMA target: the online projections are predictions and targets.
Augmentations: SimCLR's with blur probability 1.0 / 0.0 per view (DetCon's table; FIDELITY row 4
notes the text also says SimCLR's 0.5 / 0.5). Variants as configs/detcon_b.py.
"""
from ssl_jax import config_lib


def get_config(arg=None):
  return config_lib.detcon_config("detcon_s", config_lib.parse_arg(arg, config_lib.DETCON_VARIANTS))
