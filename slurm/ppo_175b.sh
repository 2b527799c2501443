#!/bin/bash
# InstructGPT stage 3, PPO-ptx, 175B (examples/instructgpt/ppo_175b.yaml).
# Layout: 16 nodes x 8 H100 = 128 GPUs: TP=8 in a node, PP=8 across nodes, DP=2;
# FP8 (hybrid), distributed optimizer, full activation recomputation; actor + reference 175B,
# critic + reward model 6B, co-located; no sequence parallelism (PPO refuses it). Memory plan:
# 59.9 GiB a GPU at peak (rollout).
# Rollouts are generated through the 8 pipeline stages (models/generation.py); see the
# README, "Running on a cluster".
#   sbatch slurm/ppo_175b.sh [key=value ...]     from the repository root (mkdir -p logs first)
#   bash slurm/ppo_175b.sh [key=value ...]       the same, creating logs/
#   DRY_RUN=1 bash slurm/ppo_175b.sh             print the layout and srun command and the memory plan; start nothing
# Partition/account: export SBATCH_PARTITION=... SBATCH_ACCOUNT=... (or pass -p/-A to sbatch).
#SBATCH --job-name=ppo_175b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8       # one task per GPU
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@1200      # 20 min warning: finish the step, checkpoint, requeue
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued run appends to the same log
#SBATCH --output=logs/%x-%j.out

STAGE=ppo
CONFIG=examples/instructgpt/ppo_175b.yaml
OVERRIDES=()                     # e.g. (train.lr=5e-6); sbatch's extra arguments come after
PLAN_ARGS=(--critic-preset 6b --rm-preset 6b)   # the critic and RM come from rm_6b
source "${MEGATRON_RLHF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/launch.sh" ||
  { echo "slurm/launch.sh not found: submit from the repository root (or set MEGATRON_RLHF_ROOT)" >&2; exit 1; }
