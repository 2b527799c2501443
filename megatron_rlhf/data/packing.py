"""Packed sequences (``data.packing: true``): several examples share one micro-batch, no padding between them.

A packed micro-batch is ONE row of ``width`` tokens (Megatron's ``thd`` layout: batch 1,
the sequences one after another). ``cu_seqlens`` holds the cumulative sequence lengths,
so sequence ``i`` occupies ``tokens[0, cu_seqlens[i]:cu_seqlens[i + 1]]``. Attention never
crosses a boundary (``models.attention``: Transformer Engine's THD kernels on GPU, a
block-diagonal causal mask on CPU), position ids restart at 0 in every sequence, and
labels and the loss mask are those of each sequence on its own, so the per-token loss is
the one of the unpacked batch. The padding after the last sequence is cut into more segments, none
longer than the longest sequence (they attend only to themselves and count nowhere), so
``cu_seqlens[-1] == width`` as the THD kernels and RoPE's per-sequence split expect::

    sequences  a0 a1 a2 | b0 b1 | pad pad pad
    positions   0  1  2 |  0  1 |  0   1   2
    cu_seqlens [0, 3, 5, 8]        num_sequences 2

Which examples share a micro-batch: :func:`first_fit_decreasing` over whole examples
(an RM prompt with its K responses is ONE unit, so its responses are scored in one
forward), bins of ``capacity`` = ``train.micro_batch_size x model.seq_length`` tokens, the
token budget of an unpacked micro-batch. It is a pure function of the examples in their
order, which the data position fixes, so a resumed run packs exactly as the original.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

from .common import round_up
from .ranking import ComparisonExample
from .sft import SftExample

PACK_MULTIPLE = 16  # a packed row's width is a multiple of this (TP sequence parallelism and FP8 need divisibility)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of unit indices whose lengths add up to at most ``capacity``.

    Units are placed longest first (ties: lower index first) into the first bin with room;
    a unit longer than ``capacity`` gets a bin of its own. Bins come out in the order they
    were opened, each listing its units in input order. Deterministic.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    bins: List[List[int]] = []
    loads: List[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length < 1:
            raise ValueError(f"unit {index} is empty")
        for b, load in enumerate(loads):
            if load + length <= capacity:
                bins[b].append(index)
                loads[b] += length
                break
        else:
            bins.append([index])
            loads.append(length)
    return [sorted(b) for b in bins]


def packed_width(loads: Sequence[int]) -> int:
    """One width for every micro-batch of a step (pipeline stages exchange one shape)."""
    return round_up(max(loads), PACK_MULTIPLE)


def segments(lengths: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cu_seqlens int32, position_ids [1, width] long)`` for sequences of ``lengths``
    laid end to end in a row of ``width``, then the tail padding as segments of its own."""
    used = sum(lengths)
    if used > width:
        raise ValueError(f"sequences of {used} tokens do not fit a packed row of {width}")
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    # the tail padding in segments no longer than the longest sequence: its position ids stay
    # within the model's (learned positions) and max_seqlen is the real sequences'
    while bounds[-1] < width:
        bounds.append(min(width, bounds[-1] + max(lengths)))
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    positions = torch.cat([torch.arange(b - a, dtype=torch.long) for a, b in zip(bounds, bounds[1:])])
    return cu_seqlens, positions.unsqueeze(0)


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


class PackedSftBatch(NamedTuple):
    """SFT / pretraining examples packed into one row (see the module docstring)."""

    tokens: torch.Tensor  # [1, width] long: each sequence minus its last token, then pad_id
    labels: torch.Tensor  # [1, width] long: the next token within the same sequence
    loss_mask: torch.Tensor  # [1, width] bool: True where the label counts (response + eos)
    position_ids: torch.Tensor  # [1, width] long: 0.. in every sequence
    cu_seqlens: torch.Tensor  # int32: the n sequences' boundaries, then the tail padding's
    max_seqlen: int  # the longest sequence
    num_sequences: int  # real sequences (the tail padding segment not counted)


def sft_unit_length(example: SftExample) -> int:
    """Tokens an SFT example occupies in a packed row (its input: the sequence minus one)."""
    return len(example.prompt_ids) + len(example.response_ids) - 1


def pack_sft(examples: Sequence[SftExample], pad_id: int, width: int) -> PackedSftBatch:
    """Lay ``examples`` end to end in one row of ``width`` tokens, as ``collate_sft`` would
    row by row: input = sequence[:-1], labels = sequence[1:], loss on the response targets."""
    if not examples:
        raise ValueError("pack_sft needs at least one example")
    lengths = [sft_unit_length(e) for e in examples]
    cu_seqlens, positions = segments(lengths, width)
    tokens = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((1, width), dtype=torch.bool)
    for example, start, n in zip(examples, cu_seqlens.tolist(), lengths):
        sequence = torch.as_tensor(example.tokens, dtype=torch.long)
        tokens[0, start : start + n] = sequence[:-1]
        labels[0, start : start + n] = sequence[1:]
        loss_mask[0, start + len(example.prompt_ids) - 1 : start + n] = True
    return PackedSftBatch(tokens, labels, loss_mask, positions, cu_seqlens, max_seqlen(cu_seqlens), len(examples))


class PackedComparisonBatch(NamedTuple):
    """The RM's prompts, every response a sequence of its own, packed into one row.

    Like ``ComparisonBatch`` (responses prompt by prompt, in response order) except that
    ``last_index`` indexes the flattened row: the reward of response ``i`` is the value
    at ``tokens[0, last_index[i]]``, its own eos.
    """

    tokens: torch.Tensor  # [1, width] long
    position_ids: torch.Tensor  # [1, width] long: 0.. in every response
    last_index: torch.Tensor  # [N] long: each response's last token in the row
    prompt_of: torch.Tensor  # [N] long: prompt of each response, 0..P-1 within the batch
    ranks: torch.Tensor  # [N] long: rank of each response among its prompt's (1 = best)
    cu_seqlens: torch.Tensor  # int32: the N responses' boundaries, then the tail padding's
    max_seqlen: int
    num_sequences: int  # N


def comparison_unit_length(example: ComparisonExample) -> int:
    """Tokens a prompt with all its responses occupies in a packed row."""
    return sum(len(example.prompt_ids) + len(r) for r in example.response_ids)


def pack_comparisons(examples: Sequence[ComparisonExample], pad_id: int, width: int) -> PackedComparisonBatch:
    """Every response of every prompt as its own sequence ``prompt + response``, one row."""
    if not examples:
        raise ValueError("pack_comparisons needs at least one example")
    sequences, prompt_of, ranks = [], [], []
    for p, example in enumerate(examples):
        if len(example.response_ids) != len(example.ranks):
            raise ValueError(f"example {p}: {len(example.response_ids)} responses but {len(example.ranks)} ranks")
        for response, rank in zip(example.response_ids, example.ranks):
            sequences.append(list(example.prompt_ids) + list(response))
            prompt_of.append(p)
            ranks.append(rank)
    lengths = [len(s) for s in sequences]
    cu_seqlens, positions = segments(lengths, width)
    tokens = torch.full((1, width), pad_id, dtype=torch.long)
    for sequence, start in zip(sequences, cu_seqlens.tolist()):
        tokens[0, start : start + len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    last_index = (cu_seqlens[1 : len(sequences) + 1] - 1).long()
    return PackedComparisonBatch(
        tokens, positions, last_index, torch.tensor(prompt_of, dtype=torch.long), torch.tensor(ranks, dtype=torch.long),
        cu_seqlens, max_seqlen(cu_seqlens), len(sequences),
    )


def is_packed(batch) -> bool:
    return hasattr(batch, "cu_seqlens")


def pack_microbatches(examples: Sequence, unit_length, pack, capacity: int) -> list:
    """``examples`` bin-packed (:func:`first_fit_decreasing`, bins of ``capacity`` tokens)
    into packed micro-batches of one common width; ``pack(examples, width=...)`` builds one."""
    lengths = [unit_length(e) for e in examples]
    bins = first_fit_decreasing(lengths, capacity)
    width = packed_width([sum(lengths[i] for i in b) for b in bins])
    return [pack([examples[i] for i in b], width=width) for b in bins]
