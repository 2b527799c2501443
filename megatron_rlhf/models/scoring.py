"""Per-action outputs of whole sequences, forward only: log-probs (policy, reference) and
values (critic), at any TP/PP layout.

For tokens ``[b, s]`` action ``t`` is token ``t + 1``, so both return ``[b, s - 1]`` fp32:
``logprobs[:, t] = log pi(tokens[:, t + 1] | tokens[:, :t + 1])`` and ``values[:, t]`` the
critic's value of the state before action ``t``. They run Megatron's forward-only schedule:
the outputs exist on the last pipeline stage and are broadcast to the others, so every
stage holds them (PPO keeps the whole rollout batch on every rank).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch

from megatron_rlhf.data.common import position_ids
from megatron_rlhf.models.logprobs import token_logprobs
from megatron_rlhf.models.schedule import broadcast_from_last_stage, forward_collect


class TokenBatch(NamedTuple):
    tokens: torch.Tensor  # [b, s] long, right-padded


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return position_ids(tokens.shape[0], tokens.shape[1]).to(tokens.device)


def _logprob_forward(model, batch: TokenBatch, *, vocab_size, temperature):
    logits = model(batch.tokens, positions(batch.tokens), None)
    return logits, lambda logits: token_logprobs(logits[:, :-1], batch.tokens[:, 1:], vocab_size, temperature)


def _value_forward(model, batch: TokenBatch):
    values = model(batch.tokens, positions(batch.tokens), None)
    return values, lambda values: values.squeeze(-1)[:, :-1].float()


@torch.no_grad()
def _per_action(model, tokens, micro_batch_size, forward_fn):
    chunks = [TokenBatch(t) for t in tokens.split(micro_batch_size)]
    outputs = forward_collect(model, chunks, forward_fn)
    result = torch.cat(outputs).float() if outputs is not None else None
    return broadcast_from_last_stage(result, (tokens.shape[0], tokens.shape[1] - 1))


def sequence_logprobs(model, tokens: torch.Tensor, vocab_size: int, micro_batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of every next token, ``[b, s-1]``, from vocab-parallel logits (no gather), under
    ``softmax(logits / temperature)`` (1: the model's own distribution)."""
    return _per_action(model, tokens, micro_batch_size, partial(_logprob_forward, vocab_size=vocab_size, temperature=temperature))


def sequence_values(model, tokens: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Critic value of the state before every action, ``[b, s-1]``."""
    return _per_action(model, tokens, micro_batch_size, _value_forward)
