#!/usr/bin/env bash
# Example Slurm job: one of the paper's recipes (scripts/<RECIPE>.sh) on several nodes, one DeepSpeed
# launcher per node (scripts/_launch.sh's NNODES form: DeepSpeed --no_ssh, no ssh between nodes).
# Submit from the repository root; DATA and OUT must be on storage that every node sees:
#   RECIPE=llama_sort_13b DATA=/shared/llama/10k OUT=/shared/out/13b sbatch --nodes=4 scripts/slurm/multinode.sh
# Group DATA for every GPU of the job first (4 nodes x 8 GPUs; with SP=N: 32 / N; README "Several nodes"):
#   python sort_and_group.py --train_file /shared/llama/10k --group_size 32
# Arguments go on to train.py (e.g. --max_steps 20). Whole nodes (--exclusive): DeepSpeed numbers each
# node's GPUs 0..NUM_GPUS-1. Multi-node runs have not been measured in this repository.
#SBATCH --job-name=longalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch runs a copy of this file: the repository is where it was submitted
if [ ! -f scripts/_launch.sh ]; then
    echo "scripts/slurm/multinode.sh: submit from the repository root ($PWD has no scripts/_launch.sh)" >&2
    exit 1
fi
RECIPE=${RECIPE:-llama_pack}
if [ ! -f "scripts/$RECIPE.sh" ]; then
    echo "scripts/slurm/multinode.sh: RECIPE=$RECIPE: no scripts/$RECIPE.sh" >&2
    exit 1
fi
: "${SLURM_JOB_NUM_NODES:?scripts/slurm/multinode.sh runs under sbatch (no SLURM_JOB_NUM_NODES)}"
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export NNODES=$SLURM_JOB_NUM_NODES
export MASTER_ADDR=${MASTER_ADDR:-${HOSTS%%$'\n'*}}  # the first node runs rank 0
export MASTER_PORT=${MASTER_PORT:-29500}
# one task per node, each the recipe with its node's rank
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'NODE_RANK=$SLURM_NODEID exec bash "scripts/$0.sh" "$@"' "$RECIPE" "$@"
