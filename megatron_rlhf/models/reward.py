"""Reading rewards out of a scalar-head GPTModel (the reward model; PPO's critic shares the head).

A reward model is ``build_model(..., scalar_head=True)``: the SFT network with its
unembedding replaced by :class:`~megatron_rlhf.models.builder.ScalarHead`, so a forward
returns ``[b, s, 1]`` values, one per position. The reward of a sequence
``[bos] + prompt + response + [eos]`` is the value at its LAST real token, the eos
(``last_index``): causal attention means that position has read the whole response and
never the right padding after it.

Normalisation (InstructGPT §3.5: "the reward model is normalised so that the labeller
demonstrations achieve a mean score of 0"): the RM stage folds the bias into
``output_layer.bias``, so the network's output IS the normalised reward and every reader
here (and PPO) applies it exactly once by doing nothing. ``meta.json`` records the
folded value as ``rm_bias`` for information only: never add it again.

:func:`score_sequences` is the one scoring path of the project: the RM stage uses it to
normalise, ``megatron-rlhf score`` to annotate files, PPO to score rollouts. It runs
Megatron's forward-only schedule, so it works at any TP/PP layout (under PP the values
exist on the last stage and are broadcast to the others).
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

from megatron_rlhf.data import pad_sequences
from megatron_rlhf.models.builder import unwrap
from megatron_rlhf.models.schedule import broadcast_from_last_stage, forward_collect
from megatron_rlhf.parallel import to_device


class ScoreBatch(NamedTuple):
    tokens: torch.Tensor  # [b, s] long, right-padded
    position_ids: torch.Tensor  # [b, s] long
    last_index: torch.Tensor  # [b] long: position of each row's last real token (its eos)


def scalar_head(model):
    """The ScalarHead of this rank (None on a pipeline stage other than the last)."""
    inner = unwrap(model)
    if not getattr(inner, "rlhf_scalar_head", False):
        raise ValueError("not a reward model: build it with build_model(..., scalar_head=True)")
    return inner.output_layer if getattr(inner, "post_process", True) else None


def read_rewards(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """``[b, s, 1]`` (or ``[b, s]``) per-position values -> ``[b]`` fp32 value at ``last_index``."""
    if values.dim() == 3:
        values = values.squeeze(-1)
    if values.dim() != 2 or values.shape[0] != last_index.shape[0]:
        raise ValueError(f"expected values [b, s(, 1)] for {last_index.shape[0]} rows, got {tuple(values.shape)}")
    if values.shape[1] <= int(last_index.max()):
        # A hidden state still split along the sequence (sequence parallelism) would leave
        # each rank a slice of the positions; ScalarHead gathers it, so this is a bug guard.
        raise ValueError(f"values cover {values.shape[1]} positions but a row ends at {int(last_index.max())}")
    return values.gather(1, last_index.to(values.device).unsqueeze(1)).squeeze(1).float()


def value_forward(model, batch):
    """Forward of a scalar-head model on any batch with tokens / position_ids (no attention
    mask: right padding under causal attention needs none). Returns ``[b, s, 1]`` on the
    last pipeline stage, the hidden state elsewhere."""
    return model(batch.tokens, batch.position_ids, None)


def _score_forward(model, batch):
    return value_forward(model, batch), lambda values: read_rewards(values, batch.last_index).detach()


@torch.no_grad()
def score_sequences(
    model, token_lists: Sequence[Sequence[int]], micro_batch_size: int = 16, pad_id: int = 0, pad_to_multiple_of: int = 16
) -> torch.Tensor:
    """Rewards of whole sequences, ``[n]`` fp32 on CPU, in input order, identical on every rank.

    Args:
        model: a scalar-head GPTModel (bare or DDP-wrapped), this rank's TP/PP shard.
        token_lists: full sequences ``[bos] + prompt + response + [eos]``; each one's reward is
            read at its last token. Every rank of a model-parallel group must pass the same list.
        micro_batch_size: sequences per forward.

    Sequences are sorted by length so a micro-batch wastes little padding; the model is put
    in eval mode (no dropout) and restored afterwards.
    """
    n = len(token_lists)
    if n == 0:
        return torch.zeros(0)
    order = sorted(range(n), key=lambda i: len(token_lists[i]))
    batches: List[ScoreBatch] = []
    for start in range(0, n, micro_batch_size):
        chunk = [token_lists[i] for i in order[start : start + micro_batch_size]]
        batches.append(to_device(ScoreBatch(*pad_sequences(chunk, pad_id, pad_to_multiple_of))))
    outputs = forward_collect(model, batches, _score_forward)
    sorted_rewards = broadcast_from_last_stage(torch.cat([o.float() for o in outputs]) if outputs is not None else None, (n,))
    rewards = torch.empty(n, dtype=torch.float32)
    rewards[torch.tensor(order)] = sorted_rewards.cpu()
    return rewards


@torch.no_grad()
def fold_bias(model, delta: float) -> None:
    """Add ``delta`` to the scalar head's bias (on the last pipeline stage; a no-op elsewhere)."""
    head = scalar_head(model)
    if head is not None:
        head.bias.add_(delta)
