"""Data sources: record contract, bad-input policy, built-in photos, Fashion-MNIST, tfds, folders."""
from __future__ import annotations

import io
import os
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from ssl_jax.data import records
from ssl_jax.data import sources
from ssl_jax.data import tfds_source
from tests import fixtures_images


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad"))
  return root, fixtures_images.make_bad_image_folder(root)


def _mean_abs(a, b):
  return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def test_image_folder_bad_inputs(bad_folder):
  root, cases = bad_folder
  ds = sources.ImageFolder(root)
  assert len(ds) == len(cases)
  assert ds.classes == ("cases",)
  errors = []
  for i in range(len(ds)):
    rec = ds[i]  # must never raise
    kind, expected, tol = cases[rec["id"]]
    if sources.skip_reason(rec):
      errors.append(rec["id"])
      assert set(rec) == {"id", "error"}
      continue
    assert kind == "ok", rec["id"]
    assert rec["label"] == 0
    image = rec["image"]
    assert image.dtype == np.uint8 and image.shape == expected.shape, rec["id"]
    assert _mean_abs(image, expected) <= tol, rec["id"]
  assert sorted(errors) == sorted(k for k, v in cases.items() if v[0] == "error")
  assert len(errors) == 4


def test_exif_orientation_is_applied(bad_folder):
  root, cases = bad_folder
  data = open(os.path.join(root, "cases", "exif_rot.jpg"), "rb").read()
  image = sources.decode_image(data)
  _, expected, _ = cases["cases/exif_rot.jpg"]
  stored = np.rot90(expected, k=1)  # the pixels as stored in the file
  assert image.shape == (40, 24, 3) and stored.shape == (24, 40, 3)
  # Closer to the clockwise rotation than to the counter-clockwise one (a wrong transpose).
  assert _mean_abs(image, expected) < 4 < _mean_abs(image, np.rot90(stored, k=1))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_exif_orientation_turns_like_pil(orientation):
  """A mask turned by `apply_exif_orientation` lands where PIL's exif_transpose puts the pixels."""
  stored = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)  # every pixel distinct
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  Image.fromarray(stored).save(buf, format="PNG", exif=exif)  # lossless: exact comparison
  data = buf.getvalue()
  assert sources.exif_orientation(data) == orientation
  decoded = sources.decode_image(data)  # PIL's ImageOps.exif_transpose: the reference
  np.testing.assert_array_equal(sources.apply_exif_orientation(stored, orientation), decoded)
  np.testing.assert_array_equal(sources.apply_exif_orientation(stored[..., 0], orientation),
                                decoded[..., 0])  # a 2-D mask turns the same way
  assert decoded.shape[:2] == ((5, 3) if orientation >= 5 else (3, 5))


def test_exif_orientation_absent_or_unreadable_is_1():
  buf = io.BytesIO()
  Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(buf, format="PNG")
  assert sources.exif_orientation(buf.getvalue()) == 1
  assert sources.exif_orientation(b"not an image") == 1
  with pytest.raises(ValueError, match="orientation=9"):
    sources.apply_exif_orientation(np.zeros((2, 3)), 9)


def test_sixteen_bit_is_scaled_not_clipped():
  g16 = np.array([[0, 257, 32768, 65535]], np.uint16)
  buf = io.BytesIO()
  Image.fromarray(g16).save(buf, format="PNG")
  out = sources.decode_image(buf.getvalue())
  np.testing.assert_array_equal(out[0, :, 0], np.round(g16[0].astype(np.float64) * 255 / 65535).astype(np.uint8))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_decompression_bomb_limit(monkeypatch):
  # PIL's own guard would raise for > 2x its limit; decode_image raises PIL's limit to ours.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  buf = io.BytesIO()
  Image.new("RGB", (100, 60), (1, 2, 3)).save(buf, format="PNG")
  assert sources.decode_image(buf.getvalue(), max_pixels=10000).shape == (60, 100, 3)
  with pytest.raises(ValueError, match="exceeds the decode limit"):
    sources.decode_image(buf.getvalue(), max_pixels=5000)
  assert sources.MAX_IMAGE_PIXELS > 89_478_485  # above PIL's default: large photos decode


def test_builtin_photos_all_load_offline():
  for name in sources.BUILTIN_PHOTOS:
    image = sources.load_builtin_photo(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
    assert min(image.shape[:2]) >= 256, name


@pytest.mark.parametrize("crop_size", [16, 96])
def test_builtin_photos_train_probe_disjoint(crop_size):
  train = sources.BuiltinPhotos("train", num_per_photo=6, crop_size=crop_size, seed=1)
  probe = sources.BuiltinPhotos("probe", num_per_photo=4, crop_size=crop_size, seed=1)
  assert len(train) == 60 and len(probe) == 40 and train.num_classes == 10
  shapes = [im.shape[:2] for im in (train._photo(k) for k in range(10))]
  for ds in (train, probe):
    for i in range(len(ds)):
      h, w = shapes[i // ds.num_per_photo]
      cut = int(round(w * 0.75))
      top, left, side = ds.box(i)
      assert 0 <= top and top + side <= h
      if ds.split == "train":
        assert 0 <= left and left + side <= cut
      else:
        assert cut <= left and left + side <= w
  rec = probe[5]
  assert rec["image"].shape == (crop_size, crop_size, 3) and rec["image"].dtype == np.uint8
  assert rec["label"] == 1 and rec["id"] == "chelsea/probe/1"
  # Fixed by the seed, independent of the worker process (pickle drops the loaded photos).
  again = pickle.loads(pickle.dumps(probe))
  assert again._images == {}
  np.testing.assert_array_equal(again[5]["image"], rec["image"])
  other = sources.BuiltinPhotos("probe", num_per_photo=4, crop_size=crop_size, seed=2)
  assert other.box(5) != probe.box(5)


def test_builtin_photos_crop_content():
  ds = sources.BuiltinPhotos("train", num_per_photo=2, crop_size=32, photos=("coffee",))
  top, left, side = ds.box(1)
  photo = sources.load_builtin_photo("coffee")
  ref = np.asarray(Image.fromarray(photo[top:top + side, left:left + side]).resize(
      (32, 32), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(ds[1]["image"], ref)
  enc = ds.get(1, with_encoded=True)["encoded"]
  np.testing.assert_array_equal(sources.decode_image(enc), ref)  # lossless


def test_fashion_mnist():
  if not os.path.exists(sources.FASHION_MNIST_PATH):
    pytest.skip("apt-get install dataset-fashion-mnist")
  train = sources.make_source("fashion_mnist", split="train")
  test = sources.make_source("fashion_mnist", split="test")
  assert len(train) == 60000 and len(test) == 10000 and train.num_classes == 10
  rec = test[9999]
  assert rec["image"].shape == (28, 28, 3) and rec["image"].dtype == np.uint8
  np.testing.assert_array_equal(rec["image"][..., 0], rec["image"][..., 1])
  _, labels = test._load()
  assert set(np.unique(labels)) == set(range(10)) and np.bincount(labels).tolist() == [1000] * 10
  assert rec["label"] == int(labels[9999]) and rec["id"] == "test/09999"
  assert pickle.loads(pickle.dumps(test))._arrays is None


def test_fashion_mnist_missing_path_says_how(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    sources.FashionMNIST("train", path=str(tmp_path))


def test_read_idx_matches_manual_layout(tmp_path):
  import gzip
  arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  path = str(tmp_path / "x-idx3-ubyte.gz")
  with gzip.open(path, "wb") as f:
    f.write(header + arr.tobytes())
  np.testing.assert_array_equal(sources.read_idx(path), arr)


def test_make_source_unknown_lists_names():
  with pytest.raises(ValueError, match="builtin_photos.*fashion_mnist.*fh_masks.*image_folder.*tfds"):
    sources.make_source("imagenet")


def test_image_folder_empty_and_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    sources.ImageFolder(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="no files"):
    sources.ImageFolder(str(tmp_path))


# --- tfds -------------------------------------------------------------------------------------

def _build_tiny_tfds(data_dir: str) -> None:
  """A 6-example array_record tfds dataset written without TensorFlow."""
  import tensorflow_datasets as tfds

  class SslJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6)}

    def _generate_examples(self, n):
      for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((8 + i, 10, 3), 40 * i, np.uint8)).save(buf, format="PNG")
        buf.seek(0)
        yield i, {"image": buf, "label": i % 3, "file_name": f"img{i}.png"}

  SslJaxTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source(tmp_path):
  data_dir = str(tmp_path / "tfds")
  _build_tiny_tfds(data_dir)
  ds = sources.make_source("tfds", name="ssl_jax_tiny_images", split="train", data_dir=data_dir)
  assert len(ds) == 6 and ds.num_classes == 3
  seen = {}
  for i in range(6):
    rec = pickle.loads(pickle.dumps(ds))[i] if i == 0 else ds[i]
    k = int(rec["id"][3:-4])
    assert rec["label"] == k % 3
    np.testing.assert_array_equal(rec["image"], np.full((8 + k, 10, 3), 40 * k, np.uint8))
    seen[rec["id"]] = True
  assert len(seen) == 6


def test_tfds_missing_dataset_names_data_dir(tmp_path):
  with pytest.raises(RuntimeError, match=f"(?s)data_dir={re.escape(str(tmp_path))}.*tfds build"):
    tfds_source.TfdsSource("mnist", split="train", data_dir=str(tmp_path))


# --- FH mask dataset: misaligned masks -------------------------------------------------------

def test_fh_dataset_shape_mismatch_is_error_record(tmp_path):
  from array_record.python import array_record_module
  from ssl_jax.data import fh_masks
  image = np.zeros((10, 12, 3), np.uint8)
  good = {"id": "ok.png", "label": 1, "height": 10, "width": 12,
          "image": sources.encode_png(image), "segments": {"1000_1000": 1},
          "masks": {"1000_1000": records.encode_mask(np.zeros((10, 12), np.int32))}}
  bad = dict(good, id="misaligned.png",
             masks={"1000_1000": records.encode_mask(np.zeros((12, 10), np.int32))})
  failed = {"id": "broken.jpg", "label": 0, "error": "cannot decode image: truncated"}
  path = str(tmp_path / fh_masks.shard_name(0, 1))
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for r in (good, bad, failed):
    writer.write(records.encode_record(r))
  writer.close()
  fh_masks._atomic_write_json(str(tmp_path / "metadata.json"), {
      "scales": [1000], "min_sizes": [1000], "num_records": 3, "num_classes": 2,
      "shards": [{"file": fh_masks.shard_name(0, 1)}]})
  ds = sources.make_source("fh_masks", path=str(tmp_path))
  assert ds[0]["masks"].shape == (10, 12) and ds[0]["label"] == 1
  rec = ds[1]
  assert set(rec) == {"id", "error"} and "misaligned.png" in rec["error"]
  assert "(12, 10)" in rec["error"] and "(10, 12)" in rec["error"]
  assert ds[2] == {"id": "broken.jpg", "error": "cannot decode image: truncated"}
  with pytest.raises(ValueError, match="scale=500, min_size=1000 were not precomputed"):
    sources.make_source("fh_masks", path=str(tmp_path), scale=500)
  with pytest.raises(FileNotFoundError, match="metadata.json"):
    sources.make_source("fh_masks", path=str(tmp_path / "nothing"))
