"""Pure-torch maths of the InstructGPT pipeline and its peers: SFT NLL, ranking loss (eq. 1),
DPO (pairwise and Plackett-Luce), KL estimators and KL-shaped rewards, GAE, GRPO and RLOO
advantages, whitening, and PPO-ptx (eq. 2). No Megatron, no torch.distributed: shard-aware
means take their global denominators as arguments, and each loss has a ``*_report`` builder
returning ``(sum, count, metrics)`` for Megatron's schedule.

Mask convention: every ``*_mask`` is True/1 where a token COUNTS.
Ranking convention: ``ranking[i]`` is the RANK of response i, 1 = best, equal ranks = tie.
"""

from .advantages import (
    expand_to_tokens,
    gae,
    grpo_advantages,
    last_token_index,
    masked_moments,
    moments_to_mean_var,
    rloo_advantages,
    shape_rewards,
    whiten,
    whiten_with_moments,
)
from .dpo import DPO_LOSSES, dpo_loss, implicit_rewards, plackett_luce_loss, response_logprob_sums
from .kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_loss, kl_per_token
from .ppo import actor_report, critic_report, entropy_bonus, policy_loss, ptx_batch_size, ptx_loss, ptx_report, value_loss
from .ranking import RankingPairs, build_ranking_pairs, centering_penalty, ranking_loss, ranking_report, ranking_to_pairs
from .sft import AS_SUM, LossReport, mask_denominator, masked_token_mean, sft_loss, sft_report, token_logprobs_from_logits

__all__ = [
    "AS_SUM", "AdaptiveKLController", "DPO_LOSSES", "FixedKLController", "KL_ESTIMATORS", "LossReport", "RankingPairs",
    "actor_report", "build_ranking_pairs", "centering_penalty", "critic_report", "dpo_loss", "entropy_bonus", "expand_to_tokens",
    "gae", "grpo_advantages", "implicit_rewards", "kl_loss", "kl_per_token", "last_token_index", "mask_denominator",
    "masked_moments", "masked_token_mean", "moments_to_mean_var", "plackett_luce_loss", "policy_loss", "ptx_batch_size",
    "ptx_loss", "ptx_report", "ranking_loss", "ranking_report", "ranking_to_pairs", "response_logprob_sums", "rloo_advantages",
    "sft_loss", "sft_report", "shape_rewards", "token_logprobs_from_logits", "value_loss", "whiten", "whiten_with_moments",
]
