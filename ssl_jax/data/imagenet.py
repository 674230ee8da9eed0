"""ImageNet as users hold it, read without TensorFlow; a preflight check; a tfrecord converter.

Every source returns the `ssl_jax.data.sources` record contract with `label` in the standard
order (the 1000 ILSVRC2012 synsets sorted by wnid, `n01440764` -> 0 ... `n15075141` -> 999: the
order of tfds `imagenet2012`, torchvision and the official DetCon labels minus one) and `id` the
image's base file name (`n01440764_10026.JPEG`, `ILSVRC2012_val_00000001.JPEG`), which is
tfds's `file_name`, so every path gives the same (id, image, label) triples.

Sources (registered in `sources.SOURCES`):
  * `tfds`              tfds array_record copies (`sources.TfdsSource`, preflighted here).
  * `tfds_tfrecord`     tfds *tfrecord* copies (`imagenet2012/5.*/imagenet2012-train.tfrecord-*`),
                        which `tfds.data_source` cannot read: TFRecord framing with masked CRC32C
                        checks, `tf.train.Example` parsed with the proto tfds vendors
                        (`tensorflow_datasets.proto.tf_example_pb2`).
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
                        pooled as one object; this cannot be undone. Returned as "masks" so
                        training can read the files directly, or imported into the FH-mask
                        array_record format with `python -m ssl_jax.data.fh_masks
                        --source=detcon_tfrecord ...` (the masks are copied, not recomputed).

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
import gzip
import hashlib
import io
import json
import os
import re
import struct
import tarfile
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ssl_jax.data import sources

NUM_CLASSES = 1000
# The sources module's decode-and-record helper and base class, shared so every source follows
# one decoding policy.
_decoded_record = sources._decoded_record  # pylint: disable=protected-access
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
# CRC32C (Castagnoli), vectorised with NumPy: TFRecord checks every record with it.

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_CHUNK = 64  # bytes per lane in the vectorised CRC


def _byte_table() -> np.ndarray:
  t = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
  return t


_TABLE = _byte_table()
_BITS = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # [256, 8]


def _tables_from_basis(basis: np.ndarray) -> np.ndarray:
  """Images of the 32 unit vectors under a GF(2)-linear map -> [4, 256] byte lookup tables."""
  return np.stack([np.bitwise_xor.reduce(np.where(_BITS, basis[8 * j:8 * j + 8], 0), axis=1)
                   for j in range(4)]).astype(np.uint32)


def _apply(tables: np.ndarray, v: np.ndarray) -> np.ndarray:
  return (tables[0][v & 0xFF] ^ tables[1][(v >> 8) & 0xFF] ^ tables[2][(v >> 16) & 0xFF]
          ^ tables[3][v >> 24])


@functools.lru_cache(maxsize=None)
def _zeros_tables(level: int) -> np.ndarray:
  """Tables of the map "CRC register after _CHUNK * 2**level zero bytes" (linear over GF(2))."""
  if level == 0:
    v = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
    for _ in range(_CHUNK):
      v = _TABLE[v & 0xFF] ^ (v >> 8)
    return _tables_from_basis(v)
  half = _zeros_tables(level - 1)
  basis = _apply(half, _apply(half, (np.uint32(1) << np.arange(32, dtype=np.uint32))))
  return _tables_from_basis(basis.astype(np.uint32))


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (init and final xor 0xFFFFFFFF), as TFRecord uses.

  Long inputs are cut into 64-byte lanes whose raw CRCs are computed side by side, then merged
  pairwise (the CRC of `A || B` is the CRC of B xor A's register shifted over len(B) zero bytes);
  the initial 0xFFFFFFFF is folded in by xoring the first four bytes, and zero bytes prepended
  to reach a power-of-two lane count leave a zero register unchanged.
  """
  buf = np.frombuffer(bytes(data), np.uint8)
  n = buf.size
  if n < 4 * _CHUNK:
    c = 0xFFFFFFFF
    for b in bytes(data):
      c = int(_TABLE[(c ^ b) & 0xFF]) ^ (c >> 8)
    return c ^ 0xFFFFFFFF
  lanes = 1 << int(np.ceil(np.log2(-(-n // _CHUNK))))
  padded = np.zeros(lanes * _CHUNK, np.uint8)
  padded[-n:] = buf
  padded[-n:-n + 4] ^= 0xFF
  rows = padded.reshape(lanes, _CHUNK).astype(np.uint32)
  r = np.zeros(lanes, np.uint32)
  for j in range(_CHUNK):
    r = _TABLE[(r ^ rows[:, j]) & 0xFF] ^ (r >> 8)
  level = 0
  while r.size > 1:
    r = _apply(_zeros_tables(level), r[0::2]) ^ r[1::2]
    level += 1
  return int(r[0]) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits and add 0xA282EAD8 (mod 2**32)."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# TFRecord framing: uint64 length, uint32 masked_crc(length), data, uint32 masked_crc(data)

def write_tfrecord(path: str, records: Iterable[bytes]) -> int:
  """Writes `records` as one uncompressed TFRecord file; returns how many were written."""
  n = 0
  with open(path, "wb") as f:
    for data in records:
      length = struct.pack("<Q", len(data))
      f.write(length + struct.pack("<I", masked_crc32c(length)) + bytes(data)
              + struct.pack("<I", masked_crc32c(data)))
      n += 1
  return n


def index_tfrecord(path: str) -> tuple[np.ndarray, np.ndarray, Optional[str]]:
  """Offsets and lengths of the records of a TFRecord file, reading only the headers.

  Returns:
    (data offsets int64 [N], lengths int64 [N], problem): `problem` is None for a well-formed
    file, else why indexing stopped (a length header failing its CRC or a truncated tail); the
    records before it are returned (framing is lost after a bad length, so nothing after it can
    be found).
  """
  offsets, lengths, problem = [], [], None
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos = 0
    while pos < size:
      header = f.read(12)
      if len(header) < 12:
        problem = f"{path}: truncated record header at byte {pos}"
        break
      (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
      if masked_crc32c(header[:8]) != crc:
        problem = f"{path}: length CRC mismatch at byte {pos} (record {len(offsets)})"
        break
      if pos + 12 + length + 4 > size:
        problem = f"{path}: record {len(offsets)} at byte {pos} runs past the end of the file"
        break
      offsets.append(pos + 12)
      lengths.append(length)
      pos += 12 + length + 4
      f.seek(pos)
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), problem


def read_tfrecords(path: str, verify: bool = True) -> Iterator[bytes]:
  """All records of a TFRecord file, in order (raises ValueError on a CRC mismatch)."""
  offsets, lengths, problem = index_tfrecord(path)
  with open(path, "rb") as f:
    for off, n in zip(offsets, lengths):
      f.seek(int(off))
      yield _checked(f.read(int(n) + 4), path, int(off), verify)
  if problem:
    raise ValueError(problem)


def _checked(chunk: bytes, path: str, offset: int, verify: bool) -> bytes:
  data, (crc,) = chunk[:-4], struct.unpack("<I", chunk[-4:])
  if verify and masked_crc32c(data) != crc:
    raise ValueError(f"{path}: data CRC mismatch in the record at byte {offset}")
  return data


# ---------------------------------------------------------------------------------------------
# tf.train.Example through the proto tfds vendors (no TensorFlow)

def _example_pb2():
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel
  return tf_example_pb2


def make_example(features: Mapping[str, Any]) -> bytes:
  """{key: bytes | str | int | float | list of one kind} -> serialised tf.train.Example."""
  ex = _example_pb2().Example()
  for key, value in features.items():
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    feat = ex.features.feature[key]
    if all(isinstance(v, (bytes, str)) for v in values):
      feat.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
    elif all(isinstance(v, (int, np.integer)) for v in values):
      feat.int64_list.value.extend(int(v) for v in values)
    else:
      feat.float_list.value.extend(float(v) for v in values)
  return ex.SerializeToString()


def parse_example(data: bytes) -> dict[str, list]:
  """Serialised tf.train.Example -> {key: list of bytes | int | float}."""
  ex = _example_pb2().Example.FromString(data)
  out = {}
  for key, feat in ex.features.feature.items():
    kind = feat.WhichOneof("kind")
    out[key] = list(getattr(feat, kind).value) if kind else []
  return out


# ---------------------------------------------------------------------------------------------
# Index cache (TFRecord offsets, tar members): built once, keyed by the files' size and mtime

def _file_key(paths: Sequence[str]) -> str:
  parts = [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def cached_index(kind: str, paths: Sequence[str], build: Callable[[], dict],
                 cache_dir: Optional[str] = None) -> dict:
  """`build()` (a JSON-able dict), cached in `cache_dir`/index (default `sources.
  default_cache_dir()`) under a name hashing the paths, sizes and mtimes of `paths`."""
  folder = os.path.join(cache_dir or sources.default_cache_dir(), "index")
  path = os.path.join(folder, f"{kind}-{_file_key(paths)}.json.gz")
  if os.path.exists(path):
    with gzip.open(path, "rt") as f:
      return json.load(f)
  index = build()
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with gzip.open(tmp, "wt") as f:
    json.dump(index, f)
  os.replace(tmp, path)
  return index


# ---------------------------------------------------------------------------------------------
# TFRecord sources: tfds tfrecord copies and official DetCon files

class TFRecordSource(sources._Source):  # pylint: disable=protected-access
  """Records of TFRecord files of tf.train.Example with an encoded image (random access).

  Args:
    files: a glob pattern or a list of files, read in sorted order.
    image_key, label_key, id_key: Example keys ("" for no label); the id falls back to
      "<file>#<record>" when `id_key` is absent.
    label_offset: added to the stored label (DetCon stores 1..1000: -1).
    masks_key: Example key of raw uint8 FH ids [S, H, W] (DetCon), "" for none.
    mask_index: which of the S planes to return as "masks".
    verify_crc: check each record's data CRC (a mismatch gives an error record).
    cache_dir: where the offset index is cached.
  """

  def __init__(self, files: str | Sequence[str], image_key: str = "image",
               label_key: str = "label", id_key: str = "file_name", label_offset: int = 0,
               masks_key: str = "", mask_index: int = 0, verify_crc: bool = True,
               cache_dir: Optional[str] = None):
    paths = sorted(glob.glob(files)) if isinstance(files, str) else list(files)
    if not paths:
      raise FileNotFoundError(f"TFRecordSource: no files match {files!r}")
    self.files = paths
    self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
    self.label_offset, self.masks_key, self.mask_index = label_offset, masks_key, mask_index
    self.verify_crc = verify_crc
    self.num_classes = NUM_CLASSES if label_key else 0

    def build():
      out = {"files": [], "problems": []}
      for p in paths:
        offsets, lengths, problem = index_tfrecord(p)
        out["files"].append({"offsets": offsets.tolist(), "lengths": lengths.tolist()})
        if problem:
          out["problems"].append(problem)
      return out

    index = cached_index("tfrecord", paths, build, cache_dir)
    self.problems = index["problems"]  # corrupt framing: records after it are unreachable
    for problem in self.problems:
      warnings.warn(f"TFRecordSource: {problem}; the records after it in that file are skipped")
    counts = [len(f["offsets"]) for f in index["files"]]
    self._file_of = np.repeat(np.arange(len(paths), dtype=np.int32), counts)
    self._offset = np.concatenate([np.asarray(f["offsets"], np.int64) for f in index["files"]])
    self._length = np.concatenate([np.asarray(f["lengths"], np.int64) for f in index["files"]])
    self._handles: dict[int, Any] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_handles"] = {}
    return state

  def __len__(self):
    return int(self._offset.size)

  def _read(self, i: int) -> bytes:
    k = int(self._file_of[i])
    if k not in self._handles:
      self._handles[k] = open(self.files[k], "rb")  # pylint: disable=consider-using-with
    f = self._handles[k]
    f.seek(int(self._offset[i]))
    return _checked(f.read(int(self._length[i]) + 4), self.files[k], int(self._offset[i]),
                    self.verify_crc)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    fallback = f"{os.path.basename(self.files[int(self._file_of[i])])}#{i}"
    try:
      ex = parse_example(self._read(i))
    except Exception as e:  # CRC mismatch, bad proto: this record only
      return sources.error_record(fallback, f"cannot read record: {type(e).__name__}: {e}")
    rid = ex.get(self.id_key, [fallback.encode()])[0]
    rid = rid.decode("utf-8", "replace") if isinstance(rid, bytes) else str(rid)
    if not ex.get(self.image_key):
      return sources.error_record(rid, f"no {self.image_key!r} feature")
    extra = {}
    if self.label_key:
      if not ex.get(self.label_key):
        return sources.error_record(rid, f"no {self.label_key!r} feature")
      extra["label"] = int(ex[self.label_key][0]) + self.label_offset
    out = _decoded_record(rid, ex[self.image_key][0], with_encoded, **extra)
    if "error" in out or not self.masks_key:
      return out
    raw = b"".join(ex.get(self.masks_key, []))
    h, w = out["image"].shape[:2]
    if not raw or len(raw) % (h * w):
      return sources.error_record(rid, f"{self.masks_key!r} holds {len(raw)} bytes, not a "
                                       f"multiple of the image's {h}x{w} pixels")
    planes = np.frombuffer(raw, np.uint8).reshape(-1, h, w)
    if self.mask_index >= planes.shape[0]:
      return sources.error_record(rid, f"mask_index={self.mask_index} but the record holds "
                                       f"{planes.shape[0]} FH settings")
    out["masks"] = planes[self.mask_index].astype(np.int32)  # ids mod 256, see module docstring
    return out


def tfds_dataset_dir(name: str, data_dir: Optional[str]) -> str:
  """`data_dir` ("" or None: $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return (data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _version_dirs(name: str, data_dir: str) -> list[str]:
  root = os.path.join(data_dir, name)
  if not os.path.isdir(root):
    return []
  found = [os.path.join(root, v) for v in os.listdir(root)
           if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.isdir(os.path.join(root, v))]
  return sorted(found, key=lambda p: tuple(int(x) for x in os.path.basename(p).split(".")))


def _split_files(version_dir: str, name: str, split: str, fmt: str) -> list[str]:
  return sorted(glob.glob(os.path.join(version_dir, f"{name}-{split}.{fmt}-*-of-*")))


def tfds_tfrecord_source(name: str = "imagenet2012", split: str = "train",
                         data_dir: str = "", image_key: str = "image", label_key: str = "label",
                         id_key: str = "file_name", verify_crc: bool = True,
                         cache_dir: Optional[str] = None) -> TFRecordSource:
  """A tfrecord-prepared tfds copy (newest version folder), read without TensorFlow.

  `split` is a plain split name ("train", "validation"); tfds slicing syntax is not supported.
  """
  if not re.fullmatch(r"\w+", split):
    raise ValueError(f"tfds_tfrecord split={split!r}: give a plain split name (train, "
                     "validation); slicing needs the array_record copy (`python -m "
                     "ssl_jax.data.imagenet convert`)")
  info = check_tfds_dataset(name, data_dir, split, fmt="tfrecord",
                            keys=[k for k in (image_key, label_key) if k])
  src = TFRecordSource(info["files"], image_key=image_key, label_key=label_key, id_key=id_key,
                       verify_crc=verify_crc, cache_dir=cache_dir)
  src.num_classes = info["num_classes"] or src.num_classes
  return src


def detcon_tfrecord_source(data_dir: str, split: str = "train", mask_index: int = 0,
                           verify_crc: bool = True,
                           cache_dir: Optional[str] = None) -> TFRecordSource:
  """The official DetCon ImageNet-with-FH TFRecords (`{split}-*-of-*` in `data_dir`)."""
  prefix = {"train": "train", "validation": "validation", "test": "validation"}.get(split)
  if prefix is None:
    raise ValueError(f"detcon_tfrecord split={split!r} must be 'train' or 'validation'")
  pattern = os.path.join(data_dir, f"{prefix}-*-of-*")
  if not glob.glob(pattern):
    raise FileNotFoundError(
        f"detcon_tfrecord: no files {pattern} in data_dir={data_dir!r} (found: "
        f"{_listing(data_dir)}); DetCon's generate_fh_masks_for_imagenet.py writes "
        "train-XXXXX-of-02048 and validation-XXXXX-of-00256")
  return TFRecordSource(pattern, image_key="image/encoded", label_key="image/class/label",
                        id_key="image/filename", label_offset=-1,
                        masks_key="image/felzenszwalb_segmentations", mask_index=mask_index,
                        verify_crc=verify_crc, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------------------
# Raw ILSVRC2012: archives and extracted folders

def _is_image_name(name: str) -> bool:
  return not os.path.basename(name).startswith(".")


class IlsvrcTar(sources._Source):  # pylint: disable=protected-access
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
    index = cached_index("tar", [path], lambda: _index_tar(path), cache_dir)
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
    return _decoded_record(name, data, with_encoded, label=label)


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


class ImageNetFolder(sources._Source):  # pylint: disable=protected-access
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
    return _decoded_record(name, data, with_encoded, label=label)


# ---------------------------------------------------------------------------------------------
# Preflight: is a tfds dataset there, and in a format we can read?

class DatasetNotReadyError(RuntimeError):
  """The dataset is missing or unreadable; the message says what to run."""


def _listing(folder: str, limit: int = 12) -> str:
  if not os.path.isdir(folder):
    return "the folder does not exist"
  entries = sorted(os.listdir(folder))
  if not entries:
    return "an empty folder"
  more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
  return ", ".join(entries[:limit]) + more


def _fix_commands(name: str, data_dir: str) -> str:
  manual = os.path.join(data_dir, "downloads", "manual")
  tar = os.path.join(manual, "ILSVRC2012_img_train.tar")
  lines = [f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`"
           + (f" (ImageNet needs its manual-download tars in {manual} and TensorFlow)"
              if name.startswith("imagenet") else "")]
  if name.startswith("imagenet"):
    lines.append(
        "without TensorFlow, read the raw archive directly: `--config.data.source=ilsvrc_tar "
        f"--config.data.source_args='{{\"path\": \"{tar}\"}}'`, or for DetCon precompute FH "
        "masks from it: `python -m ssl_jax.data.fh_masks --source=ilsvrc_tar "
        f"--source_args=path={tar} --out=DIR --processes=N` then "
        "`--config.data.source_args.path=DIR` (docs/imagenet.md)")
  return "; or ".join(lines)


def check_tfds_dataset(name: str, data_dir: Optional[str], split: str,
                       fmt: str = "array_record", keys: Sequence[str] = ()) -> dict[str, Any]:
  """Checks that tfds dataset `name` is prepared in `data_dir` in format `fmt` with `split`.

  Args:
    name: tfds name, e.g. "imagenet2012".
    data_dir: tfds data folder ("" or None: tfds's default).
    split: a split expression; its split names ("train" of "train[:10%]+validation") are checked.
    fmt: "array_record" (what `tfds.data_source` reads) or "tfrecord".
    keys: feature keys that must exist.
  Returns:
    {"version_dir", "files" (of `split` when it names one split), "num_classes", "features"}.
  Raises:
    DatasetNotReadyError: naming data_dir, what was found, and the command that fixes it.
  """
  data_dir = tfds_dataset_dir(name, data_dir)
  if "://" in data_dir:  # remote (gs://): leave the check to tfds
    return {"version_dir": "", "files": [], "num_classes": 0, "features": []}
  versions = _version_dirs(name, data_dir)
  if not versions:
    raise DatasetNotReadyError(
        f"tfds dataset {name!r} is not prepared in data_dir={data_dir}: no "
        f"{os.path.join(data_dir, name, '<version>')} folder (data_dir holds: "
        f"{_listing(data_dir)}). Fix: {_fix_commands(name, data_dir)}")
  vdir = versions[-1]
  info_path = os.path.join(vdir, "dataset_info.json")
  if not os.path.exists(info_path):
    raise DatasetNotReadyError(
        f"tfds dataset {name!r} in data_dir={data_dir}: {vdir} has no dataset_info.json (found: "
        f"{_listing(vdir)}), an unfinished preparation. Fix: delete {vdir} and rerun "
        f"{_fix_commands(name, data_dir)}")
  with open(info_path) as f:
    info = json.load(f)
  file_format = info.get("fileFormat") or "tfrecord"  # tfds omits it for its old default
  split_info = {s["name"]: s for s in info.get("splits", [])}
  if file_format != fmt:
    if fmt == "array_record" and file_format == "tfrecord":
      raise DatasetNotReadyError(
          f"tfds dataset {name!r} in data_dir={data_dir} ({vdir}) is prepared as tfrecord, "
          "which tfds.data_source cannot read without TensorFlow. Fix, either: convert it once "
          f"(no TensorFlow): `python -m ssl_jax.data.imagenet convert --name={name} "
          f"--data_dir={data_dir}`; or read the tfrecords directly: "
          f"`--config.data.source=tfds_tfrecord` (same source_args)")
    raise DatasetNotReadyError(
        f"tfds dataset {name!r} in data_dir={data_dir} ({vdir}) is prepared as {file_format}, "
        f"expected {fmt}")
  wanted = [re.sub(r"\[.*?\]", "", s).strip() for s in split.split("+")]
  missing = [s for s in wanted if s not in split_info]
  if missing:
    raise DatasetNotReadyError(
        f"tfds dataset {name!r} in data_dir={data_dir} has no split {missing} (split={split!r}); "
        f"prepared splits: {sorted(split_info)}")
  files = []
  for s in wanted:
    found = _split_files(vdir, name, s, file_format)
    expected = len(split_info[s].get("shardLengths", []))
    if expected and len(found) != expected:
      raise DatasetNotReadyError(
          f"tfds dataset {name!r} split {s!r} in data_dir={data_dir}: {len(found)} "
          f"{file_format} shards found in {vdir}, dataset_info.json lists {expected}. Fix: "
          f"restore the missing files or re-prepare: {_fix_commands(name, data_dir)}")
    files += found
  features, num_classes = [], 0
  feat_path = os.path.join(vdir, "features.json")
  if os.path.exists(feat_path):
    with open(feat_path) as f:
      spec = json.load(f)
    feats = spec.get("featuresDict", {}).get("features", {})
    features = sorted(feats)
    label = feats.get("label", {}).get("classLabel", {})
    num_classes = int(label.get("numClasses", 0) or 0)
    absent = [k for k in keys if k not in feats]
    if absent:
      raise DatasetNotReadyError(
          f"tfds dataset {name!r} in data_dir={data_dir} has no feature {absent}; its features: "
          f"{features} (set image_key=/label_key= in source_args)")
  return {"version_dir": vdir, "files": files, "num_classes": num_classes,
          "features": features}


def is_prepared(name: str, data_dir: Optional[str] = "", split: str = "train",
                fmt: str = "array_record") -> bool:
  """Whether `check_tfds_dataset` passes."""
  try:
    check_tfds_dataset(name, data_dir, split, fmt)
    return True
  except DatasetNotReadyError:
    return False


# ---------------------------------------------------------------------------------------------
# convert: tfds tfrecord copy -> array_record copy that tfds.data_source reads

def convert_tfds_to_array_record(name: str, data_dir: str = "",
                                 verify_crc: bool = True, progress: bool = True) -> str:
  """Rewrites every tfrecord shard of the newest prepared version as array_record, in place.

  The records (serialised Examples) are copied unchanged; `dataset_info.json` then says
  `fileFormat: array_record` (the tfrecord files stay, listed as an alternative format).
  Resumable: a shard is written under a temporary name and renamed when complete.
  Returns the version folder.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  info_all = check_tfds_dataset(name, data_dir, split="+".join(_splits_of(name, data_dir)),
                                fmt="tfrecord")
  vdir = info_all["version_dir"]
  shards = info_all["files"]
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(shards), unit="shard", desc=f"tfrecord -> array_record in {vdir}")
  for src in shards:
    dst = src.replace(".tfrecord-", ".array_record-")
    if not os.path.exists(dst):
      tmp = os.path.join(vdir, f".{os.path.basename(dst)}.tmp-{os.getpid()}")
      writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
      try:
        for data in read_tfrecords(src, verify=verify_crc):
          writer.write(data)
      finally:
        writer.close()
      os.replace(tmp, dst)
    if bar:
      bar.update(1)
  if bar:
    bar.close()
  info_path = os.path.join(vdir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "array_record"
  info["alternativeFileFormats"] = sorted(set(info.get("alternativeFileFormats", []))
                                          | {"tfrecord"})
  tmp = f"{info_path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, info_path)
  return vdir


def _splits_of(name: str, data_dir: str) -> list[str]:
  versions = _version_dirs(name, tfds_dataset_dir(name, data_dir))
  if not versions or not os.path.exists(os.path.join(versions[-1], "dataset_info.json")):
    check_tfds_dataset(name, data_dir, "train", fmt="tfrecord")  # raises the clear error
  with open(os.path.join(versions[-1], "dataset_info.json")) as f:
    return [s["name"] for s in json.load(f).get("splits", [])]


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m ssl_jax.data.imagenet convert --data_dir=D [--name=imagenet2012]` or
  `python -m ssl_jax.data.imagenet check --data_dir=D [--split=train]`."""
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description="ImageNet preparation without TensorFlow.")
  p.add_argument("command", choices=["convert", "check"])
  p.add_argument("--name", default="imagenet2012")
  p.add_argument("--data_dir", default="")
  p.add_argument("--split", default="train")
  p.add_argument("--no_verify_crc", action="store_true")
  a = p.parse_args(argv)
  if a.command == "convert":
    vdir = convert_tfds_to_array_record(a.name, a.data_dir, verify_crc=not a.no_verify_crc)
    print(f"{vdir}: array_record shards written; tfds.data_source reads it now")
  else:
    info = check_tfds_dataset(a.name, a.data_dir, a.split)
    print(f"{info['version_dir']}: split {a.split!r} ready, {len(info['files'])} shards, "
          f"features {info['features']}")


if __name__ == "__main__":
  main()
