"""Reward-model ranking loss over K-way comparisons (InstructGPT eq. 1).

    loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l) ~ D}[ log sigmoid(r_theta(x, y_w) - r_theta(x, y_l)) ]

All K responses of a prompt are scored in ONE forward pass and every ordered pair of that
prompt contributes, weighted so that each prompt counts once (InstructGPT trains on all
C(K,2) pairs of a prompt as a single batch element to avoid over-fitting).

Ranking convention used throughout this module: a ranking is a list of K integers, one per
response, giving that response's RANK. Rank 1 is the BEST response; a larger rank is worse;
equal ranks are ties. Example: ``[3, 1, 2]`` means response 1 is best, then response 2, then
response 0. Ties produce no pair, so a prompt with ties has fewer than C(K,2) pairs and its
pairs are averaged over the pairs it actually has.
"""

from __future__ import annotations

import numbers
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def ranking_to_pairs(ranking: Sequence[int]) -> List[Tuple[int, int]]:
    """All strictly ordered ``(winner_index, loser_index)`` pairs of one prompt's ranking.

    Args:
        ranking: list/tuple of K >= 2 integers >= 1; ``ranking[i]`` is the rank of
            response i, rank 1 = best, equal ranks = tie (see module docstring).

    Returns:
        Pairs in index order of ``(min(i, j), max(i, j))`` for i < j; tied responses
        yield no pair.

    Raises:
        ValueError: not a list/tuple of ints, K < 2, a rank < 1, or all responses tied.
    """
    if not isinstance(ranking, (list, tuple)):
        raise ValueError(
            f"ranking must be a list or tuple of integer ranks (1 = best), got {type(ranking).__name__}"
            " (convert tensors/arrays with .tolist())"
        )
    for rank in ranking:
        # bool is an Integral in Python but a True/False rank is almost surely a bug
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ValueError(f"ranks must be integers (1 = best), got {rank!r} in {list(ranking)}")
        if rank < 1:
            raise ValueError(f"ranks start at 1 (= best), got {rank} in {list(ranking)}")
    if len(ranking) < 2:
        raise ValueError(f"a ranking needs K >= 2 responses, got K={len(ranking)}: {list(ranking)}")

    pairs = []
    for i in range(len(ranking)):
        for j in range(i + 1, len(ranking)):
            if ranking[i] < ranking[j]:
                pairs.append((i, j))
            elif ranking[j] < ranking[i]:
                pairs.append((j, i))
    if not pairs:
        raise ValueError(f"all {len(ranking)} responses are tied ({list(ranking)}): no comparison to learn from")
    return pairs


class RankingPairs(NamedTuple):
    """Index tensors describing every comparison pair of a batch of prompts.

    ``rewards`` for the batch is the concatenation of each prompt's K responses in order;
    prompt p's responses occupy ``rewards[offsets[p]:offsets[p + 1]]``.
    """

    winner: torch.Tensor  # [num_pairs] long, index into rewards
    loser: torch.Tensor  # [num_pairs] long, index into rewards
    prompt: torch.Tensor  # [num_pairs] long, prompt of each pair in 0..num_prompts-1
    offsets: torch.Tensor  # [num_prompts + 1] long, start of each prompt's responses

    @property
    def num_prompts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_responses(self) -> int:
        return int(self.offsets[-1])


def build_ranking_pairs(rankings: Sequence[Sequence[int]], device=None) -> RankingPairs:
    """Flatten per-prompt rankings (each with its own K) into ``RankingPairs`` index tensors.

    Args:
        rankings: one ranking per prompt (rank 1 = best, ties allowed, see module docstring).
            K is ``len(ranking)`` and may differ between prompts.
        device: where to put the index tensors (default CPU).
    """
    if len(rankings) == 0:
        raise ValueError("need at least one prompt's ranking")
    winners, losers, prompts, offsets = [], [], [], [0]
    for prompt_index, ranking in enumerate(rankings):
        try:
            pairs = ranking_to_pairs(ranking)
        except ValueError as error:
            raise ValueError(f"prompt {prompt_index}: {error}") from None
        start = offsets[-1]
        winners.extend(start + w for w, _ in pairs)
        losers.extend(start + l for _, l in pairs)
        prompts.extend([prompt_index] * len(pairs))
        offsets.append(start + len(ranking))

    def as_long(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return RankingPairs(as_long(winners), as_long(losers), as_long(prompts), as_long(offsets))


def ranking_loss(
    rewards: torch.Tensor,
    pair_winner: torch.Tensor,
    pair_loser: torch.Tensor,
    pair_prompt: torch.Tensor,
    num_prompts: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """InstructGPT eq. 1 for a batch of prompts with K-way rankings (vectorised).

        loss = 1/P * sum_p [ -1/n_p * sum_{(w,l) in pairs(p)} log sigmoid(r_w - r_l) ]

    where ``n_p`` is the number of strictly ordered pairs of prompt p (C(K,2) without ties)
    and P = ``num_prompts``.

    Args:
        rewards: ``[num_responses]`` scalar reward of every response of every prompt.
        pair_winner, pair_loser: ``[num_pairs]`` long indices into ``rewards``.
        pair_prompt: ``[num_pairs]`` long prompt id (>= 0) of each pair; used to count n_p.
        num_prompts: denominator P. Default: the number of distinct prompts in
            ``pair_prompt``. Under data parallelism pass the GLOBAL prompt count so the
            ranks' losses sum to the global loss (each prompt must live on one rank).

    Returns:
        ``(loss, metrics)``. Metrics are local, detached, and averaged over PAIRS (not
        prompts): ``accuracy`` (fraction with r_w > r_l; ties in reward count as wrong),
        ``chosen_reward``, ``rejected_reward``, ``margin`` (mean r_w - r_l).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_responses], got shape {tuple(rewards.shape)}")
    if not (pair_winner.shape == pair_loser.shape == pair_prompt.shape) or pair_winner.dim() != 1:
        raise ValueError(
            "pair_winner, pair_loser and pair_prompt must be 1-D and equal length, got shapes "
            f"{tuple(pair_winner.shape)}, {tuple(pair_loser.shape)}, {tuple(pair_prompt.shape)}"
        )
    if pair_winner.numel() == 0:
        raise ValueError("ranking_loss needs at least one comparison pair")

    chosen = rewards[pair_winner]
    rejected = rewards[pair_loser]
    margins = chosen - rejected
    pairs_per_prompt = torch.bincount(pair_prompt)
    pair_weight = 1.0 / pairs_per_prompt[pair_prompt].to(rewards.dtype)
    if num_prompts is None:
        num_prompts = (pairs_per_prompt > 0).sum().to(rewards.dtype)
    # logsigmoid stays finite for large negative margins where log(sigmoid(.)) underflows
    loss = -(F.logsigmoid(margins) * pair_weight).sum() / num_prompts

    # float32 metrics: a bf16 accuracy of 1/3 would read 0.333984
    margins_detached = margins.detach().float()
    metrics = {
        "loss": loss.detach().float(),
        "accuracy": (margins_detached > 0).float().mean(),
        "chosen_reward": chosen.detach().float().mean(),
        "rejected_reward": rejected.detach().float().mean(),
        "margin": margins_detached.mean(),
    }
    return loss, metrics


def centering_penalty(rewards: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reward centering (Eisenstein et al., 2023): ``sum_p mean_{i in p} r_i^2``, summed over
    the prompts (each prompt's responses are ``rewards[offsets[p]:offsets[p + 1]]``)."""
    sizes = offsets[1:] - offsets[:-1]
    row_prompt = torch.repeat_interleave(torch.arange(sizes.numel(), device=rewards.device), sizes.to(rewards.device))
    per_prompt = torch.zeros(sizes.numel(), dtype=rewards.dtype, device=rewards.device)
    per_prompt.index_add_(0, row_prompt, rewards.square())
    return (per_prompt / sizes.to(rewards.dtype)).sum()


def ranking_report(rewards: torch.Tensor, pairs: RankingPairs, center_coef: float = 0.0):
    """Eq. 1 as the schedule takes it (``sft.LossReport``): the SUM over this micro-batch's
    prompts of each prompt's pair mean (+ ``center_coef`` x :func:`centering_penalty`),
    counted in prompts, so the step is the mean over the global batch's prompts.

    Metrics are counted in pairs: ``accuracy`` (ties in reward count as wrong),
    ``chosen_reward``, ``rejected_reward``, ``margin``.
    """
    loss_sum, _ = ranking_loss(rewards, pairs.winner, pairs.loser, pairs.prompt, num_prompts=1.0)
    if center_coef:
        loss_sum = loss_sum + center_coef * centering_penalty(rewards, pairs.offsets)
    chosen, rejected = rewards[pairs.winner].detach().float(), rewards[pairs.loser].detach().float()
    n_pairs, n_prompts = pairs.winner.numel(), pairs.num_prompts
    return loss_sum, n_prompts, {
        "loss": (loss_sum.detach(), n_prompts),
        "accuracy": (((chosen - rejected) > 0).float().sum(), n_pairs),
        "chosen_reward": (chosen.sum(), n_pairs),
        "rejected_reward": (rejected.sum(), n_pairs),
        "margin": ((chosen - rejected).sum(), n_pairs),
    }
