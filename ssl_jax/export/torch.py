"""Backbone variables <-> PyTorch state dicts of torchvision ResNets and timm ViTs / Swins.

The flax trees are laid out like the PyTorch modules (see `models/resnet.py`, `models/vit.py`,
`models/swin.py`), so the mapping is a rename plus a layout change: conv kernels HWIO -> OIHW,
Dense kernels (in, out) -> (out, in); `scale` -> `weight`; `mean`/`var` ->
`running_mean`/`running_var`; `layer1_0` -> `layer1.0`, `layers_2/blocks_5` -> `layers.2.blocks.5`;
ViT `patch_embed` -> `patch_embed.proj`.

Loading the result in PyTorch (no classifier exported):
  torchvision: `m = torchvision.models.resnet50(); m.fc = torch.nn.Identity();
               m.load_state_dict(sd, strict=True)`  (m(x) is then our "pooled")
  timm:        `m = timm.create_model("vit_small_patch16_224", num_classes=0)` (pool="cls"), or
               with `global_pool="avg", fc_norm=False` for pool="mean";
               `m = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)` (timm 1.0).
  `torch_model_code(arch)` spells the constructor (with img_size / window_size / ... overrides).
Passing `classifier=` (a `LinearClassifier`'s variables) adds `fc.*` / `head.*` / `head.fc.*`
(Swin), so the stock 1000-class models load strictly; a probe's BatchNorm without affine is folded
into the linear layer.

Swin import also reads Microsoft's layout (official Swin releases, MoBY, SimMIM): their
PatchMerging sits at the END of stages 0..2 (`layers.{i}.downsample`), timm 1.0's at the START of
stages 1..3, so `layers.{i}.downsample.*` becomes `layers.{i+1}.downsample.*` (as timm's own
`checkpoint_filter_fn`); the `relative_position_index` / `attn_mask` buffers those files carry are
recomputed by our model and dropped; `head.*` and MoBY's `encoder_k.`/`projector`/`predictor`/queues
are ignored (the backbone is found under the `encoder.` prefix). A MoBY `.pth` needs unpickling
once; `load_torch_file` uses `torch.load(weights_only=True)`, which reads plain checkpoints
({"model": {...}, "epoch": ...}). One-off conversion to a pickle-free file (environment with torch):
  python -c "import sys, safetensors.torch as st; from ssl_jax.export.torch import load_torch_file;
  st.save_file({k: v.clone() for k, v in load_torch_file(sys.argv[1]).items()}, sys.argv[2])" \
  moby_swin_t_300ep_pretrained.pth moby_swin_t.safetensors
after which `import_backbone("moby_swin_t.safetensors", "swin_tiny")` needs no torch. MoBY's
training checkpoints also pickle their yacs config, which weights_only refuses (torch's error names
`yacs.config.CfgNode`); for such a file you trust, convert once with full unpickling in a throwaway
environment with torch and yacs:
  python -c "import sys, torch, safetensors.torch as st; sd = torch.load(sys.argv[1],
  map_location='cpu', weights_only=False)['model']; st.save_file({k: v.clone() for k, v in
  sd.items()}, sys.argv[2])" ckpt_epoch_299.pth moby_swin_t.safetensors

The Swin resolution matters only where a stage's map is no larger than the window (the window
and its bias table shrink, see `models/swin.py`): export and import infer an `img_size` giving the
same table shapes from the tables themselves unless `img_size=` is passed.

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
from ssl_jax.models import swin as swin_lib
from ssl_jax.models import vit as vit_lib

# Tried in order when `prefix_strip` is None: wrappers of DDP (module.), MoCo (base_encoder,
# encoder_q), and common SSL checkpoints (backbone., encoder.).
DEFAULT_PREFIXES = ("module.base_encoder.", "module.encoder_q.", "module.encoder.",
                    "module.backbone.", "module.", "base_encoder.", "encoder_q.", "backbone.",
                    "encoder.", "")
# Classifier weights are not part of a backbone and are dropped on import.
CLASSIFIER_PREFIXES = ("fc.", "head.")
_TIMM_NAME = re.compile(r"^(vit_(?:tiny|small|base))_patch(\d+)(?:_(\d+))?$")
_TIMM_SWIN = re.compile(r"^(swin_(?:tiny|small|base))_patch(\d+)_window(\d+)(?:_(\d+))?$")
_SWIN_TABLE = re.compile(r"^layers\.(\d+)\.blocks\.0\.attn\.relative_position_bias_table$")
# Buffers of Microsoft's (and timm < 0.9's) Swin files that our model recomputes.
SWIN_BUFFERS = ("relative_position_index", "attn_mask")
_BN_LEAVES = {"mean": "running_mean", "var": "running_var"}


def parse_arch(arch: Any, **kwargs) -> tuple[str, dict]:
  """arch: "resnet50", "vit_small", "swin_tiny", timm's "vit_small_patch16_224" /
  "swin_tiny_patch4_window7_224", or a mapping such as `config.model` ({"name": ..., **fields})
  -> (backbone name, fields incl. `img_size` for ViTs and Swins)."""
  if isinstance(arch, Mapping):
    arch = dict(arch)
    if "name" not in arch:
      raise ValueError(f"arch mapping {arch} has no 'name' (e.g. config.model)")
    name, fields = arch.pop("name"), arch
  else:
    name, fields = str(arch), {}
    match = _TIMM_NAME.match(name)
    swin_match = _TIMM_SWIN.match(name)
    if match:
      name = match.group(1)
      fields["patch_size"] = int(match.group(2))
      if match.group(3):
        fields["img_size"] = int(match.group(3))
    elif swin_match:
      name = swin_match.group(1)
      fields["patch_size"] = int(swin_match.group(2))
      fields["window_size"] = int(swin_match.group(3))
      if swin_match.group(4):
        fields["img_size"] = int(swin_match.group(4))
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


def _is_swin(name: str) -> bool:
  return name.startswith("swin_")


def _swin_img_size(name: str, fields: dict, table_rows: Mapping[int, int]) -> dict:
  """An img_size at which the Swin's bias tables have `table_rows` rows ({stage: rows}).

  A stage whose map r is at most the window w has a (2r−1)² table, else (2w−1)²: the first
  shrunken table fixes img = r·patch·2^stage; with none, patch·window·2^(stages−1) (224 for
  Swin-T) gives full windows everywhere.
  """
  if not _is_swin(name) or "img_size" in fields:
    return fields
  model = models.get_backbone(name, **{k: v for k, v in fields.items() if k != "dtype"})
  p, w = model.patch_size, model.window_size
  for stage in sorted(table_rows):
    side = int(round(table_rows[stage] ** 0.5))
    if side * side != table_rows[stage] or side % 2 == 0:
      raise ValueError(f"layers.{stage}: relative_position_bias_table has {table_rows[stage]} "
                       "rows, not (2·window − 1)² of a square window")
    r = (side + 1) // 2
    if r < w:
      return {**fields, "img_size": r * p * 2**stage}
  return {**fields, "img_size": p * w * 2 ** (len(tuple(model.depths)) - 1)}


def _torch_module(path: tuple[str, ...]) -> str:
  if path == ("patch_embed",):  # ViT: one conv; Swin's patch_embed has proj and norm
    return "patch_embed.proj"
  return ".".join(re.sub(r"^(layer\d+|layers|downsample|blocks)_(\d+)$", r"\1.\2", p)
                  for p in path)


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
  name, fields = resolve_arch(variables, arch, **arch_kwargs)
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
    prefix = {"vit": "head", "swin": "head.fc"}.get(name.split("_")[0], "fc")
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = _fold_classifier(classifier,
                                                                      classifier_bn_epsilon)
  return out


def resolve_arch(variables: Mapping, arch: Any, **arch_kwargs) -> tuple[str, dict]:
  """`parse_arch` plus the resolution the weights fix: ViT learned pos_embed, Swin bias tables."""
  name, fields = parse_arch(arch, **arch_kwargs)
  pos = _get(variables, ("params", "pos_embed"))
  fields = _vit_img_size(name, fields, None if pos is None else pos.shape[1])
  if not _is_swin(name):
    return name, fields
  tables = {}
  for stage, tree in (_get(variables, ("params",)) or {}).items():
    table = _get(tree, ("blocks_0", "attn", "relative_position_bias_table"))
    if re.match(r"^layers_\d+$", stage) and table is not None:
      tables[int(stage[len("layers_"):])] = table.shape[0]
  return name, _swin_img_size(name, fields, tables)


def torch_model_code(arch: Any, **arch_kwargs) -> str:
  """The PyTorch constructor (Python source) whose state dict our export matches, e.g.
  `timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)`; fields that differ from
  the named timm model are passed as keyword arguments."""
  name, fields = parse_arch(arch, **arch_kwargs)
  model = models.get_backbone(name, **{k: v for k, v in fields.items() if k != "img_size"})
  if name.startswith("resnet"):
    extra = "" if model.width == 64 else f"  # width={model.width}: no torchvision equivalent"
    stem = (f"; m.conv1 = torch.nn.Conv2d(3, {model.width}, 3, 1, 1, bias=False); "
            "m.maxpool = torch.nn.Identity()") if model.small_image_stem else ""
    return f"m = torchvision.models.{name}(); m.fc = torch.nn.Identity(){stem}{extra}"
  img = int(fields.get("img_size", 224))
  if name.startswith("vit"):
    dim, depth, heads = vit_lib._SIZES[name]  # pylint: disable=protected-access
    base = f"{name}_patch16_224"
    kw = {"img_size": img, "patch_size": model.patch_size, "embed_dim": model.embed_dim,
          "depth": model.depth, "num_heads": model.num_heads, "mlp_ratio": model.mlp_ratio,
          "qkv_bias": model.qkv_bias}
    defaults = {"img_size": 224, "patch_size": 16, "embed_dim": dim, "depth": depth,
                "num_heads": heads, "mlp_ratio": 4.0, "qkv_bias": True}
    if model.pool == "mean":
      kw.update(global_pool="avg", fc_norm=False)
  else:
    dim, depths, heads = swin_lib.SIZES[name]
    base = f"{name}_patch4_window7_224"
    kw = {"img_size": img, "patch_size": model.patch_size, "window_size": model.window_size,
          "embed_dim": model.embed_dim, "depths": tuple(model.depths),
          "num_heads": tuple(model.num_heads), "mlp_ratio": model.mlp_ratio,
          "qkv_bias": model.qkv_bias}
    defaults = {"img_size": 224, "patch_size": 4, "window_size": 7, "embed_dim": dim,
                "depths": depths, "num_heads": heads, "mlp_ratio": 4.0, "qkv_bias": True}
  args = "".join(f", {k}={v!r}" for k, v in kw.items() if defaults.get(k) != v)
  return f'm = timm.create_model("{base}", num_classes=0{args})'


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


_MLP_KEY = re.compile(r"^(?:dense|norm)_\d+$|^last_norm$")


def _is_mlp(tree: Any) -> bool:
  return isinstance(tree, Mapping) and "dense_0" in tree and all(_MLP_KEY.match(k) for k in tree)


def mlp_to_torch_state_dict(params: Mapping, batch_stats: Optional[Mapping] = None,
                            prefix: str = "", bn_epsilon: float = 1e-5,
                            ln_epsilon: float = 1e-6) -> tuple[dict[str, np.ndarray], str]:
  """`models.heads.MLP` variables -> (state dict of the equivalent `torch.nn.Sequential`, its
  source code).

  The Sequential, numbered as PyTorch numbers its children from 0: for each hidden layer i
  `Linear(d_in, hidden, bias=use_bias)`, then `BatchNorm1d(hidden, eps=bn_epsilon)` (norm="bn")
  or `LayerNorm(hidden, eps=ln_epsilon)` (norm="ln"; flax's default ε 1e-6, not torch's 1e-5) or
  nothing (norm="none"), then `ReLU()`; finally `Linear(hidden, out_dim)` and, for last_norm
  "bn" / "bn_noaffine", `BatchNorm1d(out_dim, eps=bn_epsilon[, affine=False])`. E.g. BYOL's
  projector is `projector.0` Linear, `projector.1` BatchNorm1d, `projector.2` ReLU, `projector.3`
  Linear. In eval mode it computes our MLP with `train=False`.

  Args:
    params: the MLP's params ({"dense_0": {"kernel", "bias"?}, "norm_0": ..., ...}).
    batch_stats: its batch statistics ({"norm_0": {"mean", "var"}, "last_norm": ...}) if any.
    prefix: prepended to every key (e.g. "projector.").
  """
  stats = batch_stats or {}
  num_layers = sum(1 for k in params if k.startswith("dense_"))
  out: dict[str, np.ndarray] = {}
  modules: list[str] = []

  def add(leaf: str, value) -> None:
    out[f"{prefix}{len(modules)}.{leaf}"] = np.ascontiguousarray(np.asarray(value, np.float32))

  def linear(i: int) -> None:
    dense = params[f"dense_{i}"]
    kernel = np.asarray(dense["kernel"])
    add("weight", kernel.T)
    if "bias" in dense:
      add("bias", dense["bias"])
    modules.append(f"torch.nn.Linear({kernel.shape[0]}, {kernel.shape[1]}, "
                   f"bias={'bias' in dense})")

  def norm(name: str) -> None:
    p = params.get(name, {})
    if name in stats:
      if "scale" in p:
        add("weight", p["scale"])
        add("bias", p["bias"])
      add("running_mean", stats[name]["mean"])
      add("running_var", stats[name]["var"])
      out[f"{prefix}{len(modules)}.num_batches_tracked"] = np.array(0, np.int64)
      affine = "" if "scale" in p else ", affine=False"
      modules.append(f"torch.nn.BatchNorm1d({np.shape(stats[name]['mean'])[0]}, "
                     f"eps={bn_epsilon}{affine})")
    else:
      add("weight", p["scale"])
      add("bias", p["bias"])
      modules.append(f"torch.nn.LayerNorm({np.shape(p['scale'])[0]}, eps={ln_epsilon})")

  for i in range(num_layers - 1):
    linear(i)
    if f"norm_{i}" in params or f"norm_{i}" in stats:
      norm(f"norm_{i}")
    modules.append("torch.nn.ReLU()")
  linear(num_layers - 1)
  if "last_norm" in params or "last_norm" in stats:
    norm("last_norm")
  return out, "torch.nn.Sequential(" + ", ".join(modules) + ")"


def heads_to_torch_state_dict(params: Mapping, batch_stats: Optional[Mapping] = None
                              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A method's heads (its params except "backbone") -> (torch state dict, {head: layout}).

  `models.heads.MLP` heads become `nn.Sequential`s (`mlp_to_torch_state_dict`: keys
  `projector.0.weight`, ...; the layout is the Sequential's source). Any other module gets the
  backbone rules (conv OIHW, Linear [out, in], scale -> weight, BN running statistics,
  `name_3` -> `name.3`) under its own name, i.e. the state dict of a torch module whose
  submodules are named like ours; a bare array (e.g. a mask token) keeps its name and shape.
  """
  stats = batch_stats or {}
  out: dict[str, np.ndarray] = {}
  layouts: dict[str, str] = {}
  for name in sorted(set(params) | set(stats)):
    if name == "backbone":
      continue
    tree, tree_stats = params.get(name, {}), stats.get(name, {})
    if _is_mlp(tree):
      sd, layouts[name] = mlp_to_torch_state_dict(tree, tree_stats, prefix=f"{name}.")
    elif not isinstance(tree, Mapping):
      sd, layouts[name] = {name: np.ascontiguousarray(np.asarray(tree))}, "tensor"
    else:
      variables = {"params": tree, "batch_stats": tree_stats}
      entries = _mapping(variables)
      sd = {f"{name}.{key}": _to_torch_layout(np.asarray(_get(variables, path), np.float32), kind)
            for path, key, kind in entries}
      sd.update({f"{name}.{module}.num_batches_tracked": np.array(0, np.int64)
                 for module in _bn_modules(entries)})
      layouts[name] = "module named like the flax tree"
    out.update(sd)
  return out, layouts


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
  if _is_swin(name):
    state_dict = swin_from_microsoft_layout(state_dict)
  # Resolution first (needs the stripped pos_embed / bias tables), then the exact expected keys.
  pos = next((v for k, v in state_dict.items()
              if k.endswith("pos_embed") and any(k == p + "pos_embed" for p in prefixes)), None)
  fields = _vit_img_size(name, fields, None if pos is None else _to_numpy(pos).shape[1])
  if _is_swin(name):
    fields = _swin_img_size(name, fields, _swin_table_rows(state_dict, prefixes))
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


def swin_from_microsoft_layout(state_dict: Mapping) -> dict:
  """Microsoft's Swin keys (PatchMerging at the end of stages 0..2, index/mask buffers) ->
  timm 1.0's; a timm-layout dict passes through with only the buffers dropped.

  The layout is Microsoft's when some key holds `layers.0.downsample.` (timm's stage 0 has none);
  every `layers.{i}.downsample.` (under any prefix) then moves to `layers.{i+1}.downsample.`.
  """
  microsoft = any(re.search(r"(^|\.)layers\.0\.downsample\.", k) for k in state_dict)
  shift = lambda m: f"{m.group(1)}layers.{int(m.group(2)) + 1}.downsample."  # noqa: E731
  out = {}
  for key, value in state_dict.items():
    if key.rsplit(".", 1)[-1] in SWIN_BUFFERS:
      continue
    if microsoft:
      key = re.sub(r"(^|\.)layers\.(\d+)\.downsample\.", shift, key)
    out[key] = value
  return out


def _swin_table_rows(state_dict: Mapping, prefixes: Iterable[str]) -> dict[int, int]:
  """{stage: rows of layers.{stage}.blocks.0's bias table} under the first prefix that has any."""
  for prefix in prefixes:
    rows = {}
    for key, value in state_dict.items():
      match = _SWIN_TABLE.match(key[len(prefix):]) if key.startswith(prefix) else None
      if match:
        rows[int(match.group(1))] = _to_numpy(value).shape[0]
    if rows:
      return rows
  return {}


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
