"""DetCon-S (Hénaff et al., 2021) on ImageNet with FH masks: ResNet-50, SimCLR-style, batch 4096.

Reproduces Fig. 4 / Table 1 (DetCon-S 1000 ep: COCO 1x AP^bb 41.8): pretraining only.
Precompute masks as in configs/detcon_b.py, then:

  python -m ssl_jax.main --config=configs/detcon_s.py --workdir=... \\
      --config.data.source_args.path=$DATA/imagenet_fh

SimCLR v1 optimisation at every length (LARS lr 0.3 x bs/256, wd 1e-6, 10 warmup epochs, cosine;
App. A.3), 1000 epochs by default (`:epochs=N` for another length, e.g. Fig. 4's 100-1000).
SimCLR v1's projection head 2048 -> 128 ending in a BN, no predictor and no EMA target: the online
projections are predictions and targets. Augmentations: SimCLR's with blur probability 1.0 / 0.0
per view (DetCon's table; FIDELITY row 4 notes the text also says SimCLR's 0.5 / 0.5).
`:coco` pretrains on COCO train2017 (Sec. 4.2) for 1296 epochs (one point of Fig. 6's 324-5184)
with a piecewise schedule; `:grid`, `:fh_scale`, `:demo`, `:test` as configs/detcon_b.py.
"""
from ssl_jax import config_lib


def get_config(arg=None):
  return config_lib.detcon_config("detcon_s", config_lib.parse_arg(arg, config_lib.DETCON_VARIANTS))
