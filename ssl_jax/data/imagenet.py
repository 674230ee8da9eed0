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

Subsets, for every ImageNet source (`classes=`) and for the folder and tfds-tfrecord sources
(`split=` slices):
  * `classes="imagenet100"`: ImageNet-100, the 100 classes of CMC (Tian et al. 2019), which Masked
    MoCo/BYOL and other papers train and evaluate on; or a file of wnids, one per line. Labels
    are remapped to 0..K−1 in sorted-wnid order (what an image folder of those classes gives).
    Sources whose labels live inside the records (TFRecords, tfds array_record) read every
    record's label once and cache the list (`cache_dir`).
  * `split="train[:10%]"` and the rest of tfds's slice syntax (`sources.split_indices`): a
    tfds copy keeps tfds's record order (shuffled when tfds prepared it); an image folder has no
    such order, so a sliced folder is read class by class in turn (the first image of every
    class, then the second, ...), which makes every slice class-balanced: `train[:10%]` holds
    10 % of every class (±1 image).

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

# ImageNet-100: the class list of CMC (Tian, Krishnan & Isola 2019, "Contrastive Multiview
# Coding"), file `imagenet100.txt` of github.com/HobbitLong/CMC, in that file's order.
IMAGENET100 = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823",
    "n04589890", "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013",
    "n04485082", "n02105505", "n01983481", "n02788148", "n03530642", "n04435653", "n02086910",
    "n02859443", "n13040303", "n03594734", "n02085620", "n02099849", "n01558993", "n04493381",
    "n02109047", "n04111531", "n02877765", "n04429376", "n02009229", "n01978455", "n02106550",
    "n01820546", "n01692333", "n07714571", "n02974003", "n02114855", "n03785016", "n03764736",
    "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251", "n02701002",
    "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973",
    "n03017168", "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322",
    "n02113978", "n03787032", "n02089867", "n02119022", "n03777754", "n04238763", "n02231487",
    "n03032252", "n02138441", "n02104029", "n03837869", "n03494278", "n04136333", "n03794056",
    "n03492542", "n02018207", "n04067472", "n03930630", "n03584829", "n02123045", "n04229816",
    "n02100583", "n03642806", "n04336792", "n03259280", "n02116738", "n02108089", "n03424325",
    "n01855672", "n02090622")
CLASS_SUBSETS = {"imagenet100": IMAGENET100}


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
# Class subsets

def subset_wnids(classes: str) -> tuple[str, ...]:
  """The wnids of `classes`: "" (all: ()), a name of CLASS_SUBSETS, or a file with one wnid per
  line (blank lines and `#` comments ignored). Every wnid is checked; duplicates are an error."""
  if not classes:
    return ()
  if classes in CLASS_SUBSETS:
    wnids = CLASS_SUBSETS[classes]
  elif os.path.isfile(classes):
    with open(classes, encoding="utf-8") as f:
      wnids = tuple(w for w in (ln.split("#")[0].strip() for ln in f) if w)
  else:
    raise ValueError(f"classes={classes!r} is neither a known subset {sorted(CLASS_SUBSETS)} nor "
                     "a file of wnids (one per line)")
  for w in wnids:
    wnid_label(w, f"classes={classes!r}")
  if len(set(wnids)) != len(wnids) or not wnids:
    raise ValueError(f"classes={classes!r} lists {len(wnids)} wnids, {len(set(wnids))} distinct: "
                     "give each class once")
  return tuple(wnids)


def subset_label_map(classes: str) -> Optional[dict[int, int]]:
  """{standard label 0..999: subset label 0..K−1 (sorted-wnid order)}, or None for all classes."""
  wnids = subset_wnids(classes)
  return {wnid_label(w): k for k, w in enumerate(sorted(wnids))} if wnids else None


def subset_of(source: sources.Source, labels: np.ndarray, classes: str = "",
              indices: Optional[np.ndarray] = None) -> sources.Source:
  """`source` restricted to `indices` (default all) and to the records of `classes`.

  Args:
    source: a source with standard ImageNet labels.
    labels: int [len(source)] every record's label (−1 unknown: dropped by a class subset).
    classes: "" or a class subset (`subset_wnids`).
    indices: records to keep, in order (a split slice), or None.
  """
  label_map = subset_label_map(classes)
  if indices is None and label_map is None:
    return source
  keep = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices)
  if label_map is not None:
    keep = keep[np.isin(np.asarray(labels)[keep], list(label_map))]
  return sources.Subset(source, keep, label_map,
                        num_classes=len(label_map) if label_map else NUM_CLASSES)


def tfrecord_labels(source: tfrecord.TFRecordSource, cache_dir: Optional[str] = None
                    ) -> np.ndarray:
  """Every record's label (+ the source's label_offset; −1 when unreadable), read once from the
  files without decoding images and cached beside the offset index."""

  def build():
    labels = []
    for path in source.files:
      offsets, lengths, _ = tfrecord.index_tfrecord(path)
      with open(path, "rb") as f:
        for off, n in zip(offsets, lengths):
          f.seek(int(off))
          try:
            value = tfrecord.parse_example(f.read(int(n)))[source.label_key][0]
            labels.append(int(value) + source.label_offset)
          except Exception:  # pylint: disable=broad-except  # the record is an error record
            labels.append(-1)
    return {"labels": labels}

  index = tfrecord.cached_index(f"labels-{re.sub(r'[^A-Za-z0-9]', '_', source.label_key)}",
                                source.files, build, cache_dir)
  return np.asarray(index["labels"], np.int64)


# ---------------------------------------------------------------------------------------------
# Official DetCon TFRecords (ImageNet with FH masks)

def detcon_tfrecord_source(data_dir: str, split: str = "train", mask_index: int = 0,
                           verify_crc: bool = True, cache_dir: Optional[str] = None,
                           classes: str = "") -> sources.Source:
  """The official DetCon ImageNet-with-FH TFRecords (`{split}-*-of-*` in `data_dir`).

  Masks follow the image through its EXIF orientation (`tfrecord.TFRecordSource`, masks_key).
  `classes`: a class subset (module docstring).
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
  source = tfrecord.TFRecordSource(pattern, image_key="image/encoded",
                                   label_key="image/class/label", id_key="image/filename",
                                   label_offset=-1, num_classes=NUM_CLASSES,
                                   masks_key="image/felzenszwalb_segmentations",
                                   mask_index=mask_index, verify_crc=verify_crc,
                                   cache_dir=cache_dir)
  if not classes:
    return source
  return subset_of(source, tfrecord_labels(source, cache_dir), classes)


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
    classes: a class subset (module docstring), labels remapped to 0..K−1.
  """

  def __init__(self, path: str, labels_file: str = "", cache_dir: Optional[str] = None,
               classes: str = ""):
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
    self._label_map = subset_label_map(classes)
    if self._label_map is not None:
      keep = [k for k in range(len(self._names)) if self._label(k) in self._label_map]
      if not keep:
        raise ValueError(f"ilsvrc_tar path={path!r} holds no image of classes={classes!r}")
      self._names = [self._names[k] for k in keep]
      self._wnids = [self._wnids[k] for k in keep]
      self._offset, self._size = self._offset[keep], self._size[keep]
      self.num_classes = len(self._label_map)

  def _label(self, i: int) -> int:
    """Standard label of member i (−1 when the labels file lacks it)."""
    name, wnid = self._names[i], self._wnids[i]
    if wnid:
      return wnid_label(wnid, self.path)
    return self._labels.get(name, -1)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_f"] = None
    return state

  def __len__(self):
    return len(self._names)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    name = self._names[i]
    try:
      label = self._label(i)
    except ValueError as e:
      return sources.error_record(name, f"no label: {e}")
    if label < 0:
      return sources.error_record(name, "no label: not in the validation labels file")
    if self._label_map is not None:
      label = self._label_map[label]
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
  of classes keeps ImageNet's labels) unless `classes` selects a subset (then 0..K−1); ids are
  base file names.

  Args:
    root: the class folders (or flat validation images), or with `split` their parent.
    labels_file: validation labels of a flat folder ("" tfds's bundled list).
    split: "" (all of `root`), or a tfds-style expression `NAME[slice]` reading the folder
      `root/NAME` (e.g. root=/data/imagenet, split="train[:10%]"), or `[slice]` slicing `root`
      itself. A sliced folder is read class by class in turn (module docstring), so every slice
      is class-balanced.
    classes: a class subset ("imagenet100" or a wnid file).
  """

  def __init__(self, root: str, labels_file: str = "", split: str = "", classes: str = ""):
    name, bracket, bounds = split.partition("[")
    folder = os.path.join(root, name) if name else root
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"imagenet_folder root={root!r}"
                              + (f" split={split!r}: {folder!r}" if name else "")
                              + " is not a directory")
    self.root = folder
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    files: list[str] = []
    labels: list[int] = []
    if class_dirs:
      for d in class_dirs:
        label = wnid_label(d, folder)  # a stray folder is a setup error, named now
        names = [f"{d}/{f}" for f in sorted(os.listdir(os.path.join(folder, d)))
                 if _is_image_name(f)]
        files += names
        labels += [label] * len(names)
    else:
      val_labels = read_validation_labels(labels_file)
      files = entries
      labels = [val_labels.get(f, -1) for f in entries]
    if not files:
      raise ValueError(f"imagenet_folder root={folder!r} holds no images")
    labels_arr = np.asarray(labels, np.int64)
    order = np.arange(len(files))
    if split:
      # Class by class in turn: sort by (rank of the file within its class, label).
      rank = np.zeros(len(files), np.int64)
      for label in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == label)
        rank[members] = np.arange(members.size)
      order = np.lexsort((labels_arr, rank))
      spec = f"records[{bounds}" if bracket else "records"
      order = order[sources.split_indices(spec, {"records": len(files)},
                                          where=f"imagenet_folder split={split!r}")]
    self._label_map = subset_label_map(classes)
    if self._label_map is not None:
      order = order[np.isin(labels_arr[order], list(self._label_map))]
    if order.size == 0:
      raise ValueError(f"imagenet_folder root={folder!r} split={split!r} classes={classes!r} "
                       "selects no image")
    self._files = [files[k] for k in order]
    self._labels = labels_arr[order]
    self.num_classes = len(self._label_map) if self._label_map else NUM_CLASSES

  def __len__(self):
    return len(self._files)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    rel, label = self._files[i], int(self._labels[i])
    name = os.path.basename(rel)
    if label < 0:
      return sources.error_record(name, "no label: not in the validation labels file")
    if self._label_map is not None:
      label = self._label_map[label]
    try:
      with open(os.path.join(self.root, rel), "rb") as f:
        data = f.read()
    except OSError as e:
      return sources.error_record(name, f"cannot read file: {e}")
    return sources.decoded_record(name, data, with_encoded, label=label)
