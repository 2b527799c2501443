"""DPO (Rafailov et al. 2023) on K-way rankings: golden numbers worked out by hand, the ln 2 of a
policy equal to its reference, Plackett-Luce ties, and the sums-with-counts the loop divides."""

import itertools
import math

import pytest
import torch

from megatron_rlhf.algorithms import build_ranking_pairs
from megatron_rlhf.algorithms.dpo import dpo_loss, implicit_rewards, plackett_luce_loss, response_logprob_sums

F64 = torch.float64


def loss_of(policy, ref, rankings, beta=1.0, loss_type="pairwise", **kwargs):
    pairs = build_ranking_pairs(rankings)
    ranks = torch.tensor([r for ranking in rankings for r in ranking])
    return dpo_loss(torch.tensor(policy, dtype=F64), torch.tensor(ref, dtype=F64), ranks, pairs, beta, loss_type, **kwargs)


def test_response_logprob_sums_and_implicit_rewards():
    token_logprobs = torch.tensor([[-9.0, -1.0, -2.0, -7.0], [-9.0, -9.0, -0.5, -0.25]], dtype=F64)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)  # prompt and padding masked
    logps = response_logprob_sums(token_logprobs, mask)
    assert logps.tolist() == [-3.0, -0.75]
    ref = torch.tensor([-2.0, -1.0], dtype=F64)
    assert implicit_rewards(logps, ref, beta=0.5).tolist() == [-0.5, 0.125]
    with pytest.raises(ValueError, match="beta must be > 0"):
        implicit_rewards(logps, ref, beta=0.0)


@pytest.mark.parametrize("loss_type", ["pairwise", "plackett_luce"])
def test_policy_equal_to_reference(loss_type):
    # every implicit reward is 0: each pair's term is ln 2
    policy = [-3.0, -5.0, -1.0, -2.0, -4.0]
    loss, metrics = loss_of(policy, policy, [[1, 2, 2], [2, 1]], beta=0.1, loss_type=loss_type)
    if loss_type == "pairwise":
        assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    else:
        # prompt 0 [1, 2, 2]: response 0 chosen from all three, ln 3; prompt 1 (K = 2): ln 2
        assert loss.item() == pytest.approx((math.log(3) + math.log(2)) / 2, abs=1e-12)
    assert metrics["accuracy"][0].item() == 0.0  # equal rewards count as wrong
    assert metrics["margin"][0].item() == 0.0


def test_pairwise_with_ties_golden():
    # prompt 0, ranks [1, 2, 2]: pairs (0>1), (0>2). rewards (beta = 1, ref 0): 0, 0, -ln 3
    #   terms: -log sigmoid(0) = ln 2,  -log sigmoid(ln 3) = -log(3/4) = ln(4/3)  -> mean ln(8/3) / 2
    # prompt 1, ranks [2, 1]: pair (1>0); rewards ln 2, 0: -log sigmoid(-ln 2) = -log(1/3) = ln 3
    policy = [0.0, 0.0, -math.log(3), math.log(2), 0.0]
    loss, metrics = loss_of(policy, [0.0] * 5, [[1, 2, 2], [2, 1]])
    expected = (math.log(8 / 3) / 2 + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # three pairs: margins 0 (wrong), ln 3 (right), -ln 2 (wrong)
    assert metrics["accuracy"][0].item() == 1.0 and metrics["accuracy"][1] == 3
    # metrics are float32 (as algorithms.ranking's)
    assert metrics["margin"][0].item() == pytest.approx(math.log(3) - math.log(2), abs=1e-6)
    assert metrics["chosen_reward"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["rejected_reward"][0].item() == pytest.approx(-math.log(3) + math.log(2), abs=1e-6)
    # the loss summed over prompts, with the prompt count, is what the loop divides
    assert metrics["loss"][1] == 2 and metrics["loss"][0].item() == pytest.approx(2 * expected, abs=1e-6)


def test_beta_and_reference_enter_as_a_log_ratio():
    # rewards beta * (policy - ref) = 0.5 * ([1, -1] - [-1, 1]) = [1, -1]: -log sigmoid(2)
    loss, _ = loss_of([1.0, -1.0], [-1.0, 1.0], [[1, 2]], beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-12)


def test_plackett_luce_k3_golden():
    # ranks [2, 1, 3]: response 1 best, then 0, then 2. rewards 0, ln 2, -ln 2 (exp: 1, 2, 1/2)
    #   choose 1 from {0, 1, 2}: ln 2 - ln 3.5;  choose 0 from {0, 2}: 0 - ln 1.5
    #   loss = -(ln 2 - ln 3.5 - ln 1.5) / 2 = ln(21/8) / 2
    policy = [0.0, math.log(2), -math.log(2)]
    loss, _ = loss_of(policy, [0.0] * 3, [[2, 1, 3]], loss_type="plackett_luce")
    assert loss.item() == pytest.approx(math.log(21 / 8) / 2, abs=1e-12)


def test_plackett_luce_ties_breslow_golden():
    # ranks [1, 1, 2]: responses 0 and 1 are both chosen from {0, 1, 2}; response 2 (the worst) is not
    # rewards 0, ln 2, ln 3 (exp 1, 2, 3): terms 0 - ln 6, ln 2 - ln 6 -> loss = (2 ln 6 - ln 2) / 2 = ln 18 / 2
    policy = [0.0, math.log(2), math.log(3)]
    loss, _ = loss_of(policy, [0.0] * 3, [[1, 1, 2]], loss_type="plackett_luce")
    assert loss.item() == pytest.approx(math.log(18) / 2, abs=1e-12)
    # ranks [1, 2, 2]: only response 0 is chosen, from all three; a tied worst group has no term
    loss, _ = loss_of(policy, [0.0] * 3, [[1, 2, 2]], loss_type="plackett_luce")
    assert loss.item() == pytest.approx(math.log(6), abs=1e-12)


def brute_force_plackett_luce(rewards, ranking):
    """The likelihood of a strict ranking by its definition: best first, each from those left."""
    order = sorted(range(len(ranking)), key=lambda i: ranking[i])
    nll = 0.0
    for position in range(len(order) - 1):
        left = order[position:]
        nll -= rewards[order[position]] - math.log(sum(math.exp(rewards[j]) for j in left))
    return nll / (len(order) - 1)


def test_plackett_luce_without_ties_is_the_ranking_likelihood_and_k2_is_pairwise():
    g = torch.Generator().manual_seed(0)
    rankings = [[3, 1, 4, 2], [2, 1], [5, 3, 1, 4, 2]]
    n = sum(len(r) for r in rankings)
    policy = torch.randn(n, generator=g, dtype=F64)
    ref = torch.randn(n, generator=g, dtype=F64)
    loss, _ = loss_of(policy.tolist(), ref.tolist(), rankings, beta=0.7, loss_type="plackett_luce")
    rewards = (0.7 * (policy - ref)).tolist()
    per_prompt, start = [], 0
    for ranking in rankings:
        per_prompt.append(brute_force_plackett_luce(rewards[start : start + len(ranking)], ranking))
        start += len(ranking)
    assert loss.item() == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-12)
    # K = 2: Plackett-Luce is the pairwise loss
    pl, _ = loss_of([0.3, -1.2], [0.1, 0.4], [[2, 1]], beta=0.2, loss_type="plackett_luce")
    pw, _ = loss_of([0.3, -1.2], [0.1, 0.4], [[2, 1]], beta=0.2, loss_type="pairwise")
    assert pl.item() == pytest.approx(pw.item(), abs=1e-14)


@pytest.mark.parametrize("loss_type", ["pairwise", "plackett_luce"])
def test_listing_order_of_responses_does_not_matter(loss_type):
    ranking = [2, 1, 2, 3]
    policy = [0.5, -0.25, 1.5, -2.0]
    base, _ = loss_of(policy, [0.0] * 4, [ranking], loss_type=loss_type)
    for perm in itertools.permutations(range(4)):
        permuted, _ = loss_of([policy[i] for i in perm], [0.0] * 4, [[ranking[i] for i in perm]], loss_type=loss_type)
        assert permuted.item() == pytest.approx(base.item(), abs=1e-12)


@pytest.mark.parametrize("loss_type", ["pairwise", "plackett_luce"])
def test_shards_sum_to_the_global_mean_and_the_gradient_raises_the_preferred(loss_type):
    rankings = [[1, 2, 3], [2, 1, 1], [1, 2]]
    policy = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0, -2.5, -0.7, -0.2], dtype=F64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5, -2.0, -2.0, -2.0, -1.0, -1.0], dtype=F64)
    ranks = torch.tensor([r for ranking in rankings for r in ranking])
    whole, _ = dpo_loss(policy, ref, ranks, build_ranking_pairs(rankings), 0.3, loss_type)
    # two "ranks" of a data-parallel group: prompts 0-1 and prompt 2, each dividing by the global 3
    first, _ = dpo_loss(policy[:6], ref[:6], ranks[:6], build_ranking_pairs(rankings[:2]), 0.3, loss_type, num_prompts=3)
    second, _ = dpo_loss(policy[6:], ref[6:], ranks[6:], build_ranking_pairs(rankings[2:]), 0.3, loss_type, num_prompts=3)
    assert (first + second).item() == pytest.approx(whole.item(), abs=1e-12)
    whole.backward()
    # descending the loss raises the best response's log-prob and lowers the worst's
    assert policy.grad[0] < 0 and policy.grad[2] > 0
    assert policy.grad[6] < 0 and policy.grad[7] > 0


def test_plackett_luce_checks_shapes_and_loss_names():
    pairs = build_ranking_pairs([[1, 2]])
    with pytest.raises(ValueError, match=r"must both be \[2\]"):
        plackett_luce_loss(torch.zeros(3), torch.tensor([1, 2, 3]), pairs)
    with pytest.raises(ValueError, match="unknown DPO loss 'listwise'"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 2]), pairs, 0.1, "listwise")
