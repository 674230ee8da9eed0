"""TFRecord files without TensorFlow: framing, CRC32C, `tf.train.Example`, and a random-access
source over them.

A TFRecord file is a sequence of records, each `uint64 length | uint32 masked_crc32c(length) |
data | uint32 masked_crc32c(data)` (little-endian), where CRC32C is the Castagnoli CRC and the
mask is TFRecord's rotate-and-add. Records here are serialised `tf.train.Example` protos, parsed
with the proto tensorflow-datasets vendors (`tensorflow_datasets.proto.tf_example_pb2`).

`TFRecordSource` reads such files by random access through an offset index built once (headers
only) and cached by `cached_index`, which `imagenet.IlsvrcTar` also uses for its tar index. Bad
records never raise: a CRC mismatch, a bad proto or a missing feature gives an error record.
"""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import struct
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ssl_jax.data import sources


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
# A random-access source over TFRecord files of tf.train.Example

class TFRecordSource(sources.Source):
  """Records of TFRecord files of tf.train.Example with an encoded image (random access).

  Args:
    files: a glob pattern or a list of files, read in sorted order.
    image_key, label_key, id_key: Example keys ("" for no label); the id falls back to
      "<file>#<record>" when `id_key` is absent.
    label_offset: added to the stored label (DetCon stores 1..1000: -1).
    num_classes: the class count, 0 if unknown.
    masks_key: Example key of raw uint8 segment ids [S, H, W] ("" for none), H, W those of the
      image *as stored in the file*: the official DetCon files computed them on a decode that
      ignores EXIF orientation, so for an image with an EXIF Orientation tag the mask is turned
      exactly as `sources.decode_image` turns the pixels (`sources.apply_exif_orientation`),
      which keeps image and mask aligned.
    mask_index: which of the S planes to return as "masks".
    verify_crc: check each record's data CRC (a mismatch gives an error record).
    cache_dir: where the offset index is cached.
  """

  def __init__(self, files: str | Sequence[str], image_key: str = "image",
               label_key: str = "label", id_key: str = "file_name", label_offset: int = 0,
               num_classes: int = 0, masks_key: str = "", mask_index: int = 0,
               verify_crc: bool = True, cache_dir: Optional[str] = None):
    paths = sorted(glob.glob(files)) if isinstance(files, str) else list(files)
    if not paths:
      raise FileNotFoundError(f"TFRecordSource: no files match {files!r}")
    self.files = paths
    self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
    self.label_offset, self.masks_key, self.mask_index = label_offset, masks_key, mask_index
    self.verify_crc = verify_crc
    self.num_classes = int(num_classes)

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

  @property
  def provides_masks(self) -> bool:
    """Whether records carry precomputed "masks" (the FH precompute copies them)."""
    return bool(self.masks_key)

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
    encoded = ex[self.image_key][0]
    out = sources.decoded_record(rid, encoded, with_encoded, **extra)
    if "error" in out or not self.masks_key:
      return out
    # The mask planes follow the pixels as stored; the decoded image may have been turned by
    # its EXIF orientation (tags 5..8 swap height and width).
    orientation = sources.exif_orientation(encoded)
    h, w = out["image"].shape[:2]
    if orientation in (5, 6, 7, 8):
      h, w = w, h
    raw = b"".join(ex.get(self.masks_key, []))
    if not raw or len(raw) % (h * w):
      return sources.error_record(rid, f"{self.masks_key!r} holds {len(raw)} bytes, not a "
                                       f"multiple of the image's {h}x{w} stored pixels")
    planes = np.frombuffer(raw, np.uint8).reshape(-1, h, w)
    if self.mask_index >= planes.shape[0]:
      return sources.error_record(rid, f"mask_index={self.mask_index} but the record holds "
                                       f"{planes.shape[0]} FH settings")
    mask = sources.apply_exif_orientation(planes[self.mask_index], orientation)
    out["masks"] = mask.astype(np.int32)  # DetCon's ids are stored mod 256 (imagenet docstring)
    return out
