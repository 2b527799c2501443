"""Packed sequences (data.packing): the bin packing, the THD layout, and the same numbers as unpacked.

Packed and unpacked micro-batches of the same examples give the same loss and gradients
(SFT, the RM with the same reward per response, PPO's pretraining term), for the GPT-2
flavour (learned positions read the restarted position ids) and Llama (RoPE restarts at
each cu_seqlens boundary inside Megatron's THD path); TP=2 and PP=2 match TP=1.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dist_utils import run_distributed, run_single

VOCAB = 100
SEQ = 32


# ------------------------------------------------------------------ the packing itself (hand-worked)


def test_first_fit_decreasing_by_hand():
    from megatron_rlhf.data.packing import first_fit_decreasing

    # longest first: 8 -> bin A; 5 -> B; 4 -> B (9); 3 -> C (A has 2 left, B 1); 2 -> A (10)
    assert first_fit_decreasing([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    # ties go by index, a unit longer than the capacity gets a bin of its own
    assert first_fit_decreasing([4, 4, 12, 4], 8) == [[2], [0, 1], [3]]
    with pytest.raises(ValueError, match="empty"):
        first_fit_decreasing([3, 0], 8)


def test_pack_sft_layout_by_hand():
    from megatron_rlhf.data import SftExample
    from megatron_rlhf.data.packing import pack_sft

    a = SftExample([1, 10, 11], [20, 2])  # input bos 10 11 20 (4), targets 10 11 20 eos
    b = SftExample([1, 12], [21, 22, 2])  # input bos 12 21 22 (4)
    batch = pack_sft([a, b], pad_id=0, width=11)
    assert batch.tokens.tolist() == [[1, 10, 11, 20, 1, 12, 21, 22, 0, 0, 0]]
    assert batch.labels.tolist() == [[10, 11, 20, 2, 12, 21, 22, 2, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[False, False, True, True, False, True, True, True, False, False, False]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 4, 8, 11] and batch.cu_seqlens.dtype == torch.int32
    assert (batch.max_seqlen, batch.num_sequences) == (4, 2)
    full = pack_sft([a, b], pad_id=0, width=8)  # no padding: no tail segment
    assert full.cu_seqlens.tolist() == [0, 4, 8]
    wide = pack_sft([a, b], pad_id=0, width=18)  # the tail in segments no longer than the longest sequence
    assert wide.cu_seqlens.tolist() == [0, 4, 8, 12, 16, 18] and wide.max_seqlen == 4
    assert wide.position_ids[0, 8:].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_pack_comparisons_reads_each_response_at_its_own_eos():
    from megatron_rlhf.data import ComparisonExample
    from megatron_rlhf.data.packing import comparison_unit_length, pack_comparisons

    prompt = ComparisonExample([1, 30], [[40, 2], [41, 42, 2]], [2, 1])
    assert comparison_unit_length(prompt) == 4 + 5
    batch = pack_comparisons([prompt], pad_id=0, width=16)
    assert batch.tokens[0, :9].tolist() == [1, 30, 40, 2, 1, 30, 41, 42, 2]
    assert batch.last_index.tolist() == [3, 8]
    assert batch.cu_seqlens.tolist() == [0, 4, 9, 14, 16]
    assert batch.ranks.tolist() == [2, 1] and batch.prompt_of.tolist() == [0, 0]


def test_segment_lengths_checks_cu_seqlens():
    from megatron_rlhf.models.attention import segment_lengths

    assert segment_lengths(torch.tensor([0, 3, 5, 8]), 8) == [3, 2, 3]
    for bad in ([0, 3, 5], [1, 3, 8], [0, 5, 5, 8]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            segment_lengths(torch.tensor(bad), 8)


# ------------------------------------------------------------------ packed == unpacked


def _model_cfg(flavour):
    from megatron_rlhf.config import ModelConfig

    return ModelConfig(
        flavour=flavour, num_layers=2, hidden_size=32, num_attention_heads=4,
        num_query_groups=2 if flavour == "llama" else None, seq_length=SEQ,
    )


def _sft_examples(seed=0, n=7):
    from megatron_rlhf.data import SftExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = (int(x) for x in torch.randint(1, 12, (2,), generator=g))
        out.append(SftExample([1] + torch.randint(3, VOCAB, (p,), generator=g).tolist(), torch.randint(3, VOCAB, (r,), generator=g).tolist() + [2]))
    return out


def _rm_examples(ks=(2, 3, 4), seed=1):
    from megatron_rlhf.data import ComparisonExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in ks:
        prompt = [1] + torch.randint(3, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        responses = [torch.randint(3, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() + [2] for _ in range(k)]
        out.append(ComparisonExample(prompt, responses, torch.randperm(k, generator=g).add(1).tolist()))
    return out


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _run(model, batches, forward_fn, divide=True):
    """Sum the micro-batches' (sum, count) as the schedule does; backward the global mean."""
    model.zero_grad()
    total, count, outputs = 0.0, 0, []
    for batch in batches:
        output, loss_fn = forward_fn(model, batch)
        loss_sum, n, _ = loss_fn(output)
        total, count = total + loss_sum, count + int(n)
        outputs.append(output)
    loss = total / count if divide else total
    loss.backward()
    return loss.item(), _grads(model), outputs


def _packed_vs_unpacked(flavour):
    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.data import collate_comparisons, collate_sft
    from megatron_rlhf.data.packing import comparison_unit_length, first_fit_decreasing, pack_comparisons, pack_microbatches, pack_sft, sft_unit_length
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.models.reward import read_rewards
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes import ppo, rm, sft

    init_distributed(ParallelConfig(), _model_cfg(flavour))
    out = {}
    # SFT: 7 demonstrations, padded in one batch vs packed into bins of 2 x seq_length tokens
    policy = build_model(_model_cfg(flavour), ParallelConfig(), VOCAB, seed=3)
    examples = _sft_examples()
    forward = partial(sft.forward_step, vocab_size=VOCAB)
    padded = _run(policy, [collate_sft(examples, pad_id=0, max_len=SEQ)], forward)
    packed_batches = pack_microbatches(examples, sft_unit_length, partial(pack_sft, pad_id=0), 2 * SEQ)
    packed = _run(policy, packed_batches, forward)
    out["sft"] = (padded[:2], packed[:2], len(packed_batches))
    # PPO's pretraining term: ptx_report's sum (count 0) through actor_forward
    forward = partial(ppo.actor_forward, vocab_size=VOCAB, clip_eps=0.2, entropy_coef=0.0, ptx_coef=0.5, episode_tokens=10.0, ptx_tokens=30.0)
    padded = _run(policy, [collate_sft(examples, pad_id=0, max_len=SEQ)], forward, divide=False)
    packed = _run(policy, pack_microbatches(examples, sft_unit_length, partial(pack_sft, pad_id=0), 2 * SEQ), forward, divide=False)
    out["ptx"] = (padded[:2], packed[:2])
    # RM: three prompts (K = 2, 3, 4), every reward read at its response's own eos
    reward_model = build_model(_model_cfg(flavour), ParallelConfig(), VOCAB, scalar_head=True, seed=4)
    comparisons = _rm_examples()
    padded_batch = collate_comparisons(comparisons, pad_id=0, max_len=SEQ)
    padded = _run(reward_model, [padded_batch], rm.forward_step)
    packed_batches = pack_microbatches(comparisons, comparison_unit_length, partial(pack_comparisons, pad_id=0), 2 * SEQ)
    packed = _run(reward_model, packed_batches, rm.forward_step)
    padded_rewards = read_rewards(padded[2][0], padded_batch.last_index)
    packed_rewards = torch.cat([values.reshape(-1)[b.last_index] for values, b in zip(packed[2], packed_batches)])
    # the packed order: bin by bin, each bin's prompts in input order, all K responses of each
    bins = first_fit_decreasing([comparison_unit_length(e) for e in comparisons], 2 * SEQ)
    starts = [sum(len(e.response_ids) for e in comparisons[:i]) for i in range(len(comparisons))]
    order = [starts[i] + k for b in bins for i in b for k in range(len(comparisons[i].response_ids))]
    out["rm"] = (padded[:2], packed[:2], padded_rewards[order].detach(), packed_rewards.detach(), len(packed_batches))
    return out


def _assert_same(reference, other):
    (loss1, grads1), (loss2, grads2) = reference, other
    assert abs(loss1 - loss2) < 1e-5, (loss1, loss2)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        assert (grads1[name] - grads2[name]).abs().max().item() < 1e-5, name
    assert max(g.abs().max().item() for g in grads1.values()) > 1e-3  # gradients that could differ


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_packed_gives_the_unpacked_loss_gradients_and_rewards(flavour):
    out = run_single(_packed_vs_unpacked, flavour)
    padded, packed, bins = out["sft"]
    assert bins >= 2  # several sequences share a bin, and there is more than one bin
    _assert_same(padded, packed)
    _assert_same(*out["ptx"])
    padded, packed, padded_rewards, packed_rewards, bins = out["rm"]
    assert bins == 2  # 9 responses of 3 prompts in two bins, no prompt split
    _assert_same(padded, packed)
    assert padded_rewards.std() > 1e-3
    assert (padded_rewards - packed_rewards).abs().max() < 1e-5


# ------------------------------------------------------------------ TP / PP equivalence


def _layout_step(parallel, ckpt_dir, save):
    """One packed SFT step and one packed RM step at this layout (weights from ``ckpt_dir``)."""
    from pathlib import Path

    from megatron.core import parallel_state

    from megatron_rlhf import checkpoint as ckpt_lib
    from megatron_rlhf.config import TrainConfig
    from megatron_rlhf.data.packing import comparison_unit_length, pack_comparisons, pack_microbatches, pack_sft, sft_unit_length
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes import rm, sft
    from megatron_rlhf.training.step import train_step, wrap_for_training

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    model_cfg = _model_cfg("llama")
    init_distributed(parallel, model_cfg)
    train = TrainConfig(lr=1e-3, lr_warmup_steps=0, global_batch_size=4, micro_batch_size=2)
    results = {}
    for name, scalar_head, forward, micro in (
        ("sft", False, partial(sft.forward_step, vocab_size=VOCAB),
         pack_microbatches(_sft_examples(n=9), sft_unit_length, partial(pack_sft, pad_id=0), SEQ)),
        ("rm", True, rm.forward_step,
         pack_microbatches(_rm_examples((2, 3, 4, 2)), comparison_unit_length, partial(pack_comparisons, pad_id=0), 2 * SEQ)),
    ):
        model = build_model(model_cfg, parallel, VOCAB, scalar_head=scalar_head, seed=5)
        if parallel.pipeline_model_parallel_size > 1:
            model.config.variable_seq_lengths = True  # as the RM recipe does
        path = Path(ckpt_dir) / name
        if save:
            ckpt_lib.save_checkpoint(path, 0, {"model": model}, {"kind": "reward" if scalar_head else "policy"})
        else:
            ckpt_lib.load_weights(model, path / ckpt_lib.iter_name(0))
        ddp, optimizer, scheduler = wrap_for_training(model, parallel, train, total_steps=1)
        results[name] = (len(micro), train_step(ddp, optimizer, scheduler, micro, forward))
    return results


def _layouts(ckpt_dir):
    from megatron_rlhf.config import ParallelConfig

    # TP=PP=1 as two data-parallel replicas fed the same micro-batches: the numbers of one
    reference = _layout_step(ParallelConfig(), ckpt_dir, save=True)
    tp2 = _layout_step(ParallelConfig(tensor_model_parallel_size=2), ckpt_dir, save=False)
    pp2 = _layout_step(ParallelConfig(pipeline_model_parallel_size=2), ckpt_dir, save=False)
    return reference, tp2, pp2


def test_packed_steps_at_tp2_and_pp2_match_tp1(tmp_path):
    for reference, tp2, pp2 in run_distributed(_layouts, 2, str(tmp_path)):
        assert reference["sft"][0] >= 2 and reference["rm"][0] >= 2  # several packed micro-batches
        for layout, other in (("tp2", tp2), ("pp2", pp2)):
            for recipe in ("sft", "rm"):
                (_, ref), (_, got) = reference[recipe], other[recipe]
                keys = ("loss", "grad_norm") + (("accuracy", "margin") if recipe == "rm" else ())
                for key in keys:
                    assert abs(got[key] - ref[key]) < 1e-5 * max(1.0, abs(ref[key])), (layout, recipe, key, ref[key], got[key])


# ------------------------------------------------------------------ resume


def test_resume_with_packing_continues_exactly(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    common = ["sft", "--config", "examples/tiny/sft.yaml", "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
              "model.hidden_dropout=0.1", "train.progress_bar=false", "train.tensorboard=false", "train.eval_interval=0", "data.valid_path=",
              "train.global_batch_size=8", "train.micro_batch_size=2", "train.save_interval=2", "train.lr_warmup_steps=0",
              "train.lr_decay_style=constant", "data.packing=true"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")

    def run(out, steps):
        r = subprocess.run([sys.executable, "-m", "megatron_rlhf", *common, f"train.max_steps={steps}", f"output_dir={out}"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: (row["train/loss"], row["grad_norm"]) for row in rows if "train/loss" in row}

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)  # continues from the step-2 checkpoint
    assert sorted(straight) == [1, 2, 3, 4]
    assert resumed[3] == straight[3] and resumed[4] == straight[4]
