"""Trained weights from wherever they are: a pretraining workdir, a safetensors export, a PyTorch file.

One loader for everything that starts from trained weights: `config.init_from` (any method's
backbone), frozen teachers (MimCo), linear evaluation and fine-tuning, export. A *source* is
  * a pretraining workdir (has `config.json` and `checkpoints/`): the backbone of the online or
    target network at a step, found by asking the run's own method (`Method.encoder` /
    `Method.target_encoder`), so no caller needs to know where a method keeps its backbone;
  * a `.safetensors` file written by `python -m ssl_jax.export` (its metadata names the
    architecture) or any torchvision / timm state dict saved as safetensors (then `model` names it);
  * a PyTorch file (`.pth`, `.pt`, `.pth.tar`, `.bin`; MoCo/MoBY/DINO-style nesting is unwrapped,
    read with `torch.load(weights_only=True)`, needs torch).
`fingerprint(source)` is the sha256 recorded in config.json so a resumed run can refuse a changed
source.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

import ml_collections
from etils import epath

from ssl_jax import checkpoint, paths, registry
from ssl_jax.errors import UserError

PARTS = ("online", "target")
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


class WeightsError(UserError, ValueError):
  """A weight source that does not exist, has the wrong layout, or does not fit the model."""


def is_workdir(source: str) -> bool:
  """A folder or bucket prefix (not a weights file)."""
  return not source.endswith((".safetensors",) + TORCH_SUFFIXES) and epath.Path(source).is_dir()


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a pretraining run wrote to `workdir/config.json`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise WeightsError(f"{path} not found: {workdir!r} is not a pretraining workdir (training "
                       "writes config.json there)")
  raw = json.loads(path.read_text())
  raw.pop("provenance", None)
  return ml_collections.ConfigDict(raw)


def model_config_of_workdir(workdir: str) -> dict:
  """The "model" section of a pretraining workdir's `config.json` ({"name", **fields})."""
  model = workdir_config(workdir).get("model")
  if not model or "name" not in model:
    raise WeightsError(f"{epath.Path(workdir) / 'config.json'} has no 'model' section with a "
                       "'name'")
  return dict(model.to_dict())


def workdir_encoder(workdir: str, step: Optional[int] = None, part: str = "online"
                    ) -> tuple[int, dict]:
  """(step, backbone variables) of a pretraining workdir's checkpoint, as host numpy arrays.

  The run's method (rebuilt from its config.json) says where its backbone lives.
  """
  if part not in PARTS:
    raise WeightsError(f"part={part!r} must be one of {PARTS}")
  config = workdir_config(workdir)
  method = registry.get_method(config.method).make(config)
  step, state = checkpoint.load_state(workdir, step)
  if part == "online":
    return step, method.encoder(state["params"], state["state"])
  if method.target_encoder is None:
    raise WeightsError(f"part='target': method {config.method!r} has no target (EMA) network; "
                       "use part='online'")
  return step, method.target_encoder(state["params"], state["state"])


def safetensors_arch(path: str) -> Optional[dict]:
  """The architecture our export wrote into a safetensors header ({"name", **fields}) or None."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
  if "arch" not in meta:
    return None
  return {"name": meta["arch"], **json.loads(meta.get("arch_fields", "{}"))}


def load_backbone(source: str, *, model: Optional[Mapping] = None, step: Optional[int] = None,
                  part: str = "online") -> tuple[dict, dict]:
  """(backbone variables {"params", "batch_stats"?} as numpy, model config {"name", **fields}).

  Args:
    source: a workdir, a .safetensors file or a PyTorch file (see the module docstring).
    model: the architecture ({"name": "resnet50"} / {"name": "vit_base", "patch_size": 16});
      for a workdir or one of our exports it defaults to the recorded one and entries given here
      override it (e.g. `drop_path_rate` for fine-tuning); required for foreign files.
    step: a workdir's checkpoint step (None or 0: latest).
    part: a workdir's "online" or "target" (EMA) network.
  """
  if not source:
    raise WeightsError("no weight source given (a workdir, .safetensors or PyTorch file)")
  model = dict(model or {})
  if is_workdir(source):
    model = {**model_config_of_workdir(source), **model}
    _, variables = workdir_encoder(source, step or None, part)
    return variables, model
  if not epath.Path(source).exists():
    raise WeightsError(f"weight source {source!r} does not exist (expected a pretraining workdir, "
                       "a .safetensors file or a PyTorch .pth/.pt file)")
  from ssl_jax.export import torch as torch_export  # pylint: disable=import-outside-toplevel
  with paths.local_copy(source) as local:
    if source.endswith(".safetensors"):
      model = {**(safetensors_arch(local) or {}), **model}
    if "name" not in model:
      raise WeightsError(f"{source}: the architecture is unknown (no ssl_jax export metadata); "
                         "name it, e.g. --config.backbone.model.name=vit_base with its "
                         "patch_size")
    try:
      variables = torch_export.from_torch_state_dict(torch_export.load_torch_file(local), model)
    except ImportError as e:
      raise WeightsError(str(e)) from e
    except ValueError as e:
      raise WeightsError(f"{source}: {e}") from e
  return variables, {k: v for k, v in model.items() if k != "img_size"}


def fingerprint(source: str, step: Optional[int] = None) -> str:
  """sha256 of a weight source: the file, or for a workdir its config.json and the files of the
  checkpoint step that would be read (latest when `step` is None)."""
  digest = hashlib.sha256()
  root = epath.Path(source)
  if is_workdir(source):
    step = step or checkpoint.latest_step(source)
    if step is None:
      raise WeightsError(f"{source}: no checkpoint to read (train first)")
    step_dir = checkpoint.checkpoint_dir(source) / str(step)
    files = [root / "config.json"] + _files_under(step_dir)
    names = [str(p)[len(str(checkpoint.checkpoint_dir(source).parent)):] for p in files]
  else:
    files, names = [root], [root.name]
  for path, name in zip(files, names):
    digest.update(name.encode())
    with path.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


def _files_under(folder: epath.Path) -> list[epath.Path]:
  """Every file below `folder`, sorted (epath has no recursive glob on buckets)."""
  out = []
  for child in sorted(folder.iterdir(), key=str):
    out += _files_under(child) if child.is_dir() else [child]
  return out


def check_fits(variables: Mapping, abstract: Mapping, where: str) -> None:
  """Raises WeightsError when `variables` does not have exactly the structure and shapes of
  `abstract` (a tree of arrays or ShapeDtypeStructs), naming up to 10 differences."""
  import jax  # pylint: disable=import-outside-toplevel
  got = {jax.tree_util.keystr(k): tuple(v.shape)
         for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
  problems += [f"{k}: {got[k]} vs model {want[k]}" for k in sorted(want.keys() & got.keys())
               if got[k] != want[k]]
  if problems:
    more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
    raise WeightsError(f"{where} does not fit the model: {'; '.join(problems[:10])}{more}")


def describe(source: str, step: Optional[int] = None, part: str = "online") -> dict[str, Any]:
  """{"source", "sha256", "step"?, "part"?}: what config.json records about a weight source."""
  out: dict[str, Any] = {"source": str(paths.resolve(source)),
                         "sha256": fingerprint(source, step)}
  if is_workdir(source):
    out.update(step=int(step or checkpoint.latest_step(source)), part=part)
  return out
