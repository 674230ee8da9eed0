"""MimCo (Zhou et al., MM 2022) stage 2 on ImageNet: ViT-S/16 student with a MoCo v3 ViT-S teacher,
100 epochs (paper Table 1: 82.5 % fine-tuned), or Swin-T with a MoBY Swin-T teacher (81.7 %).

  python -m ssl_jax.main --config=configs/mimco.py --workdir=... \
      --config.method_args.teacher=/path/to/mocov3_vit_small_300ep.pth.tar     (MoCo v3 release)
  python -m ssl_jax.main --config=configs/mimco.py --workdir=... \
      --config.method_args.teacher=workdirs/mocov3_vit_small                  (our MoCo v3 run)
  python -m ssl_jax.main --config=configs/mimco.py:model=swin_tiny --workdir=... \
      --config.method_args.teacher=/path/to/moby_swin_t_300ep_pretrained.pth  (MoBY release)
  python -m ssl_jax.main --config=configs/mimco.py:demo --workdir=...   (needs the MoCo v3 demo run)
  python -m ssl_jax.main --config=configs/mimco.py:test --workdir=...   (seconds, own teacher)

The teacher (`method_args.teacher`) is a pretraining workdir (`teacher_part` online/target,
`teacher_step` 0 = latest), our .safetensors export, or a PyTorch file; a file without our
metadata takes its architecture from `teacher_model` (the presets name the paper's teachers:
MoCo v3 ViT-S/16 with its fixed sin-cos positions, MoBY Swin-T). It is a frozen constant: never
trained or checkpointed; config.json records its path and sha256 and a resume with a changed
teacher is refused.

Paper settings (Sec. 3.3): AdamW, batch 2048, lr 1e-3 × bs/512 (= base_lr 5e-4 × bs/256), wd 0.05,
10 warmup epochs, 100 epochs; crop 0.67–1 + flip (SimMIM's light augmentation); SimMIM masking
(32 px mask patches, ratio 0.6); queues of 4096, τ 0.2.
Our choices where the paper is silent (FIDELITY row 21; docs/mimco.md):
  * loss weights 1 (patch) and 1 (image);
  * momentum projectors: 0.99 cosine → 1 (MoBY);
  * heads: image projector/predictor 4096 → 256 (MoBY); patch 1×1-conv heads 2048 → 256;
  * AdamW β (0.9, 0.999), ε 1e-8 (SimMIM's), grad-norm clip 5 (SimMIM's), no decay on biases,
    norms and tokens;
  * after warmup: cosine to 0;
  * input 224 px for both (the teachers' resolution; a Swin-T MoBY teacher is window 7 at 224);
  * student ViT: learned absolute positions, drop path 0.1 (SimMIM's ViT), features for
    evaluation = mean of the patch tokens (the losses never reach the CLS token); Swin: drop
    path 0.
:demo uses the MoCo v3 demo run as its teacher (`workdirs/mocov3_demo`, made by
`python -m ssl_jax.main --config=configs/mocov3.py:demo --workdir=workdirs/mocov3_demo`); without
it the run stops with that command. :test writes a randomly initialised tiny ViT (or Swin with
`:test,model=swin_tiny`) teacher once into the cache folder ($SSL_JAX_CACHE or ~/.cache/ssl_jax,
`mimco_random_teacher_<hash>.safetensors`, deterministic) and uses it.

Cost: student forward+backward (3 × 4.6 GFLOPs for ViT-S/16) + teacher forward (4.6) ≈ 18.4
GFLOPs per image → ≈ 2.4e18 FLOPs for 100 epochs of 1.28 M images (Swin-T: 4.5 GFLOPs, about the
same).
"""
from ssl_jax import config_lib

DEMO_TEACHER = "workdirs/mocov3_demo"
DEMO_TEACHER_COMMAND = ("python -m ssl_jax.main --config=configs/mocov3.py:demo "
                        f"--workdir={DEMO_TEACHER}")
PRESETS = {
    # name: (student model, teacher_model for files without our metadata, drop path)
    "vit_small": ({"name": "vit_small", "patch_size": 16, "pos_embed": "learned", "pool": "mean"},
                  {"name": "vit_small", "patch_size": 16, "pos_embed": "sincos"}, 0.1),
    "swin_tiny": ({"name": "swin_tiny"}, {"name": "swin_tiny", "patch_size": 4, "window_size": 7},
                  0.0),
}
TEST_SWIN = {"name": "swin_tiny", "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
             "window_size": 4, "patch_size": 4}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ("demo", "test", "epochs", "model"))
  name = args.get("model", "vit_small")
  if name not in PRESETS:
    raise config_lib.ConfigError(f"configs/mimco.py:model={name} is unknown; presets: "
                                 f"{', '.join(sorted(PRESETS))}")
  model, teacher_model, drop_path = PRESETS[name]
  c = config_lib.base_config()
  c.method = "mimco"
  c.method_args = config_lib.ConfigDict({
      "teacher": "", "teacher_model": config_lib.ConfigDict(teacher_model),
      "teacher_step": 0, "teacher_part": "online", "teacher_seed": 0, "teacher_command": "",
      "masking": True, "mask_patch_size": 32, "mask_ratio": 0.6,
      "patch_loss": "contrastive", "patch_weight": 1.0, "image_weight": 1.0,
      "temperature": 0.2, "queue_size": 4096, "momentum": 0.99,
      "projector_hidden": 4096, "predictor_hidden": 4096, "projector_dim": 256,
      "patch_hidden": 2048})
  c.model = config_lib.ConfigDict({**model, "drop_path_rate": drop_path})
  config_lib.imagenet_data(c)
  c.data.image_size = 224
  c.data.views = "simmim"
  c.optim.name = "adamw"
  c.optim.base_lr = 5e-4
  c.optim.weight_decay = 0.05
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.grad_clip = 5.0
  c.optim.warmup_epochs = 10.0
  c.optim.exclude_from_decay = "bias_norm_and_tokens"
  c.train.batch_size = 2048
  c.train.num_epochs = float(args.get("epochs", 100))
  if args.get("demo") or args.get("test"):
    demo = bool(args.get("demo"))
    if demo and name != "vit_small":
      raise config_lib.ConfigError("configs/mimco.py:demo has a ViT teacher (the MoCo v3 demo "
                                   "run): use it without model=")
    config_lib.apply_size_variant(c, args, vit=True)
    if name.startswith("swin"):
      c.model = config_lib.ConfigDict(TEST_SWIN)
    else:
      # The student has the teacher's shape (the MoCo v3 demo ViT for :demo).
      c.model.update({"pos_embed": "sincos", "pool": "mean"})
    c.method_args.patch_hidden = 256 if demo else 64
    c.method_args.queue_size = 16 * c.train.batch_size
    c.method_args.mask_patch_size = c.data.image_size // 4  # 16 mask patches, as in configs/simmim.py
    if demo:
      c.method_args.teacher = DEMO_TEACHER
      c.method_args.teacher_command = DEMO_TEACHER_COMMAND
      c.method_args.teacher_model = config_lib.ConfigDict({"name": ""})  # recorded by the workdir
    else:
      c.method_args.teacher = "random"
      c.method_args.teacher_model = config_lib.ConfigDict(c.model.to_dict())
  return c
