"""``ppo.rollout_engine=dynamic`` on CPU: the config key and its refusals, the pure helpers of
``rollout/dynamic.py`` (sampling-parameter mapping, KV-buffer sizing, the rollout seed), and the
adapter itself on Megatron's real dynamic engine with its CUDA calls pointed at the CPU and a
reference paged attention (TP=1, TP=2, PP=2, and two PPO steps through the recipe). The
flash-attn kernels and BF16 need a GPU: tests/gpu/test_gpu_dynamic_rollout.py."""

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


# ----------------------------------------------------------------------------- the adapter on CPU
# Megatron's dynamic engine is CUDA-only, but its scheduling, its context and our adapter are
# plain torch. On CPU, with the CUDA spots pointed at the CPU (cpu_compat's proxy for the engine,
# controller, context and allocator modules; no pinned memory, no NVTX) and the paged flash
# attention replaced by the reference below, the whole adapter runs: requests in, steps,
# chunked prefill, eos, the padded-vocabulary cut, the temperature, Generation out. This checks
# our use of the engine, not flash-attn (tests/gpu does that).


def _reference_paged_attention(self, q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_table,
                               is_decode_only):
    """What ``Attention.flash_decode_and_prefill`` computes, in plain torch (fp32 scores).

    ``q`` ``[tokens, 1, heads, d]``; ``k``/``v`` ``[blocks, block_size, kv heads, d]``; request
    ``r`` owns queries ``cu_seqlens_q[r]:cu_seqlens_q[r+1]`` (one each when decoding), which are
    its last positions, and keys ``0 .. seqlens_k[r]-1`` in blocks ``block_table[r]``; causal.
    """
    import math as _math

    import torch as _torch

    tokens, heads, d = q.shape[0], q.shape[-2], q.shape[-1]
    q3 = q.reshape(tokens, heads, d)
    out = _torch.zeros_like(q3)
    lengths = seqlens_k.tolist()
    bounds = list(range(len(lengths) + 1)) if is_decode_only else cu_seqlens_q.tolist()
    block = k.shape[1]
    for r, kv_len in enumerate(lengths):
        start, end = bounds[r], bounds[r + 1]
        if kv_len <= 0 or end <= start:
            continue
        ids = block_table[r, : _math.ceil(kv_len / block)].long()
        keys = k[ids].reshape(-1, k.shape[-2], d)[:kv_len].float()
        values = v[ids].reshape(-1, v.shape[-2], d)[:kv_len].float()
        keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
        values = values.repeat_interleave(heads // values.shape[1], dim=1)
        query = q3[start:end].float()
        scores = _torch.einsum("qhd,khd->hqk", query, keys) / _math.sqrt(d)
        positions = _torch.arange(kv_len - (end - start), kv_len)
        scores = scores.masked_fill(_torch.arange(kv_len)[None, None, :] > positions[None, :, None], float("-inf"))
        out[start:end] = _torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out.unsqueeze(1)


def _dynamic_engine_on_cpu():
    """Point the dynamic engine's CUDA spots at the CPU and give it the reference attention (test-only, this process)."""
    from megatron_rlhf import cpu_compat
    from megatron_rlhf.rollout import dynamic

    import megatron.core.inference.communication_utils as communication_module
    import megatron.core.inference.contexts.dynamic_block_allocator as allocator_module
    import megatron.core.inference.contexts.dynamic_context as context_module
    import megatron.core.inference.engines.dynamic_engine as engine_module
    import megatron.core.inference.text_generation_controllers.text_generation_controller as controller_module
    from megatron.core.inference.contexts.attention_context import mha_metadata
    from megatron.core.transformer import attention

    class NoPinnedMemory(cpu_compat._TorchOnCpu):
        def __getattr__(self, name):
            attr = super().__getattr__(name)
            if callable(attr) and name in cpu_compat._FACTORIES:
                def factory(*args, _f=attr, **kwargs):
                    kwargs.pop("pin_memory", None)
                    return _f(*args, **kwargs)
                return factory
            return attr

    proxy = NoPinnedMemory()
    for module in (allocator_module, context_module, engine_module, controller_module, mha_metadata, communication_module):
        module.torch = proxy
    communication_module._is_cuda = lambda tensor: None  # PP: stage-to-stage transfers over gloo
    engine_module.range_push = engine_module.range_pop = lambda *args, **kwargs: None
    attention.HAVE_FA3 = True  # the version assert; the kernel itself is replaced:
    if attention.rearrange is None:  # einops (a flash-attn dependency) may be absent here
        attention.rearrange = lambda x, pattern: x.reshape(x.shape[0], x.shape[1], -1)
    attention.Attention.flash_decode_and_prefill = _reference_paged_attention
    dynamic.dynamic_engine_unavailable = lambda: None


def _engine_on_cpu(tp: int, full: bool = True, pp: int = 1):
    import collections

    import torch

    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.rollout import dynamic, rollout

    cfg = ModelConfig(flavour="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, seq_length=48,
                      precision="fp32", init_method_std=0.2)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(parallel, cfg)
    model = build_model(cfg, parallel, 200, seed=3)  # 200 real ids, padded to 256 rows

    _dynamic_engine_on_cpu()
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 5, 30, 9, 12, 1, 24]
    prompts = [[1] + torch.randint(3, 200, (n - 1,), generator=g).tolist() for n in lengths]
    # eos: the token our greedy responses repeat most, so that some responses end on it and others run out of budget
    probe = rollout(model, prompts, 12, temperature=0.0, pad_id=0, vocab_size=200)
    eos = collections.Counter(t for r in probe.responses for t in r[1:]).most_common(1)[0][0]
    common = dict(eos_id=eos, pad_id=0, vocab_size=200)
    # max_requests 4 < 8 prompts: queued requests enter as others finish (continuous batching);
    # max_tokens is then 192, so the 30-token prompt's prefill shares steps with decodes
    sampler = dynamic.DynamicRollout(model, max_requests=4, seed=0)
    out = {"eos": eos, "plan": (sampler.plan.blocks, sampler.context.block_allocator.total_count, sampler.plan.max_tokens)}
    out["ours"] = rollout(model, prompts, 12, temperature=0.0, **common)
    out["dyn"] = sampler(model, prompts, 12, temperature=0.0, **common)
    out["dyn_again"] = sampler(model, prompts, 12, temperature=0.0, **common)
    if not full:
        return out
    # sampling at temperature 0.7: reproducible for the same seeds; log-probs of the tempered distribution
    seeds = list(range(50, 58))
    out["sampled"] = sampler(model, prompts, 12, temperature=0.7, seeds=seeds, **common)
    out["sampled_again"] = sampler(model, prompts, 12, temperature=0.7, seeds=seeds, **common)
    out["sampled_other"] = sampler(model, prompts, 12, temperature=0.7, seeds=[s + 1 for s in seeds], **common)
    rescored = []
    with torch.no_grad():
        for seq, p in zip(out["sampled"].sequences, out["sampled"].prompt_lengths):
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, p - 1 : len(seq) - 1, :200].float()
            logprobs = torch.log_softmax(logits / 0.7, dim=-1)
            rescored.append(logprobs.gather(-1, torch.tensor(seq[p:])[:, None])[:, 0].tolist())
    out["rescored"] = rescored
    # a budget cut by the context: 45 + 12 > 48 leaves 3 tokens
    out["near_context"] = sampler(model, [[1] * 45], 12, temperature=0.0, **common)
    # training right after a rollout, at the width the engine's RoPE used (seq_length), where
    # RoPE's lru_cache would return what the rollout cached under inference_mode
    tokens = torch.randint(0, 200, (2, 48), generator=g)
    model(tokens, torch.arange(48).expand(2, -1), None).float().square().mean().backward()
    out["backward_after_rollout"] = all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    # the module's weights, changed in place after the engine was built: all logits 0 -> argmax is id 0
    out["training_mode_kept"] = model.training
    with torch.no_grad():
        model.decoder.final_layernorm.weight.zero_()
    out["zeroed"] = sampler(model, prompts[:2], 3, temperature=0.0, **common).responses
    # an engine that never schedules its requests: an error, not a hang
    sampler.engine.schedule_waiting_requests = lambda: None
    try:
        sampler(model, prompts[:2], 3, temperature=0.0, **common)
        out["stuck"] = "returned"
    except RuntimeError as exc:
        out["stuck"] = str(exc)
    return out


@pytest.fixture(scope="module")
def cpu_engine():
    from dist_utils import run_single

    return run_single(_engine_on_cpu, 1)


@pytest.fixture(scope="module")
def cpu_engine_tp2():
    from dist_utils import run_distributed

    return run_distributed(_engine_on_cpu, 2, 2, False)


@pytest.fixture(scope="module")
def cpu_engine_pp2():
    from dist_utils import run_distributed

    return run_distributed(_engine_on_cpu, 2, 1, False, 2)


def test_the_context_is_sized_as_planned(cpu_engine):
    blocks, total, max_tokens = cpu_engine["plan"]
    assert blocks == 4 and total == 5  # 4 requests x 1 block of 256 tokens, + Megatron's dummy block
    assert max_tokens == 192  # 4 x 48 tokens, rounded up to 64


def test_greedy_adapter_gives_our_tokens_on_cpu(cpu_engine):
    ours, dyn = cpu_engine["ours"], cpu_engine["dyn"]
    assert any(ours.finished) and not all(ours.finished)  # eos and the budget both end responses here
    assert dyn == ours  # sequences, lengths, finished (log-probs are not compared by ==)
    for a, b in zip(ours.logprobs, dyn.logprobs):
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert cpu_engine["dyn_again"] == dyn


def test_greedy_adapter_gives_our_tokens_at_tp2(cpu_engine_tp2):
    """Each TP rank holds 1 of the 2 KV heads in its context; the logits are gathered over TP
    and every rank samples the same tokens."""
    first, second = cpu_engine_tp2
    assert first["plan"] == (4, 5, 192)
    assert first["dyn"] == first["ours"] and second["dyn"] == second["ours"] == first["ours"]
    assert first["dyn_again"] == first["dyn"]


def test_greedy_adapter_gives_our_tokens_at_pp2(cpu_engine_pp2):
    """One layer per stage: each stage's context holds its own layer's KV cache; hidden states go
    stage to stage and the last stage's (cut) logits are broadcast back, so both stages sample
    the same tokens."""
    first, second = cpu_engine_pp2
    assert first["dyn"] == first["ours"] and second["dyn"] == second["ours"] == first["ours"]
    assert first["dyn_again"] == first["dyn"]


def test_sampling_adapter_is_seeded_and_scores_the_tempered_distribution(cpu_engine):
    sampled, eos = cpu_engine["sampled"], cpu_engine["eos"]
    assert sampled == cpu_engine["sampled_again"] and sampled != cpu_engine["sampled_other"]
    assert all(0 <= t < 200 for r in sampled.responses for t in r)  # never a padded id (200..255)
    for r, f in zip(sampled.responses, sampled.finished):
        assert 1 <= len(r) <= 12 and f == (r[-1] == eos) and eos not in r[:-1]
    for got, want in zip(sampled.logprobs, cpu_engine["rescored"]):
        assert len(got) == len(want) and max(abs(x - y) for x, y in zip(got, want)) < 1e-4


def test_adapter_respects_the_context_and_the_modules_current_weights(cpu_engine):
    near = cpu_engine["near_context"]
    assert near.response_lengths[0] <= 3 and len(near.sequences[0]) <= 48
    assert cpu_engine["training_mode_kept"]  # put back in train mode after each rollout
    assert cpu_engine["backward_after_rollout"]
    assert cpu_engine["zeroed"] == [[0, 0, 0], [0, 0, 0]]
    assert cpu_engine["stuck"].startswith("dynamic engine: 2 requests still unfinished after 28 steps (no progress); 2 waiting")


def _ppo_with_the_dynamic_engine(root: str):
    """Two PPO iterations (Llama: RoPE) with ppo.rollout_engine=dynamic, through the recipe."""
    import torch

    from megatron_rlhf import checkpoint as ckpt_lib
    from megatron_rlhf.config import Config, ModelConfig, ParallelConfig
    from megatron_rlhf.data import Tokenizer
    from megatron_rlhf.models.builder import build_model, unwrap
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes import ppo as ppo_recipe
    from megatron_rlhf.rollout.dynamic import DynamicRollout
    from megatron_rlhf.training.loop import setup

    arch = dict(flavour="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=40)
    tokenizer = Tokenizer.load(ROOT / "examples/tiny/tokenizer.model")
    sft = Config(stage="sft", model=ModelConfig(tokenizer=str(ROOT / "examples/tiny/tokenizer.model"), precision="fp32", **arch))
    init_distributed(sft.parallel, sft.model)
    policy = build_model(sft.model, ParallelConfig(), tokenizer.vocab_size, seed=1)
    ckpt_lib.save_checkpoint(Path(root) / "sft" / "checkpoints", 1, {"model": policy}, ckpt_lib.checkpoint_meta(sft, tokenizer, "policy"),
                             tokenizer_bytes=tokenizer.serialized_model())
    _dynamic_engine_on_cpu()
    ppo_recipe.check_dynamic_config = lambda cfg: None  # it refuses fp32 and CPU: the two things this test fakes
    overrides = [f"model.{k}={v}" for k, v in arch.items()] + [
        "model.precision=fp32", f"model.init_from={Path(root) / 'sft'}", f"output_dir={Path(root) / 'ppo'}", "ppo.rollout_engine=dynamic",
        "ppo.reward_model=", "ppo.reward_fn=examples/tiny/reward_fn.py:reward", "ppo.pretrain_path=", "ppo.ptx_coef=0",
        "ppo.critic_warmup_steps=0", "train.global_batch_size=16", "train.micro_batch_size=8", "ppo.mini_batch_size=8",
        "ppo.max_new_tokens=8", "train.max_steps=2", *["train.progress_bar=false", "train.tensorboard=false"]]
    cfg = load_config(str(ROOT / "examples/tiny/ppo.yaml"), overrides, stage="ppo")
    trainer = ppo_recipe.PPORecipe(setup(cfg))
    engine = trainer.generate
    start = {k: v.detach().clone() for k, v in unwrap(trainer.actor).named_parameters()}
    rows = []
    for step in range(2):
        episodes, metrics = trainer.rollout(step)
        update = trainer.update(episodes, step)  # a backward after an inference_mode rollout (RoPE's cache)
        rows.append({**metrics, **{k: v for k, v in update.items() if isinstance(v, float)}})
    moved = max((v - dict(unwrap(trainer.actor).named_parameters())[k]).abs().max().item() for k, v in start.items())
    return dict(is_dynamic=isinstance(engine, DynamicRollout), same_engine=trainer.generate is engine,
                engine_model_is_actor=engine.model is unwrap(trainer.actor), rows=rows, moved=moved)


def test_ppo_recipe_runs_two_steps_with_the_dynamic_engine_on_cpu(tmp_path):
    from dist_utils import run_single

    r = run_single(_ppo_with_the_dynamic_engine, str(tmp_path))
    assert r["is_dynamic"] and r["same_engine"] and r["engine_model_is_actor"]
    assert len(r["rows"]) == 2 and all(math.isfinite(v) for row in r["rows"] for v in row.values() if isinstance(v, float))
    assert all(row["rollout/response_length"] > 0 for row in r["rows"])
    assert r["moved"] > 0  # the actor trained between the two rollouts
