"""The rollout engine against independent references: Megatron's own forward (greedy tokens,
sampling log-probs), each prompt generated alone (continuous batching), hand-computed
exponential-race draws, and TP=2 / PP=2 (2 gloo processes) with continuous batching == TP=1."""

import math

import pytest
import torch

from megatron_rlhf.config import ParallelConfig
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.rollout import full_recompute_generate, generate, rollout, sample_rows
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


def test_sample_rows_exponential_race_by_hand():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(4, 4)
    # the winner is argmax p / q: row 0 plain argmax, row 1 a small q lifts 0.1 to 10,
    # row 2: 0.2/0.05 = 4 beats 0.3/0.1 = 3, row 3: 0.3/0.1 = 3 beats 0.2/0.1 = 2 and 0.4/0.5
    noise = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.01, 1.0, 1.0, 1.0], [1.0, 0.05, 0.1, 1.0], [1.0, 0.1, 0.1, 0.5]])
    tokens, logprobs = sample_rows(logits, noise)
    assert tokens.tolist() == [3, 0, 1, 2]
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    # top-k 2 keeps {2, 3}: row 1's and row 2's winners are cut; log-probs stay untruncated ones
    tokens, logprobs = sample_rows(logits, noise, top_k=2)
    assert tokens.tolist() == [3, 3, 2, 2]
    torch.testing.assert_close(logprobs, probs.log()[tokens])
    # top-p 0.5 keeps {3, 2} (0.4 < 0.5 <= 0.7); padded ids (>= vocab_size) are never drawn
    assert sample_rows(logits, noise, top_p=0.5)[0].tolist() == [3, 3, 2, 2]
    assert sample_rows(logits, noise, vocab_size=2)[0].tolist() == [1, 0, 1, 1]
    # greedy ignores the noise; its log-prob is the untempered one
    tokens, logprobs = sample_rows(logits, None, temperature=0)
    assert tokens.tolist() == [3] * 4 and logprobs[0].item() == pytest.approx(math.log(0.4))
    # temperature 2: probs proportional to sqrt(p) = .316 .447 .548 .632; row 3: 5.48 beats 4.47 and 1.26
    root = probs.sqrt() / probs.sqrt().sum()
    tokens, logprobs = sample_rows(logits, noise, temperature=2.0)
    assert tokens.tolist() == [3, 0, 1, 2]
    torch.testing.assert_close(logprobs, root.log()[tokens])
    # with Exponential(1) noise the race draws from p
    g = torch.Generator().manual_seed(0)
    draws = sample_rows(probs.log().expand(4000, 4), torch.empty(4000, 4).exponential_(generator=g))[0]
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 4000.0, probs, atol=0.03, rtol=0)


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
    from megatron_rlhf.checkpoint import load_weights, resolve_checkpoint

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
    from megatron_rlhf.checkpoint import save_checkpoint

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
