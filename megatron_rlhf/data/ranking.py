"""Reward-model comparisons: K-way rankings or pairwise preferences -> batches.

Accepted line formats (one per line, mixable in one file; extra keys ignored):

* ``{"prompt": str, "responses": [r_0, ..., r_{K-1}], "ranking": [rank_0, ...]}`` where
  ``ranking[i]`` is the RANK of response i: 1 = best, larger = worse, equal = tie,
  every rank in 1..K (the convention of ``algorithms.ranking``). 2 <= K <= 9, as in
  InstructGPT's labelling interface.
* ``{"prompt": str, "responses": [...], "order": [i_best, ..., i_worst]}``: response
  indices best first, a permutation of 0..K-1 (no ties). Converted to ranks.
* ``{"prompt": str, "chosen": str, "rejected": str}``: K = 2, ranks [1, 2].
* chat lines (with a chat template, see :func:`chat_comparison`): the prompt is a
  conversation, rendered with the assistant header; each reply is rendered after it.

A line with no strictly ordered pair (all tied) is an error: it teaches nothing. So is
an unranked task, ``"ranking": null`` as ``megatron-rlhf sample-for-ranking`` writes it
("unranked task: fill in ranking").

Each response becomes ``[bos] + prompt + response + [eos]``; the reward is read at the
eos (``ComparisonBatch.last_index``). The whole sequence must fit in ``model.seq_length``.
Under ``prompt_left`` the oldest prompt tokens are dropped (sized for the LONGEST
response, so all K share one prompt) down to a quarter of the budget; a comparison
whose response still does not fit is DROPPED and counted, never cut: a ranking judges
whole responses, and cutting one could invert it.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .common import LoadStats, bos_prefix, check_policy, pad_sequences, prompt_keep
from .chat import check_messages, reply_ids
from .chat import prompt_ids as chat_prompt_ids
from .jsonl import DataError, check_fields, data_error, read_jsonl

MIN_K, MAX_K = 2, 9
CHAT_RM_FIX = (
    'with a chat template: {"messages": [...], "chosen": "...", "rejected": "..."}, or "responses" with "ranking"/"order", '
    'or TRL\'s {"prompt": [...], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}'
)
UNRANKED_FIX = (
    'a labeller replaces null with the rank of each response, e.g. "ranking": [2, 1, 3] (1 = best, equal = tie); '
    "`megatron-rlhf sample-for-ranking --check FILE` lists every line still unranked"
)
RM_FIX = (
    'use {"prompt": str, "responses": [str, ...], "ranking": [rank per response, 1 = best]}, '
    'or "order": [response indices, best first] instead of "ranking", '
    'or {"prompt": str, "chosen": str, "rejected": str}'
)


class ComparisonExample(NamedTuple):
    """One prompt with K ranked responses; ``prompt_ids + response_ids[i]`` is sequence i.

    ``prompt_ids`` = [bos] + prompt tokens; ``response_ids[i]`` = response tokens + [eos];
    ``ranks[i]`` = rank of response i (1 = best, ties equal).
    """

    prompt_ids: List[int]
    response_ids: List[List[int]]
    ranks: List[int]


class ComparisonBatch(NamedTuple):
    """All K responses of each prompt as rows, prompt by prompt (never split).

    N = total responses. Rows of prompt p are contiguous and in response order, so
    ``rankings()`` feeds ``algorithms.ranking.build_ranking_pairs`` directly.
    """

    tokens: torch.Tensor  # [N, s] long, right-padded with pad_id
    position_ids: torch.Tensor  # [N, s] long
    last_index: torch.Tensor  # [N] long: position of each row's eos (where the reward is read)
    prompt_of: torch.Tensor  # [N] long: prompt of each row, 0..P-1 within the batch
    ranks: torch.Tensor  # [N] long: rank of each row among its prompt's responses (1 = best)

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_of[-1]) + 1

    def rankings(self) -> List[List[int]]:
        """Per-prompt rank lists, e.g. ``[[2, 1], [1, 3, 2]]``."""
        out: List[List[int]] = [[] for _ in range(self.num_prompts)]
        for p, r in zip(self.prompt_of.tolist(), self.ranks.tolist()):
            out[p].append(r)
        return out


class UnrankedTask(DataError):
    """A ranking task as ``sample-for-ranking`` writes it (``"ranking": null``), not yet labelled.

    Raised only after the prompt and responses were validated."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _assistant_text(value, key: str, path, line: int) -> str:
    """A reply given as a string or as TRL's ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise data_error(path, line, f"{key!r} must be a non-empty reply: a string or [{{\"role\": \"assistant\", \"content\": ...}}]", CHAT_RM_FIX)
    return value


def chat_comparison(record: dict, path, line: int) -> Optional[Tuple[list, dict]]:
    """``(prompt messages, a plain record of the same comparison)`` for a chat line, else None.

    Chat lines: ``{"messages": [...], "responses": [...], "ranking" | "order": ...}`` or
    ``{"messages": [...], "chosen": reply, "rejected": reply}``; TRL's explicit-prompt
    ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` and implicit-prompt
    ``{"chosen": [..., reply], "rejected": [..., reply]}`` (a shared conversation, then one
    assistant reply each). A reply is a string or ``[{"role": "assistant", "content": ...}]``.
    """
    if "messages" in record:
        messages = record["messages"]
        rest = {k: v for k, v in record.items() if k != "messages"}
    elif isinstance(record.get("prompt"), list):
        messages, rest = record["prompt"], {k: v for k, v in record.items() if k != "prompt"}
    elif isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list):
        chosen, rejected = record["chosen"], record["rejected"]
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            raise data_error(path, line, "implicit-prompt pair: 'chosen' and 'rejected' must share every message but the last", CHAT_RM_FIX)
        messages, rest = chosen[:-1], {"chosen": chosen[-1:], "rejected": rejected[-1:]}
    else:
        return None
    check_messages(messages, path, line, "prompt" if "messages" not in record else "messages")
    if messages[-1]["role"] == "assistant":
        raise data_error(path, line, "the prompt conversation ends with an assistant turn; the replies to rank come after it", CHAT_RM_FIX)
    plain = dict(rest, prompt="(chat)")
    for key in ("chosen", "rejected"):
        if key in plain:
            plain[key] = _assistant_text(plain[key], key, path, line)
    if isinstance(plain.get("responses"), list):
        plain["responses"] = [_assistant_text(r, f"responses[{i}]", path, line) for i, r in enumerate(plain["responses"])]
    return messages, plain


def parse_comparison(record: dict, path, line: int) -> Tuple[str, List[str], List[int]]:
    """Validate one line in any accepted format -> ``(prompt, responses, ranks)``."""

    def fail(problem: str, fix: str = RM_FIX):
        return data_error(path, line, problem, fix)

    if "chosen" in record or "rejected" in record:
        check_fields(record, {"prompt": str, "chosen": str, "rejected": str}, path, line, RM_FIX)
        if "responses" in record:
            raise fail('both pairwise ("chosen"/"rejected") and K-way ("responses") keys; use one format per line')
        return record["prompt"], [record["chosen"], record["rejected"]], [1, 2]

    check_fields(record, {"prompt": str, "responses": list}, path, line, RM_FIX)
    responses = record["responses"]
    k = len(responses)
    if not MIN_K <= k <= MAX_K:
        raise fail(f"{k} response(s); a comparison needs K = {MIN_K}..{MAX_K}")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise fail(f"responses[{i}] must be a string, got {type(response).__name__}")
        if not response.strip():
            raise fail(f"responses[{i}] is empty")

    has_ranking, has_order = record.get("ranking") is not None, record.get("order") is not None
    if "ranking" in record and not has_ranking and not has_order:
        error = fail(f'unranked task: fill in ranking ("ranking" is null for these {k} responses)', UNRANKED_FIX)
        raise UnrankedTask(str(error), error.path, error.line)
    if has_ranking == has_order:
        raise fail('need exactly one of "ranking" (ranks, 1 = best) and "order" (indices, best first)')
    key = "ranking" if has_ranking else "order"
    values = record[key]
    if not isinstance(values, list):
        raise fail(f"{key!r} must be a list, got {type(values).__name__}")
    if len(values) != k:
        raise fail(f"{key!r} has {len(values)} entries but there are {k} responses; give one per response")
    if not all(_is_int(v) for v in values):
        raise fail(f"{key!r} must hold integers, got {values}")

    if has_order:
        bad = [v for v in values if not 0 <= v < k]
        if bad:
            raise fail(f"'order' index {bad[0]} is out of range for {k} responses (0..{k - 1})")
        if len(set(values)) != k:
            dup = next(v for v in values if values.count(v) > 1)
            raise fail(
                f"'order' {values} repeats index {dup}; it must list every response index once, best first",
                'for ties use "ranking" (rank per response, equal ranks = tie)',
            )
        ranks = [0] * k
        for position, index in enumerate(values):
            ranks[index] = position + 1
        _check_identical(responses, ranks, fail)
        return record["prompt"], list(responses), ranks

    if any(not 1 <= v <= k for v in values):
        raise fail(
            f"'ranking' {values}: ranks must be integers in 1..{k} (1 = best)",
            'ranking[i] is the RANK of response i; to list indices best-first use "order" instead',
        )
    if len(set(values)) == 1:
        raise fail(f"all {k} responses are tied ({values}): no ordered pair to learn from", "rank them or drop the line")
    _check_identical(responses, values, fail)
    return record["prompt"], list(responses), list(values)


def _check_identical(responses: List[str], ranks: List[int], fail) -> None:
    """Identical texts (up to whitespace) must share a rank: one text with two ranks teaches r(y) > r(y)."""
    first: dict = {}
    for i, text in enumerate(responses):
        j = first.setdefault(" ".join(text.split()), i)
        if j != i and ranks[i] != ranks[j]:
            raise fail(f"responses[{j}] and responses[{i}] are the same text but ranked {ranks[j]} and {ranks[i]}",
                       'give identical responses the same rank (a tie, with "ranking"), or drop one')


def fit_comparison(prompt_len: int, longest: int, seq_length: int, truncation: str, bos: int = 1) -> Tuple[str, int]:
    """How one comparison fits ``seq_length`` -> ``(outcome, prompt tokens kept)``.

    ``longest`` is the longest response in tokens, eos included; the sequence is
    ``[bos] + prompt + response``. ``outcome`` is "fits", "truncated" (``prompt_left`` cut
    the oldest prompt tokens), "dropped", or "error" (too long under ``truncation=error``).
    ``bos``: 1, or 0 for a tokenizer that starts sequences without one.
    Shared by ``load_comparisons`` and ``data-stats`` so their counts agree.
    """
    if bos + prompt_len + longest <= seq_length:
        return "fits", prompt_len
    if truncation == "error":
        return "error", prompt_len
    keep = prompt_keep(prompt_len, longest - 1, seq_length)
    if not bos:
        keep = max(keep, min(1, prompt_len))
    if truncation == "drop" or bos + keep + longest > seq_length:
        return "dropped", 0
    return "truncated", keep


def load_comparisons(
    path, tokenizer, seq_length: int, truncation: str = "prompt_left"
) -> Tuple[List[ComparisonExample], LoadStats]:
    """Read, validate and tokenise a comparisons file (all formats above).

    Returns ``(examples, stats)`` in file order; a record is one prompt with its K responses.
    """
    check_policy(truncation)
    stats = LoadStats()
    examples = []
    eos = tokenizer.eos_id
    for line, record in read_jsonl(path, None, RM_FIX):
        stats.records += 1
        chat = chat_comparison(record, path, line)
        if chat is not None:  # the template writes bos and the turn markers
            messages, plain = chat
            _, response_texts, ranks = parse_comparison(plain, path, line)
            prompt = chat_prompt_ids(tokenizer, messages, path, line)
            responses = [reply_ids(tokenizer, messages, r, path, line) for r in response_texts]
            bos = []
        else:
            prompt_text, response_texts, ranks = parse_comparison(record, path, line)
            prompt = tokenizer.encode(prompt_text)
            responses = [tokenizer.encode(r) + [eos] for r in response_texts]
            bos = bos_prefix(tokenizer)
        longest = max(len(r) for r in responses)  # eos included
        outcome, keep = fit_comparison(len(prompt), longest, seq_length, truncation, len(bos))
        if outcome == "error":
            raise data_error(
                path, line, f"comparison too long: {len(bos) + len(prompt) + longest} tokens > model.seq_length={seq_length}",
                "raise model.seq_length, shorten the example, or set data.truncation=prompt_left (or drop)",
            )
        if outcome == "dropped":
            stats.dropped += 1
            stats.note(f"{path}:{line}")
            continue
        if outcome == "truncated":
            prompt = prompt[len(prompt) - keep :]
            stats.truncated += 1
            stats.note(f"{path}:{line}")
        stats.kept += 1
        examples.append(ComparisonExample([*bos, *prompt], responses, ranks))
    if not examples:
        raise data_error(path, None, f"every comparison was dropped ({stats})", "raise model.seq_length")
    return examples, stats


def collate_comparisons(
    examples: Sequence[ComparisonExample], pad_id: int, pad_to_multiple_of: int = 16, max_len: Optional[int] = None
) -> ComparisonBatch:
    """One row per response, all K responses of every prompt together, right-padded.

    The width is the longest sequence rounded up to ``pad_to_multiple_of``, capped at
    ``max_len`` (pass ``model.seq_length``).
    """
    if not examples:
        raise ValueError("collate_comparisons needs at least one example")
    sequences, prompt_of, ranks = [], [], []
    for p, example in enumerate(examples):
        if len(example.response_ids) != len(example.ranks):
            raise ValueError(f"example {p}: {len(example.response_ids)} responses but {len(example.ranks)} ranks")
        for response, rank in zip(example.response_ids, example.ranks):
            sequences.append(example.prompt_ids + response)
            prompt_of.append(p)
            ranks.append(rank)
    tokens, positions, last_index = pad_sequences(sequences, pad_id, pad_to_multiple_of, max_len)
    return ComparisonBatch(
        tokens, positions, last_index, torch.tensor(prompt_of, dtype=torch.long), torch.tensor(ranks, dtype=torch.long)
    )
