#!/usr/bin/env bash
# Run one config on every host of a Cloud TPU pod slice. Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE configs/detcon_b.py gs://bucket/workdir [--config.x=y ...]
# Every host runs the same command; JAX discovers the pod (jax.distributed.initialize), each host
# reads its shard of the data, and rerunning the same command resumes from the latest checkpoint.
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/ssl_jax && .venv/bin/python -m ssl_jax.main --config=$config --workdir=$workdir $*"
