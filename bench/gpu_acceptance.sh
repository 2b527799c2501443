#!/usr/bin/env bash
# The acceptance figures of issue 7 on one H100 or H200, then the README rows.
#
#   bench/gpu_acceptance.sh            # PYTHON=python by default; results in bench/results/
#   PYTHON=.venv/bin/python bench/gpu_acceptance.sh
#
# Needs: a CUDA GPU, torch with CUDA, megatron-core 0.16.1, transformers, Transformer Engine
# (for the FP8 rows; without it they fail with a one-line error and the rest still run).
# About 10 minutes on an H100 (1.3B Llama: four SFT runs of 13 steps, one PPO iteration at
# batch 64 x 512 new tokens plus its transformers baseline).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
status=0

"$PY" - <<'EOF' || exit 1
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device: these are the GPU acceptance runs (the CPU smoke runs are in tests/test_bench.py)")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| Transformer Engine:",
      "yes" if importlib.util.find_spec("transformer_engine") else "NO (fp8 rows will fail)")
EOF

sft() {  # name, then extra arguments
  local name=$1; shift
  "$PY" bench/sft_throughput.py --preset 1.3b --flavour llama --seq-length 2048 --micro-batch-size 4 \
      --steps 10 --warmup 3 --output "$OUT/$name.json" "$@" || status=1
}
sft sft_1.3b_llama_bf16                                         # MFU target >= 50%, ours/transformers ratio
sft sft_1.3b_llama_fp8 --fp8 --no-baseline                      # FP8 tokens/s >= 1.35x BF16
sft sft_1.3b_llama_bf16_recompute --recompute full --no-baseline
sft sft_1.3b_llama_fp8_recompute --fp8 --recompute full --no-baseline

"$PY" bench/ppo_step.py --preset 1.3b --flavour llama --batch 64 --prompt-length 128 --max-new-tokens 512 \
    --micro-batch-size 8 --output "$OUT/ppo_1.3b_llama_bf16_b64_n512.json" || status=1  # >= 3x, decode >= 50% of roofline

"$PY" bench/summarize.py "$OUT"/sft_1.3b_llama_*.json "$OUT"/ppo_1.3b_llama_bf16_b64_n512.json
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {}
bf16, fp8, ppo = load("sft_1.3b_llama_bf16"), load("sft_1.3b_llama_fp8"), load("ppo_1.3b_llama_bf16_b64_n512")
def show(what, value, target, fmt):
    verdict = "n/a" if value is None else ("met" if value >= target else "MISSED")
    print(f"{what}: {'-' if value is None else format(value, fmt)} (target >= {format(target, fmt)}): {verdict}")
show("SFT BF16 MFU", bf16.get("mfu"), 0.50, ".1%")
t_b, t_f = bf16.get("tokens_per_s"), fp8.get("tokens_per_s")
show("SFT FP8 / BF16 tokens/s", t_f / t_b if t_b and t_f else None, 1.35, ".2f")
print(f"SFT ours / transformers tokens/s: {bf16.get('ratio_vs_baseline')}")
show("PPO speed-up vs transformers", ppo.get("speedup_vs_baseline"), 3.0, ".2f")
show("PPO decode fraction of HBM roofline (batch 64)", ppo.get("decode_roofline_fraction"), 0.50, ".1%")
EOF
exit $status
