"""The benchmark scripts run end to end on a tiny model on CPU and write the documented
keys, so they cannot rot between GPU runs. Speeds are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _common_keys(result):
    for key in ("benchmark", "device", "date", "versions", "config", "tokens_per_s", "mfu", "baseline_tokens_per_s",
                "peak_memory_bytes"):
        assert key in result, key
    assert result["device"] == "cpu" and "not performance claims" in result["note"]
    for name in ("torch", "megatron-core", "transformers"):
        assert result["versions"][name]


def test_sft_throughput_tiny(tmp_path):
    out = tmp_path / "sft.json"
    proc = _run("sft_throughput.py", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    _common_keys(result)
    for key in ("flops_formula", "flops_per_token", "tflops", "ours", "baseline", "ratio_vs_baseline", "shape"):
        assert key in result, key
    assert result["tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0
    assert result["mfu"] is None  # no peak is defined on CPU
    assert result["same_parameter_count"]  # the transformers model has our shape
    assert result["shape"]["parameters"] == result["ours"]["parameters_built"]  # memory_plan's count, the built model


def test_sft_packing_tiny(tmp_path):
    out = tmp_path / "packing.json"
    proc = _run("sft_throughput.py", "--preset", "tiny", "--packing", "--steps", "1", "--warmup", "0", "--micro-batch-size", "4", "--length-median", "24",
                "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "sft_packing" and "lognormal" in result["config"]["length_distribution"]
    padded, packed = result["padded"], result["packed"]
    # the same examples: the same useful tokens; packing leaves less padding in fewer micro-batches
    assert padded["useful_tokens_timed"] == packed["useful_tokens_timed"] > 0
    assert packed["padding_fraction"] < padded["padding_fraction"]
    assert sum(packed["micro_batches_per_step"]) <= sum(padded["micro_batches_per_step"])
    assert result["useful_tokens_per_s_ratio"] > 0 and result["useful_tokens_per_s_ratio_median_step"] > 0


def test_sft_sweep_tiny(tmp_path):
    out = tmp_path / "sweep.json"
    proc = _run("sft_throughput.py", "--sweep", "--sizes", "tiny", "--no-baseline", "--steps", "1", "--warmup", "0",
                "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # on CPU the sweep keeps fp32 without recomputation and says what it skipped
    assert [(r["config"]["precision"], r["config"]["recompute"]) for r in result["runs"]] == [("fp32", "none")]
    assert result["runs"][0]["tokens_per_s"] > 0 and len(result["skipped"]) == 2
    assert "| tiny | fp32 | none |" in proc.stdout


def test_ppo_step_tiny(tmp_path):
    out = tmp_path / "ppo.json"
    proc = _run("ppo_step.py", "--preset", "tiny", "--batch", "4", "--prompt-length", "8", "--max-new-tokens", "8",
                "--micro-batch-size", "2", "--warmup", "0", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    _common_keys(result)
    for side in ("ours", "baseline"):
        r = result[side]
        assert r["generated_tokens"] == 4 * 8  # eos never ends a response early: both sides do the same work
        for key in ("generate_s", "score_s", "train_s", "iteration_s", "generated_tokens_per_s", "decode_roofline"):
            assert key in r, (side, key)
        assert r["decode_roofline"]["bytes_per_decode_step"] > 0
    assert result["speedup_vs_baseline"] > 0 and result["trl_note"]
    assert result["ours"]["ptx_loss"] > 0  # the ptx batch was trained on


def test_gpu_only_options_are_refused_on_cpu_in_one_line():
    for script, option, message in (("sft_throughput.py", "--fp8", "--fp8 needs a CUDA GPU with Transformer Engine"),
                                     ("ppo_step.py", "--recompute=full", "--recompute full needs a CUDA GPU")):
        proc = _run(script, "--preset", "tiny", option, timeout=120)
        assert proc.returncode != 0
        assert message in proc.stderr.strip().splitlines()[-1]
