"""BYOL (Grill et al., 2020) on ImageNet: ResNet-50, 1000 epochs, batch 4096 (paper Table 1: 74.3 % linear).

  python -m ssl_jax.main --config=configs/byol.py --workdir=gs://bucket/byol
  python -m ssl_jax.main --config=configs/byol.py:epochs=300 --workdir=...   (300-epoch preset)
  python -m ssl_jax.main --config=configs/byol.py:demo --workdir=/tmp/byol_demo  (CPU, minutes)

Presets by epoch count, the official table (deepmind-research byol/configs/byol.py
`_LR_PRESETS` / `_WD_PRESETS` / `_EMA_PRESETS`; `config_lib.BYOL_PRESETS`):
  epochs   base lr   weight decay   τ_base
      40      0.45           1e-6     0.97
     100      0.45           1e-6     0.99
     300      0.3            1e-6     0.99
    1000      0.2          1.5e-6     0.996   (default)
Other epoch counts have no official row and are refused (the official config asserts it).

Recipe (paper Sec. 3.3 / App. C): LARS, lr = base lr × bs/256, biases and BN excluded from decay
and adaptation, 10 warmup epochs + cosine; projector and predictor 4096 → 256: Linear → BN → ReLU
→ Linear without bias (the official Haiku MLP); ResNet blocks start with their last BN γ at 0
(Haiku `scale_init=zeros`); τ cosine from τ_base to 1; asymmetric augmentations (blur 1.0/0.1,
solarize 0/0.2). Cost: ~8 h on 512 TPU v3 cores at 1000 epochs.
"""
from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs"))
  epochs = args.get("epochs", 1000)
  preset = config_lib.epoch_preset(config_lib.BYOL_PRESETS, epochs, "BYOL")
  c = config_lib.base_config()
  c.method = "byol"
  c.method_args = config_lib.ConfigDict({
      "projector_hidden": 4096, "predictor_hidden": 4096, "projector_dim": 256,
      "ema_base": preset["ema_base"]})
  c.model = config_lib.ConfigDict({"name": "resnet50", "zero_init_residual": True})
  config_lib.imagenet_data(c)
  c.data.image_size = 224
  c.data.views = "byol"
  c.optim.name = "lars"
  c.optim.base_lr = preset["base_lr"]
  c.optim.weight_decay = preset["weight_decay"]
  c.optim.warmup_epochs = 10.0
  c.train.batch_size = 4096
  c.train.num_epochs = float(epochs)
  config_lib.apply_size_variant(c, args)
  return c
