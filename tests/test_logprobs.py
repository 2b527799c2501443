"""Vocab-parallel log-probs and entropy: TP=1 against plain torch, TP=2 (2 gloo processes) against TP=1."""

import pytest
import torch

from megatron_rlhf.config import ModelConfig, ParallelConfig
from megatron_rlhf.models import logprobs as lp
from megatron_rlhf.models.logprobs import token_logprobs, vocab_parallel_entropy
from megatron_rlhf.parallel import init_distributed

from dist_utils import run_distributed

B, S, V = 3, 5, 16  # V: the padded vocabulary, split 8 + 8 at TP=2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(B, S, V, generator=g)
    targets = torch.randint(0, 7, (B, S), generator=g)  # real ids only (vocab_size >= 7 below)
    grad_lp = torch.randn(B, S, generator=g)  # upstream gradients for the backward check
    grad_h = torch.randn(B, S, generator=g)
    return logits, targets, grad_lp, grad_h


def _reference(logits, targets, vocab_size):
    """torch.log_softmax + gather and -sum p log p over the real vocabulary, in the input's dtype."""
    z = logits
    if vocab_size is not None:
        z = z[..., :vocab_size]
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _forward_backward(logits_local, targets, grad_lp, grad_h, vocab_size):
    """(logp, entropy, d(sum grad_lp*logp + grad_h*H)/d logits_local) for this rank's slice."""
    x = logits_local.clone().requires_grad_(True)
    logp = token_logprobs(x, targets, vocab_size)
    ent = vocab_parallel_entropy(x, vocab_size)
    ((logp * grad_lp).sum() + (ent * grad_h).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


@pytest.fixture
def tp1():
    init_distributed(ParallelConfig(), ModelConfig())


@pytest.mark.parametrize("vocab_size", [None, 13, 7])
def test_tp1_matches_torch(tp1, vocab_size):
    logits, targets, *_ = _inputs()
    ref_lp, ref_h = _reference(logits, targets, vocab_size)
    logp = token_logprobs(logits, targets, vocab_size)
    ent = vocab_parallel_entropy(logits, vocab_size)
    assert logp.shape == ent.shape == (B, S) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_h, atol=1e-6, rtol=0)


def test_tp1_gradients_match_autograd(tp1):
    logits, targets, grad_lp, grad_h = _inputs(1)
    vocab_size = 13
    _, _, grad = _forward_backward(logits, targets, grad_lp, grad_h, vocab_size)
    x = logits.double().requires_grad_(True)
    ref_lp, ref_h = _reference(x, targets, vocab_size)
    ((ref_lp * grad_lp).sum() + (ref_h * grad_h).sum()).backward()
    torch.testing.assert_close(grad.double(), x.grad, atol=1e-6, rtol=0)
    assert grad[..., vocab_size:].abs().max() == 0  # padded ids: no gradient


def test_inputs_not_modified_and_padding_gets_no_mass(tp1):
    logits, targets, *_ = _inputs(2)
    before = logits.clone()
    # give the padded ids the largest logits: masked, they must still receive no probability
    logits[..., 13:] += 100.0
    token_logprobs(logits, targets, 13)
    vocab_parallel_entropy(logits, 13)
    assert torch.equal(logits[..., :13], before[..., :13])  # fp32 input left untouched
    logp_all = torch.stack([token_logprobs(logits, torch.full((B, S), v), 13) for v in range(13)], -1)
    torch.testing.assert_close(logp_all.exp().sum(-1), torch.ones(B, S), atol=1e-6, rtol=0)


def test_bf16_logits(tp1):
    logits, targets, *_ = _inputs(3)
    ref_lp, _ = _reference(logits.bfloat16().float(), targets, None)
    torch.testing.assert_close(token_logprobs(logits.bfloat16(), targets), ref_lp, atol=1e-5, rtol=0)


def test_without_process_group(monkeypatch):
    # pure maths (no torch.distributed): plain log_softmax, same numbers
    monkeypatch.setattr(lp, "_tp_info", lambda: (None, 0, 1))
    logits, targets, *_ = _inputs(4)
    ref_lp, ref_h = _reference(logits, targets, 13)
    torch.testing.assert_close(token_logprobs(logits, targets, 13), ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(vocab_parallel_entropy(logits, 13), ref_h, atol=1e-6, rtol=0)


def _tp2_worker(vocab_sizes):
    from megatron.core import parallel_state

    init_distributed(ParallelConfig(tensor_model_parallel_size=2), ModelConfig())
    rank = parallel_state.get_tensor_model_parallel_rank()
    out = {}
    for vocab_size in vocab_sizes:
        logits, targets, grad_lp, grad_h = _inputs(5)
        local = logits[..., rank * V // 2 : (rank + 1) * V // 2]
        out[vocab_size] = _forward_backward(local, targets, grad_lp, grad_h, vocab_size)
    return out


def test_tp2_matches_tp1(tp1):
    vocab_sizes = [None, 13, 7]  # 7: rank 1's slice is all padding
    results = run_distributed(_tp2_worker, 2, args=(vocab_sizes,))
    for vocab_size in vocab_sizes:
        logits, targets, grad_lp, grad_h = _inputs(5)
        ref_lp, ref_h, ref_grad = _forward_backward(logits, targets, grad_lp, grad_h, vocab_size)
        for rank, res in enumerate(results):
            logp, ent, grad = res[vocab_size]
            assert (logp - ref_lp).abs().max() < 1e-5
            assert (ent - ref_h).abs().max() < 1e-5
            assert (grad - ref_grad[..., rank * V // 2 : (rank + 1) * V // 2]).abs().max() < 1e-5
