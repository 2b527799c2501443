"""Rollouts: the generation engine (``engine``: full prefill, per-slot KV cache, continuous
batching, pipeline groups in flight; ``sampling``; ``stage``: this rank's layers; ``results``)
and the PPO episodes built from them (``episodes``)."""

from .engine import full_recompute_generate, generate, rollout
from .results import Generation, RolloutBatch, padded_batch
from .sampling import prompt_seeds, sample_rows, sample_tokens

__all__ = ["Generation", "RolloutBatch", "full_recompute_generate", "generate", "padded_batch", "prompt_seeds", "rollout", "sample_rows", "sample_tokens"]
