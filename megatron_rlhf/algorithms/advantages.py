"""Per-token rewards (InstructGPT eq. 2), GAE (Schulman et al. 2016), the critic-free group
baselines GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024), and masked whitening.

Shapes: ``[batch, seq]`` tensors aligned so that position t holds the quantities of the t-th
generated token; ``response_mask`` is True on the tokens that count (the response), False on
prompt and padding. The group estimators work on ``[batch]`` sequence rewards whose rows are
grouped by prompt: rows ``[g * group_size, (g + 1) * group_size)`` are the samples of prompt g.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .kl import kl_per_token


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``[batch]`` index of the last True position of each row of a ``[batch, seq]`` mask."""
    mask = mask.bool()
    if not mask.any(dim=1).all():
        empty_rows = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty_rows} have no valid response token; every response needs >= 1 token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def shape_rewards(
    rm_scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT eq. 2 as per-token rewards for PPO.

        reward_t = -kl_coef * KL_t                      on every response token
        reward_T += rm_score                            at the LAST response token T

    Summed over a response with the k1 estimator this is exactly
    ``r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))``. The pretraining term of eq. 2 is
    a separate loss (``ppo.ptx_report``).

    Args:
        rm_scores: ``[batch]`` reward-model score of each full response.
        logprobs, ref_logprobs: ``[batch, seq]`` sampled tokens' log-probs under the rollout
            policy and the reference (SFT) model; pass detached tensors, rewards are constants.
        response_mask: ``[batch, seq]``; each row needs at least one True.
        kl_coef: beta, a number (e.g. ``controller.value``).
        estimator: per-token KL estimator name (``kl.KL_ESTIMATORS``).

    Returns:
        ``(rewards, kl)``, both ``[batch, seq]`` and zero outside ``response_mask``.
    """
    if rm_scores.dim() != 1 or rm_scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"rm_scores must be [batch]={logprobs.shape[0]}, got shape {tuple(rm_scores.shape)}")
    mask_f = response_mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask_f
    rewards = -kl_coef * kl
    last = last_token_index(response_mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += rm_scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                              (lambda-return, the value target)

    Each response is a bandit episode: the value after its last valid token is 0. Masked
    positions are skipped, not treated as steps, so right padding, left padding and prompt
    tokens never leak their (garbage) rewards or values into valid positions.

    Args:
        rewards: ``[batch, seq]`` per-token rewards (e.g. from ``shape_rewards``).
        values: ``[batch, seq]`` value estimates V_t of the rollout-time critic.
        response_mask: ``[batch, seq]``.
        gamma, lam: discount and GAE lambda (for RLHF typically gamma = 1, lam = 0.95).

    Returns:
        ``(advantages, returns)``, ``[batch, seq]``, zero outside the mask. Not differentiable
        by design: PPO treats them as constants.
    """
    if not (rewards.shape == values.shape == response_mask.shape):
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must have the same [batch, seq] shape"
        )
    rewards = rewards.detach()
    values = values.detach()
    mask = response_mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
        # carry the recursion state across masked positions unchanged
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    returns = (advantages + values) * mask.to(values.dtype)
    return advantages, returns


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum, sum_of_squares, count)`` of ``values`` over the mask, in float64.

    These are additive across shards: all-reduce (SUM) them over data-parallel ranks, then call
    ``moments_to_mean_var`` to get global statistics. float64 keeps ``sum_sq - sum**2 / n``
    from cancelling catastrophically when the mean is large relative to the spread.
    """
    mask_f = mask.to(torch.float64)
    values64 = values.detach().to(torch.float64) * mask_f
    return values64.sum(), values64.square().sum(), mask_f.sum()


def moments_to_mean_var(
    total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor, unbiased: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from ``masked_moments`` sums (possibly all-reduced).

    ``unbiased`` applies Bessel's correction (n - 1). With fewer than two tokens the variance
    is reported as 0 rather than NaN/inf.
    """
    n = count.clamp(min=1.0)
    mean = total / n
    sum_sq_dev = (total_sq - total * mean).clamp(min=0.0)
    denom = (count - 1.0).clamp(min=1.0) if unbiased else n
    return mean, sum_sq_dev / denom


def whiten_with_moments(
    values: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` on masked tokens, 0 elsewhere.

    With ``shift_mean=False`` the mean is added back, so only the scale changes (used for
    rewards, whose sign carries meaning).
    """
    mean = torch.as_tensor(mean, dtype=torch.float64, device=values.device)
    var = torch.as_tensor(var, dtype=torch.float64, device=values.device)
    whitened = (values.to(torch.float64) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return (whitened * mask.to(torch.float64)).to(values.dtype)


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    moments: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Masked whitening of ``values`` (e.g. advantages) over the tokens of ``mask``.

    Statistics are local by default. For global-batch whitening under data parallelism,
    compute ``masked_moments``, all-reduce the three sums, and pass them as ``moments``
    (a global token count alone is not enough: the mean and variance must be global too).

    Args:
        values, mask: ``[batch, seq]``.
        shift_mean: subtract the mean (True) or only rescale (False).
        unbiased: Bessel-corrected variance.
        eps: added to the variance.
        moments: optional ``(sum, sum_of_squares, count)`` to use instead of local ones.

    Returns:
        ``[batch, seq]`` whitened values, 0 outside the mask, same dtype as ``values``.
    """
    if moments is None:
        moments = masked_moments(values, mask)
    mean, var = moments_to_mean_var(*moments, unbiased=unbiased)
    return whiten_with_moments(values, mask, mean, var, shift_mean=shift_mean, eps=eps)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` ``[batch]`` as ``[batch / group_size, group_size]`` in float64, checked."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [batch] (one reward per sample), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group baseline needs at least 2 samples per prompt")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (samples per prompt)")
    return rewards.detach().to(torch.float64).view(-1, group_size)


def _zero_equal_groups(advantages: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Exactly 0 for a group whose rewards are all equal: its mean may differ from the value by
    an ulp, which the std division would blow up into a spurious +-1 pattern."""
    equal = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(advantages), advantages)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-normalised advantage (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision).

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      (scale_by_std=True)
        A_i =  r_i - mean(r_group)                              (scale_by_std=False; Dr. GRPO,
                                                                 Liu et al. 2025: no difficulty bias)

    ``std`` is Bessel-corrected (n - 1), as ``torch.std``. A group whose rewards are all equal
    gets advantage exactly 0 (it has nothing to compare). The same advantage applies to every
    token of sample i (``expand_to_tokens``).

    Args:
        rewards: ``[batch]`` sequence rewards, grouped by prompt (see module docstring).
        group_size: samples per prompt (>= 2).
        scale_by_std: divide by the group's standard deviation.
        eps: added to the std.

    Returns:
        ``[batch]`` advantages, detached, in the dtype of ``rewards``.
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return _zero_equal_groups(centred, groups).reshape(-1).to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, eq. 6).

        A_i = r_i - 1/(k-1) * sum_{j != i} r_j  =  k/(k-1) * (r_i - mean(r_group))

    with k = ``group_size``: each sample's baseline is the mean reward of the OTHER samples of
    its prompt, so it is unbiased. Equal rewards in a group give advantage 0.

    Returns:
        ``[batch]`` advantages, detached, in the dtype of ``rewards``.
    """
    groups = _groups(rewards, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return _zero_equal_groups(groups - baseline, groups).reshape(-1).to(rewards.dtype)


def expand_to_tokens(sequence_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[batch]`` per-sample values (a group advantage) on every response token: ``[batch, seq]``,
    zero outside ``response_mask``."""
    if sequence_values.dim() != 1 or sequence_values.shape[0] != response_mask.shape[0]:
        raise ValueError(f"sequence_values must be [batch]={response_mask.shape[0]}, got shape {tuple(sequence_values.shape)}")
    return sequence_values[:, None] * response_mask.to(sequence_values.dtype)
