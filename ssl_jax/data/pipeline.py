"""The grain input pipeline: one global stream of examples, each process reads its slice.

Training (`train_dataset`): the source is shuffled (re-shuffled every epoch) and repeated into
one infinite global stream; element i gets its views from a generator seeded by (seed, i). Global
batch k holds elements [k·B, (k+1)·B); process p of P reads rows [p·B/P, (p+1)·B/P) of every
global batch. Element i is a pure function of (seed, i), so the data position of a run is its
step: a run resumed at step s starts at global batch s, with any number of processes, and sees
exactly the batches an uninterrupted run would (no iterator state to save).

Bad records (a source returns `{"id", "error"}` instead of raising, and view making may fail on
a malformed record) are logged with their id and replaced, in place, by the element one epoch
later in the stream (a different random record; `ReplaceBad`), so the global stream stays aligned
across processes; each element carries `skipped`, the number of bad records it replaced.

Evaluation (`eval_batches`): one ordered pass in global batches, every process reading its rows,
padded to full batches with a `valid` mask (one compiled shape, any process count).

Host work here is geometry only (decode, crop, flip, resize of images and masks); colour
augmentation runs on device inside the jitted step (`ssl_jax.data.augment`).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Iterator

import grain
import numpy as np
from absl import logging

from ssl_jax.data import transforms
from ssl_jax.data import views as views_lib


# Keys a batch carries for the host only (never shipped to the device); counters are summed
# over the run and logged as `data/<name>`.
HOST_KEYS = ("id", "error", "skipped", "segments_dropped", "crop", "flip", "crop_fallback",
             "negative_fallback")
HOST_COUNTERS = ("skipped", "segments_dropped", "crop_fallback", "negative_fallback")


@dataclasses.dataclass(frozen=True)
class MakeViews(grain.transforms.RandomMap):
  """Turns one source record into the method's fixed-size uint8 views (picklable for workers).

  Which views: `recipe` (`ssl_jax.data.views`), V = its length, at `image_size`; `mask_type`
  adds the segment ids carried through the same geometry (`max_segments` ids, `grid` cells for
  the spatial-grid masks); `num_boxes` > 0 makes MaskCo's query/key views with key-view boxes
  (`views.make_maskco_views`, sides `box_side` × image_size); `local_views` > 0 adds multi-crop
  local views of `local_recipe` at `local_image_size`. `from_config` reads all of it from
  `config.data`; `output_spec` tells the trainer what each batch holds.
  """
  recipe: str
  image_size: int
  mask_type: str | None = None
  max_segments: int = 64
  grid: tuple[int, int] = (5, 5)
  num_boxes: int = 0
  box_side: tuple[float, float] = (32 / 224, 128 / 224)
  local_recipe: str = ""
  local_views: int = 0
  local_image_size: int = 0

  @classmethod
  def from_config(cls, config) -> "MakeViews":
    from ssl_jax import config_lib  # pylint: disable=import-outside-toplevel
    d = config.data
    return cls(recipe=d.views, image_size=int(d.image_size), mask_type=d.masks,
               max_segments=config_lib.max_segments(config), grid=tuple(d.grid),
               num_boxes=int(d.num_boxes), box_side=tuple(float(v) for v in d.box_side),
               local_recipe=d.local_recipe, local_views=int(d.local_views),
               local_image_size=int(d.local_image_size))

  def output_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (per-example shape, dtype)} of the device-relevant arrays of each element."""
    v, s = len(views_lib.get_recipe(self.recipe)), self.image_size
    spec = {"image": ((v, s, s, 3), np.dtype(np.uint8)), "label": ((), np.dtype(np.int32))}
    if self.mask_type:
      spec["masks"] = ((v, s, s), views_lib.mask_dtype(self.max_segments))
    if self.num_boxes:
      spec["boxes"] = ((self.num_boxes, 4), np.dtype(np.float32))
      spec["masked_box"] = ((4,), np.dtype(np.float32))
    if self.local_views:
      ls = self.local_image_size
      spec["local_image"] = ((self.local_views, ls, ls, 3), np.dtype(np.uint8))
    return spec

  def _views(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    recipe = views_lib.get_recipe(self.recipe)
    if self.num_boxes:
      if self.mask_type:
        raise ValueError("MaskCo views (num_boxes > 0) carry no masks; set config.data.masks=None")
      return views_lib.make_maskco_views(record, recipe, rng, self.image_size,
                                         num_boxes=self.num_boxes, box_side=self.box_side)
    return views_lib.make_views(record, recipe, rng, self.image_size, mask_type=self.mask_type,
                                max_segments=self.max_segments, grid=self.grid)

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "error" in record:
      return record
    try:
      out = self._views(record, rng)
      if self.local_views:
        local = views_lib.get_recipe(self.local_recipe, num_views=self.local_views)
        out["local_image"] = views_lib.make_views(record, local, rng,
                                                  self.local_image_size)["image"]
    except ValueError as e:  # malformed record (e.g. mask/image shape mismatch): skip, count
      return {"id": record.get("id", "?"), "error": str(e)}
    if "label" not in out:
      out["label"] = np.int32(record.get("label", -1))
    out["id"] = str(record.get("id", "?"))
    return out


@dataclasses.dataclass(frozen=True)
class EvalView(grain.transforms.Map):
  """Resize-and-centre-crop view for evaluation (kNN memory bank and queries)."""
  image_size: int
  crop_fraction: float = 1.0

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    if "error" in record:
      return record
    image = transforms.to_rgb(record["image"])
    h, w = image.shape[:2]
    side = max(1, int(round(min(h, w) * self.crop_fraction)))
    box = ((h - side) // 2, (w - side) // 2, side, side)
    image, _ = transforms.crop_flip_resize(image, box, False, self.image_size)
    return {"image": image, "label": np.int32(record.get("label", -1))}


class _SkipBadIterator(grain.DatasetIterator):
  """Drops error records, counting them on the next good element as `skipped`."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    skipped = 0
    while True:
      record = next(self._parent)
      if "error" not in record:
        record = dict(record)
        record["skipped"] = np.int32(skipped)
        return record
      skipped += 1
      logging.warning("skipping record %s: %s", record.get("id"), record["error"])

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipBad(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipBadIterator(self._parent.__iter__())


class ReplaceBad(grain.MapDataset):
  """Element i of `parent`, or, when that is an error record, the first good one of
  i + stride, i + 2·stride, ... (`stride` = the source length: the same place one epoch later,
  another random record). Adds `skipped` (int32): how many bad records it replaced."""

  def __init__(self, parent: grain.MapDataset, stride: int, max_tries: int = 64):
    super().__init__(parent)
    self._stride, self._max_tries = int(stride), int(max_tries)

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    for tries in range(self._max_tries):
      record = self._parent[index + tries * self._stride]
      if "error" not in record:
        return {**record, "skipped": np.int32(tries)}
      logging.warning("skipping record %s: %s", record.get("id"), record["error"])
    raise RuntimeError(f"{self._max_tries} bad records in a row at stream position {index}: "
                       "the data source is broken (see the warnings above)")


class ProcessSlice(grain.MapDataset):
  """This process's rows of every global batch, from global batch `start_batch` on.

  Local element j = global element (start_batch + j // b)·B + p·b + j % b, b = B / P.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int, start_batch: int = 0):
    super().__init__(parent)
    self._global, self._local = int(global_batch), int(global_batch) // int(process_count)
    self._offset = int(process_index) * self._local
    self._start = int(start_batch)

  def __len__(self) -> int:
    return sys.maxsize

  def global_index(self, index: int) -> int:
    batch, row = divmod(index, self._local)
    return (self._start + batch) * self._global + self._offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.global_index(index)]


def global_stream(source, *, seed: int, transform) -> grain.MapDataset:
  """The infinite global stream: element i = `transform` of the i-th record of the repeated,
  per-epoch re-shuffled source, with generator seeded by (seed, i); bad ones replaced."""
  if len(source) == 0:
    raise ValueError(f"data source {source!r} is empty")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat().random_map(transform)
  return ReplaceBad(ds, stride=len(source))


def train_dataset(source, *, seed: int, batch_size: int, transform: grain.transforms.RandomMap,
                  num_workers: int = 0, prefetch: int = 2, process_index: int = 0,
                  process_count: int = 1, start_step: int = 0) -> grain.IterDataset:
  """An infinite iterator of this process's local batches (`batch_size // process_count` rows).

  Args:
    source: random-access record source (`ssl_jax.data.sources`).
    seed: pipeline seed (shuffle and per-element augmentation generators).
    batch_size: global batch size B; each process yields its B / P rows of every global batch.
    transform: record -> views (`MakeViews`).
    start_step: the first global batch (a resumed run's step).
  """
  if batch_size % process_count:
    raise ValueError(f"config.train.batch_size={batch_size} is not divisible by the "
                     f"{process_count} processes")
  ds = ProcessSlice(global_stream(source, seed=seed, transform=transform), batch_size,
                    process_index, process_count, start_step)
  # Batched as a MapDataset: local batch k is always rows k·b..(k+1)·b of the slice, also when
  # worker processes (which split the dataset by element) make the batches.
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, min(8, prefetch * 2)),
                                            prefetch_buffer_size=max(1, prefetch * 4)))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                    per_worker_buffer_size=prefetch))
  return it


def eval_batches(source, *, image_size: int, batch_size: int, limit: int = 0,
                 crop_fraction: float = 1.0, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `source` (the first `limit` records if > 0) in global batches of
  `batch_size`; this process yields its `batch_size // process_count` rows of each.

  Every batch is full: rows past the end and bad records are zero images with `valid` False
  and label -1. Yields {"image" uint8 [b, S, S, 3], "label" int32 [b], "valid" bool [b]}.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
  n = min(limit, len(source)) if limit else len(source)
  local = batch_size // process_count
  view = EvalView(image_size, crop_fraction)
  blank = {"image": np.zeros((image_size, image_size, 3), np.uint8), "label": np.int32(-1),
           "valid": False}

  def element(j):
    batch, row = divmod(j, local)
    i = batch * batch_size + process_index * local + row
    if i >= n:
      return blank
    out = view.map(source[i])
    if "error" in out:
      logging.warning("evaluation skips record %s: %s", out.get("id"), out["error"])
      return blank
    return {**out, "valid": True}

  num_batches = -(-n // batch_size)
  ds = grain.MapDataset.range(num_batches * local).map(element)
  return iter(ds.to_iter_dataset().batch(local, drop_remainder=False))
