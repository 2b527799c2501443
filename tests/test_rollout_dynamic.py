"""``ppo.rollout_engine=dynamic`` on CPU: the config key and its refusals, and the pure helpers of
``rollout/dynamic.py`` (sampling-parameter mapping, KV-buffer sizing, the rollout seed). The
engine itself needs CUDA: tests/gpu/test_gpu_dynamic_rollout.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_rlhf.config import ConfigError, load_config
from megatron_rlhf.recipes.ppo import check_ppo_config
from megatron_rlhf.rollout.dynamic import (DynamicRollout, check_dynamic_config, dynamic_engine_unavailable, kv_buffer_plan, rollout_seed,
                                           sampling_arguments)

ROOT = Path(__file__).resolve().parents[1]
PPO_YAML = str(ROOT / "examples/instructgpt/ppo_6b.yaml")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path")


def _cfg(*overrides):
    return load_config(PPO_YAML, list(overrides), stage="ppo")


def test_rollout_engine_key_defaults_to_builtin_and_rejects_unknown_values():
    assert _cfg().ppo.rollout_engine == "builtin"
    check_ppo_config(_cfg())  # the default passes the PPO checks on any machine
    with pytest.raises(ConfigError, match=r"ppo\.rollout_engine='dynamc' is not one of 'builtin', 'dynamic' \(did you mean 'dynamic'\?\)"):
        _cfg("ppo.rollout_engine=dynamc")


@no_cuda
def test_dynamic_without_cuda_fails_in_the_config_check_with_the_key_and_the_fix():
    with pytest.raises(ConfigError) as info:
        check_ppo_config(_cfg("ppo.rollout_engine=dynamic", "model.precision=bf16"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("ppo.rollout_engine=dynamic needs a CUDA GPU")
    assert "torch.cuda.is_available() is False" in message and "set ppo.rollout_engine=builtin" in message
    assert dynamic_engine_unavailable() == "torch.cuda.is_available() is False"


@no_cuda
def test_building_the_engine_without_cuda_says_why_before_touching_the_model():
    with pytest.raises(RuntimeError, match=r"cannot run here: torch\.cuda\.is_available\(\) is False; use the builtin engine"):
        DynamicRollout(object(), max_requests=4)


@pytest.mark.parametrize("overrides, expected", [
    (["ppo.top_k=40", "ppo.top_p=0.9"], r"cannot sample with ppo\.top_k=40 and ppo\.top_p=0\.9 together .*set one of them off"),
    (["model.precision=fp32"], r"needs bf16 weights .*set model\.precision=bf16 \(or auto\), or ppo\.rollout_engine=builtin"),
    (["model.precision=bf16", "model.fp8=hybrid"], r"does not support model\.fp8=hybrid.*unset model\.fp8"),
])
def test_dynamic_refuses_what_it_cannot_honour_before_checking_the_machine(overrides, expected):
    cfg = _cfg("ppo.rollout_engine=dynamic", *overrides)
    with pytest.raises(ConfigError, match=r"^ppo\.rollout_engine=dynamic " + expected):
        check_dynamic_config(cfg)


@pytest.mark.parametrize("ours, megatron", [
    ((0.0, 0, 1.0), dict(temperature=1.0, top_k=1, top_p=0.0)),     # greedy: Megatron's top_k=1 is argmax
    ((0.0, 40, 0.9), dict(temperature=1.0, top_k=1, top_p=0.0)),    # greedy ignores truncation, as ours does
    ((1.0, 0, 1.0), dict(temperature=1.0, top_k=0, top_p=0.0)),     # plain sampling: top_p 1.0 (ours) = 0.0 (off) there
    ((0.7, 0, 1.0), dict(temperature=1.0, top_k=0, top_p=0.0)),     # the temperature is applied by our wrapper
    ((1.0, 50, 1.0), dict(temperature=1.0, top_k=50, top_p=0.0)),
    ((1.3, 0, 0.95), dict(temperature=1.0, top_k=0, top_p=0.95)),
])
def test_sampling_arguments_map_ours_to_megatrons(ours, megatron):
    assert sampling_arguments(*ours) == megatron


def test_sampling_arguments_refuse_what_megatron_refuses_or_we_do():
    with pytest.raises(ValueError, match="top_k=40 and top_p=0.9 together"):
        sampling_arguments(1.0, 40, 0.9)
    with pytest.raises(ValueError, match="top_p must be in"):
        sampling_arguments(1.0, 0, 0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampling_arguments(-1.0, 0, 1.0)


def test_kv_buffer_plan_by_hand_for_the_tiny_model():
    # examples/tiny: 2 layers, 4 heads of 32 (no GQA), seq_length 64; 64 episodes per rank; bf16
    plan = kv_buffer_plan(64, 64, layers=2, kv_heads_per_rank=4, head_dim=32, dtype_bytes=2)
    assert plan.block_size_tokens == 256
    assert plan.blocks == 64  # one 256-token block holds a whole 64-token sequence
    assert plan.block_bytes == 2 * 2 * 256 * 4 * 32 * 2 == 262144
    assert plan.buffer_bytes == 65 * 262144  # + Megatron's dummy block: 16.25 MiB
    assert plan.max_tokens == 4096  # 64 requests x 64 tokens, under the 16384 cap, a multiple of 64
    assert plan.max_requests == 64
    # DynamicInferenceContext: block_count = int(buffer_size_gb * 1024**3) // block_size_bytes
    assert int(plan.buffer_size_gb * 1024**3) // plan.block_bytes == plan.blocks + 1


def test_kv_buffer_plan_by_hand_for_a_large_model():
    # Llama-2-70B-like: 80 layers over PP=4 (20 here), 8 KV heads over TP=8 (1 here), head 128,
    # seq_length 4096, 512 requests, bf16
    plan = kv_buffer_plan(512, 4096, layers=20, kv_heads_per_rank=1, head_dim=128, dtype_bytes=2, tp=8)
    assert plan.blocks == 512 * 16
    assert plan.block_bytes == 2 * 20 * 256 * 1 * 128 * 2 == 2621440  # 2.5 MiB
    assert math.isclose(plan.buffer_bytes / 1024**3, (8192 + 1) * 2.5 / 1024)  # 20.0 GiB
    assert plan.max_tokens == 16384  # capped; 16384 is a multiple of the TP-rounded 64
    assert int(plan.buffer_size_gb * 1024**3) // plan.block_bytes == plan.blocks + 1
    # more requests than the cap: a decode step must still fit; the padding rounder is 66 at TP=3
    assert kv_buffer_plan(20000, 64, 1, 1, 64, 2).max_tokens == 20032
    assert kv_buffer_plan(100, 64, 1, 1, 64, 2, tp=3).max_tokens == 66 * math.ceil(6400 / 66)
    with pytest.raises(ValueError, match="max_requests must be >= 1"):
        kv_buffer_plan(0, 64, 1, 1, 64, 2)


def test_rollout_seed_depends_on_every_seed_and_their_order():
    seeds = [11, 22, 33]
    assert rollout_seed(seeds) == rollout_seed(list(seeds))
    assert rollout_seed(seeds) != rollout_seed([11, 22, 34])
    assert rollout_seed(seeds) != rollout_seed([22, 11, 33])
    assert 0 <= rollout_seed(seeds) < 2**63
