"""Our CPU train steps vs an independent PyTorch implementation of the same steps, in one process.

  .venv-export/bin/python bench/torch_peer.py                       # all five cases
  .venv-export/bin/python bench/torch_peer.py --cases=byol_r18_64 --steps=5

Needs PyTorch (torch 2.14 + timm: the export venv, `make test-export` builds it); under the main
venv it prints that and exits 0, so `make bench` passes.

Each case builds our `train.build` step (bench/cpu_profile.StepBench) and a PyTorch step of the
same networks, batch, resolution and loss: online backbone + projector + predictor with
gradients, the EMA/momentum target (backbone + projector) in train mode without gradients, the
optimizer update and the EMA update. Both get random images and no colour augmentation (ours runs
the views recipe "crop_flip" that `cpu_profile.StepBench` adds, which has none; the on-device augmentation cost is in
`cpu_profile.py`'s profile instead). Differences that cost little: PyTorch's BYOL uses SGD with
momentum instead of LARS (LARS adds a per-tensor norm and scale), timm's ViT learns its position
embedding where ours is a fixed sin-cos one (both are excluded from the gradient here).
PyTorch's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set): spinning threads
collapse when other processes share the cores. Steps are timed in alternation (ours, PyTorch, ours, ...; best of `--steps`), with a pause after
each so the other library's idle threads are asleep.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_profile  # noqa: E402  pylint: disable=wrong-import-position,import-error

CASES = {
    # name: (method, model, image size, batch)
    "byol_r18_64": ("byol", {"name": "resnet18"}, 64, 32),
    "byol_r18_224": ("byol", {"name": "resnet18"}, 224, 8),
    "byol_r50_224": ("byol", {"name": "resnet50"}, 224, 8),
    "mocov3_vits_96": ("mocov3", {"name": "vit_small", "patch_size": 16}, 96, 32),
    "mocov3_vits_224": ("mocov3", {"name": "vit_small", "patch_size": 16}, 224, 8),
}


def torch_step(method: str, model: dict, image_size: int, batch: int):
  """A function running one PyTorch train step of `method` (same shapes as ours)."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)

  def mlp(dims, bias, last_bn):
    layers = []
    for i in range(len(dims) - 2):
      layers += [nn.Linear(dims[i], dims[i + 1], bias=bias), nn.BatchNorm1d(dims[i + 1]),
                 nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=bias))
    if last_bn:
      layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)

  if model["name"].startswith("resnet"):
    backbone = getattr(torchvision.models, model["name"])()
    feat = backbone.fc.in_features
    backbone.fc = nn.Identity()
  else:
    backbone = timm.create_model("vit_small_patch16_224", img_size=image_size, num_classes=0,
                                 pretrained=False)
    feat = backbone.embed_dim
    for p in list(backbone.patch_embed.parameters()) + [backbone.pos_embed]:
      p.requires_grad_(False)
  if method == "byol":
    projector = mlp([feat, 4096, 256], True, False)
    predictor = mlp([256, 4096, 256], True, False)
  else:
    projector = mlp([feat, 4096, 4096, 256], False, True)
    predictor = mlp([256, 4096, 256], False, False)
  online = nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor})
  target = nn.ModuleDict({"backbone": copy.deepcopy(backbone),
                          "projector": copy.deepcopy(projector)})
  for p in target.parameters():
    p.requires_grad_(False)
  online.train()
  target.train()
  params = [p for p in online.parameters() if p.requires_grad]
  if method == "byol":
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1.5e-6)
  else:
    opt = torch.optim.AdamW(params, lr=1.5e-4, weight_decay=0.1)
  pairs = [(t, o) for t, o in zip(target.parameters(),
                                  [p for n, p in online.named_parameters()
                                   if not n.startswith("predictor")])]
  images = torch.randn(2, batch, 3, image_size, image_size)

  def loss_fn(q, k):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    if method == "byol":
      return (2 - 2 * (q * k).sum(1)).mean()
    logits = q @ k.T / 0.2
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * 0.2

  def step():
    ps, zs = [], []
    for v in range(2):
      h = online["backbone"](images[v])
      ps.append(online["predictor"](online["projector"](h)))
      with torch.no_grad():
        zs.append(target["projector"](target["backbone"](images[v])))
    loss = loss_fn(ps[0], zs[1]) + loss_fn(ps[1], zs[0])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      t, o = zip(*pairs)
      torch._foreach_mul_(list(t), 0.99)  # pylint: disable=protected-access
      torch._foreach_add_(list(t), list(o), alpha=0.01)  # pylint: disable=protected-access
    return float(loss)

  step()
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--pause", type=float, default=0.5, help="seconds between timed steps")
  args = parser.parse_args()
  # OpenMP threads that spin while waiting collapse when the 2 cores are shared with other
  # processes (a 3.7 s step took 17 s); passive waiting keeps PyTorch's figure load-robust.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("bench/torch_peer.py needs PyTorch: run it with .venv-export/bin/python "
          "(make test-export builds that venv); skipped")
    return
  torch.set_num_threads(os.cpu_count())
  print(f"{cpu_profile.machine_load()}; torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads)")
  for name in args.cases.split(","):
    method, model, size, batch = CASES[name]
    ours = cpu_profile.StepBench(method, model, size, batch, views="crop_flip")
    ours_run, _ = ours.runner()
    theirs = torch_step(method, model, size, batch)
    best = {"ours": float("inf"), "torch": float("inf")}
    for _ in range(args.steps):
      for key, fn in (("ours", ours_run), ("torch", theirs)):
        time.sleep(args.pause)
        t = time.perf_counter()
        fn()
        best[key] = min(best[key], time.perf_counter() - t)
    gflop = ours.reference_flops() / 1e9
    print(f"{name:16s} ({method}, {model['name']}, {size} px, batch {batch}, {gflop:.1f} GFLOP): "
          f"ours {best['ours']:.3f} s, PyTorch {best['torch']:.3f} s, "
          f"ours/PyTorch {best['ours'] / best['torch']:.2f}   [{cpu_profile.machine_load()}]",
          flush=True)


if __name__ == "__main__":
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  main()
