"""Backbone variables <-> PyTorch state dicts of torchvision ResNets and timm ViTs.

The flax trees are laid out like the PyTorch modules (see `models/resnet.py`, `models/vit.py`), so
the mapping is a rename plus a layout change: conv kernels HWIO -> OIHW, Dense kernels
(in, out) -> (out, in); `scale` -> `weight`; `mean`/`var` -> `running_mean`/`running_var`;
`layer1_0` -> `layer1.0`; ViT `patch_embed` -> `patch_embed.proj`.

Loading the result in PyTorch (no classifier exported):
  torchvision: `m = torchvision.models.resnet50(); m.fc = torch.nn.Identity();
               m.load_state_dict(sd, strict=True)`  (m(x) is then our "pooled")
  timm:        `m = timm.create_model("vit_small_patch16_224", num_classes=0)` (pool="cls"), or
               with `global_pool="avg", fc_norm=False` for pool="mean".
Passing `classifier=` (a `LinearClassifier`'s variables) adds `fc.*` / `head.*`, so the stock
1000-class models load strictly; a probe's BatchNorm without affine is folded into the linear layer.

Not represented in our trees, written on export and ignored on import: BN `num_batches_tracked`
(0: torch only reads it when momentum=None) and, for pos_embed="sincos", timm's `pos_embed` (the
fixed table, computed at the resolution given by `img_size`, default 224).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import models
from ssl_jax.models import vit as vit_lib

# Tried in order when `prefix_strip` is None: wrappers of DDP (module.), MoCo (base_encoder,
# encoder_q), and common SSL checkpoints (backbone., encoder.).
DEFAULT_PREFIXES = ("module.base_encoder.", "module.encoder_q.", "module.encoder.",
                    "module.backbone.", "module.", "base_encoder.", "encoder_q.", "backbone.",
                    "encoder.", "")
# Classifier weights are not part of a backbone and are dropped on import.
CLASSIFIER_PREFIXES = ("fc.", "head.")
_TIMM_NAME = re.compile(r"^(vit_(?:tiny|small|base))_patch(\d+)(?:_(\d+))?$")
_BN_LEAVES = {"mean": "running_mean", "var": "running_var"}


def parse_arch(arch: Any, **kwargs) -> tuple[str, dict]:
  """arch: "resnet50", "vit_small", timm's "vit_small_patch16_224", or a mapping such as
  `config.model` ({"name": ..., **fields}) -> (backbone name, fields incl. `img_size` for ViTs)."""
  if isinstance(arch, Mapping):
    arch = dict(arch)
    if "name" not in arch:
      raise ValueError(f"arch mapping {arch} has no 'name' (e.g. config.model)")
    name, fields = arch.pop("name"), arch
  else:
    name, fields = str(arch), {}
    match = _TIMM_NAME.match(name)
    if match:
      name = match.group(1)
      fields["patch_size"] = int(match.group(2))
      if match.group(3):
        fields["img_size"] = int(match.group(3))
  fields.update(kwargs)
  if name not in models.BACKBONES:
    raise ValueError(f"arch={name!r} is unknown; known: {sorted(models.BACKBONES)}")
  fields.pop("dtype", None)  # irrelevant to the weights
  return name, fields


def _abstract_variables(name: str, fields: dict) -> dict:
  """The variable tree (ShapeDtypeStructs) the backbone has at its export resolution."""
  fields = dict(fields)
  img_size = fields.pop("img_size", 224)
  model = models.get_backbone(name, **fields)
  x = jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _vit_img_size(name: str, fields: dict, pos_embed_len: Optional[int]) -> dict:
  """Learned pos_embed fixes the resolution: take it from the weights rather than a guess."""
  if not name.startswith("vit") or pos_embed_len is None or "img_size" in fields:
    return fields
  grid = int(round((pos_embed_len - 1) ** 0.5))
  if grid * grid != pos_embed_len - 1:
    raise ValueError(f"pos_embed has {pos_embed_len - 1} patch positions, not a square grid")
  return {**fields, "img_size": grid * fields.get("patch_size", 16)}


def _torch_module(path: tuple[str, ...]) -> str:
  parts = []
  for p in path:
    p = re.sub(r"^(layer\d+|downsample|blocks)_(\d+)$", r"\1.\2", p)
    parts.append("patch_embed.proj" if p == "patch_embed" else p)
  return ".".join(parts)


def _mapping(abstract: dict) -> list[tuple[tuple[str, ...], str, str]]:
  """[(flax path (collection, ..., leaf), torch key, kind)], kind in conv|dense|copy."""
  entries = []
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]
    for keypath, leaf in flat:
      path = tuple(k.key for k in keypath)
      module, leaf_name = _torch_module(path[:-1]), path[-1]
      if leaf_name == "kernel":
        kind, torch_leaf = ("conv" if len(leaf.shape) == 4 else "dense"), "weight"
      elif leaf_name == "scale":
        kind, torch_leaf = "copy", "weight"
      else:
        kind, torch_leaf = "copy", _BN_LEAVES.get(leaf_name, leaf_name)
      key = f"{module}.{torch_leaf}" if module else torch_leaf
      entries.append(((collection,) + path, key, kind))
  return entries


def _to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
  if kind == "dense":
    return np.ascontiguousarray(x.T)
  return np.ascontiguousarray(x)


def _from_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))
  if kind == "dense":
    return np.ascontiguousarray(x.T)
  return np.ascontiguousarray(x)


def _get(tree: Mapping, path: tuple[str, ...]):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _mismatch_error(what: str, missing: Iterable[str], unexpected: Iterable[str],
                    wrong_shapes: Iterable[str] = ()) -> ValueError:
  missing, unexpected, wrong_shapes = sorted(missing), sorted(unexpected), sorted(wrong_shapes)
  parts = [f"{what} does not match the architecture:"]
  if missing:
    parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
  if unexpected:
    parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
  if wrong_shapes:
    parts.append(f"wrong shapes ({len(wrong_shapes)}): {wrong_shapes[:20]}")
  return ValueError("\n  ".join(parts))


def _bn_modules(entries) -> list[str]:
  return sorted({key.rsplit(".", 1)[0] for path, key, _ in entries if path[0] == "batch_stats"})


def to_torch_state_dict(variables: Mapping, arch: Any, classifier: Optional[Mapping] = None,
                        classifier_bn_epsilon: float = 1e-6, **arch_kwargs) -> dict[str, np.ndarray]:
  """Backbone variables {"params", "batch_stats"?} -> torchvision/timm state dict of NumPy arrays.

  Args:
    variables: the backbone's variables (e.g. `Method.encoder(params, state)`).
    arch: see `parse_arch`; `arch_kwargs` override its fields (width, patch_size, img_size...).
    classifier: optional `LinearClassifier` variables {"params": {"head"}, "batch_stats"?: {"bn"}}
      exported as `fc.*` (ResNet) or `head.*` (ViT); `classifier_bn_epsilon` is its BN ε.
  Returns:
    {torch key: array} with torch layouts, float32 weights, int64 `num_batches_tracked`.
  """
  name, fields = parse_arch(arch, **arch_kwargs)
  pos = _get(variables, ("params", "pos_embed"))
  fields = _vit_img_size(name, fields, None if pos is None else pos.shape[1])
  abstract = _abstract_variables(name, fields)
  entries = _mapping(abstract)
  expected = {path: key for path, key, _ in entries}
  given = {tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(
      {c: variables.get(c, {}) for c in ("params", "batch_stats")})[0]}
  wrong = []
  out = {}
  for path, key, kind in entries:
    value = _get(variables, path)
    if value is None:
      continue
    value = np.asarray(jax.device_get(value), np.float32)
    want = tuple(_get(abstract, path).shape)
    if value.shape != want:
      wrong.append(f"{'/'.join(path)}: {value.shape} != {want}")
    out[key] = _to_torch_layout(value, kind)
  missing = {"/".join(p) for p in set(expected) - given}
  unexpected = {"/".join(p) for p in given - set(expected)}
  if missing or unexpected or wrong:
    raise _mismatch_error(f"variables for arch {name!r}", missing, unexpected, wrong)
  for module in _bn_modules(entries):
    out[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
  if name.startswith("vit") and fields.get("pos_embed", "learned") == "sincos":
    patch = fields.get("patch_size", 16)
    grid = fields.get("img_size", 224) // patch
    out["pos_embed"] = vit_lib.sincos_pos_embed(_embed_dim(name, fields), (grid, grid))
  if classifier is not None:
    prefix = "head" if name.startswith("vit") else "fc"
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = _fold_classifier(classifier,
                                                                      classifier_bn_epsilon)
  return out


def _embed_dim(name: str, fields: dict) -> int:
  return fields.get("embed_dim", vit_lib._SIZES[name][0])  # pylint: disable=protected-access


def _fold_classifier(classifier: Mapping, eps: float) -> tuple[np.ndarray, np.ndarray]:
  """LinearClassifier -> (weight [K, D], bias [K]); eval-mode BN (no affine) folded in:
  W·(x − μ)/σ + b = (W/σ)·x + (b − W·μ/σ)."""
  head = classifier["params"]["head"]
  w = np.asarray(head["kernel"], np.float64)
  b = np.asarray(head["bias"], np.float64)
  bn = _get(classifier, ("batch_stats", "bn"))
  if bn is not None:
    sigma = np.sqrt(np.asarray(bn["var"], np.float64) + eps)
    b = b - (np.asarray(bn["mean"], np.float64) / sigma) @ w
    w = w / sigma[:, None]
  return np.ascontiguousarray(w.T, np.float32), b.astype(np.float32)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; avoid importing torch here
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _strip(state_dict: Mapping, prefixes: Iterable[str], expected: set[str]):
  """Picks the first prefix under which every expected key is found (else the best match)."""
  best = None
  for prefix in prefixes:
    stripped = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    found = len(expected & set(stripped))
    if found == len(expected):
      return stripped
    if best is None or found > best[0]:
      best = (found, stripped)
  return best[1] if best else {}


def from_torch_state_dict(state_dict: Mapping, arch: Any, prefix_strip=None,
                          **arch_kwargs) -> dict:
  """torchvision/timm state dict (tensors or arrays) -> backbone variables {"params", "batch_stats"}.

  Args:
    state_dict: e.g. `torch.load(path)["state_dict"]` or `safetensors.numpy.load_file(path)`.
    arch: see `parse_arch`; for a learned-pos_embed ViT the resolution comes from `pos_embed`.
    prefix_strip: a prefix (or prefixes, tried in order) whose keys hold the backbone, e.g.
      "module.base_encoder."; keys without it are ignored. Default: `DEFAULT_PREFIXES`.
  Raises:
    ValueError naming the missing, unexpected and wrongly shaped keys.
  """
  name, fields = parse_arch(arch, **arch_kwargs)
  if prefix_strip is None:
    prefixes = DEFAULT_PREFIXES
  else:
    prefixes = (prefix_strip,) if isinstance(prefix_strip, str) else tuple(prefix_strip)
  # Resolution first (needs the stripped pos_embed), then the exact expected keys.
  pos = next((v for k, v in state_dict.items()
              if k.endswith("pos_embed") and any(k == p + "pos_embed" for p in prefixes)), None)
  fields = _vit_img_size(name, fields, None if pos is None else _to_numpy(pos).shape[1])
  sincos = name.startswith("vit") and fields.get("pos_embed", "learned") == "sincos"
  if sincos:
    fields.setdefault("img_size", 224)
  abstract = _abstract_variables(name, fields)
  entries = _mapping(abstract)
  expected = {key for _, key, _ in entries}
  sd = _strip(state_dict, prefixes, expected)
  ignored = {k for k in sd if k.startswith(CLASSIFIER_PREFIXES) or k.endswith(
      "num_batches_tracked") or (sincos and k == "pos_embed")}
  sd = {k: v for k, v in sd.items() if k not in ignored}
  variables: dict = {}
  wrong = []
  for path, key, kind in entries:
    if key not in sd:
      continue
    value = _from_torch_layout(_to_numpy(sd[key]).astype(np.float32), kind)
    want = tuple(_get(abstract, path).shape)
    if value.shape != want:
      expected_shape = _to_torch_layout(np.zeros(want, np.float32), kind).shape
      wrong.append(f"{key}: {tuple(_to_numpy(sd[key]).shape)}, expected {expected_shape}")
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  missing, unexpected = expected - set(sd), set(sd) - expected
  if missing or unexpected or wrong:
    raise _mismatch_error(f"state dict for arch {name!r}", missing, unexpected, wrong)
  return variables


# Where released checkpoints keep their weights: MoCo v3 / MoBY / DINO save {"state_dict": ...},
# {"model": ...} or {"teacher": ...}; timm and torchvision save the dict itself.
CHECKPOINT_KEYS = ("state_dict", "model", "teacher", "student", "module")


def load_torch_file(path: str) -> dict:
  """A state dict from a .safetensors file or a PyTorch checkpoint, without unrestricted pickle.

  `.safetensors` is read with safetensors (no torch needed); anything else with
  `torch.load(path, map_location="cpu", weights_only=True)` (tensors and plain containers only;
  a file needing arbitrary pickle is refused by torch with an error naming the class). Nested
  checkpoints ({"state_dict": {...}} and the like) are unwrapped.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (`pip install -e .[torch]`); "
                      "or convert it to .safetensors") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  while isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
    key = next((k for k in CHECKPOINT_KEYS if k in obj), None)
    if key is None:
      raise ValueError(f"{path}: no tensors at the top level and none of {CHECKPOINT_KEYS} "
                       f"found; keys: {sorted(obj)[:20]}")
    obj = obj[key]
  return dict(obj)


def import_backbone(path: str, arch: Any, prefix_strip=None, **arch_kwargs) -> dict:
  """Backbone variables from a torchvision/timm/MoCo-style file (teachers, fine-tuning)."""
  return from_torch_state_dict(load_torch_file(path), arch, prefix_strip=prefix_strip,
                               **arch_kwargs)
