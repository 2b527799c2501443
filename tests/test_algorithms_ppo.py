"""PPO-clip policy/value losses on both sides of the clip, entropy, and the PPO-ptx objective."""


import pytest
import torch

from megatron_rlhf.algorithms import (
    actor_report,
    critic_report,
    ptx_report,
    entropy_bonus,
    policy_loss,
    ptx_batch_size,
    ptx_loss,
    value_loss,
)

F64 = torch.float64

# old_logprobs = 0 so ratio = exp(logprobs); the last token is masked padding with a wild ratio
RATIOS = [1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 50.0]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0, 2.0, -2.0, 1.0]
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)


def policy_inputs():
    logprobs = torch.tensor([RATIOS], dtype=F64).log().requires_grad_()
    return logprobs, torch.zeros(1, 7, dtype=F64), torch.tensor([ADVANTAGES], dtype=F64)


def test_policy_loss_golden_both_sides_of_clip():
    logprobs, old_logprobs, advantages = policy_inputs()
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, MASK, clip_eps=0.2)
    # per token -min(r A, clip(r, 0.8, 1.2) A):
    #   r=1.5 A=+1: -min(1.5, 1.2)  = -1.2  clipped (gradient 0)
    #   r=1.5 A=-1: -min(-1.5,-1.2) =  1.5  unclipped (pessimistic side)
    #   r=0.5 A=+1: -min(0.5, 0.8)  = -0.5  unclipped
    #   r=0.5 A=-1: -min(-0.5,-0.8) =  0.8  clipped (gradient 0)
    #   r=1.1 A=+2: -2.2 inside the range;  r=0.9 A=-2: 1.8 inside
    # mean = (-1.2 + 1.5 - 0.5 + 0.8 - 2.2 + 1.8) / 6 = 0.2 / 6
    assert loss.item() == pytest.approx(0.2 / 6, abs=1e-12)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 6, abs=1e-12)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-12)  # (1.5+1.5+0.5+0.5+1.1+0.9) / 6
    # k3 = r - 1 - log r per token: 0.0945349 (x2), 0.1931472 (x2), 0.0046898, 0.0053605
    assert metrics["approx_kl"].item() == pytest.approx(0.0975690801261772, abs=1e-12)
    assert all(not value.requires_grad for value in metrics.values())

    loss.backward()
    # d loss_t / d logprob_t = -A r / 6 where unclipped; 0 where clipped or masked
    expected_grad = torch.tensor([[0.0, 1.5, -0.5, 0.0, -2.2, 1.8, 0.0]], dtype=F64) / 6
    torch.testing.assert_close(logprobs.grad, expected_grad, atol=1e-12, rtol=0)


def test_policy_loss_on_policy_is_minus_mean_advantage():
    advantages = torch.tensor([[1.0, -3.0, 0.5]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.3]])
    loss, metrics = policy_loss(logprobs, logprobs.clone(), advantages, torch.ones(1, 3))
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # -(1 - 3 + 0.5) / 3
    assert metrics["clipfrac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0


def test_policy_loss_shards_with_global_count_sum_to_global():
    logprobs, old_logprobs, advantages = policy_inputs()
    full, full_metrics = policy_loss(logprobs, old_logprobs, advantages, MASK)
    left, left_metrics = policy_loss(logprobs[:, :4], old_logprobs[:, :4], advantages[:, :4], MASK[:, :4], num_tokens=6)
    right, right_metrics = policy_loss(logprobs[:, 4:], old_logprobs[:, 4:], advantages[:, 4:], MASK[:, 4:], num_tokens=6)
    assert (left + right).item() == pytest.approx(full.item(), abs=1e-12)
    for name in ("clipfrac", "approx_kl", "ratio_mean"):
        assert (left_metrics[name] + right_metrics[name]).item() == pytest.approx(full_metrics[name].item(), abs=1e-12)


def test_policy_loss_rejects_bad_clip():
    logprobs, old_logprobs, advantages = policy_inputs()
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(logprobs, old_logprobs, advantages, MASK, clip_eps=0.0)


def value_inputs():
    # old values 0, clip 0.2 -> clipped prediction is +-0.2 when |v| > 0.2; last token is padding
    values = torch.tensor([[0.5, 0.5, -0.5, -0.5, 0.1, 9.0]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, -1.0, 0.3, 0.4, -9.0]], dtype=F64)
    return values, torch.zeros(1, 6, dtype=F64), returns, torch.tensor([[1, 1, 1, 1, 1, 0]])


def test_value_loss_golden_both_sides():
    values, old_values, returns, mask = value_inputs()
    loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # (v-R)^2 vs (v_clip-R)^2, 0.5 * max:
    #   v= 0.5 R= 1.0: 0.25 vs ( 0.2-1.0)^2 = 0.64 -> 0.32   clipped
    #   v= 0.5 R= 0.0: 0.25 vs ( 0.2-0.0)^2 = 0.04 -> 0.125
    #   v=-0.5 R=-1.0: 0.25 vs (-0.2+1.0)^2 = 0.64 -> 0.32   clipped
    #   v=-0.5 R= 0.3: 0.64 vs (-0.2-0.3)^2 = 0.25 -> 0.32
    #   v= 0.1 R= 0.4: inside the range, 0.09      -> 0.045
    # mean = 1.13 / 5
    assert loss.item() == pytest.approx(0.226, abs=1e-12)
    assert metrics["value_clipfrac"].item() == pytest.approx(0.4, abs=1e-12)
    assert metrics["value_mean"].item() == pytest.approx(0.02, abs=1e-12)
    assert metrics["value_mse"].item() == pytest.approx(1.48 / 5, abs=1e-12)
    loss.backward()
    # gradient (v - R) / 5 where the unclipped error is used, 0 where the clipped one is
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5, 0.0, -0.8, -0.3, 0.0]], dtype=F64) / 5, atol=1e-12, rtol=0)


def test_value_loss_unclipped_and_sharded():
    values, old_values, returns, mask = value_inputs()
    loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.5 * 1.48 / 5, abs=1e-12)
    assert metrics["value_clipfrac"].item() == 0.0
    full, _ = value_loss(values, old_values, returns, mask)
    left, _ = value_loss(values[:, :2], old_values[:, :2], returns[:, :2], mask[:, :2], num_tokens=5)
    right, _ = value_loss(values[:, 2:], old_values[:, 2:], returns[:, 2:], mask[:, 2:], num_tokens=5)
    assert (left + right).item() == pytest.approx(full.item(), abs=1e-12)


def test_entropy_bonus():
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    term, metrics = entropy_bonus(entropy, torch.tensor([[1, 1], [1, 0]]), coef=0.01)
    assert metrics["entropy"].item() == pytest.approx(2.0, abs=1e-6)  # (1 + 2 + 3) / 3
    assert term.item() == pytest.approx(-0.02, abs=1e-7)


def test_ptx_loss_golden():
    assert ptx_loss(torch.tensor(2.0), 27.8).item() == pytest.approx(55.6, abs=1e-5)


def _schedule_step(reports):
    """What Megatron's schedule does with calculate_per_token_loss: sum the micro-batches'
    loss sums and counts, divide by the total count (here one data-parallel rank)."""
    total = sum(r[0] for r in reports)
    count = sum(float(r[1]) for r in reports)
    return total / count


def test_actor_and_ptx_reports_give_eq2_in_the_schedule():
    """Two episode micro-batches and one pretraining micro-batch through the schedule's one
    division equal eq. 2 negated: policy mean - c * entropy mean + gamma * pretraining NLL mean."""
    torch.manual_seed(1)
    logprobs = torch.randn(4, 5, dtype=F64, requires_grad=True)
    old = logprobs.detach() + 0.1 * torch.randn(4, 5, dtype=F64)
    adv = torch.randn(4, 5, dtype=F64)
    entropy = torch.rand(4, 5, dtype=F64) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    ptx_lp = -torch.rand(3, 6, dtype=F64) * 5
    ptx_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4], dtype=torch.bool)
    c, gamma, eps = 0.01, 27.8, 0.2
    n_e, n_d = float(mask.sum()), float(ptx_mask.sum())  # 11 episode tokens, 11 pretraining tokens
    reports = [
        actor_report(logprobs[:2], entropy[:2], old[:2], adv[:2], mask[:2], eps, c),
        actor_report(logprobs[2:], entropy[2:], old[2:], adv[2:], mask[2:], eps, c),
        ptx_report(ptx_lp, ptx_mask, gamma, main_count=n_e, ptx_tokens=n_d),
    ]
    assert reports[2][1] == 0  # pretraining tokens are not in the schedule's count
    step_loss = _schedule_step(reports)
    policy, _ = policy_loss(logprobs, old, adv, mask, eps)
    expected = policy - c * (entropy * mask).sum() / n_e + gamma * (-(ptx_lp * ptx_mask).sum() / n_d)
    torch.testing.assert_close(step_loss, expected, atol=1e-12, rtol=0)
    step_loss.backward()
    assert logprobs.grad[~mask].abs().max().item() == 0  # padding gets no gradient
    # the metrics are (sum, count) pairs: their ratio is the mean
    s, n = reports[2][2]["ptx_loss"]
    assert (s / n).item() == pytest.approx((-(ptx_lp * ptx_mask).sum() / n_d).item(), abs=1e-12)


def test_critic_report_is_the_value_loss_sum():
    torch.manual_seed(2)
    values, old, returns = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    loss_sum, count, metrics = critic_report(values, old, returns, mask, 0.2)
    mean, _ = value_loss(values, old, returns, mask, 0.2)
    assert count.item() == 7 and (loss_sum / count).item() == pytest.approx(mean.item(), abs=1e-12)
    assert set(metrics) == {"value_loss", "value_clipfrac"}


@pytest.mark.parametrize(
    "episodes, ratio, expected",
    [(64, 8, 512), (3, 0.5, 2), (45, 0.7, 32), (1, 0.1, 1), (0, 8, 0), (10, 0, 0), (7, 1.0, 7)],
)
def test_ptx_batch_size(episodes, ratio, expected):
    # 3 * 0.5 = 1.5 and 45 * 0.7 = 31.4999... round up; 0.1 keeps at least one example
    assert ptx_batch_size(episodes, ratio) == expected


@pytest.mark.parametrize("episodes, ratio", [(-1, 8), (2.0, 8), (True, 8), (4, -1.0)])
def test_ptx_batch_size_rejects_bad_input(episodes, ratio):
    with pytest.raises(ValueError):
        ptx_batch_size(episodes, ratio)
