#!/bin/bash
# InstructGPT stage 2, reward model, on the bundled tiny task: 2 CPU processes (gloo), TP=2,
# no GPU. Writes runs/slurm/tiny/rm; needs the tiny SFT run first.
#   sbatch slurm/rm_tiny.sh [key=value ...]     from the repository root (mkdir -p logs first)
#   bash slurm/rm_tiny.sh [key=value ...]       the same, creating logs/
#   DRY_RUN=1 bash slurm/rm_tiny.sh             print the layout and srun command; start nothing
#SBATCH --job-name=rm_tiny
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60        # warning before the time limit: checkpoint, requeue
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued run appends to the same log
#SBATCH --output=logs/%x-%j.out

STAGE=rm
CONFIG=examples/tiny/rm.yaml
DEVICE=cpu
OVERRIDES=(
  output_dir=runs/slurm/tiny/rm
  parallel.tensor_model_parallel_size=2
  parallel.backend=gloo
  model.init_from=runs/slurm/tiny/sft/checkpoints/best
)
source "${MEGATRON_RLHF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root (or set MEGATRON_RLHF_ROOT)" >&2; exit 1; }
