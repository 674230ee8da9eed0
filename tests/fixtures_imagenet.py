"""A tiny ImageNet in every form users hold it, written without TensorFlow.

`make_imagenet_fixture(root)` writes the same 9 train and 3 validation images as
  * the raw archives: `ILSVRC2012_img_train.tar` (a tar of per-class tars) and
    `ILSVRC2012_img_val.tar`, with validation labels as `LOC_val_solution.csv`, a wnid-per-line
    file and the devkit's ground truth + `meta.mat`;
  * extracted folders `train/nXXXXXXXX/*.JPEG` and a flat `val/`;
  * a tfds `imagenet2012` copy prepared as array_record and one prepared as tfrecord;
  * official-DetCon TFRecords with FH ids > 255 (stored wrapped, as DetCon wrote them), two FH
    planes, and one corrupted record;
and returns the paths plus what every reader must produce: {id: (label, uint8 [H, W, 3])}.
The awkward files of real ImageNet are included: a CMYK JPEG, a greyscale JPEG and a PNG named
`.JPEG`. The TFRecord writer side (framing, CRC, Example) is `ssl_jax.data.tfrecord`'s.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from ssl_jax.data import imagenet
from ssl_jax.data import tfrecord

WNIDS = ("n01440764", "n01443537", "n01484850")  # standard labels 0, 1, 2
VAL_WNIDS = ("n01484850", "n01440764", "n15075141")  # labels 2, 0, 999
VAL_IDS_OF_WNID = {"n01440764": 1, "n01443537": 2, "n01484850": 3, "n15075141": 1000}
CORRUPT_ID = "n01443537_99.JPEG"  # in the DetCon files only, with a flipped data byte


def _photo(h: int, w: int, seed: int) -> np.ndarray:
  """Blocks of colour with mild noise: FH finds a few segments, JPEG keeps it recognisable."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (4, 4, 3))
  img = np.kron(blocks, np.ones((-(-h // 4), -(-w // 4), 1)))[:h, :w]
  return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _encode(im: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _images() -> tuple[list, list]:
  """([(wnid, file name, bytes)] train, [(file name, bytes)] val)."""
  train = []
  for c, wnid in enumerate(WNIDS):
    for k in range(2):
      rgb = _photo(40 + 4 * k, 48, 10 * c + k)
      train.append((wnid, f"{wnid}_{k + 1}.JPEG", _encode(Image.fromarray(rgb), "JPEG")))
  train.append((WNIDS[0], f"{WNIDS[0]}_3.JPEG",
                _encode(Image.fromarray(_photo(44, 40, 91)).convert("CMYK"), "JPEG")))
  train.append((WNIDS[1], f"{WNIDS[1]}_3.JPEG",
                _encode(Image.fromarray(_photo(40, 40, 92)).convert("L"), "JPEG")))
  train.append((WNIDS[2], f"{WNIDS[2]}_3.JPEG", _encode(Image.fromarray(_photo(36, 52, 93)),
                                                         "PNG")))  # a PNG named .JPEG
  val = [(imagenet.val_file_name(i), _encode(Image.fromarray(_photo(40, 44, 200 + i)), "JPEG"))
         for i in range(len(VAL_WNIDS))]
  return train, val


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as t:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      t.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _write(path: str, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def detcon_ids(h: int, w: int, seed: int) -> np.ndarray:
  """Segment ids up to ~320 (so DetCon's uint8 cast wraps some of them)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 320, (4, 4))[np.minimum(np.arange(h)[:, None] * 4 // h, 3),
                                      np.minimum(np.arange(w)[None, :] * 4 // w, 3)]


def _tfds_copy(data_dir: str, fmt: str, splits: dict[str, list[list[bytes]]]) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  vdir = os.path.join(data_dir, "imagenet2012", "5.1.0")
  os.makedirs(vdir, exist_ok=True)
  tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=1000),
      "file_name": tfds.features.Text()}).save_config(vdir)
  split_infos = []
  for split, shards in splits.items():
    for k, shard in enumerate(shards):
      path = os.path.join(vdir, f"imagenet2012-{split}.{fmt}-{k:05d}-of-{len(shards):05d}")
      if fmt == "tfrecord":
        tfrecord.write_tfrecord(path, shard)
      else:
        from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
        w = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for r in shard:
          w.write(r)
        w.close()
    split_infos.append({"name": split, "shardLengths": [str(len(s)) for s in shards],
                        "numBytes": str(sum(len(r) for s in shards for r in s)),
                        "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"})
  info = {"name": "imagenet2012", "version": "5.1.0", "splits": split_infos,
          "moduleName": "tensorflow_datasets.datasets.imagenet2012.imagenet2012_dataset_builder"}
  if fmt == "array_record":
    info["fileFormat"] = "array_record"  # tfrecord copies made by older tfds omit the field
  with open(os.path.join(vdir, "dataset_info.json"), "w") as f:
    json.dump(info, f)
  return data_dir


def _write_meta_mat(path: str) -> None:
  import scipy.io  # pylint: disable=import-outside-toplevel
  dt = np.dtype([("ILSVRC2012_ID", "O"), ("WNID", "O")])
  synsets = np.array([(i, w) for w, i in VAL_IDS_OF_WNID.items()]
                     + [(1001, "n00001740")], dtype=dt)  # a non-leaf synset, as the devkit has
  scipy.io.savemat(path, {"synsets": synsets})


def make_imagenet_fixture(root: str) -> dict:
  """Writes every format under `root`; returns paths and the expected records (docstring)."""
  from ssl_jax.data import sources  # pylint: disable=import-outside-toplevel
  train, val = _images()
  expected_train = {name: (WNIDS.index(w), sources.decode_image(data)) for w, name, data in train}
  expected_val = {name: (imagenet.wnid_label(w), sources.decode_image(data))
                  for (name, data), w in zip(val, VAL_WNIDS)}
  out = {"expected_train": expected_train, "expected_val": expected_val}

  raw = os.path.join(root, "raw")
  class_tars = [(f"{w}.tar", _tar_bytes([(n, d) for ww, n, d in train if ww == w]))
                for w in WNIDS]
  out["train_tar"] = _write(os.path.join(raw, "ILSVRC2012_img_train.tar"), _tar_bytes(class_tars))
  out["val_tar"] = _write(os.path.join(raw, "ILSVRC2012_img_val.tar"), _tar_bytes(val))
  csv_rows = ["ImageId,PredictionString"] + [
      f"{n[:-5]},{w} 1 2 30 30 {w} 3 4 20 20" for (n, _), w in zip(val, VAL_WNIDS)]
  out["loc_csv"] = _write(os.path.join(raw, "LOC_val_solution.csv"),
                          ("\n".join(csv_rows[:1] + csv_rows[:0:-1]) + "\n").encode())  # any order
  out["wnid_txt"] = _write(os.path.join(raw, "validation_labels.txt"),
                           ("\n".join(VAL_WNIDS) + "\n").encode())
  devkit = os.path.join(raw, "devkit", "data")
  out["devkit_gt"] = _write(os.path.join(devkit, "ILSVRC2012_validation_ground_truth.txt"),
                            "".join(f"{VAL_IDS_OF_WNID[w]}\n" for w in VAL_WNIDS).encode())
  _write_meta_mat(os.path.join(devkit, "meta.mat"))

  ext = os.path.join(root, "extracted")
  for w, name, data in train:
    _write(os.path.join(ext, "train", w, name), data)
  for name, data in val:
    _write(os.path.join(ext, "val", name), data)
  out["train_dir"], out["val_dir"] = os.path.join(ext, "train"), os.path.join(ext, "val")

  def tfds_example(name, data, label):
    return tfrecord.make_example({"image": data, "label": label, "file_name": name})
  tr = [tfds_example(n, d, WNIDS.index(w)) for w, n, d in train]
  va = [tfds_example(n, d, expected_val[n][0]) for n, d in val]
  out["tfds_array_record"] = _tfds_copy(os.path.join(root, "tfds_ar"), "array_record",
                                        {"train": [tr[:5], tr[5:]], "validation": [va]})
  out["tfds_tfrecord"] = _tfds_copy(os.path.join(root, "tfds_tfr"), "tfrecord",
                                    {"train": [tr[:4], tr[4:]], "validation": [va]})

  # Official DetCon layout: label 1..1000, FH planes [S, H, W] as raw uint8 (ids wrapped).
  detcon = os.path.join(root, "detcon")
  os.makedirs(detcon, exist_ok=True)
  out["detcon_dir"], out["detcon_masks"] = detcon, {}
  recs = []
  for j, (w, name, data) in enumerate(train):
    h, wd = expected_train[name][1].shape[:2]
    ids = np.stack([detcon_ids(h, wd, j), detcon_ids(h, wd, 100 + j)])
    out["detcon_masks"][name] = ids
    recs.append(tfrecord.make_example({
        "image/encoded": data, "image/class/label": WNIDS.index(w) + 1,
        "image/filename": name, "image/class/synset": w, "image/height": h, "image/width": wd,
        "image/felzenszwalb_segmentations": ids.astype(np.uint8).tobytes()}))
  bad = tfrecord.make_example({"image/encoded": train[0][2], "image/class/label": 2,
                               "image/filename": CORRUPT_ID})
  tfrecord.write_tfrecord(os.path.join(detcon, "train-00000-of-00002"), recs[:4])
  p = os.path.join(detcon, "train-00001-of-00002")
  tfrecord.write_tfrecord(p, recs[4:6] + [bad] + recs[6:])
  with open(p, "r+b") as f:  # flip one byte inside the bad record's data: its CRC fails
    pos = 2 * 16 + sum(len(r) for r in recs[4:6]) + 12 + len(bad) // 2
    f.seek(pos)
    byte = f.read(1)[0]
    f.seek(pos)
    f.write(bytes([byte ^ 0xFF]))
  return out
