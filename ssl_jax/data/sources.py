"""Random-access image sources: the record contract, the decoding policy, the base class, the
small built-in sources, and the name -> source table every other data module registers in.

Record contract (the grain pipeline and the view code rely on it):
  {"image": uint8 [H, W, 3] RGB, "id": str (stable), "label": int (when known),
   "masks": int32 [H, W] (FH segment ids, aligned with "image"; FH-mask sources only),
   "segmentation": int32 [H, W] (sources with ground truth only)}

Bad input never raises from `__getitem__`: it returns `{"id": str, "error": reason}`, which the
pipeline drops and counts (`skip_reason`). Decoding policy (`decode_image`):
  * EXIF orientation is applied (`ImageOps.exif_transpose`), so pixels are as a viewer shows them.
    A mask stored for the pixels as the file holds them (official DetCon TFRecords) is turned the
    same way (`exif_orientation`, `apply_exif_orientation`), so image and mask stay aligned.
  * Greyscale, palette, RGBA (alpha dropped, as PIL's and tf.image's `convert to RGB`), CMYK and
    other modes become 8-bit RGB; 16-bit greyscale is *scaled* to 8 bits (round(v * 255 / 65535)),
    not clipped, which would turn most of a 16-bit image white.
  * Images up to `MAX_IMAGE_PIXELS` pixels decode. PIL's own decompression-bomb guard (89 M
    pixels warns, 179 M raises) is raised to this limit, as a module-level PIL setting, because
    legitimate photos (panoramas, scans) exceed PIL's default; larger files give an error record.
  * Truncated or corrupt files and non-images give error records (PIL's `LOAD_TRUNCATED_IMAGES`
    stays off: a half-decoded image is grey garbage a model would train on).

Sources are picklable and open files lazily, so each grain worker process opens its own handles.
Every source also has `get(i, with_encoded=True)`, which adds `"encoded"`: the original file
bytes (or a lossless PNG for array sources), used by the FH precompute to store images unchanged.

Where the other sources live (each registered in `SOURCES` by "module:attribute"):
  `tfds_source` (tfds array_record and tfrecord copies), `imagenet` (ILSVRC2012 archives and
  folders, official DetCon TFRecords), `tfrecord` (the TFRecord format and `TFRecordSource`),
  `fh_masks` (precomputed FH masks: the writer and `FHMaskDataset`).
"""
from __future__ import annotations

import gzip
import importlib
import io
import os
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

# 2**28 pixels (a 16384 x 16384 image, 805 MB as RGB): above PIL's default bomb limit so large
# photos decode, small enough that one bad header cannot exhaust a worker's memory.
MAX_IMAGE_PIXELS = 2**28


def error_record(record_id: str, reason: str) -> dict[str, str]:
  """The record a source returns instead of raising on bad input."""
  return {"id": str(record_id), "error": str(reason)}


def skip_reason(record: Mapping[str, Any]) -> Optional[str]:
  """Why the pipeline must drop `record` (its `error`), or None for a good record."""
  return record.get("error")


def pil_to_rgb(im: Image.Image) -> np.ndarray:
  """A loaded PIL image of any mode -> uint8 [H, W, 3] RGB (policy in the module docstring)."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(im).astype(np.int64)
    if im.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
      raise ValueError(f"32-bit integer image with values in [{a.min()}, {a.max()}] "
                       "has no defined 8-bit scaling")
    a = ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
  if im.mode == "F":
    a = np.asarray(im, dtype=np.float64)
    # Float images: [0, 1] is the common convention (scale); otherwise assume [0, 255].
    a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
    a = np.round(np.clip(np.nan_to_num(a), 0, 255)).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
  if im.mode != "RGB":
    im = im.convert("RGB")
  return np.asarray(im, dtype=np.uint8).copy()


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """Encoded image bytes (any PIL format) -> uint8 [H, W, 3] RGB, EXIF orientation applied.

  Raises:
    ValueError: not an image, truncated, corrupt, or more than `max_pixels` pixels.
  """
  if (Image.MAX_IMAGE_PIXELS or 0) < max_pixels and Image.MAX_IMAGE_PIXELS is not None:
    Image.MAX_IMAGE_PIXELS = max_pixels  # see the module docstring
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if w * h > max_pixels:
          raise ValueError(f"image of {w}x{h} pixels exceeds the decode limit of {max_pixels} "
                           "pixels (ssl_jax.data.sources.MAX_IMAGE_PIXELS)")
        if w == 0 or h == 0:
          raise ValueError(f"image of {w}x{h} pixels is empty")
        im.load()
        im = ImageOps.exif_transpose(im)
        return pil_to_rgb(im)
  except ValueError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files
    raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from e


def exif_orientation(data: bytes) -> int:
  """The EXIF Orientation tag (1..8) of encoded image bytes; 1 when absent or unreadable.

  The tag `decode_image` (through `ImageOps.exif_transpose`) turns the pixels by.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1))
  except Exception:  # pylint: disable=broad-except  # an unreadable header: decode reports it
    return 1
  return orientation if orientation in _EXIF_TURNS else 1


# EXIF orientation -> the array operation PIL's `exif_transpose` applies (its Image.Transpose
# methods FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM, TRANSPOSE, ROTATE_270, TRANSVERSE,
# ROTATE_90 for tags 2..8), on the first two axes of an [H, W, ...] array.
_EXIF_TURNS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
    8: lambda a: np.rot90(a, k=1),
}


def apply_exif_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
  """Turns `array` [H, W, ...] as `decode_image` turns an image with EXIF tag `orientation`.

  For data aligned with the stored (un-rotated) pixels, e.g. a segmentation mask computed on a
  decode that ignored EXIF. Tags 5..8 swap H and W.
  """
  if orientation not in _EXIF_TURNS:
    raise ValueError(f"orientation={orientation} is not an EXIF orientation (1..8)")
  return np.ascontiguousarray(_EXIF_TURNS[orientation](np.asarray(array)))


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> lossless PNG bytes (for sources that hold arrays, not files)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def decoded_record(record_id: str, data: bytes, with_encoded: bool,
                   **extra: Any) -> dict[str, Any]:
  """Encoded bytes -> `{"image", "id", **extra}` (+ `"encoded"`), or an error record."""
  try:
    image = decode_image(data)
  except ValueError as e:
    return error_record(record_id, str(e))
  out = {"image": image, "id": record_id, **extra}
  if with_encoded:
    out["encoded"] = bytes(data)
  return out


def default_cache_dir() -> str:
  """$SSL_JAX_CACHE, else ~/.cache/ssl_jax: where indexes and FH-mask caches are written."""
  return os.environ.get("SSL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "ssl_jax")


def describe_folder(folder: str, limit: int = 12) -> str:
  """What `folder` holds, for error messages: its first `limit` entries, or why there are none."""
  if not os.path.isdir(folder):
    return "the folder does not exist"
  entries = sorted(os.listdir(folder))
  if not entries:
    return "an empty folder"
  more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
  return ", ".join(entries[:limit]) + more


class Source:
  """Base: `__getitem__(i)` is `get(i)`; subclasses implement `get` and `__len__`."""

  num_classes = 0

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"{type(self).__name__} index {i} out of range for {n} records")
    return self.get(int(i) % n)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}({len(self)} records)"


# ---------------------------------------------------------------------------------------------
# Subsets: tfds split slices and class subsets over any source

def split_indices(spec: str, sizes: Mapping[str, int],
                  shard_lengths: Optional[Mapping[str, Sequence[int]]] = None,
                  where: str = "split") -> np.ndarray:
  """Record indices of a tfds split expression over splits stored one after another.

  The syntax and the arithmetic are tfds's (`tfds.core.ReadInstruction`): `train`,
  `train[:10%]`, `train[1000:2000]`, `train[-5%:]`, `train[:4shard]`, and sums
  `train[:10%]+validation`; percent boundaries round to the closest record (tfds's default
  rounding), so `train[:10%]` of ImageNet's 1,281,167 records is the first 128,117.

  Args:
    spec: the expression.
    sizes: split name -> record count, in the order the splits are laid out (the indices of a
      later split start after the earlier ones).
    shard_lengths: split name -> records per shard (only for `shard` slices).
    where: names the argument in errors.

  Returns:
    int64 [K] indices into the concatenated splits, in the expression's order.
  """
  import types  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  starts, start = {}, 0
  for name, n in sizes.items():
    starts[name] = start
    start += int(n)
  infos = {name: types.SimpleNamespace(num_examples=int(n),
                                       shard_lengths=list((shard_lengths or {}).get(name, [n])))
           for name, n in sizes.items()}
  try:
    absolute = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
  except (ValueError, AssertionError, KeyError, NotImplementedError) as e:
    raise ValueError(f"{where}={spec!r}: {e} (tfds split syntax, e.g. 'train[:10%]' or "
                     f"'train[1000:2000]'; splits here: {list(sizes)})") from e
  parts = []
  for a in absolute:
    n = int(sizes[a.splitname])
    lo = 0 if a.from_ is None else int(a.from_)
    hi = n if a.to is None else int(a.to)
    parts.append(starts[a.splitname] + np.arange(lo, max(lo, hi), dtype=np.int64))
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class Subset(Source):
  """Records `indices` of `source`, in that order, with labels remapped through `label_map`.

  A record whose label is not in `label_map` becomes an error record (the pipeline drops it).
  Built by the ImageNet sources for split slices and class subsets (ImageNet-100).
  """

  def __init__(self, source: Source, indices: Sequence[int],
               label_map: Optional[Mapping[int, int]] = None, num_classes: int = 0):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.label_map = dict(label_map) if label_map is not None else None
    self.num_classes = int(num_classes or getattr(source, "num_classes", 0))
    if self.indices.size == 0:
      raise ValueError(f"the subset of {source!r} is empty")

  @property
  def provides_masks(self) -> bool:
    return bool(getattr(self.source, "provides_masks", False))

  def __len__(self):
    return int(self.indices.size)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    record = self.source.get(int(self.indices[i]), with_encoded)
    if self.label_map is None or "error" in record or "label" not in record:
      return record
    label = self.label_map.get(int(record["label"]))
    if label is None:
      return error_record(record.get("id", str(i)), f"label {record['label']} is not in the "
                          "class subset")
    return {**record, "label": label}


# ---------------------------------------------------------------------------------------------
# Built-in photos (scikit-image, bundled in its wheel, no download)

# Every one ships inside scikit-image's wheel (skimage/data/*.png|jpg), so none needs a
# download. stereo_motorcycle returns (left, right, disparity): the left view is used.
BUILTIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "stereo_motorcycle", "colorwheel", "cat")
PROBE_FRACTION = 0.25  # the right quarter of each photo is held out for the probe split


def load_builtin_photo(name: str) -> np.ndarray:
  """One of `BUILTIN_PHOTOS` as uint8 [H, W, 3]."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  if name not in BUILTIN_PHOTOS:
    raise ValueError(f"unknown built-in photo {name!r}; known: {BUILTIN_PHOTOS}")
  image = getattr(skimage.data, name)()
  if isinstance(image, tuple):
    image = image[0]
  return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def builtin_photo_region(height: int, width: int, split: str) -> tuple[int, int, int, int]:
  """(top, left, h, w) of `split`'s region: "train" the left 75 %, "probe" the right 25 %."""
  cut = int(round(width * (1.0 - PROBE_FRACTION)))
  if split == "train":
    return 0, 0, height, cut
  if split == "probe":
    return 0, cut, height, width - cut
  raise ValueError(f"BuiltinPhotos split={split!r} must be 'train' or 'probe'")


class BuiltinPhotos(Source):
  """Square crops of scikit-image's bundled colour photos, each photo one class.

  "train" crops lie in the left 75 % of each photo and "probe" crops in the right 25 %, so a
  kNN/linear probe on "probe" measures generalisation to unseen pixels of the same scenes. A crop
  is a square of side ~ U[0.15, 0.3] x the photo's short side (clipped to the region), placed
  uniformly in the region and resized (bilinear, antialiased) to `crop_size`; crops are fixed by
  `seed`.

  Args:
    split: "train" or "probe".
    num_per_photo: crops per photo (label = photo index in `photos`).
    crop_size: output side in pixels.
    seed: fixes the crop windows.
    photos: subset/order of `BUILTIN_PHOTOS`.
  """

  def __init__(self, split: str = "train", num_per_photo: int = 64, crop_size: int = 96,
               seed: int = 0, photos: Sequence[str] = BUILTIN_PHOTOS):
    if num_per_photo <= 0 or crop_size <= 0:
      raise ValueError(f"BuiltinPhotos num_per_photo={num_per_photo} and crop_size={crop_size} "
                       "must be positive")
    builtin_photo_region(1, 4, split)  # validates split
    self.split, self.num_per_photo, self.crop_size = split, int(num_per_photo), int(crop_size)
    self.seed, self.photos = int(seed), tuple(photos)
    for p in self.photos:
      if p not in BUILTIN_PHOTOS:
        raise ValueError(f"BuiltinPhotos photos: unknown photo {p!r}; known: {BUILTIN_PHOTOS}")
    self.num_classes = len(self.photos)
    self._images: dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_images"] = {}  # reloaded lazily in each worker process
    return state

  def __len__(self):
    return len(self.photos) * self.num_per_photo

  def _photo(self, k: int) -> np.ndarray:
    # Per photo: a worker writing one FH shard usually needs one or two of the ten photos.
    if k not in self._images:
      self._images[k] = load_builtin_photo(self.photos[k])
    return self._images[k]

  def box(self, i: int) -> tuple[int, int, int]:
    """(top, left, side) in photo pixels of crop `i` (photo `i // num_per_photo`)."""
    k, j = divmod(int(i), self.num_per_photo)
    h, w = self._photo(k).shape[:2]
    top0, left0, rh, rw = builtin_photo_region(h, w, self.split)
    # Seeded by (seed, split, photo, crop): independent of the other crops and splits.
    rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, k, j])
    side = int(round(rng.uniform(0.15, 0.3) * min(h, w)))
    side = max(1, min(side, rh, rw))
    top = top0 + int(rng.integers(0, rh - side + 1))
    left = left0 + int(rng.integers(0, rw - side + 1))
    return top, left, side

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    k = int(i) // self.num_per_photo
    top, left, side = self.box(i)
    crop = self._photo(k)[top:top + side, left:left + side]
    image = np.asarray(Image.fromarray(crop).resize((self.crop_size, self.crop_size),
                                                    Image.Resampling.BILINEAR))
    out = {"image": image, "id": f"{self.photos[k]}/{self.split}/{i % self.num_per_photo}",
           "label": k}
    if with_encoded:
      out["encoded"] = encode_png(image)
    return out


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist)

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str) -> np.ndarray:
  """A (gzipped) IDX file -> uint8 array of its declared shape."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * d:8 + 4 * d], "big") for d in range(ndim)]
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f"{path}: {body.size} bytes of data, header declares shape {dims}")
  return body.reshape(dims)


class FashionMNIST(Source):
  """Fashion-MNIST 28x28 images as uint8 RGB (grey replicated), labels 0-9.

  Args:
    split: "train" (60000) or "test" (10000).
    path: folder with the four gzipped IDX files (`apt-get install dataset-fashion-mnist`).
  """

  num_classes = 10

  def __init__(self, split: str = "train", path: str = FASHION_MNIST_PATH):
    if split not in _FASHION_FILES:
      raise ValueError(f"FashionMNIST split={split!r} must be one of {sorted(_FASHION_FILES)}")
    self.split, self.path = split, path
    self._files = [os.path.join(path, f) for f in _FASHION_FILES[split]]
    missing = [f for f in self._files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(
          f"Fashion-MNIST files missing: {missing}. Install them with "
          "`sudo apt-get install dataset-fashion-mnist` (files under "
          f"{FASHION_MNIST_PATH}) or pass path= to a folder holding {_FASHION_FILES[split]}")
    self._arrays = None
    # Reading only the label file's header gives the length without loading the images.
    with gzip.open(self._files[1], "rb") as f:
      self._len = int.from_bytes(f.read(8)[4:8], "big")

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_arrays"] = None
    return state

  def __len__(self):
    return self._len

  def _load(self):
    if self._arrays is None:
      images, labels = read_idx(self._files[0]), read_idx(self._files[1])
      if len(images) != len(labels):
        raise ValueError(f"{self._files}: {len(images)} images but {len(labels)} labels")
      self._arrays = (images, labels)
    return self._arrays

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    images, labels = self._load()
    image = np.repeat(images[i][:, :, None], 3, axis=2)
    out = {"image": image, "id": f"{self.split}/{i:05d}", "label": int(labels[i])}
    if with_encoded:
      out["encoded"] = encode_png(image)
    return out


# ---------------------------------------------------------------------------------------------
# Image folder

class ImageFolder(Source):
  """Images under `root`, one sub-folder per class (sorted names -> labels 0..C-1).

  Files are found recursively inside each class folder, any extension (a file PIL cannot read
  gives an error record, not a crash); hidden files and folders are ignored. If `root` has no
  sub-folders, its files form one unlabelled set (no "label" key). Ids are paths relative to
  `root`, "/"-separated.
  """

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"ImageFolder root={root!r} is not a directory")
    self.root = root
    subdirs = sorted(d for d in os.listdir(root)
                     if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    self.classes = tuple(subdirs)
    self.num_classes = len(subdirs)
    files: list[tuple[str, int]] = []
    if subdirs:
      for label, d in enumerate(subdirs):
        files += [(f, label) for f in self._walk(os.path.join(root, d))]
    else:
      files = [(f, -1) for f in self._walk(root)]
    self._files = files
    if not files:
      raise ValueError(f"ImageFolder root={root!r} holds no files")

  def _walk(self, folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      out += [os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
              for f in sorted(filenames) if not f.startswith(".")]
    return out

  def __len__(self):
    return len(self._files)

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    rel, label = self._files[i]
    try:
      with open(os.path.join(self.root, rel), "rb") as f:
        data = f.read()
    except OSError as e:
      return error_record(rel, f"cannot read file: {e}")
    extra = {"label": label} if label >= 0 else {}
    return decoded_record(rel, data, with_encoded, **extra)


# ---------------------------------------------------------------------------------------------
# The name -> source table. Entries are "module:attribute" strings resolved on use (as
# `ssl_jax.registry.METHODS`), so this base module imports none of the modules that build on it
# (they import it): no import cycle, and a grain worker unpickling a source imports only its module.

SOURCES: dict[str, str] = {
    "builtin_photos": "ssl_jax.data.sources:BuiltinPhotos",
    "fashion_mnist": "ssl_jax.data.sources:FashionMNIST",
    "image_folder": "ssl_jax.data.sources:ImageFolder",
    "tfds": "ssl_jax.data.tfds_source:TfdsSource",
    "tfds_tfrecord": "ssl_jax.data.tfds_source:tfds_tfrecord_source",
    "ilsvrc_tar": "ssl_jax.data.imagenet:IlsvrcTar",
    "imagenet_folder": "ssl_jax.data.imagenet:ImageNetFolder",
    "detcon_tfrecord": "ssl_jax.data.imagenet:detcon_tfrecord_source",
    "fh_masks": "ssl_jax.data.fh_masks:FHMaskDataset",
}


def source_constructor(name: str) -> Callable[..., Source]:
  """The class or function `SOURCES[name]` names. Raises ValueError for an unknown name."""
  if name not in SOURCES:
    raise ValueError(f"data source {name!r} is unknown; known sources: {sorted(SOURCES)}")
  module, attr = SOURCES[name].split(":")
  return getattr(importlib.import_module(module), attr)


def make_source(name: str, /, **kwargs: Any) -> Source:
  """Source `name` (a key of `SOURCES`) built with `kwargs`.

  `name` is positional-only: the tfds source itself takes a `name=` argument.
  """
  make = source_constructor(name)
  try:
    return make(**kwargs)
  except TypeError as e:
    raise TypeError(f"data source {name!r}: bad arguments {sorted(kwargs)}: {e}") from e
