"""Multi-process training, as on a pod: `launch/local_multiprocess.sh 2 -- <main args>` runs two
processes of 4 CPU devices each (gloo collectives, jax.distributed), each reading its slice of the
global batch. Their losses equal one process of 8 devices on the same global batches; a run saved
by 2 processes resumes on 1 with exactly the batches the 2-process run would have seen; SIGTERM to
one process makes both save the same step and exit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ssl_jax import parallel
from tests.helpers import ROOT

LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")


def _env(**extra):
  env = dict(os.environ, PYTHON=sys.executable,
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"), **extra)
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  return env


def _single(args, timeout=900):
  """One process with 8 CPU devices."""
  return subprocess.run([sys.executable, "-m", "ssl_jax.main", *args], cwd=ROOT,
                        env=_env(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8"),
                        capture_output=True, text=True, timeout=timeout)


def _launch(args, log_dir, timeout=900):
  """Two processes with 4 CPU devices each."""
  return subprocess.run(["bash", LAUNCH, "--devices-per-process=4", f"--log-dir={log_dir}", "2",
                         "--", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _logs(log_dir):
  return "\n".join(open(os.path.join(log_dir, name)).read()[-2000:]
                   for name in sorted(os.listdir(log_dir)) if name.startswith("process_"))


def _args(config, workdir, steps, *extra):
  return [f"--config={config}", f"--workdir={workdir}", f"--config.train.total_steps={steps}",
          "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=1",
          "--config.train.progress_bar=False", *extra]


@pytest.mark.parametrize("config", ["configs/detcon_b.py:test", "configs/mocov3.py:test"])
def test_two_processes_equal_one_and_resume_on_one(config, tmp_path):
  """2 processes x 4 devices give the losses of 1 process x 8 devices, step for step; the 2-process
  run stopped at step 2 resumes on 1 process and continues with the same losses."""
  reference = str(tmp_path / "one")
  run = _single(_args(config, reference, 4))
  assert run.returncode == 0, run.stderr[-3000:]
  two = str(tmp_path / "two")
  run = _launch(_args(config, two, 4, "--max_steps=2"), tmp_path / "logs")
  assert run.returncode == 0, run.stderr[-3000:] + _logs(tmp_path / "logs")
  run = _single(_args(config, two, 4))  # resume the 2-process run with 1 process
  assert run.returncode == 0, run.stderr[-3000:]
  assert "resuming at step 2" in run.stdout
  want, got = _losses(reference), _losses(two)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  # Reductions over 8 devices run in another order split over 2 processes: float rounding only,
  # which later updates amplify a little (another batch would change the loss by percents).
  np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=2e-5)
  np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=2e-3)


def test_sigterm_to_one_process_saves_the_same_step_on_both(tmp_path):
  """Preemption notice to one host (then, later, to the other): both save one agreed step and
  exit 0; nobody hangs in a collective."""
  workdir = tmp_path / "run"
  log_dir = tmp_path / "logs"
  proc = subprocess.Popen(
      ["bash", LAUNCH, "--devices-per-process=4", f"--log-dir={log_dir}", "2", "--",
       *_args("configs/byol.py:test", str(workdir), 100000,
              "--config.train.checkpoint_every_steps=100000")],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)
  try:
    deadline = time.time() + 600
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
      assert proc.poll() is None, proc.stderr.read()[-3000:] + _logs(log_dir)
      time.sleep(0.5)
    time.sleep(2)  # a few steps in
    children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "ssl_jax.main"],
                              capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in children]
    assert len(pids) == 2, children
    os.kill(pids[0], signal.SIGTERM)
    time.sleep(1.5)
    if proc.poll() is None:
      try:
        os.kill(pids[1], signal.SIGTERM)
      except ProcessLookupError:
        pass
    proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, _logs(log_dir)
  logs = [open(log_dir / f"process_{i}.log").read() for i in range(2)]
  saved = [int(log.split("SIGTERM received: saved step ")[1].split(",")[0]) for log in logs
           if "SIGTERM received: saved step " in log]
  checkpoints = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert saved and checkpoints == [saved[0]], (saved, checkpoints, logs)


def test_evaluation_features_on_two_processes(tmp_path):
  """Each process reads its rows of the evaluation set; every process gets all features and
  labels in order, bad records left out (`tests/multiprocess_eval_check.py`)."""
  out = tmp_path / "features.json"
  run = subprocess.run(["bash", LAUNCH, "--devices-per-process=2",
                        "--module=tests.multiprocess_eval_check", f"--log-dir={tmp_path}", "2",
                        "--", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:] + _logs(tmp_path)
  got = json.loads(out.read_text())
  assert (got["processes"], got["devices"]) == (2, 4)
  good = [i for i in range(11) if i != 3]
  for name in ("jitted", "predict"):
    feats, labels = got[name]
    np.testing.assert_allclose(feats, good)  # an image's mean pixel is its index
    assert labels == [i % 4 for i in good]


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5", "TPU_WORKER_ID": "3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    # GKE TPU node pools set the same variables as a TPU VM pod slice.
    ({"TPU_WORKER_HOSTNAMES": "job-0.svc,job-1.svc", "TPU_WORKER_ID": "0",
      "KUBERNETES_SERVICE_HOST": "10.1.0.1"}, {}),
    # SLURM, one task per node (launch/gpu_slurm.sh): every GPU of the node is this process's.
    ({"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8",
      "SLURM_LOCALID": "0"}, {"local_device_ids": [0, 1, 2, 3, 4, 5, 6, 7]}),
    ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1(x2)",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, {"local_device_ids": [0, 1, 2, 3]}),
    # SLURM, one task per GPU: JAX's own binding (one GPU per task, by SLURM_LOCALID).
    ({"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8",
      "SLURM_LOCALID": "3"}, {}),
    ({"SLURM_NTASKS": "1", "SLURM_GPUS_ON_NODE": "8"}, None),
    ({"SSL_JAX_DISTRIBUTED": "1"}, {}),
])
def test_cluster_detection(env, expected):
  assert parallel.distributed_init_args(env) == expected
