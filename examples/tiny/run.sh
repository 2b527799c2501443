#!/usr/bin/env bash
# The whole InstructGPT pipeline on the bundled tiny task, on a CPU, in a few minutes:
#   SFT -> reward model -> PPO-ptx -> report.      Usage: examples/tiny/run.sh [OUT_DIR]
# Each stage writes OUT_DIR/<stage>/{config.yaml,metrics.jsonl,checkpoints/}; rerunning the
# script resumes or skips finished stages. Extra key=value arguments go to every stage,
# e.g. `examples/tiny/run.sh runs/x train.seed=7`.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/tiny}
shift || true
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
run() { echo "== megatron-rlhf $*" >&2; "$PY" -m megatron_rlhf "$@"; }

run sft --config examples/tiny/sft.yaml output_dir="$OUT/sft" "$@"
run rm --config examples/tiny/rm.yaml output_dir="$OUT/rm" model.init_from="$OUT/sft/checkpoints/best" "$@"
run ppo --config examples/tiny/ppo.yaml output_dir="$OUT/ppo" model.init_from="$OUT/sft/checkpoints/best" \
    ppo.reward_model="$OUT/rm" "$@"
run report "$OUT"
echo "done: $OUT (report: $OUT/report/summary.md)" >&2
