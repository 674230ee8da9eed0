"""Paths that may be local folders or buckets (`gs://`, anything etils.epath reads).

Everything a run writes or reads by path (config.json, metrics.jsonl, checkpoints, exports, FH
mask shards) goes through `etils.epath`, which uses gcsfs for `gs://` (no TensorFlow); orbax
writes checkpoint arrays through tensorstore, which reads `gs://` natively. Local paths are made
absolute (orbax needs that); remote ones are kept as given.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

from etils import epath

from ssl_jax.errors import UserError


class WorkdirError(UserError, OSError):
  """The workdir cannot be created or written (bad bucket name, no permission)."""


def is_remote(path) -> bool:
  return "://" in str(path)


def resolve(path) -> epath.Path:
  """An epath.Path; local paths absolute."""
  p = epath.Path(path)
  return p if is_remote(path) else p.expanduser().absolute()


def check_workdir(workdir) -> str:
  """Creates `workdir` and checks it is writable (a probe file written and removed), so a bad
  bucket fails in one line before anything is compiled. Returns it as a string (local: absolute).

  A bucket path is not "created": object stores have no folders, and gcsfs's makedirs
  (`_mkdir(create_parents=True)`) sends a create request for a missing *bucket*, so a typo in
  the bucket name would make a new bucket wherever the credentials allow it; writing the probe
  object into a missing bucket fails instead."""
  if not workdir:
    raise WorkdirError("--workdir is empty")
  path = resolve(workdir)
  try:
    if not is_remote(workdir):
      path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_check_{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # gcsfs/google-auth raise many kinds: all mean "cannot write there"
    raise WorkdirError(f"--workdir={workdir} is not writable ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:300]}); check the path or bucket name and "
                       "your credentials") from e
  return str(path)


def write_atomic(path, text: str) -> None:
  """Writes a text file so that readers see the old or the new content, never a part: a
  temporary sibling renamed over the target (one object write on a bucket)."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)  # an object upload is atomic
    return
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """A local file path for `path`: itself when local, else a temporary download of it (for
  readers that need a real file, e.g. safetensors, torch.load)."""
  if not is_remote(path):
    yield str(path)
    return
  src = epath.Path(path)
  with tempfile.TemporaryDirectory(prefix="ssl_jax_") as tmp:
    dst = os.path.join(tmp, src.name)
    with src.open("rb") as fin, open(dst, "wb") as fout:
      shutil.copyfileobj(fin, fout, 1 << 22)
    yield dst


@contextlib.contextmanager
def local_output(path) -> Iterator[str]:
  """A local file path to write `path` through; `path` appears, complete, only when the block
  ends without error. Local: the sibling `.<name>.tmp-<pid>` (parent folders created), renamed
  over `path`; bucket: a temporary file, uploaded (an object appears when its upload ends).
  A failed block leaves nothing; a killed one at most the local sibling."""
  if not is_remote(path):
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
      yield tmp
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    os.replace(tmp, path)
    return
  dst = epath.Path(path)
  with tempfile.TemporaryDirectory(prefix="ssl_jax_") as tmp:
    local = os.path.join(tmp, dst.name)
    yield local
    with open(local, "rb") as fin, dst.open("wb") as fout:
      shutil.copyfileobj(fin, fout, 1 << 22)
