"""Random-access image sources: one record per index, decoded to uint8 RGB on the host.

Record contract (the grain pipeline and the view code rely on it):
  {"image": uint8 [H, W, 3] RGB, "id": str (stable), "label": int (when known),
   "masks": int32 [H, W] (FH segment ids; `FHMaskDataset` only),
   "segmentation": int32 [H, W] (sources with ground truth only)}

Bad input never raises from `__getitem__`: it returns `{"id": str, "error": reason}`, which the
pipeline drops and counts (`skip_reason`). Decoding policy (`decode_image`):
  * EXIF orientation is applied (`ImageOps.exif_transpose`), so pixels are as a viewer shows them.
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
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

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


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> lossless PNG bytes (for sources that hold arrays, not files)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _decoded_record(record_id: str, data: bytes, with_encoded: bool,
                    **extra: Any) -> dict[str, Any]:
  try:
    image = decode_image(data)
  except ValueError as e:
    return error_record(record_id, str(e))
  out = {"image": image, "id": record_id, **extra}
  if with_encoded:
    out["encoded"] = bytes(data)
  return out


class _Source:
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


class BuiltinPhotos(_Source):
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


class FashionMNIST(_Source):
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

class ImageFolder(_Source):
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
    return _decoded_record(rel, data, with_encoded, **extra)


# ---------------------------------------------------------------------------------------------
# TFDS (array_record via tfds.data_source; no TensorFlow)

class TfdsSource(_Source):
  """A TFDS split read with `tfds.data_source` (array_record files), images decoded with PIL.

  The image feature is read undecoded (`tfds.decode.SkipDecoding`) so decoding follows this
  module's policy and needs no TensorFlow. Ids are the example's `file_name` (ImageNet) when the
  dataset has one, else "<name>/<split>/<index>".

  Args:
    name: tfds name, e.g. "imagenet2012".
    split: e.g. "train", "validation[:1000]".
    data_dir: tfds data folder ("" or None: tfds' default).
    image_key, label_key: feature names; label_key "" for none.
    id_key: feature holding a stable id.
  """

  def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None,
               image_key: str = "image", label_key: str = "label", id_key: str = "file_name"):
    self.name, self.split, self.data_dir = name, split, data_dir or None
    self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
    self._ds = None
    self._len = len(self._open())
    self.num_classes = self._num_classes()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None
    return state

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      from ssl_jax.data import imagenet  # pylint: disable=import-outside-toplevel
      # Missing and tfrecord-only copies both make tfds raise the same misleading
      # NotImplementedError: the preflight names data_dir, what it found and the fix.
      imagenet.check_tfds_dataset(self.name, self.data_dir, self.split,
                                  keys=[k for k in (self.image_key, self.label_key) if k])
      where = self.data_dir or "tfds' default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
      try:
        self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                    download=False,
                                    decoders={self.image_key: tfds.decode.SkipDecoding()})
      except Exception as e:  # tfds raises many types: not found, tfrecord-only, bad split
        raise RuntimeError(
            f"tfds.data_source({self.name!r}, split={self.split!r}) failed in data_dir={where}: "
            f"{type(e).__name__}: {e}. The dataset must be prepared there in array_record format: "
            f"`tfds build {self.name} --data_dir=DIR --file_format=array_record` (ImageNet needs "
            "its manual-download tars under DIR/downloads/manual); a tfrecord-prepared copy can be "
            "converted with `tfds convert_format --root_data_dir=DIR --out_file_format=array_record`"
        ) from e
    return self._ds

  def _num_classes(self) -> int:
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      feature = self._open().dataset_info.features[self.label_key]
      return int(feature.num_classes) if isinstance(feature, tfds.features.ClassLabel) else 0
    except Exception:  # no label feature / no info: the evaluator infers the class count
      return 0

  def __len__(self):
    return self._len

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    fallback_id = f"{self.name}/{self.split}/{i}"
    try:
      example = self._open()[i]
    except Exception as e:  # a corrupt array_record entry must not kill the run
      return error_record(fallback_id, f"cannot read example: {type(e).__name__}: {e}")
    rid = example.get(self.id_key, fallback_id)
    rid = rid.decode("utf-8", "replace") if isinstance(rid, bytes) else str(rid)
    extra = {}
    if self.label_key and self.label_key in example:
      extra["label"] = int(np.asarray(example[self.label_key]))
    image = example.get(self.image_key)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
      # Already decoded (e.g. tfds.testing.mock_data ignores decoders).
      out = {"image": pil_to_rgb(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1
                                                 else image)), "id": rid, **extra}
      if with_encoded:
        out["encoded"] = encode_png(out["image"])
      return out
    if isinstance(image, np.ndarray):
      image = image.item()
    if not isinstance(image, (bytes, bytearray)):
      return error_record(rid, f"feature {self.image_key!r} is {type(image).__name__}, "
                               "not encoded image bytes")
    return _decoded_record(rid, bytes(image), with_encoded, **extra)


# ---------------------------------------------------------------------------------------------
# Precomputed FH masks (written by `python -m ssl_jax.data.fh_masks`)

def default_cache_dir() -> str:
  """$SSL_JAX_CACHE, else ~/.cache/ssl_jax: where `FHMaskDataset(precompute_from=...)` writes."""
  return os.environ.get("SSL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "ssl_jax")


class FHMaskDataset(_Source):
  """Images with their Felzenszwalb-Huttenlocher masks for one (scale, min_size).

  Args:
    path: output folder of `python -m ssl_jax.data.fh_masks` (metadata.json + shards).
    scale, min_size: which precomputed setting to return as "masks".
    precompute_from, precompute_args: with `path=""`, compute the masks of source
      `precompute_from` (made with `precompute_args`) once into a cache folder named by a hash of
      the settings (under `cache_dir`, default `default_cache_dir()`) and read them from there; for
      small sources (the demo's built-in photos).
    max_side: with `precompute_from`, the FH long-side cap (0: full resolution).

  Records whose image failed at precompute time, or whose stored mask does not match the decoded
  image's shape, come back as error records naming the id (never a misaligned mask).
  """

  def __init__(self, path: str = "", scale: float = 1000, min_size: int = 1000,
               precompute_from: Optional[str] = None,
               precompute_args: Optional[Mapping[str, Any]] = None,
               cache_dir: Optional[str] = None, max_side: int = 0):
    if not path:
      if not precompute_from:
        raise ValueError(
            "config.data.source_args.path is empty: DetCon reads images with precomputed FH "
            "masks. Compute them once (resumable, parallel), e.g. for ImageNet:\n"
            f"  python -m ssl_jax.data.fh_masks --source=tfds "
            f"--source_args=name=imagenet2012,split=train --out=$DATA/imagenet_fh "
            f"--scales={scale:g} --min_sizes={min_size} --processes=$(nproc)\n"
            "then pass --config.data.source_args.path=$DATA/imagenet_fh (or set "
            "source_args.precompute_from=<source name> to compute them into a cache on first use)")
      path = self._ensure_cache(precompute_from, dict(precompute_args or {}), scale, min_size,
                                max_side, cache_dir or default_cache_dir())
    self.path = path
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f"FHMaskDataset: {meta_path} not found; precompute masks with `python -m "
          f"ssl_jax.data.fh_masks --out={path} ...` (an unfinished run has no metadata.json: "
          "rerun the same command to resume it)")
    with open(meta_path) as f:
      self.metadata = json.load(f)
    from ssl_jax.data import records  # pylint: disable=import-outside-toplevel
    self.key = records.mask_key(scale, min_size)
    available = [records.mask_key(s, m) for s in self.metadata["scales"]
                 for m in self.metadata["min_sizes"]]
    if self.key not in available:
      raise ValueError(f"FHMaskDataset: scale={scale}, min_size={min_size} were not precomputed "
                       f"in {path}; available (scale_min_size): {available}")
    self._shards = [os.path.join(path, s["file"]) for s in self.metadata["shards"]]
    self._len = int(self.metadata["num_records"])
    self.num_classes = int(self.metadata.get("num_classes", 0))
    self._source = None

  @staticmethod
  def _ensure_cache(name, args, scale, min_size, max_side, cache_dir) -> str:
    from ssl_jax.data import fh_masks  # pylint: disable=import-outside-toplevel
    spec = json.dumps({"source": name, "args": args, "scale": scale, "min_size": min_size,
                       "max_side": max_side, "version": fh_masks.FORMAT_VERSION}, sort_keys=True)
    out = os.path.join(cache_dir, f"fh_{name}_{hashlib.sha256(spec.encode()).hexdigest()[:16]}")
    if not os.path.exists(os.path.join(out, "metadata.json")):
      fh_masks.precompute(name, args, out, scales=(scale,), min_sizes=(min_size,),
                          processes=1, max_side=max_side, progress=False)
    return out

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None  # file handles are reopened in each worker process
    return state

  def __len__(self):
    return self._len

  def _open(self):
    if self._source is None:
      import grain  # pylint: disable=import-outside-toplevel
      self._source = grain.sources.ArrayRecordDataSource(self._shards)
    return self._source

  def get(self, i: int, with_encoded: bool = False) -> dict[str, Any]:
    from ssl_jax.data import records  # pylint: disable=import-outside-toplevel
    try:
      rec = records.decode_record(self._open()[i])
    except Exception as e:  # a corrupt shard entry
      return error_record(f"{self.path}#{i}", f"cannot read record: {type(e).__name__}: {e}")
    rid = rec["id"]
    if "error" in rec:
      return error_record(rid, rec["error"])
    out = _decoded_record(rid, rec["image"], with_encoded)
    if "error" in out:
      return out
    try:
      masks = records.decode_mask(rec["masks"][self.key])
    except Exception as e:
      return error_record(rid, f"cannot decode mask {self.key}: {type(e).__name__}: {e}")
    if masks.shape != out["image"].shape[:2]:
      return error_record(rid, f"mask {self.key} of shape {masks.shape} does not match image "
                               f"of shape {out['image'].shape[:2]} in record {rid!r}")
    out["masks"] = masks
    if rec.get("label", -1) >= 0:
      out["label"] = int(rec["label"])
    return out


# ---------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., _Source]] = {
    "builtin_photos": BuiltinPhotos,
    "fashion_mnist": FashionMNIST,
    "image_folder": ImageFolder,
    "tfds": TfdsSource,
    "fh_masks": FHMaskDataset,
}


def _imagenet(attr: str) -> Callable[..., _Source]:
  # ImageNet sources live in ssl_jax.data.imagenet, which imports this module: bind lazily.
  def make(**kwargs: Any) -> _Source:
    from ssl_jax.data import imagenet  # pylint: disable=import-outside-toplevel
    return getattr(imagenet, attr)(**kwargs)
  return make


SOURCES.update({
    "tfds_tfrecord": _imagenet("tfds_tfrecord_source"),
    "ilsvrc_tar": _imagenet("IlsvrcTar"),
    "imagenet_folder": _imagenet("ImageNetFolder"),
    "detcon_tfrecord": _imagenet("detcon_tfrecord_source"),
})


def make_source(name: str, /, **kwargs: Any) -> _Source:
  """Source `name` (a key of `SOURCES`) built with `kwargs`.

  `name` is positional-only: the tfds source itself takes a `name=` argument.
  """
  if name not in SOURCES:
    raise ValueError(f"data source {name!r} is unknown; known sources: {sorted(SOURCES)}")
  try:
    return SOURCES[name](**kwargs)
  except TypeError as e:
    raise TypeError(f"data source {name!r}: bad arguments {sorted(kwargs)}: {e}") from e
