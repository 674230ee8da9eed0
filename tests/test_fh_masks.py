"""FH mask precompute: exact masks, resumable byte-identical shards, ids > 255, bad inputs, a stale
--out refused, per-record exceptions as error entries, the pixel cap, a shard per process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from skimage.segmentation import felzenszwalb

from ssl_jax.data import fh_masks
from ssl_jax.data import records
from ssl_jax.data import sources
from tests import fixtures_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder):
  return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_builtin_photos_masks_equal_felzenszwalb(tmp_path):
  args = {"split": "train", "num_per_photo": 2, "crop_size": 32}
  meta = fh_masks.precompute("builtin_photos", args, str(tmp_path), scales=[50, 100],
                             min_sizes=[20], records_per_shard=7, progress=False)
  src = sources.BuiltinPhotos(**args)
  assert meta["num_records"] == 20 and meta["num_shards"] == 3 and meta["counts"]["failed"] == 0
  assert [s["num_records"] for s in meta["shards"]] == [6, 7, 7]  # balanced, each <= 7
  assert [s["first_index"] for s in meta["shards"]] == [0, 6, 13]
  assert meta["num_classes"] == 10
  for scale in (50, 100):
    ds = sources.make_source("fh_masks", path=str(tmp_path), scale=scale, min_size=20)
    counts = []
    for i in range(len(ds)):
      rec, ref = ds[i], src[i]
      assert rec["id"] == ref["id"] and rec["label"] == ref["label"]
      np.testing.assert_array_equal(rec["image"], ref["image"])
      expected = felzenszwalb(ref["image"], scale=scale, sigma=0.8, min_size=20)
      assert rec["masks"].dtype == np.int32
      np.testing.assert_array_equal(rec["masks"], expected)
      counts.append(int(expected.max()) + 1)
    summary = meta["segments"][f"{scale}_20"]
    assert summary["mean"] == pytest.approx(np.mean(counts), abs=1e-4)
    assert summary["median"] == np.median(counts) and summary["max"] == max(counts)


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("noise"))
  fixtures_images.make_noise_folder(root, n=10, side=40)
  return root


def test_resume_after_partial_run_is_byte_identical(noise_folder, tmp_path):
  kw = dict(scales=[1], min_sizes=[2, 5], records_per_shard=3, progress=False)
  full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
  fh_masks.precompute("image_folder", {"root": noise_folder}, full, **kw)
  # An interrupted run: shards 0 and 2 finished, shard 1 half-written under its temp name.
  fh_masks.precompute("image_folder", {"root": noise_folder}, resumed, shards=[0, 2], **kw)
  assert not os.path.exists(os.path.join(resumed, "metadata.json"))
  stale = os.path.join(resumed, f".{fh_masks.shard_name(1, 4)}.tmp-999")
  open(stale, "wb").write(b"partial")
  before = os.stat(os.path.join(resumed, fh_masks.shard_name(0, 4))).st_mtime_ns
  fh_masks.precompute("image_folder", {"root": noise_folder}, resumed, processes=2, **kw)
  assert os.stat(os.path.join(resumed, fh_masks.shard_name(0, 4))).st_mtime_ns == before
  assert _files(full) == _files(resumed)  # also: no temp file left
  assert sorted(_files(full)) == [fh_masks.shard_name(k, 4) for k in range(4)] + [
      "metadata.json", "settings.json"]


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory):
  # 24 images of 128 px: FH with scale 1 / min_size 2 takes tens of ms each, so the run lasts
  # long after its first shard appears and the kill lands mid-run.
  root = str(tmp_path_factory.mktemp("slow"))
  fixtures_images.make_noise_folder(root, n=24, side=128)
  return root


def _finished_shards(folder):
  return sorted(f for f in os.listdir(folder) if f.endswith(".array_record") and f[0] != ".")


def test_cli_killed_midway_then_rerun(slow_folder, tmp_path):
  out = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "ssl_jax.data.fh_masks", "--source=image_folder",
         f"--source_args=root={slow_folder}", f"--out={out}", "--scales=1", "--min_sizes=2",
         "--records_per_shard=1", "--processes=1"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(out) and _finished_shards(out):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  proc.wait()
  # The kill must have happened mid-run: killed (not finished on its own), some shards done,
  # not all, no metadata. Otherwise this test would not test resumption at all.
  assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout.read()[-2000:])
  finished = _finished_shards(out)
  assert 1 <= len(finished) < 24 and "metadata.json" not in os.listdir(out), finished
  rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "segments per image" in rerun.stdout
  ref = str(tmp_path / "ref")
  fh_masks.precompute("image_folder", {"root": slow_folder}, ref, scales=[1], min_sizes=[2],
                      records_per_shard=1, progress=False)
  assert _files(ref) == _files(out)


def test_ids_above_255_survive(tmp_path):
  from PIL import Image
  image = fixtures_images.noise_image(40, seed=3)
  os.makedirs(tmp_path / "in" / "a")
  Image.fromarray(image).save(tmp_path / "in" / "a" / "noise.png")
  out = str(tmp_path / "out")
  fh_masks.precompute("image_folder", {"root": str(tmp_path / "in")}, out, scales=[1],
                      min_sizes=[2], progress=False)
  rec = sources.make_source("fh_masks", path=out, scale=1, min_size=2)[0]
  expected = felzenszwalb(image, scale=1, sigma=0.8, min_size=2)
  assert expected.max() > 300
  np.testing.assert_array_equal(rec["masks"], expected)


def test_too_many_segments_is_an_error_entry(tmp_path):
  with pytest.raises(ValueError, match="rec7.*below 65536"):
    records.encode_mask(np.arange(70000).reshape(280, 250), "rec7")
  ids = np.array([[0, 255, 256, 65535]])
  np.testing.assert_array_equal(records.decode_mask(records.encode_mask(ids)), ids)
  from PIL import Image
  os.makedirs(tmp_path / "in" / "a")
  Image.fromarray(fixtures_images.noise_image(260)).save(tmp_path / "in" / "a" / "many.png")
  Image.fromarray(fixtures_images.noise_image(16)).save(tmp_path / "in" / "a" / "ok.png")
  out = str(tmp_path / "out")
  meta = fh_masks.precompute("image_folder", {"root": str(tmp_path / "in")}, out,
                             scales=[1e-6], min_sizes=[1], progress=False)
  assert meta["counts"] == {"images": 1, "failed": 1, "capped": 0}
  assert [(f["index"], f["id"]) for f in meta["failures"]] == [(0, "a/many.png")]
  ds = sources.make_source("fh_masks", path=out, scale=1e-6, min_size=1)
  assert "error" in ds[0] and ds[0]["id"] == "a/many.png" and "65536" in ds[0]["error"]
  assert ds[1]["masks"].shape == (16, 16)


def test_bad_folder_runs_to_completion(tmp_path):
  cases = fixtures_images.make_bad_image_folder(str(tmp_path / "in"), large_side=1600)
  out = str(tmp_path / "out")
  meta = fh_masks.precompute("image_folder", {"root": str(tmp_path / "in")}, out,
                             scales=[100], min_sizes=[20], max_side=256, records_per_shard=5,
                             progress=False)
  bad = sorted(k for k, v in cases.items() if v[0] == "error")
  assert meta["counts"] == {"images": len(cases) - len(bad), "failed": len(bad), "capped": 0}
  assert sorted(f["id"] for f in meta["failures"]) == bad
  assert meta["max_side"] == 256
  ds = sources.make_source("fh_masks", path=out, scale=100, min_size=20)
  folder = sources.ImageFolder(str(tmp_path / "in"))
  skipped = 0
  for i in range(len(ds)):
    rec = ds[i]
    if sources.skip_reason(rec):
      skipped += 1
      assert rec["id"] in bad
      continue
    np.testing.assert_array_equal(rec["image"], folder[i]["image"])  # same decode policy
    assert rec["masks"].shape == rec["image"].shape[:2]
    n = rec["masks"].max() + 1
    assert set(np.unique(rec["masks"])) == set(range(n))  # ids stay contiguous after upsizing
    if rec["id"].endswith("flat.png"):
      assert n == 1
    if rec["id"].endswith("tiny.png") or rec["id"].endswith("grey.png"):
      # Below max_side: FH ran at full resolution, exactly as skimage.
      np.testing.assert_array_equal(
          rec["masks"], felzenszwalb(rec["image"], scale=100, sigma=0.8, min_size=20))
  assert skipped == len(bad) == 4


def test_max_side_caps_fh_resolution():
  image = fixtures_images.noise_image(64)
  full = fh_masks.felzenszwalb_masks(image, 100, 20, max_side=64)
  np.testing.assert_array_equal(full, felzenszwalb(image, scale=100, sigma=0.8, min_size=20))
  capped = fh_masks.felzenszwalb_masks(image, 100, 20, max_side=16)
  assert capped.shape == (64, 64)
  # Each FH cell at 16 px becomes a 4x4 block at 64 px (nearest upsizing).
  np.testing.assert_array_equal(capped, np.kron(capped[::4, ::4], np.ones((4, 4), np.int32)))


@pytest.mark.parametrize("text,expected", [
    ("", {}),
    ("name=imagenet2012,split=train[:1%]", {"name": "imagenet2012", "split": "train[:1%]"}),
    ("num_per_photo=8,crop_size=48,flag=true,x=0.5", {"num_per_photo": 8, "crop_size": 48,
                                                       "flag": True, "x": 0.5}),
])
def test_parse_source_args(text, expected):
  assert fh_masks.parse_source_args(text) == expected


def test_parse_source_args_rejects_bare_item():
  with pytest.raises(ValueError, match="'oops' is not key=value"):
    fh_masks.parse_source_args("a=1,oops")


def test_fh_dataset_precompute_cache(tmp_path):
  kw = dict(path="", scale=50, min_size=20, precompute_from="builtin_photos",
            precompute_args={"split": "train", "num_per_photo": 1, "crop_size": 24},
            cache_dir=str(tmp_path))
  ds = sources.make_source("fh_masks", **kw)
  assert len(ds) == 10 and ds.num_classes == 10 and ds[3]["masks"].shape == (24, 24)
  meta = os.path.join(ds.path, "metadata.json")
  mtime = os.stat(meta).st_mtime_ns
  again = sources.make_source("fh_masks", **kw)
  assert again.path == ds.path and os.stat(meta).st_mtime_ns == mtime  # reused, not recomputed
  with pytest.raises(ValueError, match="(?s)source_args.path is empty.*python -m ssl_jax.data.fh_masks.*precompute_from="):
    sources.make_source("fh_masks", path="")


# --- a stale --out is refused ------------------------------------------------------------------

def test_stale_out_is_refused(noise_folder, tmp_path):
  kw = dict(records_per_shard=4, progress=False)
  out = str(tmp_path / "out")
  # An interrupted run (shard 0 of 3 written) and a finished one are both protected.
  fh_masks.precompute("image_folder", {"root": noise_folder}, out, scales=[1], min_sizes=[2],
                      shards=[0], **kw)
  for change, field, held, asked in [
      (dict(scales=[5], min_sizes=[2]), "scales", "[1]", "[5]"),
      (dict(scales=[1], min_sizes=[3]), "min_sizes", "[2]", "[3]"),
      (dict(scales=[1], min_sizes=[2], max_side=16), "max_side", "0", "16"),
      (dict(scales=[1], min_sizes=[2], max_pixels=100), "max_pixels", str(2**24), "100")]:
    with pytest.raises(fh_masks.StaleOutputError) as e:
      fh_masks.precompute("image_folder", {"root": noise_folder}, out, **change, **kw)
    msg = str(e.value)
    assert f"--out={out}" in msg and f"{field}: holds {held}, asked {asked}" in msg, msg
    assert "another --out" in msg
  # Another source (same length): refused too, naming both source_args.
  other = str(tmp_path / "other")
  fixtures_images.make_noise_folder(other, n=10, side=40)
  with pytest.raises(fh_masks.StaleOutputError, match=f"source_args: holds .*{noise_folder}"
                                                      f".*asked .*{other}"):
    fh_masks.precompute("image_folder", {"root": other}, out, scales=[1], min_sizes=[2], **kw)
  assert _finished_shards(out) == [fh_masks.shard_name(0, 3)]  # nothing was touched
  # The same settings resume; the finished folder then refuses other settings as well.
  meta = fh_masks.precompute("image_folder", {"root": noise_folder}, out, scales=[1],
                             min_sizes=[2], **kw)
  assert meta["counts"]["failed"] == 0
  with pytest.raises(fh_masks.StaleOutputError, match="scales: holds \\[1\\], asked \\[5\\]"):
    fh_masks.precompute("image_folder", {"root": noise_folder}, out, scales=[5], min_sizes=[2],
                        **kw)
  # Shards nothing describes (an older version, another tool): refused, not guessed.
  os.remove(os.path.join(out, "settings.json"))
  os.remove(os.path.join(out, "metadata.json"))
  with pytest.raises(fh_masks.StaleOutputError, match="holds 3 FH shards.*no settings.json"):
    fh_masks.precompute("image_folder", {"root": noise_folder}, out, scales=[1], min_sizes=[2],
                        **kw)


def test_stale_out_cli_is_one_line_exit_2(noise_folder, tmp_path):
  out = str(tmp_path / "out")
  fh_masks.precompute("image_folder", {"root": noise_folder}, out, scales=[1], min_sizes=[2],
                      progress=False)
  cmd = [sys.executable, "-m", "ssl_jax.data.fh_masks", "--source=image_folder",
         f"--source_args=root={noise_folder}", f"--out={out}", "--scales=500", "--min_sizes=2"]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2, run.stderr[-2000:]
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --out={out} already holds"), lines
  assert "scales: holds [1], asked [500]" in lines[0] and "Traceback" not in run.stderr


# --- any exception inside one record becomes its error entry -----------------------------------

def test_any_exception_in_one_record_is_an_error_entry(noise_folder, tmp_path, monkeypatch):
  folder = sources.ImageFolder(noise_folder)
  ids = [folder[i]["id"] for i in range(len(folder))]
  fh = fh_masks.felzenszwalb_masks
  victim = folder[2]["image"]

  def felzenszwalb_masks(image, *args, **kwargs):
    if np.array_equal(image, victim):
      raise MemoryError("cannot allocate 80 GB")
    return fh(image, *args, **kwargs)

  get = sources.ImageFolder.get

  def flaky_get(self, i, with_encoded=False):
    if i == 6:
      raise OSError("stale NFS handle")
    return get(self, i, with_encoded)

  monkeypatch.setattr(fh_masks, "felzenszwalb_masks", felzenszwalb_masks)
  monkeypatch.setattr(sources.ImageFolder, "get", flaky_get)
  out = str(tmp_path / "out")
  meta = fh_masks.precompute("image_folder", {"root": noise_folder}, out, scales=[1],
                             min_sizes=[2], records_per_shard=100, progress=False)
  monkeypatch.undo()
  assert meta["num_shards"] == 1 and meta["counts"] == {"images": 8, "failed": 2, "capped": 0}
  assert meta["failures"] == [
      {"index": 2, "id": ids[2], "error": "MemoryError: cannot allocate 80 GB"},
      {"index": 6, "id": "#6", "error": "OSError: stale NFS handle"}]
  ds = sources.make_source("fh_masks", path=out, scale=1, min_size=2)
  for i in range(len(ds)):  # the rest of the shard is intact and in place
    rec = ds[i]
    if i in (2, 6):
      assert "error" in rec and rec["id"] == ("#6" if i == 6 else ids[2])
      continue
    assert rec["id"] == ids[i]
    np.testing.assert_array_equal(rec["masks"], felzenszwalb(folder[i]["image"], scale=1,
                                                             sigma=0.8, min_size=2))


# --- oversize images: FH resolution capped, counted ---------------------------------------------

@pytest.mark.parametrize("h,w,max_side,max_pixels,expected", [
    (64, 48, 0, 0, (64, 48)),          # no limits
    (64, 48, 0, 4000, (64, 48)),       # below the cap
    (64, 48, 0, 1000, (37, 27)),       # sqrt(1000 / 3072) = 0.571
    (64, 48, 32, 0, (32, 24)),         # max_side only
    (64, 48, 32, 500, (26, 19)),       # both: the cap is the tighter
    (1, 5000, 0, 100, (1, 100)),       # a sliver keeps one row, the cap still holds
    (5000, 2, 0, 100, (100, 1)),
])
def test_fh_shape(h, w, max_side, max_pixels, expected):
  got = fh_masks.fh_shape(h, w, max_side, max_pixels)
  assert got == expected
  if max_pixels:
    assert got[0] * got[1] <= max_pixels


def test_oversize_image_is_capped_and_counted(tmp_path):
  from PIL import Image
  os.makedirs(tmp_path / "in" / "a")
  big, small = fixtures_images.noise_image(64, seed=1), fixtures_images.noise_image(16, seed=2)
  Image.fromarray(big).save(tmp_path / "in" / "a" / "big.png")
  Image.fromarray(small).save(tmp_path / "in" / "a" / "small.png")
  out = str(tmp_path / "out")
  meta = fh_masks.precompute("image_folder", {"root": str(tmp_path / "in")}, out, scales=[1],
                             min_sizes=[2], max_pixels=1024, progress=False)
  assert meta["counts"] == {"images": 2, "failed": 0, "capped": 1}
  assert meta["capped"] == [{"index": 0, "id": "a/big.png", "height": 64, "width": 64}]
  ds = sources.make_source("fh_masks", path=out, scale=1, min_size=2)
  capped = ds[0]["masks"]
  assert capped.shape == (64, 64)
  # FH ran on a 32 x 32 copy: every 2 x 2 block of the full-size ids is one id (nearest back).
  np.testing.assert_array_equal(capped, np.kron(capped[::2, ::2], np.ones((2, 2), np.int32)))
  small_copy = np.asarray(Image.fromarray(big).resize((32, 32), Image.Resampling.BILINEAR))
  assert capped.max() + 1 == len(np.unique(felzenszwalb(small_copy, scale=1, sigma=0.8,
                                                        min_size=2)))
  np.testing.assert_array_equal(ds[1]["masks"], felzenszwalb(small, scale=1, sigma=0.8,
                                                             min_size=2))  # below: untouched


# --- every process gets a shard -------------------------------------------------------------------

@pytest.mark.parametrize("n,per_shard,processes,expected", [
    (400, 1000, 2, 2),     # the case: both cores work
    (10, 1000, 4, 4),
    (3, 1000, 8, 3),       # never an empty shard
    (10, 3, 1, 4),         # records_per_shard still bounds the size
    (2500, 1000, 2, 3),
    (2500, 1000, 8, 8),
])
def test_plan_shards(n, per_shard, processes, expected):
  assert fh_masks.plan_shards(n, per_shard, processes) == expected
  bounds = fh_masks.shard_bounds(n, expected)
  sizes = [b - a for a, b in bounds]
  assert bounds[0][0] == 0 and bounds[-1][1] == n
  assert all(a == b for (_, a), (b, _) in zip(bounds, bounds[1:]))  # contiguous, in order
  assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and max(sizes) <= per_shard


def test_each_process_gets_a_shard(noise_folder, tmp_path, monkeypatch):
  pools = []
  get_context = fh_masks.multiprocessing.get_context

  class SpyContext:
    def __init__(self, method):
      self.ctx = get_context(method)

    def Pool(self, processes):  # pylint: disable=invalid-name
      pools.append(processes)
      return self.ctx.Pool(processes)

  monkeypatch.setattr(fh_masks.multiprocessing, "get_context", SpyContext)
  kw = dict(scales=[1], min_sizes=[2], progress=False)  # records_per_shard: default 1000
  out = str(tmp_path / "p2")
  meta = fh_masks.precompute("image_folder", {"root": noise_folder}, out, processes=2, **kw)
  assert pools == [2]
  assert meta["num_shards"] == 2 and [s["num_records"] for s in meta["shards"]] == [5, 5]
  # A rerun with another --processes keeps the layout it finds (resumes, no reshuffle).
  part = str(tmp_path / "part")
  fh_masks.precompute("image_folder", {"root": noise_folder}, part, processes=2, shards=[0],
                      **kw)
  fh_masks.precompute("image_folder", {"root": noise_folder}, part, processes=1, **kw)
  assert _files(part) == _files(out)
