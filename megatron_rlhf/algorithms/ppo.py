"""PPO-clip losses (Schulman et al. 2017) and the PPO-ptx objective (InstructGPT eq. 2).

Token tensors are ``[batch, seq]``; ``mask`` is True on the response tokens that count. Every
masked mean takes an optional ``num_tokens``: pass the global token count under data
parallelism and the per-rank losses and metrics sum to the global means.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from .kl import kl_loss, kl_per_token
from .sft import AS_SUM, LossReport, TokenCount, masked_token_mean, sft_loss

Metrics = Dict[str, torch.Tensor]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    num_tokens: TokenCount = None,
) -> Tuple[torch.Tensor, Metrics]:
    """PPO-clip surrogate (Schulman et al. 2017, eq. 7), negated to be minimised.

        ratio_t = exp(logprobs_t - old_logprobs_t)
        loss_t  = -min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)
        loss    = masked mean of loss_t

    Args:
        logprobs: ``[batch, seq]`` current policy log-probs of the sampled tokens (with grad).
        old_logprobs: ``[batch, seq]`` rollout-time log-probs (constants).
        advantages: ``[batch, seq]`` (constants, usually whitened GAE).
        mask: ``[batch, seq]``.
        clip_eps: epsilon of the clip range.
        num_tokens: global denominator (see module docstring).

    Returns:
        ``(loss, metrics)`` with detached masked means:
        ``clipfrac``: fraction of tokens where the clipped term is the binding one (its
        gradient is zero), i.e. ratio beyond 1+eps with A > 0 or below 1-eps with A < 0;
        ``approx_kl``: KL(pi_old || pi) via the k3 estimator ``(r - 1) - log r``
        (r = ratio), unbiased and >= 0 because tokens were sampled from pi_old;
        ``ratio_mean``: mean importance ratio.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)

    with torch.no_grad():
        clip_active = (clipped > unclipped).to(ratio.dtype)
        metrics = {
            "policy_loss": loss.detach(),
            "clipfrac": masked_token_mean(clip_active, mask, num_tokens),
            # KL(old || new): samples come from old, so old plays the "policy" role of k3
            "approx_kl": masked_token_mean(kl_per_token(old_logprobs, logprobs, "k3"), mask, num_tokens),
            "ratio_mean": masked_token_mean(ratio, mask, num_tokens),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: Optional[float] = 0.2,
    num_tokens: TokenCount = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Clipped value loss (the PPO2 baselines form used with Schulman et al. 2017).

        v_clip_t = old_values_t + clip(values_t - old_values_t, -eps, +eps)
        loss_t   = 0.5 * max((values_t - R_t)^2, (v_clip_t - R_t)^2)
        loss     = masked mean of loss_t

    Clipping bounds how far one PPO epoch can move the critic away from its rollout-time
    prediction; ``clip_eps=None`` disables it (plain 0.5 * MSE).

    Args:
        values: ``[batch, seq]`` current critic predictions (with grad).
        old_values: ``[batch, seq]`` rollout-time predictions (constants).
        returns: ``[batch, seq]`` value targets, e.g. GAE returns (constants).
        mask: ``[batch, seq]``.
        clip_eps: absolute clip range in value units, or None.
        num_tokens: global denominator.

    Returns:
        ``(loss, metrics)``: ``value_clipfrac`` (fraction of tokens where the clipped error
        is the larger one), ``value_mean``, ``value_mse`` (unclipped mean squared error).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    unclipped_sq = (values - returns).square()
    if clip_eps is None:
        clipped_sq = unclipped_sq
    else:
        if clip_eps <= 0:
            raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped_sq = (clipped_values - returns).square()
    loss = 0.5 * masked_token_mean(torch.maximum(unclipped_sq, clipped_sq), mask, num_tokens)

    with torch.no_grad():
        metrics = {
            "value_loss": loss.detach(),
            "value_clipfrac": masked_token_mean((clipped_sq > unclipped_sq).to(values.dtype), mask, num_tokens),
            "value_mean": masked_token_mean(values, mask, num_tokens),
            "value_mse": masked_token_mean(unclipped_sq, mask, num_tokens),
        }
    return loss, metrics


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, coef: float, num_tokens: TokenCount = None
) -> Tuple[torch.Tensor, Metrics]:
    """Loss term ``-coef * masked_mean(entropy)``; adding it to a loss rewards exploration.

    Args:
        entropy: ``[batch, seq]`` per-token entropy (``models.logprobs.vocab_parallel_entropy``).
        mask, num_tokens: as in ``policy_loss``.
        coef: entropy coefficient (>= 0).

    Returns:
        ``(loss_term, {"entropy": mean entropy})``.
    """
    mean_entropy = masked_token_mean(entropy, mask, num_tokens)
    return -coef * mean_entropy, {"entropy": mean_entropy.detach()}


def ptx_loss(ptx_nll_mean: torch.Tensor, coef: float) -> torch.Tensor:
    """Pretraining-mix term of InstructGPT eq. 2, ``gamma * NLL_pretrain`` (gamma = 27.8 there).

    ``ptx_nll_mean`` is the masked mean next-token NLL on pretraining text (``sft.sft_loss``).
    """
    return coef * ptx_nll_mean


def ptx_batch_size(num_episodes: int, ptx_ratio: float) -> int:
    """Pretraining examples to mix with ``num_episodes`` RL episodes.

    ``round(num_episodes * ptx_ratio)`` with halves rounded up (InstructGPT's PPO-ptx uses
    8 pretraining examples per episode, i.e. ``ptx_ratio=8``). Any positive product gives at
    least one example so a small ratio is not silently rounded away.
    """
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, int) or num_episodes < 0:
        raise ValueError(f"num_episodes must be a non-negative int, got {num_episodes!r}")
    if ptx_ratio < 0:
        raise ValueError(f"ptx_ratio must be >= 0, got {ptx_ratio}")
    product = num_episodes * ptx_ratio
    if product == 0:
        return 0
    # tolerance: 45 * 0.7 == 31.499999999999996 must still round like 31.5
    return max(1, math.floor(product + 0.5 + 1e-9))


# ----------------------------------------------------------------------------- the PPO-ptx step
#
# InstructGPT eq. 2, negated, for one actor step over a mini-batch of episodes E and
# pretraining sequences D:
#
#     loss = mean_{t in E} clipped surrogate_t - entropy_coef * mean_{t in E} H_t
#            + gamma * mean_{t in D} nll_t
#
# Episodes and pretraining sequences are separate micro-batches of one schedule call, and the
# schedule divides the summed gradients by ONE global count, the episode tokens N_E. So an
# episode micro-batch reports its sums with its token count, and a pretraining micro-batch
# reports ``gamma * (N_E / N_D) * sum nll`` with count 0: after the division by N_E that is
# ``gamma * mean_D nll``. N_E and N_D are global (summed over data-parallel ranks).


def actor_report(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float,
    entropy_coef: float,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> LossReport:
    """An episode micro-batch of the actor step: clipped surrogate (``policy_loss``) minus the
    entropy bonus (``entropy_bonus``), plus ``kl_coef`` x the KL to the reference as a loss term
    (``kl.kl_loss``; GRPO's form, when ``ref_logprobs`` is given), as sums over its response
    tokens, counted in tokens. ``entropy`` may be detached when ``entropy_coef`` is 0 (it is
    then only a metric)."""
    loss_sum, m = policy_loss(logprobs, old_logprobs, advantages, action_mask, clip_eps, num_tokens=AS_SUM)
    bonus, em = entropy_bonus(entropy, action_mask, entropy_coef, num_tokens=AS_SUM)
    if entropy_coef:
        loss_sum = loss_sum + bonus
    n = action_mask.sum()
    metrics = {
        "policy_loss": (m["policy_loss"], n),
        "clipfrac": (m["clipfrac"], n),
        "approx_kl": (m["approx_kl"], n),
        "entropy": (em["entropy"], n),
    }
    if ref_logprobs is not None:
        kl_sum, km = kl_loss(logprobs, ref_logprobs, action_mask, kl_estimator, num_tokens=AS_SUM)
        loss_sum = loss_sum + kl_coef * kl_sum
        metrics["kl_loss"] = (km["kl_loss"], n)
    return loss_sum, n, metrics


def ptx_report(token_logprobs: torch.Tensor, loss_mask: torch.Tensor, ptx_coef: float, main_count: float, ptx_tokens: float) -> LossReport:
    """A pretraining micro-batch of the actor step: ``gamma * (N_E / N_D) * sum nll`` with count
    0 (see above), so the step adds ``ptx_loss(mean_D nll, gamma)``. The metric ``ptx_loss`` is
    the pretraining NLL itself (sum, tokens), logged even when gamma is 0.

    ``main_count`` is the global count the schedule divides by: PPO's episode tokens N_E, or
    for any other loss mixed with pretraining text its own global count (DPO: the prompts)."""
    nll_sum, _ = sft_loss(-token_logprobs, loss_mask, num_tokens=AS_SUM)
    loss_sum = ptx_loss(nll_sum, ptx_coef * (main_count / max(ptx_tokens, 1.0)))
    return loss_sum, 0, {"ptx_loss": (nll_sum.detach(), loss_mask.sum())}


def critic_report(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor, clip_eps: Optional[float]) -> LossReport:
    """A micro-batch of the critic step: the clipped value loss (``value_loss``) as a sum over
    its response tokens, counted in tokens."""
    loss_sum, m = value_loss(values, old_values, returns, action_mask, clip_eps, num_tokens=AS_SUM)
    n = action_mask.sum()
    return loss_sum, n, {"value_loss": (loss_sum.detach(), n), "value_clipfrac": (m["value_clipfrac"], n)}
