"""SimCLR v1 (Chen et al., 2020) on ImageNet: ResNet-50, batch 4096 (paper: 69.3 % linear at 1000 ep).

  python -m ssl_jax.main --config=configs/simclr.py --workdir=...
  python -m ssl_jax.main --config=configs/simclr.py:epochs=100 --workdir=...

Recipe (v1 code and paper App. B, FIDELITY row 22): LARS lr 0.3 × bs/256, wd 1e-6 (biases and BN
excluded), 10 warmup epochs + cosine, 2-layer head 2048 → 128 as the v1 `projection_head`
(Dense without bias → BN → ReLU → Dense without bias → BN with γ only), ResNet blocks starting with
their last BN γ at 0 (v1 `init_zero`), NT-Xent τ 0.1, colour strength 1.0, blur p 0.5 on both
views.
"""
from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs"))
  c = config_lib.base_config()
  c.method = "simclr"
  c.method_args = config_lib.ConfigDict({
      "projector_hidden": 2048, "projector_dim": 128, "projector_layers": 2,
      "temperature": 0.1})
  c.model = config_lib.ConfigDict({"name": "resnet50", "zero_init_residual": True})
  config_lib.imagenet_data(c)
  c.data.image_size = 224
  c.data.views = "simclr"
  c.optim.name = "lars"
  c.optim.base_lr = 0.3
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0
  c.train.batch_size = 4096
  c.train.num_epochs = float(args.get("epochs", 1000))
  config_lib.apply_size_variant(c, args)
  return c
