#!/usr/bin/env bash
# Pretrain on a SLURM GPU cluster: one task per node, each task drives every GPU of its node; the
# tasks join through jax.distributed (ssl_jax.parallel.initialize_distributed reads SLURM's
# variables), each reads its share of the data, config.train.batch_size is global.
#
# Once, on a login node, from the repository root on the shared filesystem:
#   make install-cuda          # .venv with jax's CUDA 12 plugin (requirements-cuda.txt)
# DetCon-B on ImageNet, 16 nodes x 8 GPUs = 128 GPUs (submit from the repository root):
#   sbatch --nodes=16 --gpus-per-node=8 launch/gpu_slurm.sh -- \
#       --config=configs/detcon_b.py --workdir=/shared/runs/detcon_b \
#       --config.data.source_args.path=/shared/data/imagenet_fh
# Resubmitting the same command resumes from the workdir's last checkpoint; SLURM's SIGTERM
# (time limit, --signal below, preemption) makes every task save the same step and exit.
#
# Options before --: --dry-run (print the srun command, run nothing; works outside SLURM too).
# Environment: PYTHON (default .venv/bin/python).
#SBATCH --job-name=ssl_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --signal=TERM@300
set -euo pipefail

# The header comment above is the help text.
usage() { awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

dry_run=0
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (ssl_jax.main arguments go after --)" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
((dry_run)) || [[ -n ${SLURM_JOB_ID:-} ]] || {
  echo "error: submit with sbatch (see the header of $0), or use --dry-run" >&2; exit 2; }
[[ -f ssl_jax/main.py ]] || {
  echo "error: run from the repository root (sbatch uses the directory you submit from)" >&2
  exit 2; }
python=${PYTHON:-.venv/bin/python}
if ((!dry_run)) && ! "$python" -c "import jax_cuda12_plugin" 2>/dev/null; then
  echo "error: $python has no CUDA plugin: run 'make install-cuda' on a login node first" >&2
  exit 2
fi

# One task per node with all of the node's GPUs (SLURM_GPUS_ON_NODE); --kill-on-bad-exit stops
# the whole step when one task fails instead of leaving the others blocked in a collective.
gpus=${SLURM_GPUS_ON_NODE:-8}
cmd=(srun --ntasks-per-node=1 "--gpus-per-node=$gpus" --kill-on-bad-exit=1
     "$python" -m ssl_jax.main "$@")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
echo "ssl_jax: ${SLURM_JOB_NUM_NODES:-?} nodes x $gpus GPUs, job $SLURM_JOB_ID" >&2
exec "${cmd[@]}"
