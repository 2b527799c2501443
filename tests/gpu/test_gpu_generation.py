"""CUDA greedy generation gives the CPU's tokens on a tiny model.

A tiny SFT policy trains 100 steps in FP32 on the GPU (model.precision=fp32), then
``megatron-rlhf generate`` decodes 16 prompts greedily (temperature 0, 24 new tokens, static
KV cache) once on the GPU and once in a process that sees no GPU (CUDA_VISIBLE_DEVICES="",
the CPU path with cpu_compat). Every response must be the same token list. FP32 on both
sides: PyTorch keeps TF32 off for matmuls by default, so the two differ by summation order
only (about 1e-6 relative), far below the gap between the top two logits of a trained model;
BF16 could legitimately flip near-ties, and BF16 does not run on CPU here.
"""

from __future__ import annotations

import json

import pytest

from gpu_utils import QUIET, ROOT, SFT_YAML, cli, ok

pytestmark = pytest.mark.gpu


def test_cuda_greedy_generation_equals_cpu(tmp_path):
    run = tmp_path / "sft"
    proc = cli("sft", "--config", SFT_YAML, *QUIET, "model.precision=fp32", "train.max_steps=100", "train.eval_interval=0",
               "data.valid_path=", f"output_dir={run}")
    assert proc.returncode == 0, ok(proc)
    prompts = tmp_path / "prompts.jsonl"
    lines = (ROOT / "examples/tiny/data/ppo_prompts.jsonl").read_text().splitlines()[:16]
    prompts.write_text("\n".join(lines) + "\n")
    outputs = {}
    for device in ("gpu", "cpu"):
        out = tmp_path / f"{device}.jsonl"
        proc = cli("generate", "--checkpoint", run, "--prompts", prompts, "--max-new-tokens", 24, "--temperature", 0,
                   "--output", out, "--no-progress", cpu=device == "cpu")
        assert proc.returncode == 0, ok(proc)
        outputs[device] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outputs["gpu"]) == len(outputs["cpu"]) == 16
    assert any(len(r["tokens"]) > 1 for r in outputs["gpu"]), "nothing was generated"
    mismatched = [(g["prompt"], g["tokens"], c["tokens"]) for g, c in zip(outputs["gpu"], outputs["cpu"]) if g["tokens"] != c["tokens"]]
    assert not mismatched, f"{len(mismatched)} of 16 greedy responses differ (prompt, gpu, cpu): {mismatched[:3]}"
