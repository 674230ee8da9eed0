#!/usr/bin/env bash
# Pretrain on a Cloud TPU pod slice: create the TPU VM, install this checkout on every host, run
# the same command on every host (--worker=all), delete the VM.
#
#   launch/tpu_pod.sh [options] STEP... [-- <ssl_jax.main arguments>]
#
# DetCon-B on ImageNet, 128 chips (a v4-256 slice: 32 hosts of 4 chips), workdir in a bucket.
# FH masks are precomputed once (README "DetCon on ImageNet") into the bucket; every host reads
# the shards from it (or from a folder every host mounts):
#   BUCKET=gs://my-bucket
#   launch/tpu_pod.sh --name=detcon --zone=us-central2-b --accelerator-type=v4-256 all -- \
#       --config=configs/detcon_b.py --workdir=$BUCKET/detcon_b \
#       --config.data.source_args.path=$BUCKET/imagenet_fh
# Preempted or stopped? Rerun `run` (or `create install run` after a spot VM was reclaimed) with
# the same --workdir: training resumes from its last checkpoint in the bucket.
#
# Steps (in the order given; `all` = create install run delete, and deletes even if run fails):
#   create   gcloud compute tpus tpu-vm create (--accelerator-type, --version, --spot)
#   install  copy this checkout (committed files plus uncommitted edits of tracked files, via
#            git archive) to every host, install Python 3.11 and `make install-tpu` there
#   run      the training command on --worker=all (in the foreground; --detach: in the
#            background, output in ~/ssl_jax.log of each host)
#   logs     follow ~/ssl_jax.log of worker 0 (after run --detach)
#   delete   gcloud compute tpus tpu-vm delete
# Options:
#   --name=NAME (default ssl-jax)  --zone=ZONE (required, or $ZONE)  --project=PROJECT
#   --accelerator-type=TYPE (default v4-256)  --version=RUNTIME (default tpu-ubuntu2204-base)
#   --spot  --detach  --python=python3.11 (the hosts' interpreter for the venv)
#   --dry-run  print the commands, run nothing.
set -euo pipefail

# The header comment above is the help text.
usage() { awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

name=ssl-jax zone=${ZONE:-} project="" accelerator=v4-256 version=tpu-ubuntu2204-base
spot=0 detach=0 dry_run=0 host_python=python3.11
steps=()
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator-type=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --python=*) host_python=${1#*=} ;;
    --spot) spot=1 ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    create | install | run | logs | delete) steps+=("$1") ;;
    all) steps+=(create install run delete) ;;
    *) echo "error: unknown step or option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
main_args=("$@")
((${#steps[@]})) || { echo "error: give at least one step" >&2; usage >&2; exit 2; }
[[ -n $zone ]] || { echo "error: --zone is required (or set ZONE)" >&2; exit 2; }

has_step() { [[ " ${steps[*]} " == *" $1 "* ]]; }
if has_step run; then
  workdir=""
  for ((i = 0; i < ${#main_args[@]}; i++)); do
    case ${main_args[i]} in
      --workdir=*) workdir=${main_args[i]#*=} ;;
      --workdir) workdir=${main_args[i + 1]:-} ;;
    esac
  done
  if [[ $workdir != gs://* ]]; then
    echo "error: run needs --workdir=gs://BUCKET/PATH after --: the hosts of a pod share no" \
         "disk, the checkpoints and metrics go to the bucket (got '${workdir}')" >&2
    exit 2
  fi
  if ((detach)) && has_step delete; then
    echo "error: --detach with delete would delete the VM under the running job" >&2; exit 2
  fi
fi

gcloud_flags=("--zone=$zone")
[[ -n $project ]] && gcloud_flags+=("--project=$project")

# One shell word: as is when plain, else in single quotes.
quote() {
  if [[ $1 =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# Runs a command, or prints it (shell-quoted, one line) with --dry-run.
x() {
  if ((dry_run)); then
    local words=() w
    for w in "$@"; do words+=("$(quote "$w")"); done
    echo "${words[*]}"
  else
    "$@"
  fi
}
on_all_hosts() { x gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$1"; }

step_create() {
  local extra=()
  ((spot)) && extra+=(--spot)
  x gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}" \
    --accelerator-type="$accelerator" --version="$version" "${extra[@]}"
}

step_install() {
  local root tmp rev
  root=$(git rev-parse --show-toplevel)
  tmp=$(mktemp -d)
  # `git stash create` is a commit of the work tree's tracked changes (empty when clean).
  rev=$(git -C "$root" stash create)
  x git -C "$root" archive --format=tar.gz -o "$tmp/ssl_jax.tar.gz" "${rev:-HEAD}"
  x gcloud compute tpus tpu-vm scp "$tmp/ssl_jax.tar.gz" "$name:ssl_jax.tar.gz" \
    "${gcloud_flags[@]}" --worker=all
  on_all_hosts "set -e; sudo apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null; \
sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q $host_python $host_python-venv make >/dev/null; \
mkdir -p ~/ssl_jax && tar -xzf ~/ssl_jax.tar.gz -C ~/ssl_jax && cd ~/ssl_jax && \
make install-tpu PYTHON=$host_python && .venv/bin/python -c 'import jax; print(jax.devices())'"
  rm -rf "$tmp"
}

step_run() {
  local train
  train=".venv/bin/python -m ssl_jax.main$(printf ' %q' "${main_args[@]}")"
  if ((detach)); then
    on_all_hosts "cd ~/ssl_jax && (nohup $train > ~/ssl_jax.log 2>&1 &)"
  else
    on_all_hosts "cd ~/ssl_jax && $train"
  fi
}

step_logs() {
  x gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=0 \
    --command="tail -n 200 -F ~/ssl_jax.log"
}

step_delete() { x gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet; }

# Each step runs with errexit in a subshell; after a failure only `delete` still runs (`all`
# deletes even when run failed: an idle slice still costs money).
status=0
for step in "${steps[@]}"; do
  if [[ $step == delete ]] && ((status != 0)); then
    step_delete || true
  elif ((status == 0)); then
    set +e
    (
      set -e
      case $step in
        create) step_create ;;
        install) step_install ;;
        run) step_run ;;
        logs) step_logs ;;
        delete) step_delete ;;
      esac
    )
    status=$?
    set -e
  fi
done
exit "$status"
