#!/bin/bash
# InstructGPT stage 2, reward model, 6B (examples/instructgpt/rm_6b.yaml).
# Layout: 1 node x 8 H100: TP=4 PP=1 DP=2.
#   sbatch slurm/rm_6b.sh [key=value ...]     from the repository root (mkdir -p logs first)
#   bash slurm/rm_6b.sh [key=value ...]       the same, creating logs/
#   DRY_RUN=1 bash slurm/rm_6b.sh             print the layout and srun command and the memory plan; start nothing
# Partition/account: export SBATCH_PARTITION=... SBATCH_ACCOUNT=... (or pass -p/-A to sbatch).
#SBATCH --job-name=rm_6b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8       # one task per GPU
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600      # 10 min warning: finish the step, checkpoint, requeue
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued run appends to the same log
#SBATCH --output=logs/%x-%j.out

STAGE=rm
CONFIG=examples/instructgpt/rm_6b.yaml
OVERRIDES=()                     # e.g. (train.lr=5e-6); sbatch's extra arguments come after
source "${MEGATRON_RLHF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root (or set MEGATRON_RLHF_ROOT)" >&2; exit 1; }
