"""Scored lines ``{"prompt", "response"}`` (``megatron-rlhf score`` input, the RM's
demonstrations for normalisation) as the reward model reads them:
``[bos] + prompt + response + [eos]``."""

from __future__ import annotations

from typing import List, Optional, Tuple

from megatron_rlhf.data.common import LoadStats, bos_prefix, prompt_keep
from megatron_rlhf.data.jsonl import data_error, read_jsonl
from megatron_rlhf.data.tokenizer import Tokenizer

SCORE_FIX = 'every line needs {"prompt": "<text>", "response": "<text>"} (other keys are kept)'


def response_sequence(tokenizer: Tokenizer, prompt: str, response: str, seq_length: int) -> Optional[List[int]]:
    """``[bos] + prompt + response + [eos]`` as the RM reads it, or None when it cannot fit.

    A sequence longer than ``seq_length`` loses its oldest prompt tokens (down to a quarter
    of the budget, as in RM training); a response that still does not fit is never cut:
    its reward would be read somewhere in the middle of it.
    """
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response)
    ends = len(bos_prefix(tokenizer)) + 1  # bos (where the tokenizer has one) and eos
    if ends + len(prompt_ids) + len(response_ids) > seq_length:
        keep = prompt_keep(len(prompt_ids), len(response_ids), seq_length)
        if ends + keep + len(response_ids) > seq_length:
            return None
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return [*bos_prefix(tokenizer), *prompt_ids, *response_ids, tokenizer.eos_id]


def load_responses(path, tokenizer: Tokenizer, seq_length: int, skip_too_long: bool = False) -> Tuple[List[dict], List[List[int]], LoadStats]:
    """Validate and tokenise a ``{"prompt", "response"}`` JSONL file.

    Returns ``(records, sequences, stats)``: the kept records (all their keys) and their
    token sequences, in file order. A response too long for ``seq_length`` is an error
    naming ``path:line``, or with ``skip_too_long`` skipped and counted in ``stats``.
    """
    records, sequences, stats = [], [], LoadStats()
    for line, record in read_jsonl(path, {"prompt": str, "response": str}, SCORE_FIX):
        stats.records += 1
        sequence = response_sequence(tokenizer, record["prompt"], record["response"], seq_length)
        if sequence is None:
            if not skip_too_long:
                raise data_error(
                    path, line, f"the response alone does not fit model.seq_length={seq_length}",
                    "score with a model of a longer context or shorten the response",
                )
            stats.dropped += 1
            stats.note(f"{path}:{line}")
            continue
        stats.kept += 1
        records.append(record)
        sequences.append(sequence)
    return records, sequences, stats
