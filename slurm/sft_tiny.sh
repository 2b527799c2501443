#!/bin/bash
# InstructGPT stage 1, supervised fine-tuning, on the bundled tiny task: 2 CPU processes (gloo), TP=2,
# no GPU. Writes runs/slurm/tiny/sft.
#   sbatch slurm/sft_tiny.sh [key=value ...]     from the repository root (mkdir -p logs first)
#   bash slurm/sft_tiny.sh [key=value ...]       the same, creating logs/
#   DRY_RUN=1 bash slurm/sft_tiny.sh             print the layout and srun command; start nothing
#SBATCH --job-name=sft_tiny
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60        # warning before the time limit: checkpoint, requeue
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued run appends to the same log
#SBATCH --output=logs/%x-%j.out

STAGE=sft
CONFIG=examples/tiny/sft.yaml
DEVICE=cpu
OVERRIDES=(
  output_dir=runs/slurm/tiny/sft
  parallel.tensor_model_parallel_size=2
  parallel.backend=gloo
)
source "${MEGATRON_RLHF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root (or set MEGATRON_RLHF_ROOT)" >&2; exit 1; }
