"""MoCo v2 (Chen et al., 2020) on ImageNet: ResNet-50, batch 256, 200 epochs (paper: 67.5 % linear; 71.1 % at 800).

  python -m ssl_jax.main --config=configs/mocov2.py --workdir=...
  python -m ssl_jax.main --config=configs/mocov2.py:epochs=800 --workdir=...

Recipe (facebookresearch/moco): SGD momentum 0.9, lr 0.03 × bs/256, wd 1e-4, cosine, no warmup;
2-layer MLP head 2048 → 128 (no BN); queue 65536; key momentum 0.999; τ 0.2; crop scale
(0.2, 1), blur p 0.5. Batch-norm statistics are global (see methods/moco.py on shuffle BN).
"""
from ssl_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs"))
  c = config_lib.base_config()
  c.method = "mocov2"
  c.method_args = config_lib.ConfigDict({
      "projector_hidden": 2048, "projector_dim": 128, "temperature": 0.2,
      "momentum": 0.999, "queue_size": 65536})
  c.model = config_lib.ConfigDict({"name": "resnet50"})
  config_lib.imagenet_data(c)
  c.data.image_size = 224
  c.data.views = "mocov2"
  c.optim.name = "sgd"
  c.optim.base_lr = 0.03
  c.optim.weight_decay = 1e-4
  c.optim.exclude_from_decay = "none"  # the official code decays every parameter
  c.train.batch_size = 256
  c.train.num_epochs = float(args.get("epochs", 200))
  config_lib.apply_size_variant(c, args)
  if args.get("demo") or args.get("test"):
    c.method_args.queue_size = 16 * c.train.batch_size
  return c
