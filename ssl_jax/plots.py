"""Pictures of runs, views and reconstructions (matplotlib, Agg: files, no display needed).

  python -m ssl_jax.plots --workdir=W [--workdir=W2 ...] [--metrics=loss,knn/top1] [--out=F.png]

writes, beside each workdir's `metrics.jsonl`:
  * `W/metrics.png`: one panel per metric (default: loss, lr, img/s and every `*top1` metric:
    kNN / linear evaluators and the online probe; a dashed line marks an evaluator's chance);
  * with several workdirs, their curves overlaid in one figure, `W/metrics_overlay.png` of the
    first workdir (or `--out`), one colour per run;
  * for a MAE / ccMIM / SimMIM workdir with a checkpoint, `W/reconstructions.png`: original,
    masked input, reconstruction, and the reconstruction with the visible pixels pasted back
    (images from the run's own data source, centre crops; `--reconstructions=false` skips it).
Workdirs may be buckets (`gs://`). A missing or empty metrics.jsonl is one line of error, exit 2.

Every function builds a `matplotlib.figure.Figure` directly (no pyplot state), so notebooks can
display the returned figures and scripts can save them (`save_figure`); nothing here changes the
global matplotlib backend. Figure functions take host arrays: images [H, W, 3] (uint8, or float
in [0, 1]), segment ids [H, W] int (−1 = ignored), boxes (y0, x0, y1, x1) in pixels.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ssl_jax.errors import UserError

# Panels a metrics figure shows by default: these first, then every metric ending in "top1".
DEFAULT_METRICS = ("loss", "lr", "img/s")
MIM_METHODS = ("mae", "ccmim", "simmim")
# A fixed, high-contrast palette (tab20 without its pale half), repeated for more ids.
_SEGMENT_COLORS = np.array([
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50),
    (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (0.00, 0.00, 0.55), (0.60, 0.90, 0.20),
    (1.00, 0.85, 0.00), (0.40, 0.00, 0.40), (0.00, 0.50, 0.50), (0.90, 0.60, 0.40)])


class PlotError(UserError, ValueError):
  """Nothing to plot: a workdir without metrics, or a metric no run logged."""


# ---------------------------------------------------------------------------------------------
# Metrics curves

def load_history(workdir: str) -> list[dict]:
  """The JSON objects of `workdir/metrics.jsonl` in file order. Raises PlotError if absent/empty."""
  from ssl_jax import metrics  # pylint: disable=import-outside-toplevel
  try:
    history = metrics.read_metrics(workdir)
  except FileNotFoundError as e:
    raise PlotError(f"--workdir={workdir}: no metrics.jsonl there (a training or evaluation run "
                    "writes it at its first log step)") from e
  if not history:
    raise PlotError(f"--workdir={workdir}: metrics.jsonl is empty (no step logged yet)")
  return history


def default_metrics(histories: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
  """loss, lr, img/s (those logged), then every `*top1` metric of any run, sorted."""
  present = {k for h in histories for m in h for k in m}
  top1 = sorted(k for k in present if k.endswith("top1"))
  return [k for k in DEFAULT_METRICS if k in present] + top1


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric: every line holding a finite number for `key`, by step
  (a resumed run may log a step twice: the last line wins)."""
  points: dict[int, float] = {}
  for m in history:
    v = m.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      points[int(m["step"])] = float(v)
  steps = np.array(sorted(points), dtype=np.int64)
  return steps, np.array([points[s] for s in steps], dtype=np.float64)


def _chance(histories: Sequence[Sequence[Mapping[str, Any]]], key: str) -> Optional[float]:
  """An evaluator's chance level (`<name>/chance`) for `<name>/top1`, if logged."""
  if not key.endswith("/top1"):
    return None
  name = key[:-len("/top1")] + "/chance"
  for h in histories:
    for m in h:
      if name in m:
        return float(m[name])
  return None


def metrics_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]],
                   keys: Optional[Sequence[str]] = None, columns: int = 3,
                   title: str = "") -> Figure:
  """One panel per metric, one line per run (overlaid, a legend names the runs).

  Args:
    runs: {label: metrics history (`load_history`)}, in legend order.
    keys: metrics to show (default `default_metrics`); a key no run logged is a PlotError.
    columns: panels per row.
    title: figure title.
  Returns:
    The Figure; panel k holds one Line2D per run that logged keys[k], plus a dashed chance line
    for an evaluator's top-1 (`<name>/chance` logged). Evaluations logged only at a few steps are
    drawn with markers.
  """
  if not runs:
    raise PlotError("no runs to plot")
  histories = list(runs.values())
  keys = list(keys) if keys else default_metrics(histories)
  if not keys:
    raise PlotError("the runs logged none of the default metrics "
                    f"({', '.join(DEFAULT_METRICS)}, *top1); name some with --metrics")
  missing = [k for k in keys if not any(len(series(h, k)[0]) for h in histories)]
  if missing:
    logged = sorted({k for h in histories for m in h for k in m} - {"step"})
    raise PlotError(f"no run logged {missing}; logged metrics: {', '.join(logged)}")
  columns = max(1, min(columns, len(keys)))
  rows = -(-len(keys) // columns)
  fig = Figure(figsize=(4.6 * columns, 3.3 * rows), layout="constrained")
  FigureCanvasAgg(fig)
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for i, key in enumerate(keys):
    ax = fig.add_subplot(rows, columns, i + 1)
    for (label, history), color in zip(runs.items(), colors):
      steps, values = series(history, key)
      if not len(steps):
        continue
      few = len(steps) <= 12
      ax.plot(steps, values, color=color, label=label, marker="o" if few else None,
              markersize=4, linewidth=1.6)
    chance = _chance(histories, key)
    if chance is not None:
      ax.axhline(chance, color="0.45", linestyle="--", linewidth=1.0, label="chance")
    ax.set_title(key, fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if key == "lr":
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(runs) > 1 or chance is not None:
      ax.legend(fontsize=8, loc="best")
  if title:
    fig.suptitle(title, fontsize=12)
  return fig


def save_figure(fig: Figure, path: str, dpi: int = 110) -> str:
  """Writes `fig` as PNG to `path` (a local path or a bucket object); returns the path."""
  from ssl_jax import paths  # pylint: disable=import-outside-toplevel
  with paths.local_output(path) as local:
    fig.savefig(local, dpi=dpi, format="png")
  return path


# ---------------------------------------------------------------------------------------------
# Images, masks, boxes

def to_unit(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] or float [0, 1] image -> float32 in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return np.clip(image.astype(np.float32), 0.0, 1.0)


def unnormalize(x: np.ndarray) -> np.ndarray:
  """ImageNet-normalised pixels [..., 3] -> [0, 1] (clipped): what the networks saw, shown."""
  from ssl_jax.data import augment  # pylint: disable=import-outside-toplevel
  x = np.asarray(x, np.float32) * np.asarray(augment.IMAGENET_STD, np.float32)
  return np.clip(x + np.asarray(augment.IMAGENET_MEAN, np.float32), 0.0, 1.0)


def segment_colors(mask: np.ndarray) -> np.ndarray:
  """[H, W] segment ids -> [H, W, 4] RGBA: id k gets palette colour k (so one id has one colour
  in every view of an image, as DetCon's ids are shared), ids < 0 are transparent."""
  mask = np.asarray(mask)
  rgba = np.zeros(mask.shape + (4,), np.float32)
  valid = mask >= 0
  rgba[valid, :3] = _SEGMENT_COLORS[mask[valid] % len(_SEGMENT_COLORS)]
  rgba[valid, 3] = 1.0
  return rgba


def segment_boundaries(mask: np.ndarray) -> np.ndarray:
  """[H, W] bool: pixels whose right or lower neighbour has another id."""
  mask = np.asarray(mask)
  edge = np.zeros(mask.shape, bool)
  edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
  edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
  return edge


def overlay_segments(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45,
                     boundaries: bool = True) -> np.ndarray:
  """The image with each segment tinted in its colour (and boundaries in white): [H, W, 3] in
  [0, 1]. Ignored pixels (id < 0) keep the image."""
  image, mask = to_unit(image), np.asarray(mask)
  if image.shape[:2] != mask.shape:
    raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
  rgba = segment_colors(mask)
  a = alpha * rgba[..., 3:]
  out = image * (1 - a) + rgba[..., :3] * a
  if boundaries:
    out[segment_boundaries(mask)] = 1.0
  return out


def image_grid(images: Sequence[Sequence[Optional[np.ndarray]]],
               titles: Optional[Sequence[Sequence[str]]] = None,
               row_labels: Optional[Sequence[str]] = None, size: float = 2.4,
               title: str = "") -> Figure:
  """A grid of images without axes: images[r][c] (None leaves a cell empty).

  Returns the Figure; its axes are row-major (`fig.axes[r * columns + c]`), so callers can draw
  on a cell (`draw_boxes(fig.axes[k], ...)`).
  """
  rows = len(images)
  columns = max(len(r) for r in images) if rows else 0
  if not rows or not columns:
    raise ValueError("image_grid: no images")
  fig = Figure(figsize=(size * columns + (0.6 if row_labels else 0), size * rows + 0.35),
               layout="constrained")
  FigureCanvasAgg(fig)
  for r, row in enumerate(images):
    for c in range(columns):
      ax = fig.add_subplot(rows, columns, r * columns + c + 1)
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      im = row[c] if c < len(row) else None
      if im is not None:
        im = np.asarray(im)
        ax.imshow(im, cmap=None if im.ndim == 3 else "viridis", interpolation="nearest")
      if titles and r < len(titles) and c < len(titles[r]) and titles[r][c]:
        ax.set_title(titles[r][c], fontsize=9)
      if row_labels and c == 0 and r < len(row_labels):
        ax.set_ylabel(row_labels[r], fontsize=9)
  if title:
    fig.suptitle(title, fontsize=11)
  return fig


def draw_boxes(ax, boxes: np.ndarray, colors: Sequence[str] | str = "red",
               linewidth: float = 1.5, labels: Optional[Sequence[str]] = None) -> None:
  """Draws (y0, x0, y1, x1) pixel boxes as rectangle outlines on an image axis."""
  from matplotlib.patches import Rectangle  # pylint: disable=import-outside-toplevel
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if isinstance(colors, str):
    colors = [colors] * len(boxes)
  for k, (y0, x0, y1, x1) in enumerate(boxes):
    # imshow puts pixel (r, c) at [c - 0.5, c + 0.5]: pixel edges are at -0.5 offsets.
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor=colors[k], linewidth=linewidth))
    if labels and k < len(labels) and labels[k]:
      ax.text(x0 - 0.5, y0 - 1.5, labels[k], color=colors[k], fontsize=7, va="bottom")


def patch_mask_to_pixels(mask: np.ndarray, grid: Sequence[int], patch_size: int) -> np.ndarray:
  """[N] or [B, N] per-patch values (row-major grid) -> [h·p, w·p] or [B, h·p, w·p]."""
  mask = np.asarray(mask)
  h, w = grid
  if mask.shape[-1] != h * w:
    raise ValueError(f"mask has {mask.shape[-1]} patches, grid {tuple(grid)} has {h * w}")
  x = mask.reshape(mask.shape[:-1] + (h, w))
  return np.repeat(np.repeat(x, patch_size, axis=-2), patch_size, axis=-1)


def masked_image(image: np.ndarray, pixel_mask: np.ndarray, fill: float = 0.5) -> np.ndarray:
  """The image with masked pixels (True) set to grey `fill`: what a MIM encoder does not see."""
  out = to_unit(image).copy()
  out[np.asarray(pixel_mask, bool)] = fill
  return out


def reconstruction_figure(images: np.ndarray, pixel_masks: np.ndarray,
                          reconstructions: np.ndarray, title: str = "") -> Figure:
  """MAE's visualisation, one row per example: original | masked input | reconstruction |
  reconstruction with the visible pixels pasted back.

  Args:
    images: [B, H, W, 3] in [0, 1] (or uint8).
    pixel_masks: [B, H, W] bool, True = masked.
    reconstructions: [B, H, W, 3] in [0, 1].
  """
  images = np.asarray(images)
  if not (images.shape[:3] == np.shape(pixel_masks) == np.shape(reconstructions)[:3]):
    raise ValueError(f"images {images.shape}, pixel_masks {np.shape(pixel_masks)} and "
                     f"reconstructions {np.shape(reconstructions)} must share [B, H, W]")
  rows = []
  for x, m, r in zip(images, np.asarray(pixel_masks, bool), np.asarray(reconstructions)):
    x, r = to_unit(x), to_unit(r)
    rows.append([x, masked_image(x, m), r, np.where(m[..., None], r, x)])
  heads = ["original", "masked input", "reconstruction", "visible + reconstruction"]
  return image_grid(rows, titles=[heads] + [[""] * 4] * (len(rows) - 1), title=title)


def pca_figure(features: np.ndarray, labels: np.ndarray,
               class_names: Optional[Sequence[str]] = None, title: str = "") -> Figure:
  """Features [N, D] projected on their first two principal components, coloured by label."""
  x = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if x.ndim != 2 or x.shape[0] != labels.shape[0] or x.shape[0] < 2:
    raise ValueError(f"features {x.shape} must be [N >= 2, D] with one label each "
                     f"(labels {labels.shape})")
  x = x - x.mean(axis=0)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  proj = x @ vt[:2].T if vt.shape[0] >= 2 else np.concatenate([x @ vt[:1].T,
                                                             np.zeros((len(x), 1))], 1)
  explained = s[:2] ** 2 / max(np.sum(s ** 2), 1e-12)
  fig = Figure(figsize=(6.4, 4.8), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for k in np.unique(labels):
    sel = labels == k
    name = class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k)
    ax.scatter(proj[sel, 0], proj[sel, 1], s=16, color=f"C{int(k) % 10}", label=name,
               marker="o" if k < 10 else "^")
  ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f} % of variance)")
  ax.set_ylabel(f"PC 2 ({100 * (explained[1] if len(explained) > 1 else 0):.0f} %)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  if title:
    ax.set_title(title, fontsize=11)
  return fig


# ---------------------------------------------------------------------------------------------
# Reconstructions of MAE / ccMIM / SimMIM

def predicted_patches(pred: np.ndarray, target_patches: np.ndarray, norm_pix: bool) -> np.ndarray:
  """MAE decoder outputs [B, N, P] -> patches in the target's (normalised-image) space.

  With norm-pix targets the network predicts t̂ = (t − mean(t)) / √(var(t) + 1e-6) per patch
  (`losses.masked_patch_mse`, unbiased variance); MAE's visualisation undoes it with the true
  patch's statistics: pred · √(var(t) + 1e-6) + mean(t).
  """
  pred = np.asarray(pred, np.float64)
  if not norm_pix:
    return pred
  target = np.asarray(target_patches, np.float64)
  mean = target.mean(-1, keepdims=True)
  var = target.var(-1, keepdims=True, ddof=1)
  return pred * np.sqrt(var + 1e-6) + mean


def mim_reconstructions(config, params, state, images: np.ndarray, seed: int = 0) -> dict:
  """Masks and reconstructions of a MAE / ccMIM / SimMIM network on fixed images.

  Args:
    config: the run's config (`weights.workdir_config(W)`), method mae, ccmim or simmim.
    params, state: the train state's `params` and `state` (`checkpoint.load_state`).
    images: [B, S, S, 3] uint8 at `config.data.image_size` (no augmentation is applied: the MIM
      recipes have no colour augmentation; crops are the caller's).
    seed: the masking key.
  Returns:
    {"images" [B, S, S, 3], "pixel_mask" [B, S, S] bool (True = masked), "reconstruction"
    [B, S, S, 3]}, pixels in [0, 1]. MAE/ccMIM predict norm-pix targets: each predicted patch is
    brought back to pixels with the true patch's mean and variance (MAE's visualisation), so
    colour and brightness of the masked patches come from the image, their structure from the
    network. ccMIM masks as in training (importance sampling from the current weights).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ssl_jax.methods import base  # pylint: disable=import-outside-toplevel
  from ssl_jax.models import vit  # pylint: disable=import-outside-toplevel
  method = config.method
  if method not in MIM_METHODS:
    raise PlotError(f"reconstructions need a MIM run ({', '.join(MIM_METHODS)}); "
                    f"config.method={method!r}")
  images = np.asarray(images)
  size = int(config.data.image_size)
  if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [B, {size}, {size}, 3] (config.data.image_size), got "
                     f"{images.dtype} {images.shape}")
  rng = jax.random.PRNGKey(seed)
  batch = {"image": jnp.asarray(images[:, None])}
  if method in ("mae", "ccmim"):
    if method == "mae":
      from ssl_jax.methods import mae  # pylint: disable=import-outside-toplevel
      forward, backbone, _ = mae.make_forward(config)
      out = jax.jit(forward)(params, batch, rng)
    else:
      from ssl_jax.methods import ccmim  # pylint: disable=import-outside-toplevel
      forward, _, backbone = ccmim.make_forward(config)
      out, _ = jax.jit(forward)(params, state, batch, rng)
    p = int(backbone.patch_size)
    grid = (size // p, size // p)
    pred = predicted_patches(out["pred"], out["target_patches"], config.method_args.norm_pix_loss)
    recon = np.asarray(vit.unpatchify(jnp.asarray(pred, jnp.float32), p, grid))
    pixel_mask = patch_mask_to_pixels(np.asarray(out["masking"].mask), grid, p)
    shown = np.asarray(out["x"])
  else:
    from ssl_jax.methods import simmim  # pylint: disable=import-outside-toplevel
    net = simmim.SimMIMNet(base.make_backbone(config), dtype=base.compute_dtype(config))
    p = int(net.backbone.patch_size)
    grid = (size // p, size // p)

    @jax.jit
    def forward(params, stats, images, rng):
      x = base.normalized(images)
      token_mask = simmim.random_mask(rng, x.shape[0], config, net.backbone)
      variables = {"params": params, **({"batch_stats": stats} if stats else {})}
      return x, token_mask, net.apply(variables, x, token_mask, train=False)["pred"]

    shown, token_mask, pred = forward(params, (state or {}).get("batch_stats", {}),
                                      batch["image"][:, 0], rng)
    pixel_mask = patch_mask_to_pixels(np.asarray(token_mask), grid, p)
    recon, shown = np.asarray(pred), np.asarray(shown)
  return {"images": unnormalize(shown), "pixel_mask": pixel_mask.astype(bool),
          "reconstruction": unnormalize(recon)}


def eval_images(config, count: int) -> np.ndarray:
  """The first `count` images of a run's training source as centre crops at its image size,
  uint8 [count, S, S, 3] (what `reconstructions` shows)."""
  from ssl_jax import registry  # pylint: disable=import-outside-toplevel
  from ssl_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  source = registry.get_source(config.data.source, **config.data.source_args.to_dict())
  view = pipeline.EvalView(int(config.data.image_size))
  out = []
  # Spread over the source (the built-in photos list crops photo by photo).
  for i in np.linspace(0, len(source) - 1, num=min(count, len(source))).astype(int):
    rec = view.map(source[int(i)])
    if "error" not in rec:
      out.append(rec["image"])
  if not out:
    raise PlotError(f"config.data.source={config.data.source!r} gave no readable image")
  return np.stack(out)


# ---------------------------------------------------------------------------------------------
# The CLI's work

def _label(workdir: str) -> str:
  return os.path.basename(str(workdir).rstrip("/")) or str(workdir)


def write_plots(workdirs: Sequence[str], keys: Optional[Sequence[str]] = None,
                out: Optional[str] = None, reconstructions: bool = True,
                num_images: int = 4) -> list[str]:
  """Writes the CLI's PNGs (module docstring) and returns their paths."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  if not workdirs:
    raise PlotError("give at least one --workdir")
  histories = {}
  for w in workdirs:
    label = _label(w)
    while label in histories:  # two workdirs with the same folder name
      label += "'"
    histories[label] = (w, load_history(w))
  written = []
  for label, (w, history) in histories.items():
    fig = metrics_figure({label: history}, keys, title=str(w))
    written.append(save_figure(fig, str(epath.Path(w) / "metrics.png")))
  if len(workdirs) > 1:
    fig = metrics_figure({label: h for label, (_, h) in histories.items()}, keys)
    target = out or str(epath.Path(workdirs[0]) / "metrics_overlay.png")
    written.append(save_figure(fig, target))
  elif out:
    raise PlotError("--out names the overlay of several workdirs; with one workdir the figure "
                    "is written to <workdir>/metrics.png")
  if reconstructions:
    for w in workdirs:
      path = _write_reconstructions(w, num_images)
      if path:
        written.append(path)
  return written


def _write_reconstructions(workdir: str, num_images: int) -> Optional[str]:
  """W/reconstructions.png for a MIM run with a checkpoint; None for other runs."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  from ssl_jax import checkpoint, weights  # pylint: disable=import-outside-toplevel
  if not (epath.Path(workdir) / "config.json").exists():
    return None
  config = weights.workdir_config(workdir)
  if config.get("method") not in MIM_METHODS or checkpoint.latest_step(workdir) is None:
    return None
  step, ts = checkpoint.load_state(workdir)
  rec = mim_reconstructions(config, ts["params"], ts["state"], eval_images(config, num_images))
  fig = reconstruction_figure(rec["images"], rec["pixel_mask"], rec["reconstruction"],
                              title=f"{config.method}, step {step}: {workdir}")
  return save_figure(fig, str(epath.Path(workdir) / "reconstructions.png"))


def main(argv) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ssl_jax import cli  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  keys = [k for k in (f.metrics or []) if k]
  for path in write_plots(f.workdir or [], keys or None, f.out, f.reconstructions):
    print(f"wrote {path}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_multi_string("workdir", None, "Run folder holding metrics.jsonl; repeat the flag "
                            "to overlay several runs.")
  flags.DEFINE_list("metrics", [], "Metrics to plot (default: loss, lr, img/s, every *top1).")
  flags.DEFINE_string("out", None, "The overlay figure of several workdirs (default "
                      "<first workdir>/metrics_overlay.png).")
  flags.DEFINE_bool("reconstructions", True, "Also draw W/reconstructions.png for MAE, ccMIM and "
                    "SimMIM runs with a checkpoint.")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  from ssl_jax import cli as _cli  # pylint: disable=import-outside-toplevel
  _define_flags()
  _cli.run(main)
