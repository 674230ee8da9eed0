"""BYOL (Grill et al., 2020) on ImageNet: ResNet-50, 1000 epochs, batch 4096 (paper Table 1: 74.3 % linear).

  python -m ssl_jax.main --config=configs/byol.py --workdir=gs://bucket/byol
  python -m ssl_jax.main --config=configs/byol.py:epochs=300 --workdir=...   (300-epoch preset)
  python -m ssl_jax.main --config=configs/byol.py:demo --workdir=/tmp/byol_demo  (CPU, minutes)

Recipe (paper Sec. 3.3 / App. C): LARS, lr 0.2 × bs/256 (0.3 at 300 ep), wd 1.5e-6 (1e-6 at
300 ep), biases and BN excluded from decay and adaptation, 10 warmup epochs + cosine; projector
and predictor 4096 → 256 with BN; τ_base 0.996 (0.99 at 300 ep) cosine to 1; asymmetric
augmentations (blur 1.0/0.1, solarize 0/0.2). Cost: ~8 h on 512 TPU v3 cores at 1000 epochs.
"""
from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs"))
  epochs = args.get("epochs", 1000)
  short = epochs < 1000
  c = config_lib.base_config()
  c.method = "byol"
  c.method_args = config_lib.ConfigDict({
      "projector_hidden": 4096, "predictor_hidden": 4096, "projector_dim": 256,
      "ema_base": 0.99 if short else 0.996})
  c.model = config_lib.ConfigDict({"name": "resnet50"})
  config_lib.imagenet_data(c)
  c.data.image_size = 224
  c.data.views = "byol"
  c.optim.name = "lars"
  c.optim.base_lr = 0.3 if short else 0.2
  c.optim.weight_decay = 1e-6 if short else 1.5e-6
  c.optim.warmup_epochs = 10.0
  c.train.batch_size = 4096
  c.train.num_epochs = float(epochs)
  config_lib.apply_size_variant(c, args)
  return c
