"""Packed sequences on Transformer Engine: Megatron-Core's THD path gives the unpacked numbers.

With TE's layer spec a packed micro-batch (``data.packing``) runs as ``qkv_format='thd'``:
TE's fused attention reads ``cu_seqlens`` (``PackedSeqParams``) and keeps every token inside
its sequence, and RoPE restarts at each boundary (``apply_rotary_pos_emb`` with
``cu_seqlens``). The CPU tests (tests/test_packing.py) check the same semantics on our SDPA
attention; here the same examples, padded (bshd) and packed (thd), go through one TE model:

* SFT, Llama and GPT-2: the per-token loss within 2e-3 (fp32; TE may use TF32 GEMMs and a
  different attention kernel for thd and bshd) / 2e-2 (bf16), every gradient within 1e-2 /
  5e-2 relative L2;
* RM (Llama): every response's reward within 2e-3 / 3e-2.
"""

from __future__ import annotations

from functools import partial

import pytest

from dist_utils import run_single

pytestmark = [pytest.mark.gpu, pytest.mark.needs_te]

VOCAB, SEQ = 512, 64
TOL = {"fp32": dict(loss=2e-3, grad=1e-2, reward=2e-3), "bf16": dict(loss=2e-2, grad=5e-2, reward=3e-2)}


def _examples(n, seed):
    import torch

    from megatron_rlhf.data import SftExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = (int(x) for x in torch.randint(1, 30, (2,), generator=g))
        out.append(SftExample([1] + torch.randint(3, VOCAB, (p,), generator=g).tolist(), torch.randint(3, VOCAB, (r,), generator=g).tolist() + [2]))
    return out


def _compare(flavour, precision):
    import torch

    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.data import ComparisonExample, collate_comparisons, collate_sft
    from megatron_rlhf.data.packing import comparison_unit_length, pack_comparisons, pack_microbatches, pack_sft, sft_unit_length
    from megatron_rlhf.models.builder import build_model, use_transformer_engine
    from megatron_rlhf.models.reward import read_rewards
    from megatron_rlhf.parallel import init_distributed, to_device
    from megatron_rlhf.recipes import rm, sft

    cfg = ModelConfig(flavour=flavour, num_layers=2, hidden_size=128, num_attention_heads=4,
                      num_query_groups=2 if flavour == "llama" else None, seq_length=SEQ, precision=precision,
                      hidden_dropout=0.0, attention_dropout=0.0)
    assert use_transformer_engine(cfg)
    init_distributed(ParallelConfig(), cfg)

    def run(model, batches, forward):
        model.zero_grad()
        total, count, outputs = 0.0, 0, []
        for batch in batches:
            output, loss_fn = forward(model, to_device(batch))
            s, n, _ = loss_fn(output)
            total, count = total + s, count + int(n)
            outputs.append(output)
        (total / count).backward()
        return float(total / count), {k: p.main_grad.clone() if hasattr(p, "main_grad") else p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}, outputs

    out = {}
    policy = build_model(cfg, ParallelConfig(), VOCAB, seed=1)
    examples = _examples(12, seed=2)
    forward = partial(sft.forward_step, vocab_size=VOCAB)
    padded = run(policy, [collate_sft(examples, pad_id=0, max_len=SEQ)], forward)
    packed = run(policy, pack_microbatches(examples, sft_unit_length, partial(pack_sft, pad_id=0), 2 * SEQ), forward)
    rel = {k: ((padded[1][k] - packed[1][k]).norm() / padded[1][k].norm().clamp_min(1e-12)).item() for k in padded[1]}
    out["sft"] = (padded[0], packed[0], rel)
    if flavour == "llama":
        reward_model = build_model(cfg, ParallelConfig(), VOCAB, scalar_head=True, seed=3)
        g = torch.Generator().manual_seed(4)
        comparisons = [ComparisonExample([1, 5, 6, 7], [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() + [2] for n in torch.randint(2, 40, (k,), generator=g)], list(range(1, k + 1)))
                       for k in (2, 3, 4)]
        batch = collate_comparisons(comparisons, pad_id=0, max_len=SEQ)
        with torch.no_grad():
            values, _ = rm.forward_step(reward_model, to_device(batch))
            padded_rewards = read_rewards(values, batch.last_index.cuda()).cpu()
            packed_batches = pack_microbatches(comparisons, comparison_unit_length, partial(pack_comparisons, pad_id=0), 10 * SEQ)
            assert len(packed_batches) == 1  # one bin: responses in the padded batch's order
            values, _ = rm.forward_step(reward_model, to_device(packed_batches[0]))
            packed_rewards = values.reshape(-1)[packed_batches[0].last_index.cuda()].float().cpu()
        out["rm"] = (padded_rewards, packed_rewards)
    return out


@pytest.mark.parametrize("flavour,precision", [(f, p) for f in ("llama", "gpt2") for p in ("fp32", "bf16")])
def test_te_thd_packing_matches_padded(flavour, precision):
    tol = TOL[precision]
    out = run_single(_compare, flavour, precision)
    padded_loss, packed_loss, rel = out["sft"]
    assert abs(padded_loss - packed_loss) < tol["loss"], (padded_loss, packed_loss)
    worst = max(rel, key=rel.get)
    assert rel[worst] < tol["grad"], (worst, rel[worst])
    if "rm" in out:
        padded_rewards, packed_rewards = out["rm"]
        assert padded_rewards.std() > 1e-3
        assert (padded_rewards - packed_rewards).abs().max() < tol["reward"]
