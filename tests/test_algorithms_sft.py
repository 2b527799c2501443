"""Masked means (incl. data-parallel shards) and the SFT loss."""

import pytest
import torch

from megatron_rlhf.algorithms import masked_token_mean, sft_loss, token_logprobs_from_logits

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_token_mean_golden():
    # (1 + 2 + 4) / 3 counted tokens
    assert masked_token_mean(VALUES, MASK).item() == pytest.approx(7 / 3, abs=1e-12)
    # float masks are the same convention as bool masks
    assert masked_token_mean(VALUES, MASK.double()).item() == pytest.approx(7 / 3, abs=1e-12)


def test_two_shards_with_global_count_sum_to_global_mean():
    global_count = int(MASK.sum())
    shard_a = masked_token_mean(VALUES[:1], MASK[:1], num_tokens=global_count)  # 3 / 3
    shard_b = masked_token_mean(VALUES[1:], MASK[1:], num_tokens=torch.tensor(global_count))  # 4 / 3
    assert shard_a.item() == pytest.approx(1.0, abs=1e-12)
    assert (shard_a + shard_b).item() == pytest.approx(masked_token_mean(VALUES, MASK).item(), abs=1e-12)


def test_empty_mask_gives_zero_not_nan():
    out = masked_token_mean(VALUES, torch.zeros_like(MASK))
    assert out.item() == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        masked_token_mean(VALUES, MASK[:, :2])


def test_token_logprobs_from_logits_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs_from_logits(logits, ids), expected, atol=1e-12, rtol=0)


def test_sft_loss_is_masked_mean_nll():
    nll = torch.tensor([[0.5, 1.5, 9.0]])
    loss, metrics = sft_loss(nll, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # (0.5 + 1.5) / 2; the 9.0 prompt token is ignored
    assert metrics["nll"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["num_tokens"].item() == 2
    assert not metrics["nll"].requires_grad


def test_sft_loss_gradient_only_on_counted_tokens():
    nll = torch.tensor([[0.5, 1.5, 9.0]], requires_grad=True)
    loss, _ = sft_loss(nll, torch.tensor([[True, True, False]]))
    loss.backward()
    torch.testing.assert_close(nll.grad, torch.tensor([[0.5, 0.5, 0.0]]), atol=1e-7, rtol=0)
