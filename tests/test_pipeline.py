"""The grain pipeline: one deterministic global stream that processes slice, positioned by the
step (resume at any process count, with worker processes), bad records replaced and counted."""
from __future__ import annotations

import grain
import numpy as np
import pytest

from ssl_jax.data import pipeline
from tests.helpers import BlockSource


def _dataset(source=None, num_workers=0, process_index=0, process_count=1, seed=3,
             start_step=0, batch_size=4):
  transform = pipeline.MakeViews("byol", 32, "fh", 16)
  return pipeline.train_dataset(source or BlockSource(n=20), seed=seed, batch_size=batch_size,
                                transform=transform, num_workers=num_workers,
                                process_index=process_index, process_count=process_count,
                                start_step=start_step)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batches_have_the_documented_layout():
  batch = next(iter(_dataset()))
  assert batch["image"].shape == (4, 2, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["masks"].shape == (4, 2, 32, 32) and batch["masks"].dtype == np.int8
  assert batch["label"].shape == (4,)
  assert batch["skipped"].shape == (4,)


def test_deterministic_given_seed_and_different_across_seeds():
  _assert_same(_take(iter(_dataset()), 3), _take(iter(_dataset()), 3))
  a, b = next(iter(_dataset(seed=1))), next(iter(_dataset(seed=2)))
  assert not np.array_equal(a["image"], b["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_slice_the_same_global_batches(process_count):
  """Each process's local batches, joined in process order, are the 1-process global batches
  (what multi-host training assembles with `make_array_from_process_local_data`)."""
  source = BlockSource(n=12)
  one = _take(iter(_dataset(source, batch_size=8)), 4)  # crosses epoch boundaries (12 records)
  parts = [_take(iter(_dataset(source, batch_size=8, process_index=p,
                               process_count=process_count)), 4) for p in range(process_count)]
  for k in range(4):
    for key in one[k]:
      np.testing.assert_array_equal(np.concatenate([part[k][key] for part in parts]), one[k][key])
  # Every record appears once per epoch of the global stream.
  ids = [i for batch in one for i in batch["id"]]
  assert sorted(ids[:12]) == sorted(f"block_{i}" for i in range(12))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_step_is_the_data_position(num_workers):
  """A stream started at step s yields the batches s, s+1, ... of a stream started at 0 (with
  worker processes too): a resumed run needs no iterator state, at any process count."""
  from_zero = _take(iter(_dataset(num_workers=num_workers)), 5)
  _assert_same(_take(iter(_dataset(num_workers=num_workers, start_step=3)), 2), from_zero[3:])
  resumed_on_two = [_take(iter(_dataset(num_workers=num_workers, start_step=3, process_index=p,
                                        process_count=2)), 2) for p in range(2)]
  for k in range(2):
    np.testing.assert_array_equal(
        np.concatenate([r[k]["image"] for r in resumed_on_two]), from_zero[3 + k]["image"])


class _WithBadRecords(BlockSource):
  def __getitem__(self, i):
    if i % 5 == 0:
      return {"id": f"bad_{i}", "error": "corrupt file"}
    if i % 7 == 0:  # a mask that does not match its image must never be used
      record = super().__getitem__(i)
      record["masks"] = record["masks"][:-1]
      return record
    return super().__getitem__(i)


def test_bad_records_are_replaced_in_place_and_counted():
  """A bad record's place in the global stream is taken by the element one epoch later (another
  random record), so every process count sees the same stream; `skipped` counts replacements."""
  source = _WithBadRecords(n=35)
  is_bad = [i % 5 == 0 or i % 7 == 0 for i in range(35)]
  transform = pipeline.MakeViews("byol", 32, "fh", 16)
  stream = pipeline.global_stream(source, seed=0, transform=transform)
  raw = grain.MapDataset.source(source).seed(0).shuffle().repeat().random_map(transform)
  skipped = 0
  for i in range(70):  # two epochs
    out = stream[i]
    assert "error" not in out and out["masks"].shape == (2, 32, 32)
    tries = int(out["skipped"])
    for t in range(tries):
      assert "error" in raw[i + t * 35]
    np.testing.assert_array_equal(out["image"], raw[i + tries * 35]["image"])
    skipped += tries
  assert skipped >= 2 * sum(is_bad)  # each epoch meets every bad record at least once
  # Through batches: the counts travel with the elements.
  it = iter(pipeline.train_dataset(source, seed=0, batch_size=5, transform=transform))
  assert sum(int(np.sum(next(it)["skipped"])) for _ in range(14)) == skipped


def test_a_source_of_only_bad_records_stops_with_a_clear_error():
  class AllBad(BlockSource):
    def __getitem__(self, i):
      return {"id": f"bad_{i}", "error": "corrupt"}
  stream = pipeline.global_stream(AllBad(n=3), seed=0,
                                  transform=pipeline.MakeViews("byol", 32))
  with pytest.raises(RuntimeError, match="bad records in a row"):
    stream[0]


def test_eval_batches_are_full_with_a_valid_mask_and_sliced_per_process():
  source = _WithBadRecords(n=11)
  whole = list(pipeline.eval_batches(source, image_size=16, batch_size=4))
  assert len(whole) == 3 and all(b["image"].shape == (4, 16, 16, 3) for b in whole)
  valid = np.concatenate([b["valid"] for b in whole])
  # (evaluation reads no masks, so only the unreadable records are invalid)
  np.testing.assert_array_equal(valid[:11], [i % 5 != 0 for i in range(11)])
  assert not valid[11:].any()
  labels = np.concatenate([b["label"] for b in whole])
  np.testing.assert_array_equal(labels[valid], [i % 4 for i in range(11) if valid[i]])
  halves = [list(pipeline.eval_batches(source, image_size=16, batch_size=4, process_index=p,
                                       process_count=2)) for p in range(2)]
  for k in range(3):
    np.testing.assert_array_equal(np.concatenate([h[k]["image"] for h in halves]),
                                  whole[k]["image"])
