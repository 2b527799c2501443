"""A PPO rollout batch, held whole on every rank, and its layout-independent mini-batches.

Each data-parallel rank generates and scores its share of the global batch of prompts;
:func:`gather_episodes` then gives every rank the whole batch (right-padded to one width).
Advantages are computed on the whole batch (so whitening is global by construction), and
:func:`minibatch_rows` cuts each global mini-batch the same way at any DP size: the rows of
a mini-batch are fixed by the seed, and each rank takes a contiguous share of them. The
same global batch thus gives the same update at DP=1 and DP=N.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron_rlhf.data import epoch_order


@dataclasses.dataclass
class Episodes:
    """A rollout batch. Per-action tensors are ``[b, s-1]``: action t is token t+1."""

    tokens: torch.Tensor  # [b, s] prompt + response, right-padded
    action_mask: torch.Tensor  # [b, s-1] True where token t+1 was generated (eos included)
    old_logprobs: torch.Tensor  # [b, s-1] rollout policy
    ref_logprobs: torch.Tensor  # [b, s-1] frozen reference
    old_values: torch.Tensor  # [b, s-1] critic value of the state before action t
    scores: torch.Tensor  # [b] (or [b, k]: several rewards) the reward of each whole episode
    advantages: Optional[torch.Tensor] = None  # [b, s-1], set by the recipe
    returns: Optional[torch.Tensor] = None  # [b, s-1]

    def rows(self, index) -> "Episodes":
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return Episodes(*(None if v is None else v[index] for v in values))


def _pad_width(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.dim() < 2 or t.shape[1] == width:
        return t
    return F.pad(t, (0, width - t.shape[1]), value=value)


def gather_episodes(episodes: Episodes, pad_id: int) -> Episodes:
    """Every data-parallel rank's episodes on every rank, in rank order (a no-op at DP=1).

    Widths differ between ranks; each tensor is right-padded to the widest (``pad_id`` for
    tokens, False/0 elsewhere: padded actions are masked out)."""
    group = parallel_state.get_data_parallel_group() if dist.is_initialized() else None
    world = parallel_state.get_data_parallel_world_size() if group is not None else 1
    if world == 1:
        return episodes
    width = torch.tensor([episodes.tokens.shape[1]], device=episodes.tokens.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    width = int(width)
    gathered = {}
    for f in dataclasses.fields(episodes):
        value = getattr(episodes, f.name)
        if value is None:
            gathered[f.name] = None
            continue
        if f.name == "scores":  # per episode, not per token: nothing to pad
            local = value.contiguous()
        else:
            target = width if f.name == "tokens" else width - 1
            local = _pad_width(value, target, pad_id if f.name == "tokens" else 0).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        gathered[f.name] = torch.cat(parts)
    return Episodes(**gathered)


def minibatch_rows(num_episodes: int, mini_batch_size: int, seed: int) -> list[list[int]]:
    """The rows of each global mini-batch of one PPO epoch: the episodes shuffled by ``seed``
    (the same order at every DP size) and cut every ``mini_batch_size``. Each data-parallel
    rank trains on its contiguous share of every one (``training.loop.rank_slice``)."""
    order = epoch_order(num_episodes, seed, 0, True)
    return [order[start : start + mini_batch_size] for start in range(0, num_episodes, mini_batch_size)]
