"""Checkpoints: atomic save and exact resume (``io``), and the one reader of their metadata
(``meta``: kind, model config, tokenizer; ``load_policy``, ``load_reward_model``)."""

from .io import (
    CheckpointError, check_kind, find_resume_checkpoint, iter_name, latest_checkpoint, load_checkpoint, load_weights, mark_best,
    network_kind, read_meta, resolve_checkpoint, save_checkpoint, start_over,
)
from .meta import (
    check_compatible,
    checkpoint_meta,
    load_policy,
    load_reward_model,
    load_tokenizer,
    model_config_from_meta,
    policy_network,
    with_architecture,
)

__all__ = [
    "CheckpointError", "check_compatible", "check_kind", "checkpoint_meta", "find_resume_checkpoint", "iter_name", "latest_checkpoint",
    "load_checkpoint", "load_policy", "load_reward_model", "load_tokenizer", "load_weights", "mark_best",
    "model_config_from_meta", "network_kind", "policy_network", "start_over", "read_meta", "resolve_checkpoint", "save_checkpoint", "with_architecture",
]
