#!/usr/bin/env bash
# N training processes on this machine, each with its own CPU devices, joined by
# jax.distributed: the multi-host code path (per-process data, global arrays, cross-process
# collectives over gloo) without a cluster.
#
#   launch/local_multiprocess.sh [options] N -- <ssl_jax.main arguments>
#   launch/local_multiprocess.sh 2 -- --config=configs/detcon_b.py:test --workdir=/tmp/mp_run
#
# Options:
#   --devices-per-process=K  CPU devices of each process (JAX_NUM_CPU_DEVICES, default 4): the
#                            global mesh has N*K devices, config.train.batch_size must divide by it.
#   --port=P                 coordinator port on 127.0.0.1 (default: a free one, from Python).
#   --log-dir=DIR            process i writes DIR/process_i.log (default: this terminal).
#   --module=NAME            the Python module each process runs (default ssl_jax.main; e.g.
#                            ssl_jax.data.fh_masks for a multi-process precompute).
#   --dry-run                print the commands, run nothing.
# Environment: PYTHON (default .venv/bin/python, as `make install` creates it).
#
# Every process gets JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES=K, JAX_CPU_COLLECTIVES_IMPLEMENTATION=
# gloo, and the coordinator variables that ssl_jax.parallel.initialize_distributed reads
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). If one process fails, the others
# are stopped (they would wait forever in a collective); SIGINT/SIGTERM to this script is passed
# to every process (SIGTERM = preemption: they save and exit). Exit status: the first failure's.
set -euo pipefail

# The header comment above is the help text.
usage() { awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

devices=4 port="" log_dir="" module=ssl_jax.main dry_run=0
while (($#)); do
  case $1 in
    --devices-per-process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log-dir=*) log_dir=${1#*=} ;;
    --module=*) module=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) echo "error: the process count N comes before --" >&2; exit 2 ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
if (($# < 2)) || [[ $2 != -- ]]; then
  echo "error: expected N -- <ssl_jax.main arguments>" >&2; usage >&2; exit 2
fi
n=$1
shift 2
if ! [[ $n =~ ^[1-9][0-9]*$ ]] || ! [[ $devices =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N=$n and --devices-per-process=$devices must be positive integers" >&2; exit 2
fi
python=${PYTHON:-.venv/bin/python}
if [[ -z $port ]]; then
  if ((dry_run)); then
    port=12355
  else
    port=$("$python" -c 'import portpicker; print(portpicker.pick_unused_port())')
  fi
fi

if ((dry_run)); then
  for ((i = 0; i < n; i++)); do
    env=(JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$devices" JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
         "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$n" "JAX_PROCESS_ID=$i")
    line=$(printf '%q ' env "${env[@]}" "$python" -m "$module" "$@")
    if [[ -n $log_dir ]]; then line+="> $(printf '%q' "$log_dir/process_$i.log") 2>&1 "; fi
    echo "${line}&"
  done
  echo "wait"
  exit 0
fi

[[ -n $log_dir ]] && mkdir -p "$log_dir"
pids=()
stop_all() {
  local sig=$1 p
  for p in "${pids[@]}"; do kill "-$sig" "$p" 2>/dev/null || true; done
}
trap 'stop_all TERM' TERM
trap 'stop_all INT' INT
for ((i = 0; i < n; i++)); do
  (
    export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i
    if [[ -n $log_dir ]]; then
      exec "$python" -m "$module" "$@" >"$log_dir/process_$i.log" 2>&1
    fi
    exec "$python" -m "$module" "$@"
  ) &
  pids+=($!)
  echo "process $i of $n: pid $! (127.0.0.1:$port, $devices CPU devices)" >&2
done

# Poll until every process has exited; the first failure stops the others (SIGTERM, then
# SIGKILL after a grace period: a process blocked in a collective with a dead peer never returns).
grace=${SSL_JAX_STOP_GRACE_S:-30}
status=0 kill_at=0 finished=()
while ((${#finished[@]} < n)); do
  for i in "${!pids[@]}"; do
    [[ -n ${finished[$i]:-} ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[i]=1
    if ((rc != 0 && status == 0)); then
      status=$rc kill_at=$((SECONDS + grace))
      echo "process $i exited with status $rc: stopping the others" >&2
      stop_all TERM
    fi
  done
  if ((kill_at > 0 && SECONDS >= kill_at)); then stop_all KILL; fi
  sleep 0.2
done
exit "$status"
