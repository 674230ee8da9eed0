"""The launch scripts: their --dry-run commands, their argument checks, shellcheck, and a real
2-process CPU launch (gloo collectives across processes) through launch/local_multiprocess.sh.

Run as a module (`python -m tests.test_launch`), this file is the probe that the real launch
starts in every process.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("tpu_pod.sh", "gpu_slurm.sh", "local_multiprocess.sh")
DETCON_ARGS = ["--config=configs/detcon_b.py", "--workdir=gs://my-bucket/detcon_b",
               "--config.data.source_args.path=gs://my-bucket/imagenet fh"]  # a space survives


def _run(script, *args, env=None, timeout=60):
  return subprocess.run([os.path.join(LAUNCH, script), *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                        check=False)


def _commands(result):
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _option(words, name):
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) == 1, (name, words)
  return values[0]


def test_scripts_are_executable_and_shellcheck_clean():
  for script in SCRIPTS:
    assert os.access(os.path.join(LAUNCH, script), os.X_OK), script
  if shutil.which("shellcheck") is None:
    return  # CI does not install shellcheck; the scripts were checked with it when written
  out = subprocess.run(["shellcheck", *(os.path.join(LAUNCH, s) for s in SCRIPTS)],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stdout


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_deletes():
  cmds = _commands(_run("tpu_pod.sh", "--dry-run", "--zone=us-central2-b", "--name=detcon",
                        "--project=proj", "all", "--", *DETCON_ARGS))
  assert [c[0] for c in cmds] == ["gcloud", "git", "gcloud", "gcloud", "gcloud", "gcloud"]
  create, archive, scp, install, run, delete = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "detcon"]
  assert _option(create, "--accelerator-type") == "v4-256"  # 128 chips
  assert _option(create, "--zone") == "us-central2-b" and _option(create, "--project") == "proj"
  assert "archive" in archive and archive[-1] != ""
  assert scp[4] == "scp" and _option(scp, "--worker") == "all"
  for cmd in (install, run):
    assert cmd[4:6] == ["ssh", "detcon"] and _option(cmd, "--worker") == "all"
    assert _option(cmd, "--zone") == "us-central2-b"
  assert "make install-tpu" in _option(install, "--command")
  # The remote command is `cd ~/ssl_jax && .venv/bin/python -m ssl_jax.main ARGS`, with the
  # arguments quoted for the remote shell: splitting it gives them back unchanged.
  remote = shlex.split(_option(run, "--command"))
  assert remote[:4] == ["cd", "~/ssl_jax", "&&", ".venv/bin/python"]
  assert remote[4:6] == ["-m", "ssl_jax.main"] and remote[6:] == DETCON_ARGS
  assert delete[4:6] == ["delete", "detcon"] and "--quiet" in delete


def test_tpu_pod_detached_run_and_logs():
  cmds = _commands(_run("tpu_pod.sh", "--dry-run", "--zone=z", "--detach", "run", "logs", "--",
                        "--config=configs/detcon_b.py", "--workdir", "gs://b/run"))
  run, logs = cmds
  assert _option(run, "--worker") == "all" and "nohup" in _option(run, "--command")
  assert "~/ssl_jax.log" in _option(run, "--command")
  assert _option(logs, "--worker") == "0" and "tail" in _option(logs, "--command")


def test_tpu_pod_refuses_what_would_fail_on_the_pod():
  local = _run("tpu_pod.sh", "--dry-run", "--zone=z", "run", "--", "--config=c",
               "--workdir=/tmp/run")
  assert local.returncode == 2 and "gs://" in local.stderr and local.stdout == ""
  detached = _run("tpu_pod.sh", "--dry-run", "--zone=z", "--detach", "all", "--", "--config=c",
                  "--workdir=gs://b/r")
  assert detached.returncode == 2 and "delete" in detached.stderr
  no_zone = _run("tpu_pod.sh", "--dry-run", "create", env={"ZONE": ""})
  assert no_zone.returncode == 2 and "--zone" in no_zone.stderr
  typo = _run("tpu_pod.sh", "--dry-run", "--zone=z", "creat")
  assert typo.returncode == 2 and "creat" in typo.stderr


def test_gpu_slurm_one_task_per_node_with_all_gpus():
  with open(os.path.join(LAUNCH, "gpu_slurm.sh"), encoding="utf-8") as f:
    header = re.findall(r"^#SBATCH (\S+)", f.read(), flags=re.M)
  assert "--ntasks-per-node=1" in header and "--gpus-per-node=8" in header
  assert any(h.startswith("--signal=TERM@") for h in header)  # SIGTERM before the time limit
  args = ["--config=configs/detcon_b.py", "--workdir=/shared/detcon b"]
  (cmd,) = _commands(_run("gpu_slurm.sh", "--dry-run", "--", *args,
                          env={"SLURM_GPUS_ON_NODE": "4"}))
  assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd and "--gpus-per-node=4" in cmd
  assert "--kill-on-bad-exit=1" in cmd
  i = cmd.index("-m")
  assert cmd[i + 1] == "ssl_jax.main" and cmd[i + 2:] == args
  outside = _run("gpu_slurm.sh", "--", *args, env={"SLURM_JOB_ID": ""})
  assert outside.returncode == 2 and "sbatch" in outside.stderr


def test_local_multiprocess_dry_run_gives_each_process_its_id_and_devices():
  args = ["--config=configs/detcon_b.py:test", "--workdir=/tmp/a b"]
  cmds = _commands(_run("local_multiprocess.sh", "--dry-run", "--devices-per-process=2",
                        "--port=23456", "3", "--", *args))
  assert cmds[-1] == ["wait"]
  procs = cmds[:-1]
  assert len(procs) == 3
  for i, cmd in enumerate(procs):
    assert cmd[0] == "env" and cmd[-1] == "&"
    env = dict(w.split("=", 1) for w in cmd[1:] if re.match(r"^[A-Z_]+=", w))
    assert env == {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
                   "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                   "JAX_COORDINATOR_ADDRESS": "127.0.0.1:23456", "JAX_NUM_PROCESSES": "3",
                   "JAX_PROCESS_ID": str(i)}
    j = cmd.index("-m")
    assert cmd[j + 1] == "ssl_jax.main" and cmd[j + 2:-1] == args
  bad = _run("local_multiprocess.sh", "--dry-run", "2", "--config=c")
  assert bad.returncode == 2 and "--" in bad.stderr


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
  """A process that fails stops its peers (which would otherwise wait in a collective forever)
  and its exit status is the launcher's."""
  fake = tmp_path / "python"
  # Process 1 fails once its peers are up (their TERM trap set), not before: a peer killed
  # while bash is still starting would never run its trap.
  fake.write_text("#!/usr/bin/env bash\n"
                  "if [[ $JAX_PROCESS_ID == 1 ]]; then\n"
                  f"  for _ in $(seq 300); do [[ -e {tmp_path}/up_0 && -e {tmp_path}/up_2 ]] "
                  "&& break; sleep 0.1; done\n"
                  "  exit 7\n"
                  "fi\n"
                  f"trap 'kill $s; touch {tmp_path}/stopped_$JAX_PROCESS_ID; exit 0' TERM\n"
                  "sleep 60 >/dev/null 2>&1 & s=$!\n"
                  f"touch {tmp_path}/up_$JAX_PROCESS_ID\n"
                  "wait $s\n")
  fake.chmod(0o755)
  out = _run("local_multiprocess.sh", "--port=1", "3", "--", "--config=c",
             env={"PYTHON": str(fake), "SSL_JAX_STOP_GRACE_S": "30"}, timeout=40)
  assert out.returncode == 7, out.stderr
  assert "process 1 exited with status 7" in out.stderr
  assert {p.name for p in tmp_path.glob("stopped_*")} == {"stopped_0", "stopped_2"}


def test_local_multiprocess_really_joins_processes(tmp_path):
  """2 processes x 2 CPU devices: one JAX runtime of 4 devices whose jitted sum over a global
  array spans both processes (gloo), as the training step's collectives do."""
  out = _run("local_multiprocess.sh", "--devices-per-process=2", f"--log-dir={tmp_path}",
             "--module=tests.test_launch", "2", "--", "probe",
             env={"PYTHON": sys.executable, "XLA_FLAGS": ""}, timeout=180)
  logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert out.returncode == 0, (out.stderr, logs)
  for i, log in enumerate(logs):
    # Process i holds rows [2i, 2i + 2) of arange(4) + 1 on its 2 devices; the sum is global.
    assert f"probe process={i} count=2 devices=4 local=2 sum=10.0" in log, log


def _probe() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ssl_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed()
  mesh = parallel.make_mesh()
  i = jax.process_index()
  local = np.arange(2 * i, 2 * i + 2, dtype=np.float32) + 1
  x = jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), local)
  total = jax.jit(lambda a: a.sum(), out_shardings=parallel.replicated(mesh))(x)
  print(f"probe process={i} count={jax.process_count()} devices={jax.device_count()} "
        f"local={jax.local_device_count()} sum={float(total)}", flush=True)


if __name__ == "__main__":
  if sys.argv[1:] == ["probe"]:
    _probe()
