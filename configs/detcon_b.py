"""DetCon-B (Hénaff et al., 2021) on ImageNet with FH masks: ResNet-50, batch 4096.

Reproduces Table 1 / Table 2 (DetCon-B, 300 ep: COCO 1× AP^bb 42.0, 1000 ep: 42.7) — pretraining
only; detection fine-tuning is outside this repository.

First precompute Felzenszwalb–Huttenlocher masks once (scale 1000, min_size 1000, full
resolution; ~2 CPU-days for ImageNet, parallel over processes and resumable):

  python -m ssl_jax.data.fh_masks --source=tfds --source_args=name=imagenet2012,split=train \\
      --out=$DATA/imagenet_fh --scales=1000 --min_sizes=1000 --processes=64
  python -m ssl_jax.main --config=configs/detcon_b.py --workdir=gs://bucket/detcon_b \\
      --config.data.source_args.path=$DATA/imagenet_fh

Variants: `:epochs=1000` (lr 0.2, wd 1.5e-6, EMA 0.996; FIDELITY row 1), `:coco` (COCO images,
FH at scale 500/1000/1500 choose one, piecewise schedule ×0.1 at 96 % and 98 %), `:grid`
(spatial-grid masks, DetCon's baseline), `:demo` (CPU minutes on the built-in photos, prints kNN
accuracy at init and end), `:test` (seconds).

Defaults (FIDELITY rows 1–3b): presets by epoch count as the paper's text; 10 warmup epochs;
hard masks (average-pool then argmax, the official code), `mask_pooling="soft"` for the paper's
soft weights; 16 ids per view sampled among that view's ids (official), `sample_from="both"`
for the issue's variant; latents L2-normalised and divided by τ = 0.1, equivalent to the paper's
rescaling to norm 1/√τ.
"""
from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, config_lib.DETCON_VARIANTS)
  return config_lib.detcon_config("detcon_b", args)
