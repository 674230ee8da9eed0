"""One FH-mask record <-> bytes (msgpack; never pickle, so reading a shard runs no code).

A record written by `ssl_jax.data.fh_masks` holds:
  `id` str, `label` int (-1 when the source has none), `height`, `width` int (of the decoded,
  EXIF-transposed image), `image` bytes (the source's original encoded file, never re-encoded;
  sources without files give a lossless PNG), `masks` {"<scale>_<min_size>": 16-bit PNG bytes},
  `segments` {"<scale>_<min_size>": number of FH segments}, `capped` bool (FH ran below the
  resolution asked because the image exceeds the FH pixel cap), and for a record that could not
  be processed `error` str instead of image and masks (kept so every shard still holds its
  contiguous range of source records).

Masks are stored as 16-bit greyscale PNG: FH ids 0..n-1 survive unchanged for n <= 65536 (an
8-bit format would wrap ids above 255 onto other segments). An image with more segments cannot be
stored and fails with an error naming it.
"""
from __future__ import annotations

import io
from typing import Any, Mapping

import msgpack
import numpy as np
from PIL import Image

MAX_SEGMENTS = 65536  # ids 0..65535 fit uint16


def mask_key(scale: float, min_size: int) -> str:
  """The `masks` dict key of one FH setting, e.g. (1000, 1000) -> "1000_1000"."""
  return f"{_num(scale)}_{_num(min_size)}"


def _num(x: float) -> str:
  x = float(x)
  return str(int(x)) if x.is_integer() else repr(x)


def encode_mask(mask: np.ndarray, record_id: str = "?") -> bytes:
  """Segment ids -> 16-bit greyscale PNG bytes.

  Args:
    mask: [H, W] integer segment ids in [0, 65535].
    record_id: named in the error.
  Raises:
    ValueError: ids outside [0, 65535] (more segments than 16 bits hold), or a mask not 2-D.
  """
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"record {record_id!r}: mask of shape {mask.shape} is not [H, W]")
  if mask.size and (mask.min() < 0 or mask.max() >= MAX_SEGMENTS):
    raise ValueError(f"record {record_id!r}: segment ids span [{mask.min()}, {mask.max()}]; "
                     f"16-bit PNG masks hold ids below {MAX_SEGMENTS} (use a larger FH scale "
                     "or min_size for this image)")
  buf = io.BytesIO()
  Image.fromarray(mask.astype(np.uint16)).save(buf, format="PNG")
  return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
  """16-bit PNG bytes -> int32 [H, W] segment ids."""
  with Image.open(io.BytesIO(data)) as im:
    # PIL opens 16-bit greyscale PNG as "I;16" (or "I"); both convert losslessly to int32.
    return np.asarray(im, dtype=np.int32)


def encode_record(record: Mapping[str, Any]) -> bytes:
  """A record dict (fields in the module docstring) -> msgpack bytes."""
  out = {"id": str(record["id"]), "label": int(record.get("label", -1))}
  if "error" in record:
    out["error"] = str(record["error"])
  else:
    out.update(height=int(record["height"]), width=int(record["width"]),
               image=bytes(record["image"]),
               masks={str(k): bytes(v) for k, v in record["masks"].items()},
               segments={str(k): int(v) for k, v in record["segments"].items()},
               capped=bool(record.get("capped", False)))
  return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """msgpack bytes -> the record dict (image and masks still encoded)."""
  return msgpack.unpackb(data, raw=False)
