"""Image files for data-source tests: every awkward case a real image folder holds.

`make_bad_image_folder(root)` writes them under `root/cases/` (one class) and returns, per id
(path relative to root), what a source must produce: ("error", None) for files that cannot
become an image, or ("ok", expected) where `expected` is a uint8 [H, W, 3] reference built
independently of PIL's conversions (from the arrays the file was made from) plus a tolerance.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
  """Smooth colour gradient with blocks: survives JPEG with small error, asymmetric."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([255 * y / max(h - 1, 1), 255 * x / max(w - 1, 1),
                  np.full((h, w), 128.0)], -1)
  img[: h // 3, : w // 3] = rng.integers(0, 256, 3)  # a distinct top-left block
  return img.round().astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header declares width x height but carries (almost) no pixel data."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def make_bad_image_folder(root: str, large_side: int = 1600) -> dict[str, tuple]:
  """Writes the cases; returns {id: (kind, expected [H, W, 3] or None, tolerance)}.

  `tolerance` bounds the mean absolute difference (JPEG cases are lossy; 0 means exact).
  """
  d = os.path.join(root, "cases")
  os.makedirs(d, exist_ok=True)
  cases: dict[str, tuple] = {}

  def put(name: str, data: bytes, kind: str, expected=None, tol: int = 0):
    with open(os.path.join(d, name), "wb") as f:
      f.write(data)
    cases[f"cases/{name}"] = (kind, expected, tol)

  rng = np.random.default_rng(0)
  base = _rgb(24, 40, 1)
  jpeg = _save(Image.fromarray(base), "JPEG", quality=95)

  put("corrupt.jpg", rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "error")
  put("truncated.jpg", jpeg[: len(jpeg) // 2], "error")
  put("notes.txt", b"not an image\n", "error")
  put("bomb.png", png_header_only(20000, 20000), "error")  # 400 M px > MAX_IMAGE_PIXELS

  grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  put("grey.png", _save(Image.fromarray(grey), "PNG"), "ok", np.repeat(grey[..., None], 3, 2))

  rgba = np.concatenate([base, rng.integers(0, 256, (24, 40, 1), dtype=np.uint8)], -1)
  put("rgba.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), "ok", base)  # alpha dropped

  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  idx = rng.integers(0, 256, (16, 18), dtype=np.uint8)
  p = Image.fromarray(idx, "P")
  p.putpalette(palette.reshape(-1).tolist())
  put("palette.png", _save(p, "PNG"), "ok", palette[idx])

  flat_cmyk = np.zeros((24, 40, 3), np.uint8)
  flat_cmyk[:, :20] = (200, 40, 60)
  flat_cmyk[:, 20:] = (30, 160, 220)
  put("cmyk.jpg", _save(Image.fromarray(flat_cmyk).convert("CMYK"), "JPEG", quality=98),
      "ok", flat_cmyk, 3)

  g16 = rng.integers(0, 65536, (12, 14)).astype(np.uint16)
  put("grey16.png", _save(Image.fromarray(g16), "PNG"), "ok",
      np.repeat(((g16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)[..., None],
                3, 2))

  exif = Image.Exif()
  exif[0x0112] = 6  # orientation 6: the viewer rotates the stored pixels 90 degrees clockwise
  put("exif_rot.jpg", _save(Image.fromarray(base), "JPEG", quality=95, exif=exif), "ok",
      np.rot90(base, k=-1), 4)

  tiny = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  put("tiny.png", _save(Image.fromarray(tiny), "PNG"), "ok", tiny)

  large = _rgb(large_side * 3 // 4, large_side, 2)
  put("large.jpg", _save(Image.fromarray(large), "JPEG", quality=90), "ok", large, 3)

  flat = np.full((32, 32, 3), 77, np.uint8)  # FH gives a single segment
  put("flat.png", _save(Image.fromarray(flat), "PNG"), "ok", flat)
  return cases


def noise_image(side: int, seed: int = 0) -> np.ndarray:
  """uint8 [side, side, 3] uniform noise (FH with a small min_size gives many segments)."""
  return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def make_noise_folder(root: str, n: int, side: int = 48, classes: int = 2) -> None:
  """`n` PNG noise images spread over `classes` class folders c0, c1, ..."""
  for i in range(n):
    d = os.path.join(root, f"c{i % classes}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(noise_image(side, i)).save(os.path.join(d, f"img{i:03d}.png"))
