"""Precompute Felzenszwalb-Huttenlocher masks once, with the images, into array_record shards.

DetCon (Hénaff et al., 2021, Sec. 3.2) computes FH segmentations at full resolution with
skimage's `felzenszwalb(image, scale, sigma=0.8, min_size)`, defaults scale=1000, min_size=1000,
and studies scales {500, 1000, 1500}. Usage:

  python -m ssl_jax.data.fh_masks --source=image_folder --source_args=root=/data/photos \\
      --out=/data/photos_fh --scales=500,1000,1500 --min_sizes=1000 --processes=16

Output folder:
  fh-KKKKK-of-NNNNN.array_record  shard k holds source records [k*K, (k+1)*K) in order
                                  (K = --records_per_shard), one `ssl_jax.data.records` entry each;
  metadata.json                   source, arguments, scales, min_sizes, max_side, counts,
                                  segment statistics, the shard list with per-shard stats, and
                                  every failed record (index, id, reason).

Resumable: a shard is written under a temporary name and renamed only when complete, and
metadata.json is written last (also atomically); a rerun of the same command skips finished
shards and gives byte-identical output to an uninterrupted run. A record whose image fails to
decode (or that has >= 65536 segments) is written as an *error entry* (id + reason), not
dropped, so record positions never shift; `FHMaskDataset` returns it as an error record, which the
pipeline skips and counts, and metadata.json lists it.

`--max_side=N` (N > 0) runs FH on a copy whose long side is at most N (bilinear, antialiased) and
resizes the ids back to full resolution by nearest neighbour; recorded in metadata. Default 0:
full resolution, as the paper.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import statistics
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from ssl_jax.data import records
from ssl_jax.data import sources

FORMAT_VERSION = 1
SIGMA = 0.8  # DetCon's FH smoothing
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access for grain


def felzenszwalb_masks(image: np.ndarray, scale: float, min_size: int, sigma: float = SIGMA,
                       max_side: int = 0) -> np.ndarray:
  """FH segment ids of one image.

  Args:
    image: uint8 [H, W, 3] RGB.
    scale, min_size, sigma: skimage `felzenszwalb` parameters.
    max_side: > 0 caps the long side FH runs at (ids resized back, nearest).
  Returns:
    int32 [H, W] ids 0..n-1.
  """
  from skimage.segmentation import felzenszwalb  # pylint: disable=import-outside-toplevel
  h, w = image.shape[:2]
  small = image
  if max_side and max(h, w) > max_side:
    f = max_side / max(h, w)
    size = (max(1, int(round(w * f))), max(1, int(round(h * f))))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
  ids = felzenszwalb(small, scale=scale, sigma=sigma, min_size=min_size).astype(np.int32)
  if small is not image:
    ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.NEAREST))
    # Nearest resizing can drop a tiny segment entirely: renumber so ids stay 0..n-1.
    ids = np.unique(ids, return_inverse=True)[1].reshape(h, w).astype(np.int32)
  return ids


def make_entry(source: Any, index: int, scales: Sequence[float], min_sizes: Sequence[int],
               max_side: int = 0) -> dict[str, Any]:
  """Source record `index` -> the dict `records.encode_record` stores (or an error entry)."""
  rec = source.get(index, with_encoded=True)
  label = int(rec.get("label", -1))
  if "error" in rec:
    return {"id": rec["id"], "label": label, "error": rec["error"]}
  image = rec["image"]
  masks, segments = {}, {}
  if "masks" in rec:
    # A source with precomputed masks (official DetCon TFRecords): store them, never recompute;
    # they are labelled with the one (scale, min_size) they were made with.
    if len(scales) * len(min_sizes) != 1:
      raise ValueError(f"record {rec['id']!r} carries precomputed masks: give exactly one "
                       "--scales and one --min_sizes (their FH setting), not "
                       f"{scales}, {min_sizes}")
    key = records.mask_key(scales[0], min_sizes[0])
    masks[key] = records.encode_mask(rec["masks"], rec["id"])
    segments[key] = int(len(np.unique(rec["masks"])))
    return {"id": rec["id"], "label": label, "height": image.shape[0],
            "width": image.shape[1], "image": rec["encoded"], "masks": masks,
            "segments": segments}
  try:
    for s in scales:
      for m in min_sizes:
        key = records.mask_key(s, m)
        ids = felzenszwalb_masks(image, s, m, max_side=max_side)
        masks[key] = records.encode_mask(ids, rec["id"])
        segments[key] = int(ids.max()) + 1
  except ValueError as e:  # >= 65536 segments
    return {"id": rec["id"], "label": label, "error": str(e)}
  return {"id": rec["id"], "label": label, "height": image.shape[0], "width": image.shape[1],
          "image": rec["encoded"], "masks": masks, "segments": segments}


def shard_name(k: int, num_shards: int) -> str:
  return f"fh-{k:05d}-of-{num_shards:05d}.array_record"


@functools.lru_cache(maxsize=4)
def _cached_source(name: str, args_json: str):
  # One source per worker process and setting: opened once, reused for every shard it writes.
  return sources.make_source(name, **json.loads(args_json))


def write_shard(job: Mapping[str, Any]) -> str:
  """Writes shard `job["k"]` (records [start, stop)) unless it exists; returns its file name.

  The shard is written as `.<name>.tmp-<pid>` and renamed when complete, so the final name only
  ever holds a finished shard.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  name = shard_name(job["k"], job["num_shards"])
  final = os.path.join(job["out"], name)
  if os.path.exists(final):
    return name
  source = _cached_source(job["source"], json.dumps(job["source_args"], sort_keys=True))
  tmp = os.path.join(job["out"], f".{name}.tmp-{os.getpid()}")
  writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  try:
    for i in range(job["start"], job["stop"]):
      entry = make_entry(source, i, job["scales"], job["min_sizes"], job["max_side"])
      writer.write(records.encode_record(entry))
  finally:
    writer.close()
  os.replace(tmp, final)
  return name


def shard_stats(path: str, first_index: int) -> dict[str, Any]:
  """Reads a finished shard back: record count, segment counts, failures (index, id, error)."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  reader = array_record_module.ArrayRecordReader(path)
  try:
    n = reader.num_records()
    entries = [records.decode_record(b) for b in reader.read(list(range(n)))] if n else []
  finally:
    reader.close()
  segments: dict[str, list[int]] = {}
  failures = []
  for j, e in enumerate(entries):
    if "error" in e:
      failures.append({"index": first_index + j, "id": e["id"], "error": e["error"]})
      continue
    for key, v in e["segments"].items():
      segments.setdefault(key, []).append(v)
  return {"num_records": n, "failures": failures, "segments": segments,
          "labels": [e.get("label", -1) for e in entries]}


def _summary(counts: Sequence[int]) -> dict[str, float]:
  if not counts:
    return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
  return {"mean": round(float(np.mean(counts)), 4), "median": float(statistics.median(counts)),
          "min": int(min(counts)), "max": int(max(counts))}


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def precompute(source: str, source_args: Mapping[str, Any], out: str,
               scales: Sequence[float] = (1000,), min_sizes: Sequence[int] = (1000,),
               processes: int = 1, records_per_shard: int = 1000, max_side: int = 0,
               progress: bool = True, shards: Optional[Iterable[int]] = None) -> dict[str, Any]:
  """Computes FH masks of every record of `source` into `out` (format in the module docstring).

  Args:
    source, source_args: `sources.make_source(source, **source_args)`.
    out: output folder (created).
    scales, min_sizes: every combination is stored.
    processes: worker processes (1: in this process).
    records_per_shard: K; shard k holds records [k*K, (k+1)*K).
    max_side: FH long-side cap, 0 for full resolution.
    progress: tqdm bar and a printed summary.
    shards: write only these shard indices and return without metadata (used to simulate an
      interrupted run in tests).
  Returns:
    The metadata dict written to `out/metadata.json` (empty if `shards` is given).
  """
  if records_per_shard <= 0 or processes <= 0:
    raise ValueError(f"records_per_shard={records_per_shard} and processes={processes} must be "
                     "positive")
  if not scales or not min_sizes:
    raise ValueError(f"scales={scales} and min_sizes={min_sizes} must be non-empty")
  source_args = dict(source_args)
  src = sources.make_source(source, **source_args)
  n = len(src)
  if n == 0:
    raise ValueError(f"source {source!r} with {source_args} is empty")
  os.makedirs(out, exist_ok=True)
  num_shards = -(-n // records_per_shard)
  # Leftovers of a killed run: only temporary files; finished shards are kept and skipped.
  for f in os.listdir(out):
    if f.startswith(".fh-") and ".tmp-" in f:
      os.remove(os.path.join(out, f))
  jobs = [{"k": k, "num_shards": num_shards, "start": k * records_per_shard,
           "stop": min(n, (k + 1) * records_per_shard), "out": out, "source": source,
           "source_args": source_args, "scales": list(scales), "min_sizes": list(min_sizes),
           "max_side": int(max_side)} for k in range(num_shards)]
  if shards is not None:
    wanted = set(shards)
    jobs = [j for j in jobs if j["k"] in wanted]
  pending = [j for j in jobs if not os.path.exists(os.path.join(out, shard_name(j["k"],
                                                                                 num_shards)))]
  done_records = sum(j["stop"] - j["start"] for j in jobs) - sum(j["stop"] - j["start"]
                                                                 for j in pending)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=n if shards is None else done_records + sum(
        j["stop"] - j["start"] for j in pending), initial=done_records, unit="img",
               desc=f"FH masks -> {out}", smoothing=0.05)
  sizes = {shard_name(j["k"], num_shards): j["stop"] - j["start"] for j in pending}
  t0 = time.perf_counter()
  if processes == 1 or len(pending) <= 1:
    for job in pending:
      name = write_shard(job)
      if bar:
        bar.update(sizes[name])
  else:
    # spawn, not fork: the parent may hold threads (JAX, grain, tfds) that fork would copy locked.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(processes, len(pending))) as pool:
      for name in pool.imap_unordered(write_shard, pending):
        if bar:
          bar.update(sizes[name])
  elapsed = time.perf_counter() - t0
  if bar:
    bar.close()
  if shards is not None:
    return {}

  shard_list, failures, all_segments, labels = [], [], {}, []
  for j in jobs:
    name = shard_name(j["k"], num_shards)
    st = shard_stats(os.path.join(out, name), j["start"])
    if st["num_records"] != j["stop"] - j["start"]:
      raise RuntimeError(f"{os.path.join(out, name)} holds {st['num_records']} records, "
                         f"expected {j['stop'] - j['start']}: delete it and rerun")
    failures += st["failures"]
    labels += st["labels"]
    for key, v in st["segments"].items():
      all_segments.setdefault(key, []).extend(v)
    shard_list.append({"file": name, "first_index": j["start"], "num_records": st["num_records"],
                       "num_failed": len(st["failures"]),
                       "segments": {k: _summary(v) for k, v in sorted(st["segments"].items())}})
  metadata = {
      "format_version": FORMAT_VERSION, "source": source, "source_args": source_args,
      "scales": list(scales), "min_sizes": list(min_sizes), "sigma": SIGMA,
      "max_side": int(max_side), "records_per_shard": records_per_shard,
      "num_records": n, "num_shards": num_shards,
      "num_classes": int(getattr(src, "num_classes", 0) or (max(labels) + 1 if labels else 0)),
      "counts": {"images": n - len(failures), "failed": len(failures)},
      "segments": {k: _summary(v) for k, v in sorted(all_segments.items())},
      "failures": failures, "shards": shard_list,
  }
  _atomic_write_json(os.path.join(out, "metadata.json"), metadata)
  if progress:
    computed = sum(sizes.values())
    print(f"FH masks: {n} records in {num_shards} shards at {out}; {len(failures)} failed; "
          f"computed {computed} in {elapsed:.1f}s"
          + (f" ({computed / elapsed:.2f} img/s)" if computed and elapsed > 0 else ""))
    for k, s in metadata["segments"].items():
      print(f"  scale_min_size={k}: segments per image mean {s['mean']:.1f}, "
            f"median {s['median']:.1f}, min {s['min']}, max {s['max']}")
    for f in failures[:20]:
      print(f"  failed #{f['index']} {f['id']}: {f['error']}")
    if len(failures) > 20:
      print(f"  ... and {len(failures) - 20} more (metadata.json lists all)")
  return metadata


def parse_source_args(text: str) -> dict[str, Any]:
  """"name=imagenet2012,split=train,num=8" -> dict; values parsed as JSON when they parse."""
  out: dict[str, Any] = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    if "=" not in item:
      raise ValueError(f"--source_args item {item!r} is not key=value")
    k, v = item.split("=", 1)
    try:
      out[k.strip()] = json.loads(v)
    except json.JSONDecodeError:
      out[k.strip()] = v
  return out


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_enum("source", None, sorted(set(sources.SOURCES) - {"fh_masks"}), "Image source.")
  flags.DEFINE_string("source_args", "", "Source arguments, key=value,...")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_list("scales", ["1000"], "FH scales.")
  flags.DEFINE_list("min_sizes", ["1000"], "FH min_size values.")
  flags.DEFINE_integer("processes", 1, "Worker processes.")
  flags.DEFINE_integer("records_per_shard", 1000, "Records per array_record shard.")
  flags.DEFINE_integer("max_side", 0, "Cap on the long side FH runs at (0: full resolution).")
  flags.mark_flags_as_required(["source", "out"])
  return flags.FLAGS


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  precompute(f.source, parse_source_args(f.source_args), f.out,
             scales=[float(s) if "." in s else int(s) for s in f.scales],
             min_sizes=[int(m) for m in f.min_sizes], processes=f.processes,
             records_per_shard=f.records_per_shard, max_side=f.max_side)


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main)
