"""ssl_jax.plots: metrics curves, overlays, patch masks, MIM reconstructions, the CLI's PNGs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from ssl_jax import plots  # noqa: E402
from tests.helpers import ROOT, load_config  # noqa: E402

HISTORY = [
    {"step": 0, "knn/top1": 0.25, "knn/chance": 0.1},
    {"step": 2, "loss": 3.0, "lr": 0.1, "img/s": 100.0, "probe_top1": 0.1},
    {"step": 4, "loss": 2.5, "lr": 0.2, "img/s": 120.0, "probe_top1": 0.2},
    {"step": 4, "loss": 2.0, "lr": 0.2, "img/s": 130.0, "probe_top1": 0.3},  # resumed: last wins
    {"step": 6, "loss": float("nan"), "lr": 0.1, "img/s": 125.0, "note": "x"},
    {"step": 8, "loss": 1.5, "lr": 0.05, "img/s": 128.0, "knn/top1": 0.5, "flag": True},
]


def _write_workdir(path, history=HISTORY):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for m in history:
      f.write(json.dumps(m) + "\n")
  return str(path)


def test_series_last_line_wins_and_skips_non_numbers():
  steps, values = plots.series(HISTORY, "loss")
  np.testing.assert_array_equal(steps, [2, 4, 8])     # step 6 is NaN: left out
  np.testing.assert_array_equal(values, [3.0, 2.0, 1.5])  # step 4 logged twice: the last
  assert plots.series(HISTORY, "flag")[0].size == 0   # booleans are not metrics
  assert plots.series(HISTORY, "absent")[0].size == 0


def test_default_metrics_and_figure_panels():
  other = [{"step": 0, "loss": 4.0, "linear/top1": 0.3}, {"step": 10, "loss": 1.0}]
  keys = plots.default_metrics([HISTORY, other])
  assert keys == ["loss", "lr", "img/s", "knn/top1", "linear/top1", "probe_top1"]
  fig = plots.metrics_figure({"a": HISTORY, "b": other})
  assert [ax.get_title() for ax in fig.axes] == keys
  loss_ax, knn_ax = fig.axes[0], fig.axes[3]
  lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
  assert set(lines) == {"a", "b"}
  np.testing.assert_array_equal(lines["a"].get_xdata(), [2, 4, 8])
  np.testing.assert_array_equal(lines["b"].get_ydata(), [4.0, 1.0])
  knn = {ln.get_label(): ln for ln in knn_ax.get_lines()}
  assert set(knn) == {"a", "chance"}  # b logged no kNN; the chance line from knn/chance
  np.testing.assert_allclose(knn["chance"].get_ydata(), [0.1, 0.1])


def test_metrics_figure_errors_name_the_metric():
  with pytest.raises(plots.PlotError, match="nope.*logged metrics: .*loss"):
    plots.metrics_figure({"a": HISTORY}, ["loss", "nope"])
  with pytest.raises(plots.PlotError, match="no runs"):
    plots.metrics_figure({})
  with pytest.raises(plots.PlotError, match="none of the default metrics"):
    plots.metrics_figure({"a": [{"step": 0, "other": 1.0}]})


def test_overlay_segments_matches_numpy_reference():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  mask = np.array([[0] * 5, [0, 0, 1, 1, 1], [2] * 5, [2, 2, -1, -1, 2], [3] * 5, [3] * 5])
  out = plots.overlay_segments(image, mask, alpha=0.4, boundaries=False)
  x = image / 255.0
  for r in range(6):
    for c in range(5):
      if mask[r, c] < 0:
        expected = x[r, c]  # ignored pixels keep the image
      else:
        expected = 0.6 * x[r, c] + 0.4 * plots._SEGMENT_COLORS[mask[r, c]]
      np.testing.assert_allclose(out[r, c], expected, atol=1e-6)
  edges = plots.segment_boundaries(mask)
  brute = np.zeros_like(edges)
  for r in range(6):
    for c in range(5):
      brute[r, c] = ((c + 1 < 5 and mask[r, c + 1] != mask[r, c])
                     or (r + 1 < 6 and mask[r + 1, c] != mask[r, c]))
  np.testing.assert_array_equal(edges, brute)
  with_edges = plots.overlay_segments(image, mask, alpha=0.4)
  np.testing.assert_array_equal(with_edges[edges], 1.0)
  # One id, one colour, whatever the view: colour k for id k (and k + palette size).
  np.testing.assert_array_equal(plots.segment_colors(np.array([[1, 1 + 16]]))[0, 0],
                                plots.segment_colors(np.array([[1]]))[0, 0])
  with pytest.raises(ValueError, match="differ in size"):
    plots.overlay_segments(image, mask[:5])


def test_patch_mask_to_pixels_is_row_major():
  mask = np.array([[1, 0, 0, 1, 1, 0]])  # grid 2 x 3, patch 2
  px = plots.patch_mask_to_pixels(mask, (2, 3), 2)
  assert px.shape == (1, 4, 6)
  for r in range(4):
    for c in range(6):
      assert px[0, r, c] == mask[0, (r // 2) * 3 + c // 2]
  with pytest.raises(ValueError, match="6 patches, grid"):
    plots.patch_mask_to_pixels(mask, (2, 2), 2)


def test_predicted_patches_undo_norm_pix():
  rng = np.random.default_rng(1)
  target = rng.normal(size=(2, 3, 12)) * 3 + 1
  mean = target.mean(-1, keepdims=True)
  var = target.var(-1, keepdims=True, ddof=1)  # MAE's norm-pix: unbiased variance
  perfect = (target - mean) / np.sqrt(var + 1e-6)
  np.testing.assert_allclose(plots.predicted_patches(perfect, target, True), target, atol=1e-9)
  np.testing.assert_array_equal(plots.predicted_patches(perfect, target, False), perfect)


def test_reconstruction_figure_pastes_visible_pixels():
  rng = np.random.default_rng(2)
  images = rng.random((2, 8, 8, 3))
  recon = rng.random((2, 8, 8, 3))
  masks = rng.random((2, 8, 8)) < 0.5
  fig = plots.reconstruction_figure(images, masks, recon)
  assert len(fig.axes) == 8
  pasted = fig.axes[7].get_images()[0].get_array()
  np.testing.assert_allclose(pasted, np.where(masks[1, ..., None], recon[1], images[1]))
  masked = fig.axes[1].get_images()[0].get_array()
  np.testing.assert_allclose(masked[masks[0]], 0.5)
  with pytest.raises(ValueError, match="must share"):
    plots.reconstruction_figure(images, masks[:, :4], recon)


def test_pca_figure_projects_on_principal_axes():
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(3), 10)
  feats = np.zeros((30, 5))
  feats[:, 2] = labels * 10.0 + rng.normal(size=30) * 0.1  # nearly all variance on one axis
  fig = plots.pca_figure(feats, labels, ["a", "b", "c"])
  ax = fig.axes[0]
  assert "PC 1 (100 %" in ax.get_xlabel()
  xs = [coll.get_offsets()[:, 0] for coll in ax.collections]
  assert len(xs) == 3 and abs(abs(xs[2].mean() - xs[0].mean()) - 20.0) < 0.5
  with pytest.raises(ValueError, match="one label each"):
    plots.pca_figure(feats, labels[:5])


def test_write_plots_single_and_overlay(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  a = _write_workdir(tmp_path / "run_a")
  b = _write_workdir(tmp_path / "run_b", [{"step": s, "loss": 5.0 / (s + 1)} for s in range(9)])
  written = plots.write_plots([a, b], ["loss"])
  assert written == [f"{a}/metrics.png", f"{b}/metrics.png", f"{a}/metrics_overlay.png"]
  for path in written:
    with Image.open(path) as im:
      assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
      pixels = np.asarray(im.convert("RGB"))
      assert pixels.std() > 5  # something was drawn
  with pytest.raises(plots.PlotError, match="no metrics.jsonl"):
    plots.write_plots([str(tmp_path / "nothing")])
  _write_workdir(tmp_path / "empty", [])
  with pytest.raises(plots.PlotError, match="empty"):
    plots.write_plots([str(tmp_path / "empty")])
  with pytest.raises(plots.PlotError, match="--out names the overlay"):
    plots.write_plots([a], out=str(tmp_path / "x.png"))


def test_cli_writes_pngs_and_fails_in_one_line(tmp_path):
  a = _write_workdir(tmp_path / "run_a")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "ssl_jax.plots", f"--workdir={a}"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  assert f"wrote {a}/metrics.png" in out.stdout
  assert os.path.getsize(f"{a}/metrics.png") > 10_000
  bad = subprocess.run([sys.executable, "-m", "ssl_jax.plots", f"--workdir={tmp_path}/none"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_mae_reconstructions_from_a_workdir(tmp_path):
  """A 2-step MAE run: W/reconstructions.png, masks hide 75 %, visible pixels are the image."""
  from ssl_jax import checkpoint, train, weights  # pylint: disable=import-outside-toplevel
  config = load_config("mae")
  config.train.total_steps = 2
  config.train.checkpoint_every_steps = 2
  config.train.log_every_steps = 1
  workdir = str(tmp_path / "mae")
  train.run(config, workdir)
  written = plots.write_plots([workdir])
  assert written == [f"{workdir}/metrics.png", f"{workdir}/reconstructions.png"]
  config = weights.workdir_config(workdir)
  _, ts = checkpoint.load_state(workdir)
  images = plots.eval_images(config, 3)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  rec = plots.mim_reconstructions(config, ts["params"], ts["state"], images)
  assert rec["pixel_mask"].shape == (3, 32, 32)
  np.testing.assert_allclose(rec["pixel_mask"].mean(axis=(1, 2)), 0.75)
  # The shown images are the inputs (no augmentation), back in [0, 1].
  np.testing.assert_allclose(rec["images"], images / 255.0, atol=2e-3)
  assert np.all((rec["reconstruction"] >= 0) & (rec["reconstruction"] <= 1))
  with pytest.raises(ValueError, match="uint8"):
    plots.mim_reconstructions(config, ts["params"], ts["state"], images.astype(np.float32))


@pytest.mark.parametrize("name,masked", [("simmim", 10 / 16), ("ccmim", 0.75)])
def test_simmim_and_ccmim_reconstructions_at_init(name, masked):
  """SimMIM: 60 % of 16 mask patches (8 px at 32 px) is ceil(9.6) = 10, as SimMIM's generator;
  ccMIM: 75 % of the patches. The shown images are the un-augmented inputs."""
  import jax  # pylint: disable=import-outside-toplevel
  from ssl_jax import registry  # pylint: disable=import-outside-toplevel
  from ssl_jax.methods import base  # pylint: disable=import-outside-toplevel
  config = load_config(name)
  method = registry.get_method(config.method).make(config)
  params, state = jax.jit(method.init)(jax.random.key(0, impl="rbg"),
                                       base.zeros_like_spec(method.batch_spec(config)))
  images = plots.eval_images(config, 2)
  rec = plots.mim_reconstructions(config, params, state, images)
  np.testing.assert_allclose(rec["pixel_mask"].mean(axis=(1, 2)), masked)
  np.testing.assert_allclose(rec["images"], images / 255.0, atol=2e-3)
  assert rec["reconstruction"].shape == images.shape
  fig = plots.reconstruction_figure(rec["images"], rec["pixel_mask"], rec["reconstruction"])
  assert len(fig.axes) == 8
