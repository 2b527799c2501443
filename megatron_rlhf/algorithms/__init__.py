"""Pure-torch maths of the InstructGPT pipeline: SFT NLL, ranking loss (eq. 1), KL-shaped rewards,
GAE, whitening, and PPO-ptx (eq. 2); beyond it, DPO on K-way rankings and the critic-free
GRPO/RLOO advantages with a KL loss term. No Megatron, no torch.distributed: shard-aware means take
their global denominators as arguments.

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
from .ppo import (
    entropy_bonus,
    entropy_from_logits,
    policy_loss,
    ppo_ptx_objective,
    ptx_batch_size,
    ptx_loss,
    value_loss,
)
from .ranking import RankingPairs, build_ranking_pairs, ranking_loss, ranking_to_pairs
from .sft import mask_denominator, masked_token_mean, sft_loss, token_logprobs_from_logits

__all__ = [
    "DPO_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "RankingPairs",
    "build_ranking_pairs",
    "dpo_loss",
    "entropy_bonus",
    "entropy_from_logits",
    "expand_to_tokens",
    "gae",
    "grpo_advantages",
    "implicit_rewards",
    "kl_loss",
    "kl_per_token",
    "last_token_index",
    "mask_denominator",
    "masked_moments",
    "masked_token_mean",
    "moments_to_mean_var",
    "plackett_luce_loss",
    "policy_loss",
    "ppo_ptx_objective",
    "ptx_batch_size",
    "ptx_loss",
    "ranking_loss",
    "ranking_to_pairs",
    "response_logprob_sums",
    "rloo_advantages",
    "sft_loss",
    "shape_rewards",
    "token_logprobs_from_logits",
    "value_loss",
    "whiten",
    "whiten_with_moments",
]
