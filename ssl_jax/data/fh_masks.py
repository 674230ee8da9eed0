"""Felzenszwalb-Huttenlocher masks: computed once with the images into array_record shards
(`precompute`, the CLI) and read back as a source (`FHMaskDataset`, source "fh_masks").

DetCon (Hénaff et al., 2021, Sec. 3.2) computes FH segmentations at full resolution with
skimage's `felzenszwalb(image, scale, sigma=0.8, min_size)`, defaults scale=1000, min_size=1000,
and studies scales {500, 1000, 1500}. Usage:

  python -m ssl_jax.data.fh_masks --source=image_folder --source_args=root=/data/photos \\
      --out=/data/photos_fh --scales=500,1000,1500 --min_sizes=1000 --processes=16

Output folder (local, or a bucket: `--out=gs://bucket/imagenet_fh`; the training run then reads
the shards straight from the bucket, array_record's own GCS reader with the default credentials):
  fh-KKKKK-of-SSSSS.array_record  shard k holds source records [k*N//S, (k+1)*N//S) in order
                                  (N records, S shards), one `ssl_jax.data.records` entry each;
  settings.json                   what the folder is filled with (source, arguments, scales,
                                  min_sizes, sigma, max_side, max_pixels, N, S), written before
                                  the first shard;
  metadata.json                   the settings plus counts, segment statistics, the shard list
                                  with per-shard stats, every failed record (index, id, reason)
                                  and every record whose FH resolution was capped.

Shards: S = max(ceil(N / records_per_shard), min(processes, N)), so `--processes=P` always
gives every one of the P workers a shard, even when N < P x records_per_shard (400 images with
--processes=2: two shards of 200, not one of 400 on one core).

Resumable: a shard is written under a temporary name and renamed only when complete, and
metadata.json is written last (also atomically); a rerun of the same command skips finished
shards and gives byte-identical output to an uninterrupted run. A rerun keeps the first run's
shard layout (S), whatever its --processes. A folder holding masks made with other settings
(source, source_args, scales, min_sizes, max_side, the cap, the record count, the format
version), or shards of unknown origin, is refused (`StaleOutputError` names the folder, what it
holds and what was asked): reusing them would mix records of two runs.

A record that cannot be processed (the image fails to decode, >= 65536 segments, or *any*
exception while making it, e.g. a MemoryError in FH) is written as an *error entry* (id +
reason), not dropped, so record positions never shift; `FHMaskDataset` returns it as an error
record, which the pipeline skips and counts, and metadata.json lists it.

FH resolution: `--max_side=N` (N > 0) runs FH on a copy whose long side is at most N (bilinear,
antialiased) and resizes the ids back to full resolution by nearest neighbour; default 0: full
resolution, as the paper. Independently, an image above `FH_MAX_PIXELS` = 2**24 pixels (16.8 M,
e.g. 4096 x 4096; ImageNet and COCO images are far below it) is *capped*: FH runs on a copy scaled
to at most that many pixels, because skimage's FH needs ~290 bytes per pixel (~5 GB at the cap,
78 GB at the decode limit `sources.MAX_IMAGE_PIXELS`). Capped records are counted
(`counts.capped`) and listed (`capped`) in metadata.json and printed in the summary.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from etils import epath
from PIL import Image

from ssl_jax import paths
from ssl_jax.data import records
from ssl_jax.data import sources
from ssl_jax.errors import UserError

FORMAT_VERSION = 2  # 2: balanced shard layout, settings.json, `capped` entries
SIGMA = 0.8  # DetCon's FH smoothing
FH_MAX_PIXELS = 2**24  # the automatic FH resolution cap (module docstring)
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access for grain
# Settings that decide what the shards hold: a folder holding other values is refused.
_COMPARED = ("format_version", "source", "source_args", "scales", "min_sizes", "sigma",
             "max_side", "max_pixels", "num_records")


class StaleOutputError(UserError, ValueError):
  """`--out` holds FH masks made with other settings (or of unknown origin)."""


# ---------------------------------------------------------------------------------------------
# FH on one image

def fh_shape(height: int, width: int, max_side: int = 0,
             max_pixels: int = FH_MAX_PIXELS) -> tuple[int, int]:
  """(h, w) FH runs at for an image of `height` x `width`: the long side at most `max_side`
  (0: no limit), then at most `max_pixels` pixels (0: no limit), aspect ratio kept."""
  f = 1.0
  if max_side and max(height, width) > max_side:
    f = max_side / max(height, width)
  if max_pixels and height * width * f * f > max_pixels:
    f = math.sqrt(max_pixels / (height * width))
  if f == 1.0:
    return height, width
  h, w = max(1, int(round(height * f))), max(1, int(round(width * f)))
  if max_pixels and h * w > max_pixels:  # rounding up, or a sliver kept at one pixel across
    if h <= w:
      w = max(1, max_pixels // h)
    else:
      h = max(1, max_pixels // w)
  return h, w


def felzenszwalb_masks(image: np.ndarray, scale: float, min_size: int, sigma: float = SIGMA,
                       max_side: int = 0, max_pixels: int = FH_MAX_PIXELS) -> np.ndarray:
  """FH segment ids of one image.

  Args:
    image: uint8 [H, W, 3] RGB.
    scale, min_size, sigma: skimage `felzenszwalb` parameters.
    max_side, max_pixels: FH resolution limits (`fh_shape`); below full resolution FH runs on a
      bilinear copy and the ids are resized back by nearest neighbour.
  Returns:
    int32 [H, W] ids 0..n-1.
  """
  from skimage.segmentation import felzenszwalb  # pylint: disable=import-outside-toplevel
  h, w = image.shape[:2]
  fh, fw = fh_shape(h, w, max_side, max_pixels)
  small = image
  if (fh, fw) != (h, w):
    small = np.asarray(Image.fromarray(image).resize((fw, fh), Image.Resampling.BILINEAR))
  ids = felzenszwalb(small, scale=scale, sigma=sigma, min_size=min_size).astype(np.int32)
  if small is not image:
    ids = np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.NEAREST))
    # Nearest resizing can drop a tiny segment entirely: renumber so ids stay 0..n-1.
    ids = np.unique(ids, return_inverse=True)[1].reshape(h, w).astype(np.int32)
  return ids


def make_entry(source: Any, index: int, scales: Sequence[float], min_sizes: Sequence[int],
               max_side: int = 0, max_pixels: int = FH_MAX_PIXELS) -> dict[str, Any]:
  """Source record `index` -> the dict `records.encode_record` stores, or an error entry.

  Never raises for one record's sake: any exception while reading it or computing its masks
  (a corrupt file, >= 65536 segments, a MemoryError in FH, a bug in a source) becomes an error
  entry `{"id", "label", "error": "<type>: <message>"}`.
  """
  rid, label = f"#{index}", -1
  try:
    rec = source.get(index, with_encoded=True)
    rid, label = rec["id"], int(rec.get("label", -1))
    if "error" in rec:
      return {"id": rid, "label": label, "error": rec["error"]}
    image = rec["image"]
    masks, segments, capped = {}, {}, False
    if "masks" in rec:
      # A source with precomputed masks (official DetCon TFRecords): store them, never recompute;
      # they are labelled with the one (scale, min_size) they were made with (`precompute`
      # checks there is exactly one).
      key = records.mask_key(scales[0], min_sizes[0])
      masks[key] = records.encode_mask(rec["masks"], rid)
      segments[key] = int(len(np.unique(rec["masks"])))
    else:
      h, w = image.shape[:2]
      capped = fh_shape(h, w, max_side, max_pixels) != fh_shape(h, w, max_side, 0)
      for s in scales:
        for m in min_sizes:
          key = records.mask_key(s, m)
          ids = felzenszwalb_masks(image, s, m, max_side=max_side, max_pixels=max_pixels)
          masks[key] = records.encode_mask(ids, rid)
          segments[key] = int(ids.max()) + 1
    return {"id": rid, "label": label, "height": image.shape[0], "width": image.shape[1],
            "image": rec["encoded"], "masks": masks, "segments": segments, "capped": capped}
  except Exception as e:  # pylint: disable=broad-except  # one record must not stop the job
    reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    return {"id": rid, "label": label, "error": reason}


# ---------------------------------------------------------------------------------------------
# Shards

def shard_name(k: int, num_shards: int) -> str:
  return f"fh-{k:05d}-of-{num_shards:05d}.array_record"


def plan_shards(num_records: int, records_per_shard: int, processes: int = 1) -> int:
  """The shard count S = max(ceil(N / records_per_shard), min(processes, N)) (docstring)."""
  return max(-(-num_records // records_per_shard), min(processes, num_records))


def shard_bounds(num_records: int, num_shards: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard: sizes differ by at most one, in record order."""
  return [(k * num_records // num_shards, (k + 1) * num_records // num_shards)
          for k in range(num_shards)]


@functools.lru_cache(maxsize=4)
def _cached_source(name: str, args_json: str):
  # One source per worker process and setting: opened once, reused for every shard it writes.
  return sources.make_source(name, **json.loads(args_json))


def write_shard(job: Mapping[str, Any]) -> str:
  """Writes shard `job["k"]` (records [start, stop)); returns its file name.

  Written through `paths.local_output`: locally as `.<name>.tmp-<pid>`, renamed when complete;
  into a bucket (gs://) as a local temporary file, uploaded when complete. Either way the final
  name only ever holds a finished shard.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  name = shard_name(job["k"], job["num_shards"])
  source = _cached_source(job["source"], json.dumps(job["source_args"], sort_keys=True))
  with paths.local_output(f"{job['out']}/{name}") as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      for i in range(job["start"], job["stop"]):
        entry = make_entry(source, i, job["scales"], job["min_sizes"], job["max_side"],
                           job["max_pixels"])
        writer.write(records.encode_record(entry))
    finally:
      writer.close()
  return name


def shard_stats(path: str, first_index: int) -> dict[str, Any]:
  """Reads a finished shard back: record count, segment counts, failures and capped records."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  reader = array_record_module.ArrayRecordReader(path)
  try:
    n = reader.num_records()
    entries = [records.decode_record(b) for b in reader.read(list(range(n)))] if n else []
  finally:
    reader.close()
  segments: dict[str, list[int]] = {}
  failures, capped = [], []
  for j, e in enumerate(entries):
    if "error" in e:
      failures.append({"index": first_index + j, "id": e["id"], "error": e["error"]})
      continue
    if e.get("capped"):
      capped.append({"index": first_index + j, "id": e["id"], "height": e["height"],
                     "width": e["width"]})
    for key, v in e["segments"].items():
      segments.setdefault(key, []).append(v)
  return {"num_records": n, "failures": failures, "capped": capped, "segments": segments,
          "labels": [e.get("label", -1) for e in entries]}


# ---------------------------------------------------------------------------------------------
# The output folder: what it holds must be what this run asks for

def _json_normal(obj: Any) -> Any:
  return json.loads(json.dumps(obj, sort_keys=True))


def _held_settings(out: str) -> Optional[dict[str, Any]]:
  """The settings `out` was filled with, None for a folder without FH output.

  Raises:
    StaleOutputError: shards are there but nothing says how they were made.
  """
  root = epath.Path(out)
  for name in ("settings.json", "metadata.json"):
    path = root / name
    if path.exists():
      held = json.loads(path.read_text())
      held.setdefault("format_version", 1)  # metadata.json of version 1 had it; be explicit
      return held
  if not root.exists():  # a bucket prefix with nothing under it yet
    return None
  shards = sorted(f.name for f in root.iterdir() if f.name.startswith("fh-")
                  and f.name.endswith(".array_record"))
  if shards:
    raise StaleOutputError(
        f"--out={out} holds {len(shards)} FH shards ({shards[0]}, ...) but no settings.json or "
        "metadata.json saying how they were made, so they cannot be resumed safely. Delete them "
        "(or the folder) to recompute, or choose another --out")
  return None


def check_out_folder(out: str, settings: Mapping[str, Any]) -> Optional[dict[str, Any]]:
  """Refuses an `out` holding FH output made with other settings; returns what it holds.

  Raises:
    StaleOutputError: naming the folder, each differing setting with the value held and the
      value asked, and what to do.
  """
  held = _held_settings(out)
  if held is None:
    return None
  asked = _json_normal({k: settings[k] for k in _COMPARED})
  diff = [k for k in _COMPARED if held.get(k) != asked[k]]
  if diff:
    lines = "; ".join(f"{k}: holds {json.dumps(held.get(k))}, asked {json.dumps(asked[k])}"
                      for k in diff)
    raise StaleOutputError(
        f"--out={out} already holds FH masks made with other settings ({lines}). Reusing its "
        "shards would mix records of two runs. Choose another --out, or delete the folder to "
        "recompute it with the new settings")
  return held


def _atomic_write_json(path, obj: Any) -> None:
  paths.write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _summary(counts: Sequence[int]) -> dict[str, float]:
  if not counts:
    return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
  return {"mean": round(float(np.mean(counts)), 4), "median": float(statistics.median(counts)),
          "min": int(min(counts)), "max": int(max(counts))}


# ---------------------------------------------------------------------------------------------
# The job

def precompute(source: str, source_args: Mapping[str, Any], out: str,
               scales: Sequence[float] = (1000,), min_sizes: Sequence[int] = (1000,),
               processes: int = 1, records_per_shard: int = 1000, max_side: int = 0,
               progress: bool = True, shards: Optional[Iterable[int]] = None,
               max_pixels: int = FH_MAX_PIXELS) -> dict[str, Any]:
  """Computes FH masks of every record of `source` into `out` (format in the module docstring).

  Args:
    source, source_args: `sources.make_source(source, **source_args)`.
    out: output folder (created).
    scales, min_sizes: every combination is stored (sorted, duplicates dropped).
    processes: worker processes (1: in this process); every one gets at least one shard.
    records_per_shard: the most records a shard holds.
    max_side: FH long-side cap, 0 for full resolution.
    progress: tqdm bar and a printed summary.
    shards: write only these shard indices and return without metadata (used to simulate an
      interrupted run in tests).
    max_pixels: the automatic FH pixel cap (`FH_MAX_PIXELS`; 0: none).
  Returns:
    The metadata dict written to `out/metadata.json` (empty if `shards` is given).
  Raises:
    StaleOutputError: `out` holds FH output made with other settings.
  """
  if records_per_shard <= 0 or processes <= 0:
    raise ValueError(f"records_per_shard={records_per_shard} and processes={processes} must be "
                     "positive")
  if not scales or not min_sizes:
    raise ValueError(f"scales={scales} and min_sizes={min_sizes} must be non-empty")
  scales, min_sizes = sorted(set(scales)), sorted(set(min_sizes))
  source_args = dict(source_args)
  src = sources.make_source(source, **source_args)
  n = len(src)
  if n == 0:
    raise ValueError(f"source {source!r} with {source_args} is empty")
  if getattr(src, "provides_masks", False) and len(scales) * len(min_sizes) != 1:
    raise ValueError(f"source {source!r} carries precomputed masks: give exactly one --scales "
                     f"and one --min_sizes (the FH setting they were made with), not "
                     f"scales={scales}, min_sizes={min_sizes}")
  settings = _json_normal({
      "format_version": FORMAT_VERSION, "source": source, "source_args": source_args,
      "scales": scales, "min_sizes": min_sizes, "sigma": SIGMA, "max_side": int(max_side),
      "max_pixels": int(max_pixels), "num_records": n,
      "num_shards": plan_shards(n, records_per_shard, processes)})
  root = paths.resolve(out)
  out = str(root)
  if not paths.is_remote(out):
    os.makedirs(out, exist_ok=True)  # a bucket has no folders to make
  held = check_out_folder(out, settings)
  if held is not None:
    settings["num_shards"] = int(held["num_shards"])  # a rerun keeps the first run's layout
  else:
    _atomic_write_json(root / "settings.json", settings)
  num_shards = settings["num_shards"]
  # Leftovers of a killed run: only temporary files, finished shards are kept and skipped (a
  # bucket never holds temporary shards: they are written locally and uploaded when complete).
  if not paths.is_remote(out):
    for f in os.listdir(out):
      if f.startswith(".fh-") and ".tmp-" in f:
        os.remove(os.path.join(out, f))
  jobs = [{"k": k, "num_shards": num_shards, "start": start, "stop": stop, "out": out,
           "source": source, "source_args": source_args, "scales": scales,
           "min_sizes": min_sizes, "max_side": int(max_side), "max_pixels": int(max_pixels)}
          for k, (start, stop) in enumerate(shard_bounds(n, num_shards))]
  if shards is not None:
    wanted = set(shards)
    jobs = [j for j in jobs if j["k"] in wanted]
  done = {p.name for p in root.iterdir()} if root.exists() else set()
  pending = [j for j in jobs if shard_name(j["k"], num_shards) not in done]  # one listing
  sizes = {shard_name(j["k"], num_shards): j["stop"] - j["start"] for j in pending}
  workers = min(processes, len(pending))
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    total = sum(j["stop"] - j["start"] for j in jobs)
    bar = tqdm(total=total, initial=total - sum(sizes.values()), unit="img",
               desc=f"FH masks -> {out} ({num_shards} shards, {workers} processes)",
               smoothing=0.05)
  t0 = time.perf_counter()
  if workers <= 1:
    for job in pending:
      name = write_shard(job)
      if bar:
        bar.update(sizes[name])
  else:
    # spawn, not fork: the parent may hold threads (JAX, grain, tfds) that fork would copy locked.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
      for name in pool.imap_unordered(write_shard, pending):
        if bar:
          bar.update(sizes[name])
  elapsed = time.perf_counter() - t0
  if bar:
    bar.close()
  if shards is not None:
    return {}

  shard_list, failures, capped, all_segments, labels = [], [], [], {}, []
  for j in jobs:
    name = shard_name(j["k"], num_shards)
    st = shard_stats(f"{out}/{name}", j["start"])
    if st["num_records"] != j["stop"] - j["start"]:
      raise RuntimeError(f"{out}/{name} holds {st['num_records']} records, "
                         f"expected {j['stop'] - j['start']}: delete it and rerun")
    failures += st["failures"]
    capped += st["capped"]
    labels += st["labels"]
    for key, v in st["segments"].items():
      all_segments.setdefault(key, []).extend(v)
    shard_list.append({"file": name, "first_index": j["start"], "num_records": st["num_records"],
                       "num_failed": len(st["failures"]),
                       "segments": {k: _summary(v) for k, v in sorted(st["segments"].items())}})
  metadata = dict(settings)
  metadata.update({
      "num_classes": int(getattr(src, "num_classes", 0) or (max(labels) + 1 if labels else 0)),
      "counts": {"images": n - len(failures), "failed": len(failures), "capped": len(capped)},
      "segments": {k: _summary(v) for k, v in sorted(all_segments.items())},
      "failures": failures, "capped": capped, "shards": shard_list,
  })
  _atomic_write_json(root / "metadata.json", metadata)
  if progress:
    computed = sum(sizes.values())
    print(f"FH masks: {n} records in {num_shards} shards at {out}; {len(failures)} failed; "
          f"computed {computed} in {elapsed:.1f}s"
          + (f" ({computed / elapsed:.2f} img/s)" if computed and elapsed > 0 else ""))
    for k, s in metadata["segments"].items():
      print(f"  scale_min_size={k}: segments per image mean {s['mean']:.1f}, "
            f"median {s['median']:.1f}, min {s['min']}, max {s['max']}")
    if capped:
      print(f"  {len(capped)} images above max_pixels={max_pixels} ran FH at reduced "
            f"resolution (metadata.json lists them), e.g. {capped[0]['id']} "
            f"({capped[0]['height']}x{capped[0]['width']})")
    for f in failures[:20]:
      print(f"  failed #{f['index']} {f['id']}: {f['error']}")
    if len(failures) > 20:
      print(f"  ... and {len(failures) - 20} more (metadata.json lists all)")
  return metadata


# ---------------------------------------------------------------------------------------------
# Reading: the "fh_masks" source

class FHMaskDataset(sources.Source):
  """Images with their Felzenszwalb-Huttenlocher masks for one (scale, min_size).

  Args:
    path: output folder of `python -m ssl_jax.data.fh_masks` (metadata.json + shards).
    scale, min_size: which precomputed setting to return as "masks".
    precompute_from, precompute_args: with `path=""`, compute the masks of source
      `precompute_from` (made with `precompute_args`) once into a cache folder named by a hash of
      the settings (under `cache_dir`, default `sources.default_cache_dir()`) and read them from
      there; for small sources (the demo's built-in photos).
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
                                max_side, cache_dir or sources.default_cache_dir())
    self.path = path = str(paths.resolve(path))
    meta_path = epath.Path(path) / "metadata.json"
    if not meta_path.exists():
      raise FileNotFoundError(
          f"FHMaskDataset: {meta_path} not found; precompute masks with `python -m "
          f"ssl_jax.data.fh_masks --out={path} ...` (an unfinished run has no metadata.json: "
          "rerun the same command to resume it)")
    self.metadata = json.loads(meta_path.read_text())
    self.key = records.mask_key(scale, min_size)
    available = [records.mask_key(s, m) for s in self.metadata["scales"]
                 for m in self.metadata["min_sizes"]]
    if self.key not in available:
      raise ValueError(f"FHMaskDataset: scale={scale}, min_size={min_size} were not precomputed "
                       f"in {path}; available (scale_min_size): {available}")
    # array_record reads gs:// shards itself (riegeli's GCS reader, default credentials).
    self._shards = [f"{path}/{s['file']}" for s in self.metadata["shards"]]
    self._len = int(self.metadata["num_records"])
    self.num_classes = int(self.metadata.get("num_classes", 0))
    self._source = None

  @staticmethod
  def _ensure_cache(name, args, scale, min_size, max_side, cache_dir) -> str:
    spec = json.dumps({"source": name, "args": args, "scale": scale, "min_size": min_size,
                       "max_side": max_side, "version": FORMAT_VERSION}, sort_keys=True)
    out = os.path.join(cache_dir, f"fh_{name}_{hashlib.sha256(spec.encode()).hexdigest()[:16]}")
    if os.path.exists(os.path.join(out, "metadata.json")):
      return out
    # Several processes of one run (a multi-process launch, or grain workers) may get here at
    # once: one computes the cache under an exclusive lock, the others wait for it and read it.
    os.makedirs(cache_dir, exist_ok=True)
    with open(out + ".lock", "w", encoding="utf-8") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.exists(os.path.join(out, "metadata.json")):
        precompute(name, args, out, scales=(scale,), min_sizes=(min_size,), processes=1,
                   max_side=max_side, progress=False)
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
    try:
      rec = records.decode_record(self._open()[i])
    except Exception as e:  # a corrupt shard entry
      return sources.error_record(f"{self.path}#{i}",
                                  f"cannot read record: {type(e).__name__}: {e}")
    rid = rec["id"]
    if "error" in rec:
      return sources.error_record(rid, rec["error"])
    out = sources.decoded_record(rid, rec["image"], with_encoded)
    if "error" in out:
      return out
    try:
      masks = records.decode_mask(rec["masks"][self.key])
    except Exception as e:
      return sources.error_record(rid, f"cannot decode mask {self.key}: {type(e).__name__}: {e}")
    if masks.shape != out["image"].shape[:2]:
      return sources.error_record(
          rid, f"mask {self.key} of shape {masks.shape} does not match image of shape "
               f"{out['image'].shape[:2]} in record {rid!r}")
    out["masks"] = masks
    if rec.get("label", -1) >= 0:
      out["label"] = int(rec["label"])
    return out


# ---------------------------------------------------------------------------------------------
# CLI

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
  flags.DEFINE_integer("records_per_shard", 1000, "Most records per array_record shard.")
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
  from ssl_jax import cli  # pylint: disable=import-outside-toplevel
  _define_flags()
  cli.run(main)  # a stale --out or bad source: one line, status 2
