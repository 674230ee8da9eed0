"""Export a trained backbone as torchvision/timm weights.

  python -m ssl_jax.export --workdir=W [--step=N] [--part=online|target] --out=resnet50.safetensors

writes a safetensors file (no pickle) whose tensors load with
`torchvision.models.resnet50()` (after `m.fc = torch.nn.Identity()`),
`timm.create_model("vit_small_patch16_224", num_classes=0)` or
`timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)` and
`load_state_dict(..., strict=True)`, with metadata strings (arch, arch_fields, torch_model: the
constructor to load it into, method, step, part, sha256 of the run's config.json). `--format=pt`
writes a torch.save file instead (needs torch).

`--with_heads` also writes <out>.heads.safetensors: the method's heads as torch modules' state
dicts (`export.torch.heads_to_torch_state_dict`). A projector/predictor MLP is the state dict of
an `nn.Sequential` of Linear / BatchNorm1d (or LayerNorm) / ReLU numbered from 0
(`projector.0.weight` [out, in], `projector.1.running_mean`, ...); its metadata entry
`layout.projector` holds the Sequential's source, e.g.
`torch.nn.Sequential(torch.nn.Linear(512, 4096, bias=True), torch.nn.BatchNorm1d(4096, eps=1e-05),
torch.nn.ReLU(), torch.nn.Linear(4096, 256, bias=True))`, so
`eval(layout).load_state_dict({k[len("projector."):]: v ...}, strict=True)` works.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional

from absl import app, flags
from etils import epath

from ssl_jax import paths
from ssl_jax.export import torch as torch_export

FORMATS = ("safetensors", "pt")


def export(variables: Mapping, arch: Any, out_path: str, metadata: Optional[Mapping] = None,
           fmt: str = "safetensors", classifier: Optional[Mapping] = None) -> dict:
  """Writes the torch state dict of `variables` to `out_path`; returns the state dict.

  Args:
    variables: backbone variables {"params", "batch_stats"?}.
    arch: backbone name or `config.model` mapping (see `torch_export.parse_arch`).
    out_path: the file to write; its directory is created.
    metadata: extra {str: str} stored in the safetensors header (ignored for "pt").
    fmt: "safetensors" or "pt".
    classifier: optional LinearClassifier variables, exported as fc.* / head.*.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r} must be one of {FORMATS}")
  state_dict = torch_export.to_torch_state_dict(variables, arch, classifier=classifier)
  name, fields = torch_export.parse_arch(arch)
  _, resolved = torch_export.resolve_arch(variables, arch)
  header = {"format": "pt", "arch": name,
            "arch_fields": json.dumps(fields, sort_keys=True, default=str),
            "torch_model": torch_export.torch_model_code({"name": name, **resolved})}
  header.update({str(k): str(v) for k, v in (metadata or {}).items()})
  with paths.local_output(out_path) as local:
    if fmt == "safetensors":
      from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
      save_file(state_dict, local, metadata=header)
    else:
      import torch  # pylint: disable=import-outside-toplevel
      torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, local)
  return state_dict


def load_from_workdir(workdir: str, step: Optional[int], part: str) -> tuple[Mapping, Any, int]:
  """(variables, arch, step) of a training run: the backbone of `part` at `step` (None: latest)
  and the run's `config.model` (`ssl_jax.weights` asks the run's method where its backbone is)."""
  from ssl_jax import weights  # pylint: disable=import-outside-toplevel
  step, variables = weights.workdir_encoder(workdir, step, part)
  return variables, weights.model_config_of_workdir(workdir), step


def run_metadata(workdir: str) -> dict:
  """Method name and a hash of the run's config.json, so an export names what produced it."""
  raw = (epath.Path(workdir) / "config.json").read_bytes()
  return {"method": json.loads(raw).get("method", ""),
          "config_sha256": hashlib.sha256(raw).hexdigest()}


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
flags.DEFINE_enum("part", "online", ["online", "target"],
                  "online: the trained network; target: the EMA/momentum network (BYOL, MoCo, "
                  "DetCon-B).")
flags.DEFINE_string("out", None, "Output file; default <workdir>/export/<arch>_<step>.<format>.")
flags.DEFINE_bool("with_heads", False,
                  "Also write the method's heads (projector, predictor, ...: every online "
                  "parameter outside the backbone) to <out>.heads.safetensors as torch modules' "
                  "state dicts (MLPs as nn.Sequential of Linear/BatchNorm1d/ReLU).")
flags.DEFINE_enum("format", "safetensors", list(FORMATS), "safetensors (no pickle) or pt.")


def main(argv) -> None:
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  variables, arch, step = load_from_workdir(FLAGS.workdir, FLAGS.step, FLAGS.part)
  name, _ = torch_export.parse_arch(arch)
  out = FLAGS.out or str(epath.Path(FLAGS.workdir) / "export" / f"{name}_{step}.{FLAGS.format}")
  state_dict = export(variables, arch, out, fmt=FLAGS.format,
                      metadata={"workdir": FLAGS.workdir, "step": step, "part": FLAGS.part,
                                **run_metadata(FLAGS.workdir)})
  print(f"wrote {len(state_dict)} tensors of {name} (step {step}) to {out}")
  if FLAGS.with_heads:
    heads_out = os.path.splitext(out)[0] + ".heads.safetensors"
    n = export_heads(FLAGS.workdir, FLAGS.step, heads_out)
    print(f"wrote {n} head tensors to {heads_out}")


def export_heads(workdir: str, step: Optional[int], out_path: str) -> int:
  """Writes the online heads (every parameter outside the backbone, with their batch statistics)
  as torch modules' state dicts (see the module docstring); returns the number of tensors."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from ssl_jax import checkpoint  # pylint: disable=import-outside-toplevel
  step, state = checkpoint.load_state(workdir, step)
  stats = (state.get("state") or {}).get("batch_stats", {})
  state_dict, layouts = torch_export.heads_to_torch_state_dict(state["params"], stats)
  with paths.local_output(out_path) as local:
    save_file(state_dict, local, metadata={"step": str(step), **run_metadata(workdir),
                                           **{f"layout.{k}": v for k, v in layouts.items()}})
  return len(state_dict)


if __name__ == "__main__":
  from ssl_jax import cli  # pylint: disable=import-outside-toplevel
  cli.run(main)
