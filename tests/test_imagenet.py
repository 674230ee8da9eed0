"""ImageNet in every form: archives, folders, tfds copies, DetCon files, the tfds preflight errors,
the converter, and FH precompute -> DetCon-B training on the raw archive."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest

from ssl_jax.data import fh_masks
from ssl_jax.data import imagenet
from ssl_jax.data import sources
from ssl_jax.data import tfds_source

import fixtures_imagenet


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  out = fixtures_imagenet.make_imagenet_fixture(str(root))
  out["cache"] = str(root / "cache")
  return out


def _read_all(src) -> tuple[dict, list]:
  good, bad = {}, []
  for i in range(len(src)):
    rec = src[i]
    if "error" in rec:
      bad.append(rec)
    else:
      assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3
      assert rec["image"].shape[2] == 3, (rec["id"], rec["image"].shape)
      good[rec["id"]] = (rec["label"], rec["image"])
  return good, bad


def _assert_same(got: dict, expected: dict):
  assert sorted(got) == sorted(expected)
  for k, (label, image) in expected.items():
    assert got[k][0] == label, k
    np.testing.assert_array_equal(got[k][1], image, err_msg=k)


# --- labels -----------------------------------------------------------------------------------

def test_standard_synset_order():
  wnids = imagenet.imagenet_wnids()
  assert wnids[0] == "n01440764" and wnids[-1] == "n15075141" and list(wnids) == sorted(wnids)
  with pytest.raises(ValueError, match="n99999999.*not one of the 1000"):
    imagenet.wnid_label("n99999999")


@pytest.mark.parametrize("fmt", ["loc_csv", "wnid_txt", "devkit_gt"])
def test_validation_label_formats(fx, fmt):
  want = {n: lab for n, (lab, _) in fx["expected_val"].items()}
  assert imagenet.read_validation_labels(fx[fmt]) == want
  assert sorted(want.values()) == [0, 2, 999]


def test_devkit_without_meta_mat_is_clear(tmp_path):
  p = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
  p.write_text("490\n361\n")
  with pytest.raises(FileNotFoundError, match="meta.mat"):
    imagenet.read_validation_labels(str(p))


# --- every path gives the same records ----------------------------------------------------------

def _train_sources(fx):
  return {
      "ilsvrc_tar": sources.make_source("ilsvrc_tar", path=fx["train_tar"],
                                        cache_dir=fx["cache"]),
      "imagenet_folder": sources.make_source("imagenet_folder", root=fx["train_dir"]),
      "tfds": sources.make_source("tfds", name="imagenet2012", split="train",
                                  data_dir=fx["tfds_array_record"]),
      "tfds_tfrecord": sources.make_source("tfds_tfrecord", name="imagenet2012", split="train",
                                           data_dir=fx["tfds_tfrecord"], cache_dir=fx["cache"]),
      "detcon_tfrecord": sources.make_source("detcon_tfrecord", data_dir=fx["detcon_dir"],
                                             cache_dir=fx["cache"]),
  }


def test_train_paths_agree(fx):
  expected = fx["expected_train"]
  for name, src in _train_sources(fx).items():
    good, bad = _read_all(pickle.loads(pickle.dumps(src)))  # as a grain worker gets it
    _assert_same(good, expected)
    if name == "detcon_tfrecord":  # the corrupted record: an error record, the rest intact
      assert len(bad) == 1 and "CRC mismatch" in bad[0]["error"], bad
    else:
      assert not bad, (name, bad)
    assert src.num_classes == 1000, name
  # The awkward files: CMYK and greyscale JPEGs and the PNG named .JPEG all become RGB.
  cmyk = expected["n01440764_3.JPEG"][1]
  ref = fixtures_imagenet._photo(44, 40, 91).astype(int)  # pylint: disable=protected-access
  assert np.abs(cmyk.astype(int) - ref).mean() < 6  # CMYK converted, not 4 channels
  grey = expected["n01443537_3.JPEG"][1]
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  np.testing.assert_array_equal(expected["n01484850_3.JPEG"][1],
                                fixtures_imagenet._photo(36, 52, 93))  # pylint: disable=protected-access


def test_validation_paths_agree(fx):
  expected = fx["expected_val"]
  srcs = [sources.make_source("ilsvrc_tar", path=fx["val_tar"], labels_file=fx[f],
                              cache_dir=fx["cache"]) for f in ("loc_csv", "wnid_txt", "devkit_gt")]
  srcs += [sources.make_source("imagenet_folder", root=fx["val_dir"], labels_file=fx["loc_csv"]),
           sources.make_source("tfds", name="imagenet2012", split="validation",
                               data_dir=fx["tfds_array_record"]),
           sources.make_source("tfds_tfrecord", split="validation", data_dir=fx["tfds_tfrecord"],
                               cache_dir=fx["cache"])]
  for src in srcs:
    good, bad = _read_all(src)
    assert not bad
    _assert_same(good, expected)


def test_tfrecord_source_skips_after_corrupt_framing(fx, tmp_path):
  d = tmp_path / "tfr"
  shutil.copytree(fx["detcon_dir"], d)
  p = d / "train-00000-of-00002"
  raw = bytearray(p.read_bytes())
  first = struct.unpack("<Q", raw[:8])[0]
  raw[16 + first] ^= 1  # the second record's length header
  p.write_bytes(bytes(raw))
  with pytest.warns(UserWarning, match="length CRC mismatch"):
    src = imagenet.detcon_tfrecord_source(str(d), cache_dir=str(tmp_path / "cache"))
  assert len(src) == 1 + 6  # one record of file 0, all 6 (one corrupt) of file 1


def test_tar_index_is_cached(fx, monkeypatch):
  imagenet.IlsvrcTar(fx["train_tar"], cache_dir=fx["cache"])
  monkeypatch.setattr(imagenet, "_index_tar", lambda p: pytest.fail("index rebuilt"))
  assert len(imagenet.IlsvrcTar(fx["train_tar"], cache_dir=fx["cache"])) == 9


def test_detcon_masks_are_the_wrapped_ids(fx):
  for plane in (0, 1):
    src = imagenet.detcon_tfrecord_source(fx["detcon_dir"], mask_index=plane,
                                          cache_dir=fx["cache"])
    n = 0
    for i in range(len(src)):
      rec = src[i]
      if "error" in rec:
        continue
      ids = fx["detcon_masks"][rec["id"]][plane]
      assert ids.max() > 255  # the fixture exercises the wrap
      np.testing.assert_array_equal(rec["masks"], ids % 256)
      assert rec["masks"].shape == rec["image"].shape[:2]
      n += 1
    assert n == 9
  with pytest.raises(FileNotFoundError, match="train-XXXXX-of-02048"):
    imagenet.detcon_tfrecord_source(fx["train_dir"])


# --- preflight: the clear errors ----------------------------------------------------------------

def test_missing_dataset_error(tmp_path):
  with pytest.raises(tfds_source.DatasetNotReadyError) as e:
    sources.make_source("tfds", name="imagenet2012", split="train", data_dir=str(tmp_path))
  msg = str(e.value)
  assert f"data_dir={tmp_path}" in msg and "empty folder" in msg
  assert "tfds build imagenet2012" in msg and "--source=ilsvrc_tar" in msg
  assert "NotImplementedError" not in msg and "FileFormat" not in msg
  assert not tfds_source.is_prepared("imagenet2012", str(tmp_path))


def test_check_cli_is_one_line_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    tfds_source.main(["check", f"--data_dir={tmp_path}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: tfds dataset 'imagenet2012' is not prepared")


def test_tfrecord_prepared_dataset_error(fx):
  with pytest.raises(tfds_source.DatasetNotReadyError) as e:
    sources.make_source("tfds", name="imagenet2012", split="train", data_dir=fx["tfds_tfrecord"])
  msg = str(e.value)
  assert f"data_dir={fx['tfds_tfrecord']}" in msg and "prepared as tfrecord" in msg
  assert (f"python -m ssl_jax.data.tfds_source convert --name=imagenet2012 "
          f"--data_dir={fx['tfds_tfrecord']}") in msg
  assert "NotImplementedError" not in msg
  assert tfds_source.is_prepared("imagenet2012", fx["tfds_array_record"], "validation")


def test_missing_split_shard_and_feature(fx, tmp_path):
  d = str(tmp_path / "copy")
  shutil.copytree(fx["tfds_array_record"], d)
  with pytest.raises(tfds_source.DatasetNotReadyError, match=r"no split \['test'\].*'train'"):
    tfds_source.check_tfds_dataset("imagenet2012", d, "test")
  with pytest.raises(tfds_source.DatasetNotReadyError, match=r"no feature \['img'\]"):
    tfds_source.check_tfds_dataset("imagenet2012", d, "train[:2]", keys=["img"])
  vdir = os.path.join(d, "imagenet2012", "5.1.0")
  os.remove(os.path.join(vdir, "imagenet2012-train.array_record-00001-of-00002"))
  with pytest.raises(tfds_source.DatasetNotReadyError, match="1 array_record shards found"):
    tfds_source.check_tfds_dataset("imagenet2012", d, "validation+train")


def test_convert_tfrecord_copy_then_tfds_reads_it(fx, tmp_path):
  d = str(tmp_path / "tfr")
  shutil.copytree(fx["tfds_tfrecord"], d)
  tfds_source.main(["convert", f"--data_dir={d}"])
  src = sources.make_source("tfds", name="imagenet2012", split="train", data_dir=d)
  good, bad = _read_all(src)
  assert not bad
  _assert_same(good, fx["expected_train"])


# --- FH precompute on these sources, and DetCon-B :test on its output ----------------------------

def test_detcon_masks_import_through_precompute(fx, tmp_path):
  out = str(tmp_path / "fh_detcon")
  meta = fh_masks.precompute("detcon_tfrecord", {"data_dir": fx["detcon_dir"],
                                                 "cache_dir": fx["cache"]},
                             out, scales=[1000], min_sizes=[1000], progress=False)
  assert meta["counts"] == {"images": 9, "failed": 1, "capped": 0}
  ds = fh_masks.FHMaskDataset(out, scale=1000, min_size=1000)
  rec = next(ds[i] for i in range(len(ds)) if ds[i]["id"] == "n01484850_3.JPEG")
  np.testing.assert_array_equal(rec["masks"], fx["detcon_masks"]["n01484850_3.JPEG"][0] % 256)


def test_precompute_raw_archive_then_detcon_b_trains(fx, tmp_path):
  import ml_collections
  from helpers import load_config
  from ssl_jax import train
  out = str(tmp_path / "fh_raw")
  meta = fh_masks.precompute("ilsvrc_tar", {"path": fx["train_tar"], "cache_dir": fx["cache"]},
                             out, scales=[50], min_sizes=[20], records_per_shard=4,
                             progress=False)
  assert meta["num_records"] == 9 and meta["counts"]["failed"] == 0
  ds = fh_masks.FHMaskDataset(out, scale=50, min_size=20)
  got = {r["id"]: r for r in (ds[i] for i in range(len(ds)))}
  _assert_same({k: (r["label"], r["image"]) for k, r in got.items()}, fx["expected_train"])
  assert all(r["masks"].max() >= 1 for r in got.values())  # FH found several segments

  config = load_config("detcon_b", "test")
  config.data.source = "fh_masks"
  config.data.source_args = ml_collections.ConfigDict({"path": out, "scale": 50,
                                                       "min_size": 20})
  config.train.batch_size = 8
  workdir = str(tmp_path / "work")
  train.run(config, workdir, max_steps=2)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [m["loss"] for m in map(json.loads, f) if "loss" in m]
  assert losses and np.isfinite(losses).all()
