#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices: checks the multi-host code path.
#   launch/local_multiprocess.sh 2 configs/byol.py:test /tmp/mp_run
set -euo pipefail
n=$1 config=$2 workdir=$3; shift 3
port=$((20000 + RANDOM % 20000))
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    .venv/bin/python -m ssl_jax.main --config="$config" --workdir="$workdir" "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
