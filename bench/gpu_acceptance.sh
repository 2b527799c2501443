#!/usr/bin/env bash
# The GPU acceptance run (issues 7 and 18) on one H100/H200, in one command, within a time budget:
#   1. prepare   tools/prepare_gpu.sh: install a wheel folder (megatron-core...), report the machine
#   2. tests     pytest -m gpu (tests/gpu/: TE vs local spec, FP8, BF16 optimizer + clipping,
#                distributed optimizer save/resume, CUDA greedy = CPU, sequence parallelism, tiny pipeline,
#                the dynamic rollout engine)
#   3. sft       SFT throughput, 1.3B Llama, seq 2048, BF16, with the transformers baseline
#   4. ppo       one PPO-ptx iteration, 1.3B Llama, 64 prompts x 512 new tokens (generate / score / train),
#                with the transformers loop
#   5. fp8       the same SFT in FP8 (only where Transformer Engine imports)
#   6. memory    SFT 350M BF16: a second measured peak for the memory planner
#   7. rollout   our rollout engine vs Megatron-Core's dynamic engine (ppo.rollout_engine=dynamic), BF16,
#                tokens/s (bench/rollout.py --parts dynamic; only where flash-attn imports)
#   8. summary   bench/summarize.py: README rows, measured peaks vs tools/plan_memory.py, met/missed per target
#
#   bench/gpu_acceptance.sh [--out DIR] [--budget SECONDS] [--wheels DIR] [--no-tests] [--no-bench]
#   bench/gpu_acceptance.sh --dry-run [--out DIR]     # on a CPU: the plumbing with tiny shapes, in ~3 minutes
#
# --out      where everything goes (default: $OUT if set, else runs/gpu_acceptance), at most 8 files:
#            acceptance.log (all output), pytest.log, summary.md, and the result JSON files named as
#            bench/results/ names them (sft_1.3b_llama_bf16_rc-none_nvidia_h200.json, ...,
#            rollout_4x256_llama_v32000_nvidia_h200.json; its rows also go into summary.md). Copy the
#            JSON files into bench/results/, then: python bench/summarize.py --readme README.md bench/results/*.json
# --budget   seconds for the whole run (default 540): each step gets what is left, capped, and a
#            step that cannot get its minimum is skipped and says so; the summary always runs.
#            Steps run in the order above, so a short budget keeps the tests and the BF16 SFT row.
# --wheels   a folder of wheels for tools/prepare_gpu.sh (default .whl; see tools/prepare_gpu.sh --help)
# --dry-run  tiny shapes, fp32, CPU allowed: checks the steps, the time limits and the files, measures nothing
# PYTHON     the interpreter (default python3); PYTEST_ARGS extra pytest arguments (e.g. "-k generation")
#
# Every step runs in its own process group and is killed with its children at its limit, so a
# hung NCCL call or an out-of-memory child cannot eat the rest of the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUT:-runs/gpu_acceptance}
BUDGET=540
WHEELS=.whl
SITE=/tmp/megatron-rlhf-site
DRY=0 TESTS=1 BENCH=1
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUTDIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --dry-run) DRY=1 ;;
    --no-tests) TESTS=0 ;;
    --no-bench) BENCH=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/acceptance.log
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
START=$(date +%s)
RESERVE=25  # seconds kept for the summary
declare -a STEPS=()

say() { echo "[acceptance $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_limited SECONDS CMD...: CMD in its own process group, output to the log and stdout; the
# whole group gets SIGTERM at the limit and SIGKILL 10 s later. Returns CMD's status (124: limit).
run_limited() {
  local limit=$1; shift
  setsid bash -o pipefail -c '"$@" 2>&1 | tee -a "$0"' "$LOG" "$@" &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$limit" ]; then
      say "time limit ${limit} s reached: stopping process group $pid"
      kill -TERM -- "-$pid" 2>/dev/null; sleep 10; kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 124
    fi
    sleep 1; waited=$((waited + 1))
  done
  wait "$pid"
}

# step NAME CAP MIN CMD...: run CMD with min(CAP, budget left - RESERVE) seconds, or skip it.
step() {
  local name=$1 cap=$2 min=$3; shift 3
  local avail=$(( $(left) - RESERVE ))
  local limit=$(( avail < cap ? avail : cap ))
  if [ "$limit" -lt "$min" ]; then
    say "SKIPPED $name: ${avail} s left of the budget, it needs at least ${min} s"
    STEPS+=("| $name | skipped (budget: ${avail} s left, needs ${min} s) | - |")
    return 0
  fi
  say "START $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s)
  run_limited "$limit" "$@"
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) say "DONE $name in ${took} s"; STEPS+=("| $name | ok | ${took} s |") ;;
    124) say "TIMED OUT $name after ${took} s"; STEPS+=("| $name | timed out (limit ${limit} s) | ${took} s |") ;;
    *) say "FAILED $name (exit $rc) after ${took} s"; STEPS+=("| $name | failed (exit $rc) | ${took} s |") ;;
  esac
  return 0
}

skip() { say "SKIPPED $1: $2"; STEPS+=("| $1 | skipped ($2) | - |"); }

# ----------------------------------------------------------------------------- 1. prepare
say "out: $OUTDIR; budget ${BUDGET} s; dry run: $([ $DRY = 1 ] && echo yes || echo no)"
prepare=(tools/prepare_gpu.sh --wheels "$WHEELS" --target "$SITE")
[ "$DRY" = 1 ] && prepare+=(--allow-cpu)
step prepare 120 5 env PYTHON="$PY" "${prepare[@]}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
read -r DEVICE_TAG HAVE_CUDA HAVE_TE HAVE_MCORE < <(timeout 120 "$PY" - <<'EOF' 2>/dev/null || echo "unknown 0 0 0"
import importlib.util, torch
cuda = torch.cuda.is_available()
tag = torch.cuda.get_device_name(0).replace(" ", "_").lower() if cuda else "cpu"
te = 0
if cuda and importlib.util.find_spec("transformer_engine") is not None:
    try:
        import transformer_engine.pytorch  # noqa: F401
        te = int(torch.cuda.get_device_capability(0) >= (8, 9))
    except Exception:
        te = 0
try:
    import megatron.core  # noqa: F401
    mcore = 1
except Exception:
    mcore = 0
print(tag, int(cuda), te, mcore)
EOF
)
if [ "$HAVE_MCORE" != 1 ]; then
  say "torch or megatron-core does not import (see the prepare step): the tests and benchmarks will fail"
fi
say "device: $DEVICE_TAG; CUDA: $HAVE_CUDA; Transformer Engine + FP8-capable GPU: $HAVE_TE"
if [ "$HAVE_CUDA" != 1 ] && [ "$DRY" != 1 ]; then
  say "no CUDA device: these are the GPU acceptance runs. On a CPU, --dry-run checks the plumbing."
  exit 1
fi

# ----------------------------------------------------------------------------- shapes
if [ "$DRY" = 1 ]; then
  PRESET=tiny MEM_PRESET=tiny MEM_FLAVOUR=gpt2 PREC=fp32 SEQ=64 MBS=2 STEPS_N=1 WARMUP=0
  PPO_ARGS=(--batch 4 --prompt-length 8 --max-new-tokens 8 --micro-batch-size 2 --warmup 0) PPO_B=4 PPO_N=8
  TEST_CAP=240
else
  PRESET=1.3b MEM_PRESET=350m MEM_FLAVOUR=llama PREC=bf16 SEQ=2048 MBS=4 STEPS_N=10 WARMUP=3
  PPO_ARGS=(--batch 64 --prompt-length 128 --max-new-tokens 512 --micro-batch-size 8 --warmup 1) PPO_B=64 PPO_N=512
  TEST_CAP=270
fi
SFT_JSON=$OUTDIR/sft_${PRESET}_llama_${PREC}_rc-none_${DEVICE_TAG}.json
FP8_JSON=$OUTDIR/sft_${PRESET}_llama_fp8_rc-none_${DEVICE_TAG}.json
MEM_JSON=$OUTDIR/sft_${MEM_PRESET}_${MEM_FLAVOUR}_${PREC}_rc-none_${DEVICE_TAG}.json
ROLLOUT_JSON=$OUTDIR/rollout_4x256_llama_v32000_${DEVICE_TAG}.json
PPO_JSON=$OUTDIR/ppo_${PRESET}_llama_${PREC}_b${PPO_B}_n${PPO_N}_${DEVICE_TAG}.json
SFT=("$PY" bench/sft_throughput.py --seq-length "$SEQ" --micro-batch-size "$MBS" --steps "$STEPS_N" --warmup "$WARMUP"
     --precision "$PREC" --timeout 600)

# ----------------------------------------------------------------------------- 2. tests
if [ "$TESTS" = 1 ]; then
  # one hung test (an NCCL wait) must not take the others with it: pytest-timeout where installed
  per_test=""
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=180"
  # shellcheck disable=SC2086
  step "pytest -m gpu" "$TEST_CAP" 60 bash -o pipefail -c \
      '"$0" -m pytest -m gpu -v -rA -p no:cacheprovider '"$per_test ${PYTEST_ARGS:-}"' 2>&1 | tee "$1"' "$PY" "$OUTDIR/pytest.log"
else
  skip "pytest -m gpu" "--no-tests"
fi

# ----------------------------------------------------------------------------- 3-6. benchmarks
if [ "$BENCH" = 1 ]; then
  step "sft ${PRESET} ${PREC} + transformers" 180 60 "${SFT[@]}" --preset "$PRESET" --flavour llama --output "$SFT_JSON"
  step "ppo ${PRESET} ${PREC} b${PPO_B} n${PPO_N} + transformers" 210 90 \
      "$PY" bench/ppo_step.py --preset "$PRESET" --flavour llama --precision "$PREC" --timeout 600 "${PPO_ARGS[@]}" --output "$PPO_JSON"
  if [ "$HAVE_TE" = 1 ]; then
    step "sft ${PRESET} fp8" 90 45 "${SFT[@]}" --preset "$PRESET" --flavour llama --fp8 --no-baseline --output "$FP8_JSON"
  else
    skip "sft ${PRESET} fp8" "Transformer Engine not importable or the GPU has no FP8"
  fi
  step "sft ${MEM_PRESET} ${PREC} (memory)" 75 30 "${SFT[@]}" --preset "$MEM_PRESET" --flavour "$MEM_FLAVOUR" --no-baseline --output "$MEM_JSON"
  if [ "$DRY" = 1 ]; then
    skip "rollout builtin vs dynamic" "dry run (the dynamic engine needs CUDA and flash-attn)"
  elif timeout 120 "$PY" -c "from megatron_rlhf.rollout.dynamic import dynamic_engine_unavailable as u; import sys; sys.exit(1 if u() else 0)" 2>/dev/null; then
    step "rollout builtin vs dynamic" 120 45 "$PY" bench/rollout.py --parts dynamic --skip-before --repeats 3 --output "$ROLLOUT_JSON"
  else
    skip "rollout builtin vs dynamic" "flash-attn >= 2.7.3 / einops not importable"
  fi
else
  skip "benchmarks" "--no-bench"
fi

# ----------------------------------------------------------------------------- 8. summary
SUMMARY=$OUTDIR/summary.md
{
  echo "# GPU acceptance: $DEVICE_TAG, $(date -u +%Y-%m-%d)"
  echo
  [ "$DRY" = 1 ] && echo "DRY RUN (tiny shapes, fp32): these numbers measure nothing." && echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  if [ -f "$OUTDIR/pytest.log" ]; then
    echo "## pytest -m gpu"
    echo
    echo '```'
    grep -E '::.* (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)' "$OUTDIR/pytest.log" | sed 's/ *\[ *[0-9]*%\]$//'
    sed -n '/short test summary info/,$p' "$OUTDIR/pytest.log" | grep -E '^(SKIPPED|FAILED|ERROR|XFAIL|XPASS)'
    grep -E '^=+ .*(passed|failed|skipped|error|deselected).* =+$' "$OUTDIR/pytest.log" | tail -1
    echo '```'
    echo
  fi
} >"$SUMMARY"
if [ -f "$ROLLOUT_JSON" ]; then
  { echo "## Rollouts: builtin vs dynamic engine"; echo; "$PY" bench/rollout.py --rows --output "$ROLLOUT_JSON"; echo; } >>"$SUMMARY" 2>>"$LOG"
fi
shopt -s nullglob
results=("$OUTDIR"/sft_*.json "$OUTDIR"/ppo_*.json)
if [ ${#results[@]} -gt 0 ]; then
  "$PY" bench/summarize.py "${results[@]}" >>"$SUMMARY" 2>>"$LOG" || echo "summarize.py failed: see acceptance.log" >>"$SUMMARY"
else
  echo "no result files were written" >>"$SUMMARY"
fi
cat "$SUMMARY" | tee -a "$LOG"
say "files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
say "total $(( $(date +%s) - START )) s of the ${BUDGET} s budget"
grep -q "| failed\|| timed out" "$SUMMARY" && exit 1
exit 0
