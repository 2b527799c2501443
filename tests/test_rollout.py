"""The rollout engine against independent references: Megatron's own forward (greedy tokens,
sampling log-probs), each prompt generated alone (continuous batching), hand-computed
inverse-CDF draws, and TP=2 / PP=2 (2 gloo processes) with continuous batching == TP=1."""

import math

import pytest
import torch

from megatron_rlhf.config import ParallelConfig
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.generation import full_recompute_generate, generate, rollout, sample_rows
from megatron_rlhf.models.logprobs import token_logprobs
from megatron_rlhf.parallel import init_distributed

from dist_utils import run_distributed
from test_generation import PROMPTS, SEQ_LENGTH, VOCAB, tiny_config, tiny_model

# prompts of very different lengths, more of them than slots
MANY = PROMPTS + [[1, 3], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69], [1, 70, 71], [1, 80, 81, 82, 83, 84]]
SEEDS = [11, 12, 13, 14, 15, 16, 17, 18]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    init_distributed(ParallelConfig(), tiny_config(request.param))
    return tiny_model(request.param)


def _megatron_greedy(model, prompt, steps):
    """Greedy decoding with GPTModel.forward over the whole prefix (no engine code at all)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.tensor([seq])
            logits = model(tokens, torch.arange(len(seq))[None], None)
            seq.append(int(logits[0, -1, :VOCAB].argmax()))
    return seq


def _eos_for(model):
    """A token some responses emit early and others not at all: response lengths then vary."""
    plain = generate(model, MANY, 8, temperature=1.0, seeds=SEEDS)
    counts = {}
    for r in plain.responses:
        for t in set(r[:4]):
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (counts[t] < len(MANY), counts[t]))


def test_greedy_equals_megatron_forward(model):
    model.eval()
    gen = generate(model, MANY, 6, temperature=0)
    assert gen.sequences == [_megatron_greedy(model, p, 6) for p in MANY]


def test_sampling_logprobs_are_the_tempered_distribution(model):
    """Generation.logprobs == token_logprobs(temperature=T) on Megatron's logits of the sampled
    sequences (the untruncated tempered distribution, also with top-k), and != the untempered one."""
    model.eval()
    for top_k in (0, 5):
        gen = generate(model, MANY, 6, temperature=0.7, top_k=top_k, seeds=SEEDS)
        batch = gen.to_batch()
        with torch.no_grad():
            logits = model(batch.tokens, torch.arange(batch.tokens.shape[1])[None].expand_as(batch.tokens), None)
        mask = batch.response_mask[:, 1:]
        tempered = token_logprobs(logits[:, :-1], batch.tokens[:, 1:], VOCAB, temperature=0.7)[mask]
        engine = torch.tensor([lp for row in gen.logprobs for lp in row])
        torch.testing.assert_close(engine, tempered, atol=2e-5, rtol=1e-5)
        plain = token_logprobs(logits[:, :-1], batch.tokens[:, 1:], VOCAB)[mask]
        assert (plain - tempered).abs().max() > 1e-2


def test_token_logprobs_temperature_by_hand():
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(4.0)]]])  # T=1: probs 1/7, 2/7, 4/7
    target = torch.tensor([[2]])
    assert token_logprobs(logits, target).item() == pytest.approx(math.log(4 / 7), abs=1e-6)
    # T=0.5 squares the odds: 1, 4, 16 -> 16/21
    assert token_logprobs(logits, target, temperature=0.5).item() == pytest.approx(math.log(16 / 21), abs=1e-6)
    assert token_logprobs(logits, target, temperature=0).item() == pytest.approx(math.log(4 / 7), abs=1e-6)


def test_sample_rows_inverse_cdf_by_hand():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])  # cdf 0.1 0.3 0.6 1.0
    logits = probs.log().expand(5, 4)
    u = torch.tensor([0.05, 0.15, 0.45, 0.65, 0.999], dtype=torch.float64)
    tokens, logprobs = sample_rows(logits, u)
    assert tokens.tolist() == [0, 1, 2, 3, 3]
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    # top-k 2 keeps {2, 3}: cdf 3/7 = 0.43, 1; the log-probs stay those of the untruncated distribution
    tokens, logprobs = sample_rows(logits, u, top_k=2)
    assert tokens.tolist() == [2, 2, 3, 3, 3]
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    # top-p 0.5 keeps {3, 2} (0.4 < 0.5 <= 0.7); padded ids (>= vocab_size) are never drawn
    assert sample_rows(logits, u, top_p=0.5)[0].tolist() == [2, 2, 3, 3, 3]
    assert sample_rows(logits, u, vocab_size=2)[0].tolist() == [0, 0, 1, 1, 1]  # cdf 1/3, 1
    # greedy ignores u; its log-prob is the untempered one
    tokens, logprobs = sample_rows(logits, None, temperature=0)
    assert tokens.tolist() == [3] * 5 and logprobs[0].item() == pytest.approx(math.log(0.4))
    # temperature 2: probs proportional to sqrt(p)
    root = probs.sqrt() / probs.sqrt().sum()
    tokens, logprobs = sample_rows(logits[:2], torch.tensor([0.0, 0.9999], dtype=torch.float64), temperature=2.0)
    assert tokens.tolist() == [0, 3]
    torch.testing.assert_close(logprobs, root.log()[[0, 3]])


def test_continuous_batching_equals_each_prompt_alone(model):
    eos = _eos_for(model)
    options = dict(temperature=1.0, top_p=0.95, eos_id=eos)
    alone = [generate(model, [p], 8, seeds=[s], **options) for p, s in zip(MANY, SEEDS)]
    expected = [a.sequences[0] for a in alone]
    assert len({len(s) - len(p) for s, p in zip(expected, MANY)}) > 1  # eos made the lengths differ
    for slots, refill in ((3, True), (3, False), (1, True), (len(MANY), True)):
        gen = rollout(model, MANY, 8, slots=slots, refill=refill, seeds=SEEDS, **options)
        assert gen.sequences == expected, (slots, refill)
        assert gen.finished == [a.finished[0] for a in alone]
        torch.testing.assert_close(torch.tensor([lp for r in gen.logprobs for lp in r]),
                                   torch.tensor([lp for a in alone for lp in a.logprobs[0]]), atol=1e-5, rtol=1e-5)
    # the no-cache reference runs the same schedule with the same draws
    assert full_recompute_generate(model, MANY, 8, slots=3, seeds=SEEDS, **options).sequences == expected
    # micro-batch groups on one stage change nothing either
    assert rollout(model, MANY, 8, slots=4, micro_batches=2, seeds=SEEDS, **options).sequences == expected


def test_context_limit_and_errors(model):
    long_prompt = list(range(1, SEQ_LENGTH - 2))  # room for 3 tokens
    gen = rollout(model, [long_prompt, [1, 2], [1, 5]], 6, slots=1, temperature=0)
    assert gen.response_lengths == [3, 6, 6]
    with pytest.raises(ValueError, match="seeds"):
        rollout(model, MANY, 2, seeds=[1, 2])
    with pytest.raises(ValueError, match="slots"):
        rollout(model, MANY, 2, slots=0)


# ----------------------------------------------------------------------------- TP=2 and PP=2


def _parallel_worker(root, tp, pp):
    from megatron_rlhf.training.checkpoint import load_weights, resolve_checkpoint

    out = {}
    for flavour in ("gpt2", "llama"):
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        init_distributed(parallel, tiny_config(flavour))
        model = build_model(tiny_config(flavour), parallel, VOCAB, seed=999)
        load_weights(model, resolve_checkpoint(f"{root}/{flavour}"))
        eos = _eos_for(model)
        options = dict(temperature=1.0, top_k=20, eos_id=eos, seeds=SEEDS)
        out[flavour] = {
            "eos": eos,
            "greedy": generate(model, MANY, 8, temperature=0).sequences,
            "refill": rollout(model, MANY, 8, slots=4, **options).sequences,
            "static": rollout(model, MANY, 8, slots=4, refill=False, **options).sequences,
            "groups": rollout(model, MANY, 8, slots=5, micro_batches=1 if pp > 1 else 3, **options).sequences,
            "full": full_recompute_generate(model, MANY, 8, slots=4, **options).sequences,
        }
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_rollout_equals_single_process(tmp_path, tp, pp):
    from megatron_rlhf.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig(), tiny_config("gpt2"))
    models = {flavour: tiny_model(flavour) for flavour in ("gpt2", "llama")}
    for flavour, m in models.items():
        save_checkpoint(tmp_path / flavour, 1, {"model": m}, {"kind": "policy"})
    results = run_distributed(_parallel_worker, 2, str(tmp_path), tp, pp)
    for flavour, m in models.items():
        eos = results[0][flavour]["eos"]
        options = dict(temperature=1.0, top_k=20, eos_id=eos, seeds=SEEDS)
        expected = [generate(m, [p], 8, **dict(options, seeds=[s])).sequences[0] for p, s in zip(MANY, SEEDS)]
        greedy = generate(m, MANY, 8, temperature=0).sequences
        for rank, res in enumerate(results):
            got = res[flavour]
            assert got["eos"] == eos and got["greedy"] == greedy, (flavour, rank)
            for name in ("refill", "static", "groups", "full"):
                assert got[name] == expected, (flavour, name, rank)
