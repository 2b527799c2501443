"""KL-shaped per-token rewards (InstructGPT eq. 2), GAE and masked whitening."""

import pytest
import torch

from megatron_rlhf.algorithms import (
    gae,
    last_token_index,
    masked_moments,
    moments_to_mean_var,
    shape_rewards,
    whiten,
    whiten_with_moments,
)

F64 = torch.float64


def tensor(rows):
    return torch.tensor(rows, dtype=F64)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [2, 2, 3]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_shape_rewards_golden():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    # k1 on valid tokens: row 0 [0.5, -1, 0], row 1 [0.25, -0.5]; the 5s and 7s are masked garbage
    logprobs = tensor([[-1.0, -2.0, -3.0, 5.0], [7.0, -1.0, -1.0, 7.0]])
    ref_logprobs = tensor([[-1.5, -1.0, -3.0, 0.0], [0.0, -1.25, -0.5, 0.0]])
    rm_scores = tensor([2.0, -1.0])
    rewards, kl = shape_rewards(rm_scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, tensor([[0.5, -1.0, 0.0, 0.0], [0.0, 0.25, -0.5, 0.0]]), atol=1e-12, rtol=0)
    # -0.1 * kl, plus the RM score on each row's last valid token (index 2 in both rows)
    expected = tensor([[-0.05, 0.1, 2.0, 0.0], [0.0, -0.025, 0.05 - 1.0, 0.0]])
    torch.testing.assert_close(rewards, expected, atol=1e-12, rtol=0)
    # summed over a response: r(x, y) - beta * log(pi / pi_ref), exactly eq. 2 with k1
    torch.testing.assert_close(rewards.sum(1), rm_scores - 0.1 * kl.sum(1), atol=1e-12, rtol=0)


def test_shape_rewards_other_estimator_and_checks():
    mask = torch.tensor([[1, 1]])
    rewards, kl = shape_rewards(tensor([0.0]), tensor([[0.5, 0.0]]), tensor([[0.0, 0.0]]), mask, 1.0, "k2")
    torch.testing.assert_close(kl, tensor([[0.125, 0.0]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(rewards, tensor([[-0.125, 0.0]]), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="rm_scores"):
        shape_rewards(tensor([0.0, 1.0]), tensor([[0.5, 0.0]]), tensor([[0.0, 0.0]]), mask, 1.0)


def test_gae_golden_1x3():
    # gamma = lam = 0.5, so gamma * lam = 0.25
    # t=2: delta = 1 + 0 - 3 = -2                 A = -2
    # t=1: delta = 0 + 0.5*3 - 2 = -0.5           A = -0.5 + 0.25*(-2) = -1
    # t=0: delta = 0 + 0.5*2 - 1 = 0              A = 0 + 0.25*(-1) = -0.25
    advantages, returns = gae(tensor([[0.0, 0.0, 1.0]]), tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), 0.5, 0.5)
    torch.testing.assert_close(advantages, tensor([[-0.25, -1.0, -2.0]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, tensor([[0.75, 1.0, 1.0]]), atol=1e-12, rtol=0)


def test_gae_golden_2x4_right_padded():
    # gamma = 1, lam = 0.5; the 99s sit on padding and must not leak
    rewards = tensor([[0.1, 0.0, 1.0, 99.0], [0.0, 2.0, 99.0, 99.0]])
    values = tensor([[0.5, 0.2, 0.4, 99.0], [1.0, 0.5, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # row 0: t=2 delta 1 - 0.4 = 0.6, A 0.6; t=1 delta 0.4 - 0.2 = 0.2, A 0.2 + 0.3 = 0.5;
    #        t=0 delta 0.1 + 0.2 - 0.5 = -0.2, A -0.2 + 0.25 = 0.05
    # row 1: t=1 delta 2 - 0.5 = 1.5, A 1.5; t=0 delta 0.5 - 1 = -0.5, A -0.5 + 0.75 = 0.25
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, tensor([[0.05, 0.5, 0.6, 0.0], [0.25, 1.5, 0.0, 0.0]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, tensor([[0.55, 0.7, 1.0, 0.0], [1.25, 2.0, 0.0, 0.0]]), atol=1e-12, rtol=0)


def python_loop_gae(rewards, values, lengths, gamma, lam):
    advantages = [[0.0] * len(row) for row in rewards]
    for b, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[b][t + 1] if t + 1 < length else 0.0
            running = rewards[b][t] + gamma * next_value - values[b][t] + gamma * lam * running
            advantages[b][t] = running
    return advantages


def test_gae_matches_python_loop_random():
    torch.manual_seed(0)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    rewards, values = torch.randn(5, 7, dtype=F64), torch.randn(5, 7, dtype=F64)
    advantages, returns = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    expected = tensor(python_loop_gae(rewards.tolist(), values.tolist(), lengths, 0.97, 0.9))
    torch.testing.assert_close(advantages, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(returns, (expected + values) * mask, atol=1e-12, rtol=0)


def test_gae_ignores_where_the_padding_is():
    # the same 3-token response right-padded, left-padded (prompt first) and unpadded
    torch.manual_seed(1)
    rewards, values = torch.randn(1, 3, dtype=F64), torch.randn(1, 3, dtype=F64)
    base_adv, base_ret = gae(rewards, values, torch.ones(1, 3), 0.9, 0.8)
    garbage = torch.full((1, 2), 1e6, dtype=F64)
    padded = gae(torch.cat([garbage, rewards], 1), torch.cat([garbage, values], 1), torch.tensor([[0, 0, 1, 1, 1]]), 0.9, 0.8)
    torch.testing.assert_close(padded[0][:, 2:], base_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(padded[1][:, 2:], base_ret, atol=1e-12, rtol=0)
    assert padded[0][:, :2].abs().max().item() == 0.0


def test_gae_gamma1_lam1_returns_are_reward_to_go():
    torch.manual_seed(2)
    rewards, values = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    reward_to_go = masked_rewards.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(returns, reward_to_go, atol=1e-12, rtol=0)
    torch.testing.assert_close(advantages, (reward_to_go - values) * mask, atol=1e-12, rtol=0)


def test_gae_outputs_are_constants():
    values = torch.zeros(1, 2, requires_grad=True)
    advantages, returns = gae(torch.ones(1, 2), values, torch.ones(1, 2), 1.0, 1.0)
    assert not advantages.requires_grad and not returns.requires_grad


# [1, 2, 3, 4]: mean 2.5, unbiased var 5/3, std 1.2909944; 1.5/std = 1.161895, 0.5/std = 0.387298
WHITENED_1234 = [-1.161895003862225, -0.3872983346207417, 0.3872983346207417, 1.161895003862225]


def test_whiten_golden():
    out = whiten(tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4))
    torch.testing.assert_close(out, tensor([WHITENED_1234]), atol=1e-6, rtol=0)
    # biased variance 1.25, std 1.1180340: 1.5/std = 1.3416408, 0.5/std = 0.4472136
    out = whiten(tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4), unbiased=False)
    torch.testing.assert_close(out, tensor([[-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738]]), atol=1e-6, rtol=0)
    # shift_mean=False adds the mean 2.5 back
    out = whiten(tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4), shift_mean=False)
    torch.testing.assert_close(out, tensor([[2.5 + w for w in WHITENED_1234]]), atol=1e-6, rtol=0)


def test_whiten_masked_ignores_and_zeroes_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = whiten(values, mask)
    assert out.dtype == torch.float32
    expected = torch.tensor([[WHITENED_1234[0], WHITENED_1234[1], 0.0], [WHITENED_1234[2], WHITENED_1234[3], 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_whiten_single_token_is_finite():
    out = whiten(tensor([[5.0, 7.0]]), torch.tensor([[1, 0]]))
    assert out.abs().max().item() == 0.0


def test_global_whitening_from_shard_moments():
    torch.manual_seed(3)
    values = torch.randn(4, 6) * 3 + 10
    mask = torch.rand(4, 6) > 0.3
    shard_moments = [masked_moments(values[:2], mask[:2]), masked_moments(values[2:], mask[2:])]
    # what an all-reduce(SUM) of the three sums would produce
    summed = tuple(a + b for a, b in zip(*shard_moments))
    global_moments = masked_moments(values, mask)
    for got, want in zip(summed, global_moments):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    mean, var = moments_to_mean_var(*summed)
    assert mean.item() == pytest.approx(values[mask].double().mean().item(), abs=1e-9)
    assert var.item() == pytest.approx(values[mask].double().var().item(), abs=1e-9)
    reference = whiten(values, mask)
    shard = whiten_with_moments(values[2:], mask[2:], mean, var)
    torch.testing.assert_close(shard, reference[2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(whiten(values[:2], mask[:2], moments=summed), reference[:2], atol=1e-6, rtol=0)
