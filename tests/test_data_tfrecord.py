"""TFRecord without TensorFlow: CRC32C against a bitwise reference, framing, corruption, the
Example wire format, and `TFRecordSource` keeping masks aligned with EXIF-rotated images."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from ssl_jax.data import tfrecord


# --- CRC32C, TFRecord framing, Example wire format --------------------------------------------

def _crc32c_bitwise(data: bytes) -> int:
  """Reference: the Castagnoli CRC bit by bit (RFC 3720 B.4), no tables."""
  c = 0xFFFFFFFF
  for b in data:
    c ^= b
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
  return c ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 255, 256, 257, 320, 1000, 4096, 4097, 9000])
def test_crc32c_matches_bitwise_reference(n):
  data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
  assert tfrecord.crc32c(data) == _crc32c_bitwise(data)


def test_crc32c_known_values_and_mask():
  assert tfrecord.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
  data = b"\x07" * 300
  c = _crc32c_bitwise(data)
  assert tfrecord.masked_crc32c(data) == ((((c >> 15) | (c << 17)) & 0xFFFFFFFF)
                                          + 0xA282EAD8) % 2**32


def test_example_wire_format_and_round_trip():
  # Example{features{feature{key:"a" value{bytes_list{value:"x"}}}}} by hand: field tags 1 (0x0a),
  # lengths as single-byte varints.
  assert tfrecord.make_example({"a": b"x"}) == b"\n\x0c\n\n\n\x01a\x12\x05\n\x03\n\x01x"
  ex = tfrecord.parse_example(tfrecord.make_example(
      {"img": b"\x00\xff", "label": 7, "f": [0.5, 2.0], "name": "n.JPEG", "ids": [300, -1]}))
  assert ex == {"img": [b"\x00\xff"], "label": [7], "f": [0.5, 2.0], "name": [b"n.JPEG"],
                "ids": [300, -1]}


def test_tfrecord_framing_and_corruption(tmp_path):
  path = str(tmp_path / "r.tfrecord")
  recs = [b"", b"abc", bytes(range(256)) * 3]
  assert tfrecord.write_tfrecord(path, recs) == 3
  raw = open(path, "rb").read()
  # Reference framing: length u64 LE, masked CRC of it, data, masked CRC of data.
  assert raw[:8] == struct.pack("<Q", 0) and len(raw) == sum(16 + len(r) for r in recs)
  assert list(tfrecord.read_tfrecords(path)) == recs

  flipped = bytearray(raw)
  flipped[16 + 12 + 1] ^= 1  # inside "abc"
  open(path, "wb").write(bytes(flipped))
  with pytest.raises(ValueError, match="data CRC mismatch"):
    list(tfrecord.read_tfrecords(path))

  bad_len = bytearray(raw)
  bad_len[16] ^= 1  # length of record 1
  open(path, "wb").write(bytes(bad_len))
  offsets, _, problem = tfrecord.index_tfrecord(path)
  assert len(offsets) == 1 and "length CRC mismatch" in problem

  open(path, "wb").write(raw[:-3])  # truncated tail
  offsets, _, problem = tfrecord.index_tfrecord(path)
  assert len(offsets) == 2 and "past the end" in problem




# --- official DetCon TFRecords: a mask stays aligned with an EXIF-rotated image ----------------

# 8 flat colour blocks (2 rows x 4 columns) on a 24 x 40 image as stored in the JPEG; the FH ids
# DetCon would have computed on that un-rotated decode are the block indices.
_PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20],
                     [230, 20, 230], [20, 230, 230], [240, 240, 240], [15, 15, 15]], np.uint8)


def _stored_blocks() -> tuple[np.ndarray, np.ndarray]:
  ids = (np.arange(24)[:, None] // 12) * 4 + np.arange(40)[None, :] // 10
  return _PALETTE[ids], ids


def _write_detcon_dir(folder, orientation: int) -> np.ndarray:
  """One record in the official DetCon layout (label 1..1000, raw uint8 id planes [S, H, W])."""
  pixels, ids = _stored_blocks()
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=95, subsampling=0, exif=exif)
  folder.mkdir(parents=True, exist_ok=True)
  tfrecord.write_tfrecord(str(folder / "train-00000-of-00001"), [tfrecord.make_example({
      "image/encoded": buf.getvalue(), "image/class/label": 1, "image/filename": "rot.JPEG",
      "image/felzenszwalb_segmentations": ids.astype(np.uint8).tobytes()})])
  return ids


def _assert_aligned(image: np.ndarray, masks: np.ndarray):
  """Each segment's mean colour in the image is its block's colour: image and mask agree."""
  assert masks.shape == image.shape[:2]
  assert sorted(np.unique(masks)) == list(range(8))
  for k in range(8):
    mean = image[masks == k].astype(float).mean(0)
    nearest = int(np.argmin(np.abs(_PALETTE.astype(float) - mean).sum(1)))
    assert nearest == k, (k, mean)
    assert np.abs(mean - _PALETTE[k]).max() < 12, (k, mean)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_detcon_masks_follow_exif_rotation(tmp_path, orientation):
  from ssl_jax.data import imagenet
  ids = _write_detcon_dir(tmp_path / "detcon", orientation)
  src = imagenet.detcon_tfrecord_source(str(tmp_path / "detcon"), cache_dir=str(tmp_path / "c"))
  rec = src[0]
  assert "error" not in rec, rec
  # The image is as a viewer shows it (EXIF applied, as every other source decodes it) ...
  assert rec["image"].shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
  # ... and the mask, stored for the un-rotated pixels, is turned with it.
  _assert_aligned(rec["image"], rec["masks"])
  if orientation == 6:  # the viewer turns the stored pixels 90 degrees clockwise
    np.testing.assert_array_equal(rec["masks"], np.rot90(ids, k=-1))


def test_detcon_rotated_masks_stay_aligned_through_fh_import(tmp_path):
  from ssl_jax.data import fh_masks
  _write_detcon_dir(tmp_path / "detcon", 6)
  out = str(tmp_path / "fh")
  meta = fh_masks.precompute("detcon_tfrecord", {"data_dir": str(tmp_path / "detcon"),
                                                 "cache_dir": str(tmp_path / "c")},
                             out, scales=[1000], min_sizes=[1000], progress=False)
  assert meta["counts"]["failed"] == 0
  rec = fh_masks.FHMaskDataset(out, scale=1000, min_size=1000)[0]
  assert rec["image"].shape == (40, 24, 3)
  _assert_aligned(rec["image"], rec["masks"])
