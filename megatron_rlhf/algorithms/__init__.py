"""Pure-torch maths of the InstructGPT pipeline: SFT NLL, ranking loss (eq. 1), KL-shaped rewards,
GAE, whitening, and PPO-ptx (eq. 2). No Megatron, no torch.distributed: shard-aware means take
their global denominators as arguments.

Mask convention: every ``*_mask`` is True/1 where a token COUNTS.
Ranking convention: ``ranking[i]`` is the RANK of response i, 1 = best, equal ranks = tie.
"""

from .advantages import (
    gae,
    last_token_index,
    masked_moments,
    moments_to_mean_var,
    shape_rewards,
    whiten,
    whiten_with_moments,
)
from .kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_per_token
from .ppo import actor_report, critic_report, entropy_bonus, policy_loss, ptx_batch_size, ptx_loss, ptx_report, value_loss
from .ranking import RankingPairs, build_ranking_pairs, centering_penalty, ranking_loss, ranking_report, ranking_to_pairs
from .sft import AS_SUM, LossReport, mask_denominator, masked_token_mean, sft_loss, sft_report, token_logprobs_from_logits

__all__ = [
    "AS_SUM",
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "LossReport",
    "RankingPairs",
    "actor_report",
    "build_ranking_pairs",
    "centering_penalty",
    "critic_report",
    "entropy_bonus",
    "gae",
    "kl_per_token",
    "last_token_index",
    "mask_denominator",
    "masked_moments",
    "masked_token_mean",
    "moments_to_mean_var",
    "policy_loss",
    "ptx_batch_size",
    "ptx_loss",
    "ptx_report",
    "ranking_loss",
    "ranking_report",
    "ranking_to_pairs",
    "sft_loss",
    "sft_report",
    "shape_rewards",
    "token_logprobs_from_logits",
    "value_loss",
    "whiten",
    "whiten_with_moments",
]
