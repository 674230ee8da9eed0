#!/usr/bin/env bash
# SLURM: one task per node, each task drives all GPUs of its node. Usage:
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_slurm.sh configs/byol.py /shared/run
# JAX reads the SLURM environment in jax.distributed.initialize().
#SBATCH --job-name=ssl_jax
set -euo pipefail
config=$1 workdir=$2; shift 2
srun .venv/bin/python -m ssl_jax.main --config="$config" --workdir="$workdir" "$@"
