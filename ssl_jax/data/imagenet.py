"""ImageNet (ILSVRC2012) as users hold it, read without TensorFlow: labels and sources.

Every source returns the `ssl_jax.data.sources` record contract with `label` in the standard
order (the 1000 ILSVRC2012 synsets sorted by wnid, `n01440764` -> 0 ... `n15075141` -> 999: the
order of tfds `imagenet2012`, torchvision and the official DetCon labels minus one) and `id` the
image's base file name (`n01440764_10026.JPEG`, `ILSVRC2012_val_00000001.JPEG`), which is
tfds's `file_name`, so every path gives the same (id, image, label) triples.

Sources here (registered in `sources.SOURCES`):
  * `ilsvrc_tar`        `ILSVRC2012_img_train.tar` (a tar of per-class tars) or
                        `ILSVRC2012_img_val.tar` (flat, labels from `labels_file`), read by random
                        access through an index built once and cached (`cache_dir`).
  * `imagenet_folder`   extracted `train/nXXXXXXXX/*.JPEG` (or a val folder sorted into synset
                        folders), or a flat folder of validation images with `labels_file`.
  * `detcon_tfrecord`   the official DetCon TFRecords (`train-*-of-02048`): `image/encoded`,
                        `image/class/label` (1..1000), `image/filename`, and
                        `image/felzenszwalb_segmentations`, the FH ids as raw uint8 bytes of
                        shape [S, H, W] (one plane per FH setting, DetCon's default S = 1).
                        DetCon cast the ids to uint8, so id k is stored as k mod 256: on images
                        with more than 256 segments *distinct segments share an id* and are
                        pooled as one object; this cannot be undone. DetCon computed them on a
                        decode that ignores EXIF orientation; they are turned with the image.
                        Returned as "masks" so training can read the files directly, or
                        imported into the FH-mask array_record format with `python -m
                        ssl_jax.data.fh_masks --source=detcon_tfrecord ...` (the masks are
                        copied, not recomputed).
tfds copies of `imagenet2012` (array_record or tfrecord) are read by `ssl_jax.data.tfds_source`.

Validation labels (`labels_file`), in any of three formats, detected by content:
  * Kaggle `LOC_val_solution.csv` (`ImageId,PredictionString`, first token the wnid);
  * one wnid per line in image order (tfds's `validation_labels.txt`, bundled with tfds and used
    when `labels_file` is empty);
  * the devkit's `ILSVRC2012_validation_ground_truth.txt` (ILSVRC2012_ID 1..1000 per line, an
    order that is NOT sorted-wnid) with the devkit's `meta.mat` beside it (mapping id -> wnid).

Bad records never raise: a CRC mismatch, a corrupt image or a missing label gives an error record.
"""
from __future__ import annotations

import csv
import functools
import glob
import io
import os
import re
import tarfile
from typing import Any, Optional

import numpy as np

from ssl_jax.data import sources
from ssl_jax.data import tfrecord

NUM_CLASSES = 1000
_TFDS_IMAGENET = ("tensorflow_datasets", "datasets/imagenet2012")


# ---------------------------------------------------------------------------------------------
# Synsets and labels

@functools.lru_cache(maxsize=None)
def _tfds_text_file(name: str) -> tuple[str, ...]:
  import importlib.resources  # pylint: disable=import-outside-toplevel
  path = importlib.resources.files(_TFDS_IMAGENET[0]).joinpath(_TFDS_IMAGENET[1], name)
  return tuple(path.read_text().split())


def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 ILSVRC2012 synsets sorted: index = label (tfds's bundled `labels.txt`)."""
  wnids = _tfds_text_file("labels.txt")
  if len(wnids) != NUM_CLASSES or list(wnids) != sorted(wnids):
    raise RuntimeError("tensorflow_datasets' imagenet2012/labels.txt is not 1000 sorted wnids")
  return wnids


@functools.lru_cache(maxsize=None)
def _wnid_to_label() -> dict[str, int]:
  return {w: i for i, w in enumerate(imagenet_wnids())}


def wnid_label(wnid: str, where: str = "") -> int:
  """Label 0..999 of synset `wnid` (standard sorted order). Raises ValueError if unknown."""
  try:
    return _wnid_to_label()[wnid]
  except KeyError:
    raise ValueError(f"{wnid!r}{' in ' + where if where else ''} is not one of the 1000 "
                     "ILSVRC2012 synsets (nXXXXXXXX)") from None


def val_file_name(i: int) -> str:
  """0-based validation index -> its file name, `ILSVRC2012_val_00000001.JPEG` for 0."""
  return f"ILSVRC2012_val_{i + 1:08d}.JPEG"


def read_validation_labels(path: str = "") -> dict[str, int]:
  """A validation labels file (formats in the module docstring) -> {file name: label 0..999}.

  Args:
    path: the file; "" for tfds's bundled `validation_labels.txt`.
  """
  if not path:
    return {val_file_name(i): wnid_label(w, "tfds validation_labels.txt")
            for i, w in enumerate(_tfds_text_file("validation_labels.txt"))}
  if not os.path.exists(path):
    raise FileNotFoundError(f"validation labels_file={path!r} does not exist")
  with open(path, newline="") as f:
    text = f.read()
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if lines and lines[0].lower().startswith("imageid"):
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
      image_id, pred = row.get("ImageId"), (row.get("PredictionString") or "").split()
      if not image_id or not pred:
        raise ValueError(f"{path}: row {row} has no ImageId or PredictionString")
      out[f"{image_id}.JPEG"] = wnid_label(pred[0], path)
    return out
  if lines and all(re.fullmatch(r"n\d{8}", ln) for ln in lines):
    return {val_file_name(i): wnid_label(w, path) for i, w in enumerate(lines)}
  if lines and all(ln.isdigit() for ln in lines):
    meta = os.path.join(os.path.dirname(path), "meta.mat")
    id_to_wnid = _devkit_ids(meta, path)
    return {val_file_name(i): wnid_label(id_to_wnid[int(v)], meta) for i, v in enumerate(lines)}
  raise ValueError(f"labels_file={path!r} is neither LOC_val_solution.csv, a wnid per line, "
                   "nor the devkit's ILSVRC2012_validation_ground_truth.txt")


def _devkit_ids(meta: str, labels_path: str) -> dict[int, str]:
  if not os.path.exists(meta):
    raise FileNotFoundError(
        f"{labels_path} holds devkit ILSVRC2012_IDs, whose order is not the sorted-wnid order: "
        f"the devkit's meta.mat must sit beside it ({meta} not found)")
  import scipy.io  # pylint: disable=import-outside-toplevel
  synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
  return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets
          if int(s["ILSVRC2012_ID"]) <= NUM_CLASSES}


# ---------------------------------------------------------------------------------------------
# Official DetCon TFRecords (ImageNet with FH masks)

def detcon_tfrecord_source(data_dir: str, split: str = "train", mask_index: int = 0,
                           verify_crc: bool = True,
                           cache_dir: Optional[str] = None) -> tfrecord.TFRecordSource:
  """The official DetCon ImageNet-with-FH TFRecords (`{split}-*-of-*` in `data_dir`).

  Masks follow the image through its EXIF orientation (`tfrecord.TFRecordSource`, masks_key).
  """
  prefix = {"train": "train", "validation": "validation", "test": "validation"}.get(split)
  if prefix is None:
    raise ValueError(f"detcon_tfrecord split={split!r} must be 'train' or 'validation'")
  pattern = os.path.join(data_dir, f"{prefix}-*-of-*")
  if not glob.glob(pattern):
    raise FileNotFoundError(
        f"detcon_tfrecord: no files {pattern} in data_dir={data_dir!r} (found: "
        f"{sources.describe_folder(data_dir)}); DetCon's generate_fh_masks_for_imagenet.py "
        "writes train-XXXXX-of-02048 and validation-XXXXX-of-00256")
  return tfrecord.TFRecordSource(pattern, image_key="image/encoded",
                                 label_key="image/class/label", id_key="image/filename",
                                 label_offset=-1, num_classes=NUM_CLASSES,
                                 masks_key="image/felzenszwalb_segmentations",
                                 mask_index=mask_index, verify_crc=verify_crc,
                                 cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# Raw ILSVRC2012: archives and extracted folders

def _is_image_name(name: str) -> bool:
  return not os.path.basename(name).startswith(".")


class IlsvrcTar(sources.Source):
  """`ILSVRC2012_img_train.tar` (a tar of `nXXXXXXXX.tar`) or `ILSVRC2012_img_val.tar` (flat).

  Members are read in place (seek + read), through an index of (name, offset, size) built once
  by walking the headers (no extraction) and cached. Train labels come from the class tar's
  name; validation labels from `labels_file` (module docstring; "" uses tfds's bundled list).

  Args:
    path: the archive.
    labels_file: validation labels (flat archives only).
    cache_dir: where the index is cached.
  """

  def __init__(self, path: str, labels_file: str = "", cache_dir: Optional[str] = None):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"ilsvrc_tar path={path!r} is not a file")
    self.path = path
    index = tfrecord.cached_index("tar", [path], lambda: _index_tar(path), cache_dir)
    self._names = index["names"]
    self._wnids = index["wnids"]
    self._offset = np.asarray(index["offsets"], np.int64)
    self._size = np.asarray(index["sizes"], np.int64)
    if not self._names:
      raise ValueError(f"ilsvrc_tar path={path!r} holds no files")
    self._labels: Optional[dict[str, int]] = None
    if not all(self._wnids):
      self._labels = read_validation_labels(labels_file)
    self.num_classes = NUM_CLASSES
    self._f = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_f"] = None
    return state

  def __len__(self):
    return len(self._names)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    name, wnid = self._names[i], self._wnids[i]
    try:
      label = (wnid_label(wnid, self.path) if wnid else self._labels[name])
    except (KeyError, ValueError) as e:
      return sources.error_record(name, f"no label: {e}")
    if self._f is None:
      self._f = open(self.path, "rb")  # pylint: disable=consider-using-with
    self._f.seek(int(self._offset[i]))
    data = self._f.read(int(self._size[i]))
    return sources.decoded_record(name, data, with_encoded, label=label)


def _index_tar(path: str) -> dict[str, list]:
  """Members of a flat tar or a tar of tars: base names, wnid ("" if flat), offsets, sizes."""
  names, wnids, offsets, sizes = [], [], [], []
  with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
    members = [m for m in outer.getmembers() if m.isfile()]
    for m in members:
      base = os.path.basename(m.name)
      if base.endswith(".tar"):
        # A class tar: TarFile takes its start from fileobj.tell(), so inner offsets are
        # absolute positions in the outer archive.
        f.seek(m.offset_data)
        with tarfile.open(fileobj=f, mode="r:") as inner:
          for im in inner.getmembers():
            if im.isfile() and _is_image_name(im.name):
              names.append(os.path.basename(im.name))
              wnids.append(base[:-4])
              offsets.append(im.offset_data)
              sizes.append(im.size)
      elif _is_image_name(base):
        names.append(base)
        wnids.append("")
        offsets.append(m.offset_data)
        sizes.append(m.size)
  order = sorted(range(len(names)), key=lambda k: (wnids[k], names[k]))
  return {"names": [names[k] for k in order], "wnids": [wnids[k] for k in order],
          "offsets": [offsets[k] for k in order], "sizes": [sizes[k] for k in order]}


class ImageNetFolder(sources.Source):
  """Extracted ILSVRC2012 images: `root/nXXXXXXXX/*.JPEG`, or a flat folder + `labels_file`.

  Labels follow the standard synset order (not the index among the folders present, so a subset
  of classes keeps ImageNet's labels); ids are base file names.
  """

  def __init__(self, root: str, labels_file: str = ""):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"imagenet_folder root={root!r} is not a directory")
    self.root = root
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    files: list[tuple[str, str]] = []
    if class_dirs:
      for d in class_dirs:
        wnid_label(d, root)  # a stray folder is a setup error, named now
        files += [(f"{d}/{f}", d) for f in sorted(os.listdir(os.path.join(root, d)))
                  if _is_image_name(f)]
      self._labels = None
    else:
      files = [(f, "") for f in entries]
      self._labels = read_validation_labels(labels_file)
    if not files:
      raise ValueError(f"imagenet_folder root={root!r} holds no images")
    self._files = files
    self.num_classes = NUM_CLASSES

  def __len__(self):
    return len(self._files)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    rel, wnid = self._files[i]
    name = os.path.basename(rel)
    try:
      label = wnid_label(wnid) if wnid else self._labels[name]
    except (KeyError, ValueError) as e:
      return sources.error_record(name, f"no label: {e}")
    try:
      with open(os.path.join(self.root, rel), "rb") as f:
        data = f.read()
    except OSError as e:
      return sources.error_record(name, f"cannot read file: {e}")
    return sources.decoded_record(name, data, with_encoded, label=label)
