"""SFT demonstrations: ``{"prompt": str, "response": str}`` per line -> padded batches.

A demonstration becomes ``[bos] + prompt + response + [eos]`` (prompt and response are
tokenised separately, see ``tokenizer``; no bos for a tokenizer that adds none). A chat
line ``{"messages": [...]}`` is rendered by the tokenizer's chat template instead
(:mod:`.chat`): every assistant turn is a target, everything else is context. The model reads the sequence minus its last
token and predicts the next token everywhere; ``loss_mask`` is True exactly where that
TARGET is a response token or the eos, so the prompt and the padding never count::

    sequence   bos  P1  P2  R1  R2  eos
    tokens     bos  P1  P2  R1  R2          (input, length L-1)
    labels     P1   P2  R1  R2  eos
    loss_mask  F    F   T   T   T

Too long (more than ``seq_length + 1`` tokens, i.e. an input longer than seq_length),
``data.truncation`` decides:

* ``prompt_left``: drop the oldest prompt tokens (bos stays), keeping at least a quarter
  of the budget for the prompt (``common.prompt_keep``); if the response is still too long
  cut its tail, and the eos with it (a cut response has no end to learn). Counted.
* ``drop``: skip the example. Counted.
* ``error``: stop with ``path:line``.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .common import LoadStats, batch_width, check_policy, position_ids, prompt_keep
from .chat import conversation_segments, is_chat
from .jsonl import check_fields, data_error, read_jsonl
from .sampler import epoch_order

SFT_FIX = (
    'every line needs {"prompt": "<non-empty text>", "response": "<non-empty text>"}, or (with a chat template) '
    '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}'
)


class SftExample(NamedTuple):
    """One tokenised demonstration: ``prompt_ids + response_ids`` is the full sequence.

    ``prompt_ids`` = [bos] + prompt tokens (no target counts here); ``response_ids`` =
    response tokens + [eos] (every token is a counted target; no eos if truncated).
    Pretraining chunks use the same type with a one-token "prompt". A conversation has
    ``prompt_ids`` up to its first assistant turn and ``response_mask`` (one bool per
    response id, True = target) marking the later assistant turns among user turns;
    None means every response id counts.
    """

    prompt_ids: List[int]
    response_ids: List[int]
    response_mask: Optional[List[bool]] = None

    @property
    def tokens(self) -> List[int]:
        return self.prompt_ids + self.response_ids


class SftBatch(NamedTuple):
    """Right-padded batch; ``s`` = longest input rounded up to a multiple, <= seq_length."""

    tokens: torch.Tensor  # [b, s] long: model input, pad_id after the end
    labels: torch.Tensor  # [b, s] long: next token (pad_id where loss_mask is False past the end)
    loss_mask: torch.Tensor  # [b, s] bool: True where the label counts (response + eos)
    position_ids: torch.Tensor  # [b, s] long: 0..s-1


def build_sft_example(
    prompt_ids: Sequence[int], response_ids: Sequence[int], bos_id: Optional[int], eos_id: int, limit: int, truncation: str
) -> Tuple[Optional[SftExample], bool]:
    """Apply the truncation policy to one demonstration.

    ``bos_id`` None: the tokenizer starts sequences with no bos (GPT-2, Qwen); the prompt
    then keeps at least one token, so the first target is always predicted from something.
    Returns ``(example, truncated)``; ``(None, False)`` when it is dropped, and raises a
    plain ``ValueError`` (the caller adds file:line) under ``error``.
    """
    bos = [] if bos_id is None else [bos_id]
    length = len(bos) + len(prompt_ids) + len(response_ids) + 1
    if length <= limit:
        return SftExample([*bos, *prompt_ids], [*response_ids, eos_id]), False
    if truncation == "error":
        raise ValueError(f"{length} tokens, more than the {limit} that fit (model.seq_length + 1)")
    if truncation == "drop":
        return None, False
    keep = prompt_keep(len(prompt_ids), len(response_ids), limit)
    if not bos:
        keep = max(keep, min(1, len(prompt_ids)))
    prompt = [*bos, *prompt_ids[len(prompt_ids) - keep :]]
    room = limit - len(prompt)
    response = [*response_ids, eos_id][:room]  # the tail, eos included, goes when cut
    if not response:
        return None, False  # limit < 2: no token left to learn
    return SftExample(prompt, response), True


def build_chat_example(
    segments: Sequence[Tuple[Sequence[int], bool]], bos_id: Optional[int], limit: int, truncation: str
) -> Tuple[Optional[SftExample], bool]:
    """The truncation policy for a conversation (``chat.conversation_segments``: ``[(ids,
    is_target), ...]``). ``prompt_left`` drops the oldest context before the first
    assistant turn (a leading bos stays), keeping a quarter of the budget as for a plain
    demonstration, then cuts the tail; a conversation left with no target is dropped.
    """
    tokens = [t for ids, _ in segments for t in ids]
    mask = [target for ids, target in segments for _ in ids]
    first = mask.index(True)

    def example(prompt, rest, rest_mask):
        return SftExample(list(prompt), list(rest), None if all(rest_mask) else list(rest_mask))

    if len(tokens) <= limit:
        return example(tokens[:first], tokens[first:], mask[first:]), False
    if truncation == "error":
        raise ValueError(f"{len(tokens)} tokens, more than the {limit} that fit (model.seq_length + 1)")
    if truncation == "drop":
        return None, False
    head = 1 if bos_id is not None and tokens[0] == bos_id else 0
    context, rest, rest_mask = tokens[head:first], tokens[first:], mask[first:]
    keep = max(prompt_keep(len(context), len(rest), limit - head), 0 if head else min(1, len(context)))
    prompt = tokens[:head] + context[len(context) - keep :]
    room = max(limit - len(prompt), 0)
    rest, rest_mask = rest[:room], rest_mask[:room]
    if not any(rest_mask):
        return None, False
    return example(prompt, rest, rest_mask), True


def load_sft(path, tokenizer, seq_length: int, truncation: str = "prompt_left") -> Tuple[List[SftExample], LoadStats]:
    """Read and tokenise a demonstrations file; every line is validated first.

    Args:
        path: JSONL of ``{"prompt": str, "response": str}`` (extra keys ignored).
        tokenizer: a ``Tokenizer`` (``encode``, ``bos_id``, ``eos_id``).
        seq_length: ``model.seq_length``; a sequence may have ``seq_length + 1`` tokens.
        truncation: ``data.truncation`` (prompt_left | drop | error).

    Returns:
        ``(examples, stats)`` in file order; ``stats`` counts truncated/dropped lines.
    """
    check_policy(truncation)
    stats = LoadStats()
    examples = []
    limit = seq_length + 1
    for line, record in read_jsonl(path, None, SFT_FIX):
        stats.records += 1
        try:
            if is_chat(record):
                segments = conversation_segments(tokenizer, record["messages"], path, line)
                example, truncated = build_chat_example(segments, tokenizer.bos_id, limit, truncation)
            else:
                check_fields(record, {"prompt": str, "response": str}, path, line, SFT_FIX)
                prompt, response = tokenizer.encode(record["prompt"]), tokenizer.encode(record["response"])
                example, truncated = build_sft_example(
                    prompt, response, tokenizer.bos_id, tokenizer.eos_id, limit, truncation
                )
        except ValueError as exc:
            raise data_error(
                path, line, f"demonstration too long: {exc}",
                "raise model.seq_length, shorten the example, or set data.truncation=prompt_left (or drop)",
            ) from None
        if example is None:
            stats.dropped += 1
            stats.note(f"{path}:{line}")
            continue
        if truncated:
            stats.truncated += 1
            stats.note(f"{path}:{line}")
        stats.kept += 1
        examples.append(example)
    if not examples:
        raise data_error(path, None, f"every demonstration was dropped ({stats})", "raise model.seq_length")
    return examples, stats


def collate_sft(
    examples: Sequence[SftExample], pad_id: int, pad_to_multiple_of: int = 16, max_len: Optional[int] = None
) -> SftBatch:
    """Stack examples into an ``SftBatch`` padded on the right.

    The width is the longest input (sequence length - 1) rounded up to
    ``pad_to_multiple_of``, but never more than ``max_len`` (pass ``model.seq_length``).
    """
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    width = batch_width([len(e.prompt_ids) + len(e.response_ids) - 1 for e in examples], pad_to_multiple_of, max_len)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        sequence = torch.as_tensor(example.tokens, dtype=torch.long)
        n = sequence.numel() - 1
        tokens[row, :n] = sequence[:-1]
        labels[row, :n] = sequence[1:]
        # label t is sequence[t + 1]: it is a response token iff t + 1 >= len(prompt_ids)
        start = len(example.prompt_ids) - 1
        if example.response_mask is None:
            loss_mask[row, start:n] = True
        else:
            loss_mask[row, start:n] = torch.as_tensor(example.response_mask[: n - start], dtype=torch.bool)
    return SftBatch(tokens, labels, loss_mask, position_ids(len(examples), width))


class SftDataset:
    """Examples in a fixed order plus a deterministic per-epoch visiting order.

    Resume: ``order(epoch)[offset:]`` continues exactly after ``offset`` consumed examples.
    """

    def __init__(self, examples: Sequence[SftExample], seed: int = 1234, shuffle: bool = True):
        self.examples = list(examples)
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> SftExample:
        return self.examples[index]

    def order(self, epoch: int) -> List[int]:
        return epoch_order(len(self.examples), self.seed, epoch, self.shuffle)

    def num_tokens(self) -> int:
        """Counted target tokens over the whole dataset (for logging)."""
        return sum(len(e.response_ids) if e.response_mask is None else sum(e.response_mask) for e in self.examples)
