"""Checkpoints: atomic save and exact resume (``io``), and the one reader of their metadata
(``meta``: kind, model config, tokenizer; ``load_policy``, ``load_reward_model``)."""

from .io import CheckpointError, iter_name, latest_checkpoint, load_checkpoint, load_weights, mark_best, read_meta, resolve_checkpoint, save_checkpoint
from .meta import (
    check_compatible,
    check_kind,
    checkpoint_meta,
    load_policy,
    load_reward_model,
    load_tokenizer,
    model_config_from_meta,
    policy_network,
    with_architecture,
)

__all__ = [
    "CheckpointError", "check_compatible", "check_kind", "checkpoint_meta", "iter_name", "latest_checkpoint",
    "load_checkpoint", "load_policy", "load_reward_model", "load_tokenizer", "load_weights", "mark_best",
    "model_config_from_meta", "policy_network", "read_meta", "resolve_checkpoint", "save_checkpoint", "with_architecture",
]
