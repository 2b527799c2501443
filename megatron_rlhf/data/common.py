"""Pieces shared by the loaders: load statistics, the prompt_left truncation rule, padding.

Length budget. ``limit`` below is the most tokens a full sequence may have:

* SFT and pretraining: ``model.seq_length + 1``. The model reads ``tokens[:-1]`` and
  predicts ``tokens[1:]`` (Megatron's convention), so its input is <= seq_length.
* reward model: ``model.seq_length``. The whole sequence, eos included, is read and the
  reward taken at the last token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

TRUNCATION_POLICIES = ("prompt_left", "drop", "error")
MAX_REPORTED = 5


@dataclass
class LoadStats:
    """What a loader did with a file; the trainer logs it.

    ``records == kept + dropped``; ``truncated`` examples are among ``kept``.
    ``examples`` holds the first few ``path:line`` locations that were truncated/dropped.
    """

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    examples: List[str] = field(default_factory=list)

    def note(self, where: str) -> None:
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(where)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        text = f"{self.kept}/{self.records} kept, {self.truncated} truncated, {self.dropped} dropped"
        if self.examples:
            text += f" (e.g. {', '.join(self.examples)})"
        return text


def check_policy(truncation: str) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"data.truncation={truncation!r} is not one of {', '.join(TRUNCATION_POLICIES)}")


def bos_prefix(tokenizer) -> List[int]:
    """``[bos_id]``, or ``[]`` for a tokenizer whose sequences start without one (``bos_id`` None):
    what starts every sequence (any object with ``bos_id`` will do)."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def prompt_keep(prompt_len: int, response_len: int, limit: int) -> int:
    """How many prompt tokens (the newest ones) ``prompt_left`` keeps.

    The sequence is ``[bos] + prompt + response + [eos]``. Drop the oldest prompt tokens
    until it fits in ``limit``, but keep at least a quarter of the content budget
    ``(limit - 2) // 4`` (or the whole prompt if shorter): a response with almost no
    prompt teaches nothing about following instructions. If the sequence still does not
    fit, the caller cuts the response (SFT) or drops the example (reward model).
    """
    budget = limit - 2
    floor = min(prompt_len, max(budget, 0) // 4)
    return max(floor, min(prompt_len, budget - response_len))


def round_up(n: int, multiple: int) -> int:
    return n if multiple <= 1 else -(-n // multiple) * multiple


def batch_width(lengths: Sequence[int], pad_to_multiple_of: int, max_len: Optional[int]) -> int:
    """Longest length rounded up to the multiple, capped at ``max_len`` (the model's seq_length)."""
    longest = max(lengths)
    width = round_up(longest, pad_to_multiple_of)
    if max_len is not None:
        if longest > max_len:
            raise ValueError(
                f"a sequence of {longest} tokens does not fit max_len={max_len}; "
                "load the data with the same seq_length as the model so it is truncated"
            )
        width = min(width, max_len)
    return width


def position_ids(rows: int, width: int) -> torch.Tensor:
    """``[rows, width]`` long, 0..width-1 on every row. Right padding keeps every real
    token at its natural position, and causal attention never lets a real token see the
    padding after it, so no attention mask is needed."""
    return torch.arange(width, dtype=torch.long).unsqueeze(0).repeat(rows, 1)


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, pad_to_multiple_of: int = 16, max_len: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad whole sequences for a scoring model (reward model, critic).

    Returns ``(tokens [N, s] long, position_ids [N, s] long, last_index [N] long)`` where
    ``last_index[i]`` is the position of sequence i's last real token (its eos).
    """
    if not sequences:
        raise ValueError("need at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) < 1:
        raise ValueError("empty sequence")
    width = batch_width(lengths, pad_to_multiple_of, max_len)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    last_index = torch.tensor(lengths, dtype=torch.long) - 1
    return tokens, position_ids(len(sequences), width), last_index
