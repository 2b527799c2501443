"""Direct Preference Optimization (Rafailov et al., 2023) on K-way rankings.

DPO trains the policy directly on preferences, with no reward model: the reward is
IMPLICIT in the policy's log-ratio to a frozen reference (DPO eq. 5),

    r(x, y) = beta * [ log pi_theta(y|x) - log pi_ref(y|x) ]

where ``log pi(y|x)`` is the sum of the response tokens' log-probs (eos included). Two
losses over a prompt's K ranked responses:

* ``pairwise`` (DPO eq. 7 on every pair): InstructGPT eq. 1 with the implicit reward in
  place of the RM's,

      loss = 1/P * sum_p [ -1/n_p * sum_{(w,l) in pairs(p)} log sigmoid(r_w - r_l) ]

  over all n_p strictly ordered pairs of prompt p (C(K,2) without ties), each prompt's pairs
  averaged, then the prompts; the pairs and the sum are ``algorithms.ranking``'s.
* ``plackett_luce`` (DPO appendix A.3): the negative log-likelihood of the ranking under the
  Plackett-Luce model, responses chosen best-first, each from those not yet chosen,

      loss_p = -1/m_p * sum_{i chosen} [ r_i - log sum_{j in R(i)} exp(r_j) ]

  Ties (Breslow, 1974): the risk set R(i) of response i is every response of its prompt ranked
  no better than i, its own tie group included, so tied responses are chosen "together" from
  the same set and the loss does not depend on the order they are listed in. The responses of
  the WORST rank are never chosen over anything (without ties the last term is log 1 = 0) and
  contribute no term. ``m_p`` is the number of chosen responses (K - 1 without ties): each
  prompt counts once, as with the pairwise weighting, and K = 2 gives exactly the pairwise loss.
  For a fixed K this is the paper's loss divided by K - 1.

Both report the same pair metrics: ``accuracy`` (the preferred response of a pair has the
higher implicit reward; equal rewards count as wrong), ``margin`` (mean r_w - r_l),
``chosen_reward`` and ``rejected_reward``, averaged over pairs.

Ranking convention: as ``algorithms.ranking`` (rank 1 = best, equal ranks = tie); the responses
of prompt p are ``[offsets[p], offsets[p + 1])`` of the flattened response axis.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .ranking import RankingPairs, ranking_loss

DPO_LOSSES = ("pairwise", "plackett_luce")


def response_logprob_sums(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``log pi(y|x)`` of each row: the sum of its response tokens' log-probs.

    Args:
        token_logprobs: ``[N, s]`` log-prob of each next token.
        response_mask: ``[N, s]``, True where the token is part of the response (eos included).

    Returns:
        ``[N]``, in the dtype of ``token_logprobs``.
    """
    if token_logprobs.shape != response_mask.shape:
        raise ValueError(f"token_logprobs shape {tuple(token_logprobs.shape)} != response_mask shape {tuple(response_mask.shape)}")
    return (token_logprobs * response_mask.to(token_logprobs.dtype)).sum(dim=-1)


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO eq. 5: ``beta * (log pi_theta(y|x) - log pi_ref(y|x))``, ``[N]`` from ``[N]`` sequence log-probs."""
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 1:
        raise ValueError(f"policy_logps and ref_logps must be 1-D and equal length, got {tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return beta * (policy_logps - ref_logps.detach())


def response_prompt(pairs: RankingPairs) -> torch.Tensor:
    """``[N]`` prompt index of every response, from ``pairs.offsets``."""
    counts = pairs.offsets[1:] - pairs.offsets[:-1]
    return torch.repeat_interleave(torch.arange(pairs.num_prompts, device=counts.device), counts)


def plackett_luce_loss(
    rewards: torch.Tensor, ranks: torch.Tensor, pairs: RankingPairs, num_prompts: Optional[float] = None
) -> torch.Tensor:
    """The Plackett-Luce ranking loss of the module docstring (Breslow ties), vectorised.

    Args:
        rewards: ``[N]`` reward of every response of every prompt (here the implicit reward).
        ranks: ``[N]`` long, the rank of each response within its prompt (1 = best).
        pairs: ``build_ranking_pairs`` of the same rankings (for the prompt offsets).
        num_prompts: denominator P; default the local number of prompts. Under data
            parallelism pass the GLOBAL count (1 gives the sum over prompts).

    Returns:
        A scalar loss.
    """
    n = pairs.num_responses
    if rewards.shape != (n,) or ranks.shape != (n,):
        raise ValueError(f"rewards {tuple(rewards.shape)} and ranks {tuple(ranks.shape)} must both be [{n}] (the responses of pairs.offsets)")
    prompt = response_prompt(pairs).to(rewards.device)
    same_prompt = prompt[:, None] == prompt[None, :]
    # risk[i, j]: response j is still available when i is chosen (ranked no better than i)
    risk = same_prompt & (ranks[None, :] >= ranks[:, None])
    # i is chosen over something only if some response of its prompt is strictly worse
    chosen = (same_prompt & (ranks[None, :] > ranks[:, None])).any(dim=1)
    log_normaliser = torch.logsumexp(rewards[None, :].masked_fill(~risk, float("-inf")), dim=1)
    terms = (rewards - log_normaliser) * chosen.to(rewards.dtype)
    chosen_per_prompt = torch.zeros(pairs.num_prompts, dtype=rewards.dtype, device=rewards.device)
    chosen_per_prompt.index_add_(0, prompt, chosen.to(rewards.dtype))
    if num_prompts is None:
        num_prompts = float(pairs.num_prompts)
    return -(terms / chosen_per_prompt[prompt]).sum() / num_prompts


def dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    ranks: torch.Tensor,
    pairs: RankingPairs,
    beta: float,
    loss_type: str = "pairwise",
    num_prompts: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, Tuple[torch.Tensor, float]]]:
    """DPO over K-way rankings: the ``pairwise`` or ``plackett_luce`` loss of the module docstring.

    Args:
        policy_logps: ``[N]`` ``log pi_theta(y|x)`` of every response (``response_logprob_sums``).
        ref_logps: ``[N]`` the same under the frozen reference (no gradient flows into it).
        ranks: ``[N]`` long rank of each response within its prompt (1 = best, ties equal).
        pairs: ``build_ranking_pairs`` of the per-prompt rankings, responses in the same order.
        beta: the DPO temperature (> 0).
        loss_type: ``"pairwise"`` or ``"plackett_luce"``.
        num_prompts: denominator P of the mean over prompts; default the local prompt count.
            The training loop passes 1 (the SUM over prompts) and reports the prompt count, so
            its division by the global count is the mean over the global batch.

    Returns:
        ``(loss, metrics)``; metrics map a name to a detached ``(sum, count)`` pair, additive
        over micro-batches and ranks: ``loss`` (summed over prompts, count = prompts) and the
        pair metrics ``accuracy``, ``margin``, ``chosen_reward``, ``rejected_reward``
        (count = pairs).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {', '.join(DPO_LOSSES)}")
    rewards = implicit_rewards(policy_logps, ref_logps, beta)
    if loss_type == "pairwise":
        loss_sum, _ = ranking_loss(rewards, pairs.winner, pairs.loser, pairs.prompt, num_prompts=1.0)
    else:
        loss_sum = plackett_luce_loss(rewards, ranks, pairs, num_prompts=1.0)
    n_pairs, n_prompts = pairs.winner.numel(), pairs.num_prompts
    loss = loss_sum / (n_prompts if num_prompts is None else num_prompts)
    chosen, rejected = rewards[pairs.winner].detach().float(), rewards[pairs.loser].detach().float()
    margins = chosen - rejected
    metrics = {
        "loss": (loss_sum.detach().float(), n_prompts),
        "accuracy": ((margins > 0).float().sum(), n_pairs),
        "margin": (margins.sum(), n_pairs),
        "chosen_reward": (chosen.sum(), n_pairs),
        "rejected_reward": (rejected.sum(), n_pairs),
    }
    return loss, metrics


def dpo_report(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor, pairs: RankingPairs, beta: float, loss_type: str = "pairwise"):
    """:func:`dpo_loss` as the schedule takes it (``sft.LossReport``): the SUM over this
    micro-batch's prompts, counted in prompts, so the step is the mean over the global batch."""
    loss_sum, metrics = dpo_loss(policy_logps, ref_logps, ranks, pairs, beta, loss_type, num_prompts=1.0)
    return loss_sum, pairs.num_prompts, metrics
