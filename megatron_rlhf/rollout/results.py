"""What a rollout returns: :class:`Generation` (per prompt) and its right-padded tensors
(:class:`RolloutBatch`, :func:`padded_batch`) for scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

# ----------------------------------------------------------------------------- results


@dataclass
class RolloutBatch:
    """Right-padded tensors of a :class:`Generation`, for scoring by policy/reference/RM/critic.

    ``tokens`` ``[b, s]`` int64: prompt + response, then ``pad_id``.
    ``attention_mask`` ``[b, s]`` bool: True on real (prompt or response) tokens.
    ``response_mask`` ``[b, s]`` bool: True on generated tokens, up to and including eos.
    ``prompt_lengths``, ``response_lengths`` ``[b]`` int64.

    Log-probs computed from ``logits[:, :-1]`` against ``tokens[:, 1:]`` line up with
    ``response_mask[:, 1:]``; a reward model reads the last real token, index
    ``prompt_lengths + response_lengths - 1``.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor


@dataclass
class Generation:
    """What :func:`generate` returns, one entry per prompt, in prompt order.

    ``sequences[i]`` is prompt ``i`` followed by its response (eos included when it ended
    with one; no padding). ``finished[i]`` is True when the response ended with eos (False:
    cut by ``max_new_tokens`` or the context length). ``logprobs[i]`` has one float per
    response token: its log-prob under the tempered, untruncated distribution it was
    sampled from (see the module docstring); not compared by ``==`` (float rounding).
    """

    sequences: List[List[int]]
    prompt_lengths: List[int]
    response_lengths: List[int]
    finished: List[bool]
    logprobs: Optional[List[List[float]]] = field(default=None, compare=False)

    @classmethod
    def empty(cls, prompts: List[List[int]]) -> "Generation":
        """Every prompt with an empty response (nothing to generate)."""
        return cls([list(p) for p in prompts], [len(p) for p in prompts], [0] * len(prompts), [False] * len(prompts),
                   [[] for _ in prompts])

    @property
    def responses(self) -> List[List[int]]:
        return [seq[p:] for seq, p in zip(self.sequences, self.prompt_lengths)]

    def to_batch(self, pad_id: int = 0, length: Optional[int] = None, device=None) -> RolloutBatch:
        return padded_batch(self, pad_id=pad_id, length=length, device=device)


def padded_batch(generation: Generation, pad_id: int = 0, length: Optional[int] = None, device=None) -> RolloutBatch:
    """Right-pad ``generation`` into ``[b, s]`` tensors (see :class:`RolloutBatch`).

    ``length``: ``s``; default the longest sequence (a larger value gives fixed shapes).
    """
    lengths = [len(seq) for seq in generation.sequences]
    s = max(lengths, default=0) if length is None else length
    if lengths and max(lengths) > s:
        raise ValueError(f"padded_batch: length={s} is shorter than the longest sequence ({max(lengths)})")
    b = len(lengths)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    for i, seq in enumerate(generation.sequences):
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    idx = torch.arange(s).unsqueeze(0)
    prompt = torch.tensor(generation.prompt_lengths, dtype=torch.long).reshape(b, 1)
    response = torch.tensor(generation.response_lengths, dtype=torch.long).reshape(b, 1)
    batch = RolloutBatch(
        tokens=tokens,
        attention_mask=idx < prompt + response,
        response_mask=(idx >= prompt) & (idx < prompt + response),
        prompt_lengths=prompt.reshape(b),
        response_lengths=response.reshape(b),
    )
    if device is not None:
        batch = RolloutBatch(*(t.to(device) for t in (batch.tokens, batch.attention_mask, batch.response_mask,
                                                      batch.prompt_lengths, batch.response_lengths)))
    return batch


