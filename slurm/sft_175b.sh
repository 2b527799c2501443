#!/bin/bash
# InstructGPT stage 1, supervised fine-tuning, 175B (examples/instructgpt/sft_175b.yaml).
# Layout: 8 nodes x 8 H100: TP=8 (in a node) PP=8 (across nodes) DP=1, full recompute.
#   sbatch slurm/sft_175b.sh [key=value ...]     from the repository root (mkdir -p logs first)
#   bash slurm/sft_175b.sh [key=value ...]       the same, creating logs/
#   DRY_RUN=1 bash slurm/sft_175b.sh             print the layout and srun command and the memory plan; start nothing
# Partition/account: export SBATCH_PARTITION=... SBATCH_ACCOUNT=... (or pass -p/-A to sbatch).
#SBATCH --job-name=sft_175b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8       # one task per GPU
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900      # 15 min warning: finish the step, checkpoint, requeue
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued run appends to the same log
#SBATCH --output=logs/%x-%j.out

STAGE=sft
CONFIG=examples/instructgpt/sft_175b.yaml
OVERRIDES=()                     # e.g. (train.lr=5e-6); sbatch's extra arguments come after
source "${MEGATRON_RLHF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root (or set MEGATRON_RLHF_ROOT)" >&2; exit 1; }
