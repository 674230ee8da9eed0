"""FH mask precompute: exact masks, resumable byte-identical shards, ids > 255, bad inputs."""
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
  assert [s["num_records"] for s in meta["shards"]] == [7, 7, 6]
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
  assert len(_files(full)) == 5


def test_cli_killed_midway_then_rerun(noise_folder, tmp_path):
  out = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "ssl_jax.data.fh_masks", "--source=image_folder",
         f"--source_args=root={noise_folder}", f"--out={out}", "--scales=1", "--min_sizes=2",
         "--records_per_shard=1", "--processes=1"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(out) and any(f.endswith(".array_record") and not f.startswith(".")
                                  for f in os.listdir(out)):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait()
  if proc.returncode == -signal.SIGKILL:  # killed mid-run (not after it finished on its own)
    finished = [f for f in os.listdir(out) if f.endswith(".array_record") and f[0] != "."]
    assert 1 <= len(finished) < 10 and "metadata.json" not in os.listdir(out)
  rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "segments per image" in rerun.stdout
  ref = str(tmp_path / "ref")
  fh_masks.precompute("image_folder", {"root": noise_folder}, ref, scales=[1], min_sizes=[2],
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
  assert meta["counts"] == {"images": 1, "failed": 1}
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
  assert meta["counts"] == {"images": len(cases) - len(bad), "failed": len(bad)}
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
