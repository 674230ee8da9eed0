"""The grain input pipeline: source -> per-process shard -> shuffle -> views -> batch.

Deterministic given (seed, process index): the shuffle is re-seeded each epoch and each element's
augmentation generator is seeded by the pipeline seed and the element's position, so a restored
iterator (its state is saved with every checkpoint) yields exactly the batches an uninterrupted
run would. Host work here is geometry only (decode, crop, flip, resize of images and masks);
colour augmentation runs on device inside the jitted step (`ssl_jax.data.augment`).

Bad records (a source returns `{"id", "error"}` instead of raising, and view making may fail on
a malformed record) are dropped, logged with their id, and counted: each batch carries
`skipped` [B] int32, the number of records dropped just before each of its elements.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import grain
import numpy as np
from absl import logging

from ssl_jax.data import transforms
from ssl_jax.data import views as views_lib


@dataclasses.dataclass(frozen=True)
class MakeViews(grain.transforms.RandomMap):
  """Turns one source record into the method's fixed-size uint8 views (picklable for workers)."""
  recipe: str
  image_size: int
  mask_type: str | None = None
  max_segments: int = 64

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if "error" in record:
      return record
    try:
      out = views_lib.make_views(record, views_lib.get_recipe(self.recipe), rng,
                                 self.image_size, mask_type=self.mask_type,
                                 max_segments=self.max_segments)
    except ValueError as e:  # malformed record (e.g. mask/image shape mismatch): skip, count
      return {"id": record.get("id", "?"), "error": str(e)}
    if "label" not in out:
      out["label"] = np.int32(record.get("label", -1))
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


def train_dataset(source, *, seed: int, batch_size: int, transform: grain.transforms.RandomMap,
                  num_workers: int = 0, prefetch: int = 2, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """An infinite, per-process iterator of local batches of `batch_size // process_count`.

  Args:
    source: random-access record source (`ssl_jax.data.sources`).
    seed: pipeline seed (shuffle and per-element augmentation generators).
    batch_size: global batch size; each process yields its share.
    transform: record -> views (`MakeViews`).
  """
  if batch_size % process_count:
    raise ValueError(f"config.train.batch_size={batch_size} is not divisible by the "
                     f"{process_count} processes")
  if len(source) == 0:
    raise ValueError(f"data source {source!r} is empty")
  ds = grain.MapDataset.source(source).seed(seed)
  ds = ds[process_index::process_count].shuffle().repeat().random_map(transform)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, min(8, prefetch * 2)),
                                            prefetch_buffer_size=max(1, prefetch * 4)))
  it = SkipBad(it).batch(batch_size // process_count, drop_remainder=True)
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                    per_worker_buffer_size=prefetch))
  return it


def eval_batches(source, *, image_size: int, batch_size: int, limit: int = 0,
                 crop_fraction: float = 1.0) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `source` (first `limit` records if > 0), bad records dropped.

  The last batch may be smaller than `batch_size`.
  """
  ds = grain.MapDataset.source(source)
  if limit:
    ds = ds[:limit]
  it = SkipBad(ds.map(EvalView(image_size, crop_fraction)).to_iter_dataset())
  return iter(it.batch(batch_size, drop_remainder=False))
