"""The grain pipeline: deterministic, per-process sharded, resumable (with worker processes), skips bad records."""
from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import grain
import pytest

from ssl_jax.data import pipeline
from tests.helpers import BlockSource


def _dataset(source=None, num_workers=0, process_index=0, process_count=1, seed=3):
  transform = pipeline.MakeViews("byol", 32, "fh", 16)
  return pipeline.train_dataset(source or BlockSource(n=20), seed=seed, batch_size=4,
                                transform=transform, num_workers=num_workers,
                                process_index=process_index, process_count=process_count)


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


def test_processes_read_disjoint_shards():
  source = BlockSource(n=16)
  labels = []
  for p in range(2):
    it = iter(_dataset(source, process_index=p, process_count=2))
    ids = set()
    for b in _take(it, 4):  # one epoch of this process's 8 records, local batches of 4 // 2
      ids |= {int(x) for x in np.asarray(b["label"])}
    labels.append(ids)
  # BlockSource labels are i % 4: process 0 holds even indices (labels 0, 2), process 1 odd.
  assert labels == [{0, 2}, {1, 3}]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_round_trips_through_orbax(tmp_path, num_workers):
  it = iter(_dataset(num_workers=num_workers))
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / f"ckpt{num_workers}")) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 3)
    fresh = iter(_dataset(num_workers=num_workers))
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(_take(fresh, 3), expected)


class _WithBadRecords(BlockSource):
  def __getitem__(self, i):
    if i % 5 == 0:
      return {"id": f"bad_{i}", "error": "corrupt file"}
    if i % 7 == 0:  # a mask that does not match its image must never be used
      record = super().__getitem__(i)
      record["masks"] = record["masks"][:-1]
      return record
    return super().__getitem__(i)


def test_bad_records_are_skipped_and_counted():
  """Each good element carries the number of bad records dropped just before it."""
  source = _WithBadRecords(n=35)
  is_bad = [i % 5 == 0 or i % 7 == 0 for i in range(35)]
  ds = grain.MapDataset.source(source).random_map(pipeline.MakeViews("byol", 32, "fh", 16), seed=0)
  out = list(pipeline.SkipBad(ds.to_iter_dataset()))
  expected, run = [], 0
  for bad in is_bad:
    if bad:
      run += 1
    else:
      expected.append(run)
      run = 0
  assert [int(r["skipped"]) for r in out] == expected
  assert len(out) == 35 - sum(is_bad)
  assert all(r["masks"].shape == (2, 32, 32) for r in out)
  # Through the shuffled, batched pipeline: two epochs of good records skip every bad one once
  # or twice (the epoch boundary falls between them).
  it = iter(pipeline.train_dataset(source, seed=0, batch_size=1,
                                   transform=pipeline.MakeViews("byol", 32, "fh", 16)))
  skipped = sum(int(np.sum(next(it)["skipped"])) for _ in range(2 * len(out)))
  assert sum(is_bad) <= skipped <= 2 * sum(is_bad)
