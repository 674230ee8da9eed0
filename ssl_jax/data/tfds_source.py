"""Datasets prepared by tensorflow-datasets, read without TensorFlow, and their preflight.

  * `TfdsSource` (source `tfds`): an array_record copy through `tfds.data_source`, the image
    feature read undecoded and decoded by `sources.decode_image`.
  * `tfds_tfrecord_source` (source `tfds_tfrecord`): a *tfrecord* copy (e.g.
    `imagenet2012/5.*/imagenet2012-train.tfrecord-*`), which `tfds.data_source` cannot read,
    through `tfrecord.TFRecordSource`; split slices (`train[:10%]`) with tfds's arithmetic.
  Both take `classes=` (an ImageNet class subset such as ImageNet-100, `imagenet.subset_wnids`).
  * `check_tfds_dataset`: is the dataset prepared, in a readable format, with the split and
    features asked for? Raises `DatasetNotReadyError` naming data_dir, what it found there and
    the command that fixes it (tfds itself raises a misleading NotImplementedError for both a
    missing and a tfrecord-only copy). Both sources run it first.
  * `convert_tfds_to_array_record`: rewrites a tfrecord copy as array_record in place, so
    `tfds.data_source` reads it. CLI:

      python -m ssl_jax.data.tfds_source check --data_dir=DIR [--name=imagenet2012] [--split=train]
      python -m ssl_jax.data.tfds_source convert --data_dir=DIR [--name=imagenet2012]
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ssl_jax.data import sources
from ssl_jax.data import tfrecord
from ssl_jax.errors import UserError


# ---------------------------------------------------------------------------------------------
# Sources

class TfdsSource(sources.Source):
  """A TFDS split read with `tfds.data_source` (array_record files), images decoded with PIL.

  The image feature is read undecoded (`tfds.decode.SkipDecoding`) so decoding follows
  `sources.decode_image`'s policy and needs no TensorFlow. Ids are the example's `file_name`
  (ImageNet) when the dataset has one, else "<name>/<split>/<index>".

  Args:
    name: tfds name, e.g. "imagenet2012".
    split: e.g. "train", "validation[:1000]".
    data_dir: tfds data folder ("" or None: tfds' default).
    image_key, label_key: feature names; label_key "" for none.
    id_key: feature holding a stable id.
    classes: an ImageNet class subset ("imagenet100" or a wnid file; `imagenet.subset_wnids`),
      labels remapped to 0..K−1. Every record's label is read once (the whole split) and cached
      in `cache_dir`.
    cache_dir: where that label list is cached (default `sources.default_cache_dir()`).
  """

  def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None,
               image_key: str = "image", label_key: str = "label", id_key: str = "file_name",
               classes: str = "", cache_dir: Optional[str] = None):
    self.name, self.split, self.data_dir = name, split, data_dir or None
    self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
    self._ds = None
    self._len = len(self._open())
    self.num_classes = self._num_classes()
    self._index: Optional[np.ndarray] = None
    self._label_map: Optional[dict[int, int]] = None
    if classes:
      from ssl_jax.data import imagenet  # pylint: disable=import-outside-toplevel
      self._label_map = imagenet.subset_label_map(classes)
      labels = self._labels(cache_dir)
      self._index = np.flatnonzero(np.isin(labels, list(self._label_map)))
      if self._index.size == 0:
        raise ValueError(f"tfds {name!r} split={split!r} holds no record of classes={classes!r}")
      self._len, self.num_classes = int(self._index.size), len(self._label_map)

  def _labels(self, cache_dir: Optional[str]) -> np.ndarray:
    """Every record's label (one pass over the split, cached by its files and the split)."""
    if not self.label_key:
      raise ValueError(f"tfds {self.name!r}: classes= needs labels (label_key is empty)")

    def build():
      ds = self._open()
      return {"labels": [int(np.asarray(ds[i][self.label_key])) for i in range(len(ds))]}

    files = check_tfds_dataset(self.name, self.data_dir, self.split)["files"]
    if not files:  # remote data_dir: nothing to key a cache on
      return np.asarray(build()["labels"], np.int64)
    kind = "labels-tfds-" + re.sub(r"[^A-Za-z0-9]", "_", f"{self.split}-{self.label_key}")
    return np.asarray(tfrecord.cached_index(kind, files, build, cache_dir)["labels"], np.int64)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None
    return state

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      # Missing and tfrecord-only copies both make tfds raise the same misleading
      # NotImplementedError: the preflight names data_dir, what it found and the fix.
      check_tfds_dataset(self.name, self.data_dir, self.split,
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
            f"converted without TensorFlow: `python -m ssl_jax.data.tfds_source convert "
            f"--name={self.name} --data_dir=DIR`"
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
    if self._index is not None:
      i = int(self._index[i])
    fallback_id = f"{self.name}/{self.split}/{i}"
    try:
      example = self._open()[i]
    except Exception as e:  # a corrupt array_record entry must not kill the run
      return sources.error_record(fallback_id, f"cannot read example: {type(e).__name__}: {e}")
    rid = example.get(self.id_key, fallback_id)
    rid = rid.decode("utf-8", "replace") if isinstance(rid, bytes) else str(rid)
    extra = {}
    if self.label_key and self.label_key in example:
      extra["label"] = int(np.asarray(example[self.label_key]))
      if self._label_map is not None:
        extra["label"] = self._label_map[extra["label"]]
    image = example.get(self.image_key)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
      # Already decoded (e.g. tfds.testing.mock_data ignores decoders).
      out = {"image": sources.pil_to_rgb(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1
                                                 else image)), "id": rid, **extra}
      if with_encoded:
        out["encoded"] = sources.encode_png(out["image"])
      return out
    if isinstance(image, np.ndarray):
      image = image.item()
    if not isinstance(image, (bytes, bytearray)):
      return sources.error_record(rid, f"feature {self.image_key!r} is {type(image).__name__}, "
                               "not encoded image bytes")
    return sources.decoded_record(rid, bytes(image), with_encoded, **extra)


def tfds_tfrecord_source(name: str = "imagenet2012", split: str = "train",
                         data_dir: str = "", image_key: str = "image", label_key: str = "label",
                         id_key: str = "file_name", verify_crc: bool = True,
                         cache_dir: Optional[str] = None, classes: str = "") -> sources.Source:
  """A tfrecord-prepared tfds copy (newest version folder), read without TensorFlow.

  Args:
    split: a tfds split expression: "train", "train[:10%]", "train[1000:2000]",
      "train[:10%]+validation", ... (`sources.split_indices`: tfds's own arithmetic over the
      records in the order tfds wrote them).
    classes: an ImageNet class subset ("imagenet100" or a wnid file; `imagenet.subset_wnids`):
      labels remapped to 0..K−1. Every record's label is read once and cached in `cache_dir`.
  """
  info = check_tfds_dataset(name, data_dir, split, fmt="tfrecord",
                            keys=[k for k in (image_key, label_key) if k])
  source = tfrecord.TFRecordSource(info["files"], image_key=image_key, label_key=label_key,
                                   id_key=id_key, num_classes=info["num_classes"],
                                   verify_crc=verify_crc, cache_dir=cache_dir)
  indices = None
  if "[" in split:  # a slice: tfds's arithmetic over the records of the named splits
    lengths = info["shard_lengths"]
    sizes = {s: sum(n) for s, n in lengths.items()}
    if sum(sizes.values()) != len(source):
      raise DatasetNotReadyError(
          f"tfds dataset {name!r} in data_dir={data_dir}: dataset_info.json lists "
          f"{sum(sizes.values())} records for {split!r} but {len(source)} are readable, so a "
          "slice cannot be placed; restore or re-prepare the files")
    indices = sources.split_indices(split, sizes, lengths, where="tfds_tfrecord split")
  if not classes:
    return source if indices is None else sources.Subset(source, indices)
  from ssl_jax.data import imagenet  # pylint: disable=import-outside-toplevel
  return imagenet.subset_of(source, imagenet.tfrecord_labels(source, cache_dir), classes,
                            indices)


# ---------------------------------------------------------------------------------------------
# Where tfds keeps a dataset

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


# ---------------------------------------------------------------------------------------------
# Preflight: is a tfds dataset there, and in a format we can read?

class DatasetNotReadyError(UserError, RuntimeError):
  """The dataset is missing or unreadable; the message says what to run."""


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
    {"version_dir", "files" (of the split names, in order), "shard_lengths" ({split name:
    records per shard}, from dataset_info.json), "num_classes", "features"}.
  Raises:
    DatasetNotReadyError: naming data_dir, what was found, and the command that fixes it.
  """
  data_dir = tfds_dataset_dir(name, data_dir)
  if "://" in data_dir:  # remote (gs://): leave the check to tfds
    return {"version_dir": "", "files": [], "shard_lengths": {}, "num_classes": 0,
            "features": []}
  versions = _version_dirs(name, data_dir)
  if not versions:
    raise DatasetNotReadyError(
        f"tfds dataset {name!r} is not prepared in data_dir={data_dir}: no "
        f"{os.path.join(data_dir, name, '<version>')} folder (data_dir holds: "
        f"{sources.describe_folder(data_dir)}). Fix: {_fix_commands(name, data_dir)}")
  vdir = versions[-1]
  info_path = os.path.join(vdir, "dataset_info.json")
  if not os.path.exists(info_path):
    raise DatasetNotReadyError(
        f"tfds dataset {name!r} in data_dir={data_dir}: {vdir} has no dataset_info.json (found: "
        f"{sources.describe_folder(vdir)}), an unfinished preparation. Fix: delete {vdir} and "
        f"rerun {_fix_commands(name, data_dir)}")
  with open(info_path) as f:
    info = json.load(f)
  file_format = info.get("fileFormat") or "tfrecord"  # tfds omits it for its old default
  split_info = {s["name"]: s for s in info.get("splits", [])}
  if file_format != fmt:
    if fmt == "array_record" and file_format == "tfrecord":
      raise DatasetNotReadyError(
          f"tfds dataset {name!r} in data_dir={data_dir} ({vdir}) is prepared as tfrecord, "
          "which tfds.data_source cannot read without TensorFlow. Fix, either: convert it once "
          f"(no TensorFlow): `python -m ssl_jax.data.tfds_source convert --name={name} "
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
  files, shard_lengths = [], {}
  for s in wanted:
    shard_lengths[s] = [int(n) for n in split_info[s].get("shardLengths", [])]
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
  return {"version_dir": vdir, "files": files, "shard_lengths": shard_lengths,
          "num_classes": num_classes, "features": features}


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
        for data in tfrecord.read_tfrecords(src, verify=verify_crc):
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
  """`python -m ssl_jax.data.tfds_source convert --data_dir=D [--name=imagenet2012]` or
  `python -m ssl_jax.data.tfds_source check --data_dir=D [--split=train]`."""
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description="tfds copies without TensorFlow: check one, or "
                                          "convert a tfrecord copy to array_record.")
  p.add_argument("command", choices=["convert", "check"])
  p.add_argument("--name", default="imagenet2012")
  p.add_argument("--data_dir", default="")
  p.add_argument("--split", default="train")
  p.add_argument("--no_verify_crc", action="store_true")
  a = p.parse_args(argv)
  try:
    if a.command == "convert":
      vdir = convert_tfds_to_array_record(a.name, a.data_dir, verify_crc=not a.no_verify_crc)
      print(f"{vdir}: array_record shards written; tfds.data_source reads it now")
    else:
      info = check_tfds_dataset(a.name, a.data_dir, a.split)
      print(f"{info['version_dir']}: split {a.split!r} ready, {len(info['files'])} shards, "
            f"features {info['features']}")
  except UserError as e:  # the message says what to run: one line, no traceback
    from ssl_jax import cli  # pylint: disable=import-outside-toplevel
    cli.fail(str(e))

if __name__ == "__main__":
  main()
