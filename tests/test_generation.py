"""KV-cache generation: token-identical to full recomputation, EOS/length handling, sampling
controls, padded-vocabulary masking, rollout tensors, and TP=2 / PP=2 (2 gloo processes) == TP=1."""

import pytest
import torch

from megatron_rlhf.config import ModelConfig, ParallelConfig
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.rollout import (
    Generation,
    full_recompute_generate,
    generate,
    padded_batch,
    sample_tokens,
)
from megatron_rlhf.parallel import init_distributed

from dist_utils import run_distributed

VOCAB = 100  # the tokenizer's; the embedding is padded to 128
SEQ_LENGTH = 32
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 20, 21, 22, 23, 24, 25], [1, 40, 41]]


def tiny_config(flavour: str) -> ModelConfig:
    # A larger init std than training's 0.02 makes the random model's next-token
    # distributions peaked, so greedy choices are far from ties.
    return ModelConfig(
        flavour=flavour,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2 if flavour == "llama" else None,  # GQA
        seq_length=SEQ_LENGTH,
        make_vocab_size_divisible_by=128,
        transformer_impl="local",
        precision="fp32",
        init_method_std=0.2,
    )


def tiny_model(flavour: str, seed: int = 7, tp: int = 1):
    return build_model(tiny_config(flavour), ParallelConfig(tensor_model_parallel_size=tp), VOCAB, seed=seed)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    init_distributed(ParallelConfig(), tiny_config(request.param))
    return tiny_model(request.param)


def _cut_at_eos(seq, prompt_len, eos):
    response = seq[prompt_len:]
    return seq[: prompt_len + response.index(eos) + 1] if eos in response else seq


def test_kv_cache_greedy_equals_full_recompute(model):
    model.train()
    kv = generate(model, PROMPTS, 8, temperature=0)
    ref = full_recompute_generate(model, PROMPTS, 8, temperature=0)
    assert model.training  # mode restored
    assert kv.sequences == ref.sequences
    assert kv.prompt_lengths == [len(p) for p in PROMPTS]
    assert kv.response_lengths == [8] * len(PROMPTS) and kv.finished == [False] * len(PROMPTS)
    assert [s[: len(p)] for s, p in zip(kv.sequences, PROMPTS)] == PROMPTS
    # the model's outputs must actually depend on the prompt (a non-trivial check)
    assert len({tuple(r) for r in kv.responses}) > 1


def test_eos_stops_rows(model):
    plain = generate(model, PROMPTS, 8, temperature=0)
    eos = plain.responses[0][2]  # a token row 0 emits third: it must stop right there
    kv = generate(model, PROMPTS, 8, temperature=0, eos_id=eos, pad_id=0)
    ref = full_recompute_generate(model, PROMPTS, 8, temperature=0, eos_id=eos, pad_id=0)
    assert kv == ref
    expected = [_cut_at_eos(s, len(p), eos) for s, p in zip(plain.sequences, PROMPTS)]
    assert kv.sequences == expected
    assert kv.response_lengths == [len(s) - len(p) for s, p in zip(expected, PROMPTS)]
    assert kv.finished == [eos in s[len(p):] for s, p in zip(expected, PROMPTS)]
    assert kv.response_lengths[0] <= 3 and kv.finished[0]
    # eos appears at most once per response, and only at its end
    for r in kv.responses:
        assert eos not in r[:-1]


def test_response_cut_at_context_length(model):
    long_prompt = list(range(1, SEQ_LENGTH - 2))  # room for 3 tokens
    kv = generate(model, [long_prompt, [1, 2]], 6, temperature=0)
    assert kv.response_lengths == [3, 6] and kv.finished == [False, False]
    assert kv == full_recompute_generate(model, [long_prompt, [1, 2]], 6, temperature=0)
    with pytest.raises(ValueError, match="no room to generate"):
        generate(model, [list(range(SEQ_LENGTH))], 1)


def test_sampling_reproducible_and_matches_recompute(model):
    def run(fn, seed):
        return fn(model, PROMPTS, 8, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    a, b = run(generate, 0), run(generate, 0)
    assert a == b
    assert run(generate, 1) != a  # another seed gives other samples
    # same loop, same draws: the KV cache does not change what is sampled
    assert run(full_recompute_generate, 0) == a


def test_top_k_1_equals_greedy(model):
    greedy = generate(model, PROMPTS, 6, temperature=0)
    top1 = generate(model, PROMPTS, 6, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(3))
    assert top1 == greedy


def test_padded_vocab_never_sampled(model):
    # Make the (untrained) padding rows the most likely ids by far: masked, they still never appear.
    def boost(module, args, output):
        logits, bias = output
        logits = logits.clone()
        logits[..., VOCAB:] += 30.0
        return logits, bias

    handle = model.output_layer.register_forward_hook(boost)
    try:
        gen = generate(model, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(0))
        assert all(0 <= tok < VOCAB for r in gen.responses for tok in r)
        greedy = generate(model, PROMPTS, 4, temperature=0)
        assert all(0 <= tok < VOCAB for r in greedy.responses for tok in r)
        # sanity: the hook works -- without the mask the padding ids win
        unmasked = generate(model, PROMPTS, 4, temperature=0, vocab_size=128)
        assert all(tok >= VOCAB for r in unmasked.responses for tok in r)
    finally:
        handle.remove()


def test_refuses_scalar_head_and_bad_sampling_settings(model):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, 2, temperature=-1.0)
    rm = build_model(tiny_config("gpt2"), ParallelConfig(), VOCAB, scalar_head=True, seed=0)
    with pytest.raises(ValueError, match="scalar"):
        generate(rm, PROMPTS, 2)


def test_max_new_tokens_zero_and_empty(model):
    gen = generate(model, PROMPTS, 0)
    assert gen.sequences == PROMPTS and gen.response_lengths == [0] * len(PROMPTS)
    assert generate(model, [], 4).sequences == []


# ----------------------------------------------------------------------------- sampling unit tests


def test_sample_tokens_top_k_top_p_and_greedy():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log().expand(2000, 4)
    draws = sample_tokens(logits, 1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {1, 2}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {1, 2}
    draws = sample_tokens(logits, 1.0, top_k=3, generator=g)
    assert set(draws.tolist()) == {1, 2, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.95) < 0.05
    assert sample_tokens(logits[:3], 0.0).tolist() == [1, 1, 1]
    # padded ids (>= vocab_size) are never chosen, greedy or sampled
    padded = torch.tensor([[0.0, 1.0, 50.0, 60.0]]).expand(500, 4)
    assert sample_tokens(padded, 0.0, vocab_size=2).unique().tolist() == [1]
    assert set(sample_tokens(padded, 1.0, generator=g, vocab_size=2).tolist()) <= {0, 1}
    with pytest.raises(ValueError):
        sample_tokens(logits, -1.0)
    with pytest.raises(ValueError):
        sample_tokens(logits, 1.0, top_p=0.0)


def test_padded_batch_masks():
    gen = Generation(sequences=[[1, 5, 6, 2], [1, 9, 8, 7, 6, 5]], prompt_lengths=[2, 3],
                     response_lengths=[2, 3], finished=[True, False])
    batch = padded_batch(gen, pad_id=0)
    assert batch.tokens.tolist() == [[1, 5, 6, 2, 0, 0], [1, 9, 8, 7, 6, 5]]
    assert batch.attention_mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert batch.response_mask.tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, True],
    ]
    assert batch.prompt_lengths.tolist() == [2, 3] and batch.response_lengths.tolist() == [2, 3]
    assert gen.to_batch(length=8).tokens.shape == (2, 8)
    with pytest.raises(ValueError):
        padded_batch(gen, length=5)


# ----------------------------------------------------------------------------- TP=2


def _tp2_worker():
    from megatron.core import parallel_state

    out = {}
    for flavour in ("gpt2", "llama"):
        init_distributed(ParallelConfig(tensor_model_parallel_size=2), tiny_config(flavour))
        model = tiny_model(flavour, tp=2)
        out[flavour] = generate(model, PROMPTS, 8, temperature=0)
        out[flavour + "/eos"] = generate(model, PROMPTS, 8, temperature=0, eos_id=out[flavour].responses[1][1])
        out[flavour + "/sampled"] = generate(
            model, PROMPTS, 8, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5)
        )
    out["tp"] = parallel_state.get_tensor_model_parallel_world_size()
    return out


def test_tp2_greedy_equals_tp1():
    init_distributed(ParallelConfig(), tiny_config("gpt2"))
    results = run_distributed(_tp2_worker, 2)
    assert [r["tp"] for r in results] == [2, 2]
    for flavour in ("gpt2", "llama"):
        tp1 = tiny_model(flavour)
        expected = generate(tp1, PROMPTS, 8, temperature=0)
        eos = expected.responses[1][1]
        expected_eos = generate(tp1, PROMPTS, 8, temperature=0, eos_id=eos)
        for rank, res in enumerate(results):
            assert res[flavour] == expected, (flavour, rank)
            assert res[flavour + "/eos"] == expected_eos, (flavour, rank)
        # every TP rank uses TP rank 0's draws
        assert results[0][flavour + "/sampled"] == results[1][flavour + "/sampled"]


# ----------------------------------------------------------------------------- PP=2


def _pp2_worker(root):
    """Generate at PP=2 (one layer a stage) from the PP=1 weights saved under ``root``."""
    from megatron.core import parallel_state

    from megatron_rlhf.checkpoint import load_weights, resolve_checkpoint

    out = {}
    for flavour in ("gpt2", "llama"):
        parallel = ParallelConfig(pipeline_model_parallel_size=2)
        init_distributed(parallel, tiny_config(flavour))
        model = build_model(tiny_config(flavour), parallel, VOCAB, seed=999)  # other weights until loaded
        load_weights(model, resolve_checkpoint(f"{root}/{flavour}"))
        eos = generate(model, PROMPTS, 8, temperature=0).responses[1][1]
        for name, fn in (("kv", generate), ("full", full_recompute_generate)):
            out[f"{flavour}/{name}"] = fn(model, PROMPTS, 8, temperature=0)
            out[f"{flavour}/{name}/eos"] = fn(model, PROMPTS, 8, temperature=0, eos_id=eos)
            out[f"{flavour}/{name}/sampled"] = fn(
                model, PROMPTS, 8, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5)
            )
        out[f"{flavour}/eos_id"] = eos
        # uneven prompts and the context limit through the stages
        long_prompt = list(range(1, SEQ_LENGTH - 2))
        out[f"{flavour}/context"] = generate(model, [long_prompt, [1, 2]], 6, temperature=0)
    out["pp"] = parallel_state.get_pipeline_model_parallel_world_size()
    out["stage"] = parallel_state.get_pipeline_model_parallel_rank()
    return out


def test_pp2_generation_equals_pp1(tmp_path):
    from megatron_rlhf.checkpoint import save_checkpoint

    init_distributed(ParallelConfig(), tiny_config("gpt2"))
    models = {flavour: tiny_model(flavour) for flavour in ("gpt2", "llama")}
    for flavour, m in models.items():
        save_checkpoint(tmp_path / flavour, 1, {"model": m}, {"kind": "policy"})
    results = run_distributed(_pp2_worker, 2, str(tmp_path))
    assert [(r["pp"], r["stage"]) for r in results] == [(2, 0), (2, 1)]
    for flavour, tp1 in models.items():
        eos = results[0][f"{flavour}/eos_id"]
        expected = {
            "": generate(tp1, PROMPTS, 8, temperature=0),
            "/eos": generate(tp1, PROMPTS, 8, temperature=0, eos_id=eos),
            "/sampled": generate(tp1, PROMPTS, 8, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5)),
        }
        assert expected["/eos"] != expected[""]  # eos really cuts a row
        long_prompt = list(range(1, SEQ_LENGTH - 2))
        for rank, res in enumerate(results):  # every stage returns the same tokens
            for name in ("kv", "full"):
                for suffix, want in expected.items():
                    assert res[f"{flavour}/{name}{suffix}"] == want, (flavour, name + suffix, rank)
            assert res[f"{flavour}/context"] == generate(tp1, [long_prompt, [1, 2]], 6, temperature=0), (flavour, rank)
