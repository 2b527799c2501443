"""InstructGPT eq. 1: pair extraction (rank 1 = best), vectorised loss vs brute force, golden numbers."""

import itertools
import math
import random

import pytest
import torch

from megatron_rlhf.algorithms import build_ranking_pairs, ranking_loss, ranking_to_pairs


def loss_from_rankings(rewards, rankings, **kwargs):
    pairs = build_ranking_pairs(rankings)
    return ranking_loss(rewards, pairs.winner, pairs.loser, pairs.prompt, **kwargs)


def brute_force_loss(rewards, rankings):
    """Straight from eq. 1: per prompt, mean over its strictly ordered pairs; then mean over prompts."""
    per_prompt, start = [], 0
    for ranking in rankings:
        terms = []
        for i, j in itertools.combinations(range(len(ranking)), 2):
            if ranking[i] == ranking[j]:
                continue
            better, worse = (i, j) if ranking[i] < ranking[j] else (j, i)
            margin = rewards[start + better] - rewards[start + worse]
            terms.append(-math.log(1.0 / (1.0 + math.exp(-margin))))
        per_prompt.append(sum(terms) / len(terms))
        start += len(ranking)
    return sum(per_prompt) / len(per_prompt)


def test_ranking_to_pairs_convention_rank1_is_best():
    assert ranking_to_pairs([1, 2]) == [(0, 1)]
    assert ranking_to_pairs([2, 1]) == [(1, 0)]
    # response 1 best, then 2, then 0
    assert ranking_to_pairs([3, 1, 2]) == [(1, 0), (2, 0), (1, 2)]
    assert len(ranking_to_pairs(list(range(1, 10)))) == 36  # C(9, 2)


def test_ranking_to_pairs_ties_give_no_pair():
    # A > B > C = D
    assert ranking_to_pairs([1, 2, 3, 3]) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    # InstructGPT-style "D > C > A = B": ranks A=3, B=3, C=2, D=1
    assert ranking_to_pairs((3, 3, 2, 1)) == [(2, 0), (3, 0), (2, 1), (3, 1), (3, 2)]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1], "K >= 2"),
        ([], "K >= 2"),
        ([2, 2, 2], "tied"),
        ([1, 2.0], "integers"),
        ([True, False], "integers"),
        (["1", "2"], "integers"),
        ([0, 1], "start at 1"),
        ("12", "list or tuple"),
        (torch.tensor([1, 2]), "list or tuple"),
    ],
)
def test_ranking_to_pairs_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        ranking_to_pairs(bad)


def test_build_ranking_pairs_offsets():
    pairs = build_ranking_pairs([[1, 2], [3, 1, 2]])
    # second prompt's pairs [(1,0), (2,0), (1,2)] shifted by its offset 2
    assert pairs.offsets.tolist() == [0, 2, 5]
    assert pairs.winner.tolist() == [0, 3, 4, 3]
    assert pairs.loser.tolist() == [1, 2, 2, 4]
    assert pairs.prompt.tolist() == [0, 1, 1, 1]
    assert pairs.num_prompts == 2 and pairs.num_responses == 5


def test_build_ranking_pairs_names_bad_prompt():
    with pytest.raises(ValueError, match="prompt 1: .*tied"):
        build_ranking_pairs([[1, 2], [1, 1]])


def test_golden_k2():
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # -log sigmoid(1) = log(1 + e^-1)
    loss, _ = loss_from_rankings(rewards, [[1, 2]])
    assert loss.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    # ranking reversed: -log sigmoid(-1) = log(1 + e)
    loss, _ = loss_from_rankings(rewards, [[2, 1]])
    assert loss.item() == pytest.approx(1.3132616875182228, abs=1e-12)


def test_golden_k3():
    # rewards follow the ranking: margins 1 (A-B), 2 (A-C), 1 (B-C)
    # (2 log(1 + e^-1) + log(1 + e^-2)) / C(3,2) = (0.626523375 + 0.126928011) / 3
    rewards = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    loss, metrics = loss_from_rankings(rewards, [[1, 2, 3]])
    assert loss.item() == pytest.approx(0.25115046202647273, abs=1e-12)
    assert metrics["accuracy"].item() == 1.0


def test_golden_batch_and_metrics():
    # prompt 0 (K=2) ranked against its rewards: margin -1; prompt 1 is the K=3 case above
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    loss, metrics = loss_from_rankings(rewards, [[2, 1], [1, 2, 3]])
    assert loss.item() == pytest.approx((1.3132616875182228 + 0.25115046202647273) / 2, abs=1e-12)
    # pairs: chosen [0, 2, 2, 1], rejected [1, 1, 0, 0], margins [-1, 1, 2, 1]
    assert metrics["accuracy"].item() == pytest.approx(0.75, abs=1e-7)
    assert metrics["chosen_reward"].item() == pytest.approx(1.25, abs=1e-7)
    assert metrics["rejected_reward"].item() == pytest.approx(0.5, abs=1e-7)
    assert metrics["margin"].item() == pytest.approx(0.75, abs=1e-7)
    assert all(not value.requires_grad for value in metrics.values())


@pytest.mark.parametrize("ks", [(2,), (4,), (9,), (2, 4, 9), (3, 9, 2, 4)])
def test_matches_brute_force_random(ks):
    rng = random.Random(sum(ks) * 31 + len(ks))
    rankings = []
    for k in ks:
        ranking = list(range(1, k + 1))
        rng.shuffle(ranking)
        rankings.append(ranking)
    rewards = torch.tensor([rng.gauss(0.0, 2.0) for _ in range(sum(ks))], dtype=torch.float64)
    loss, _ = loss_from_rankings(rewards, rankings)
    assert loss.item() == pytest.approx(brute_force_loss(rewards.tolist(), rankings), abs=1e-10)


def test_matches_brute_force_with_ties():
    # tied prompts have fewer than C(K,2) pairs and are averaged over the pairs they have
    rankings = [[1, 2, 3, 3], [3, 3, 2, 1], [1, 1, 2], [2, 1, 4, 4, 1, 3, 2, 5, 5]]
    rng = random.Random(7)
    rewards = torch.tensor([rng.gauss(0.0, 1.0) for _ in range(sum(map(len, rankings)))], dtype=torch.float64)
    loss, _ = loss_from_rankings(rewards, rankings)
    assert loss.item() == pytest.approx(brute_force_loss(rewards.tolist(), rankings), abs=1e-10)


def test_data_parallel_shards_sum_to_global_loss():
    rankings = [[1, 2], [2, 1, 3, 3], [4, 3, 2, 1], [1, 2, 3]]
    rng = random.Random(3)
    rewards = [rng.gauss(0.0, 1.0) for _ in range(sum(map(len, rankings)))]
    global_loss, _ = loss_from_rankings(torch.tensor(rewards, dtype=torch.float64), rankings)
    split = len(rankings[0]) + len(rankings[1])
    shard_a, _ = loss_from_rankings(torch.tensor(rewards[:split], dtype=torch.float64), rankings[:2], num_prompts=4)
    shard_b, _ = loss_from_rankings(torch.tensor(rewards[split:], dtype=torch.float64), rankings[2:], num_prompts=4)
    assert (shard_a + shard_b).item() == pytest.approx(global_loss.item(), abs=1e-12)


def test_gradient_golden_k2_and_gradcheck():
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss, _ = loss_from_rankings(rewards, [[1, 2]])
    loss.backward()
    # d/dr_w [-log sigmoid(r_w - r_l)] = -sigmoid(-(r_w - r_l)) = -1 / (1 + e)
    torch.testing.assert_close(rewards.grad, torch.tensor([-0.2689414213699951, 0.2689414213699951], dtype=torch.float64))

    pairs = build_ranking_pairs([[2, 1, 3, 3], [1, 2, 3]])
    rewards = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r: ranking_loss(r, pairs.winner, pairs.loser, pairs.prompt)[0], (rewards,)
    )


def test_large_margins_stay_finite():
    rewards = torch.tensor([-500.0, 500.0], requires_grad=True)
    loss, _ = loss_from_rankings(rewards, [[1, 2]])
    loss.backward()
    assert loss.item() == pytest.approx(1000.0, rel=1e-6)
    assert torch.isfinite(rewards.grad).all()


def test_ranking_loss_input_checks():
    pairs = build_ranking_pairs([[1, 2]])
    with pytest.raises(ValueError, match="1-D"):
        ranking_loss(torch.zeros(2, 1), pairs.winner, pairs.loser, pairs.prompt)
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one"):
        ranking_loss(torch.zeros(2), empty, empty, empty)
