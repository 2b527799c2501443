"""PPO inputs: prompts to roll out from, and pretraining text for the ptx term.

Prompts: ``{"prompt": str}`` per line (extra keys such as ids are ignored) ->
``[bos] + prompt tokens``; or ``{"messages": [...]}`` ending with a user turn, rendered by
the tokenizer's chat template with the assistant header (:mod:`.chat`). PPO generates up to ``ppo.max_new_tokens`` after the prompt
and the whole episode must fit in ``model.seq_length``, so a prompt may have at most
``prompt_budget(seq_length, max_new_tokens)`` tokens, bos included. A longer prompt is
an error, not silently cut: a cut prompt asks a different question than the one the
reward model is shown.

Pretraining text: ``{"text": str}`` per line. Documents become ``[bos] + text + [eos]``,
are concatenated in file order and cut into chunks of ``seq_length + 1`` tokens where
each chunk starts with the previous chunk's last token (Megatron's GPT dataset layout):
the model input is exactly ``seq_length`` tokens and every token after the first is a
counted target exactly once. The last chunk may be shorter (padded by ``collate_sft``).
Chunks are ``SftExample``s whose "prompt" is their first token, so ``collate_sft``
batches them with ``loss_mask`` True on every real token. (This keeps the corpus in
memory: fine for examples and tests; use Megatron's indexed datasets at scale.)
"""

from __future__ import annotations

from typing import List, NamedTuple

from ..config import ConfigError
from .chat import is_chat
from .common import bos_prefix
from .chat import prompt_ids as chat_prompt_ids
from .jsonl import check_fields, data_error, read_jsonl
from .sft import SftExample

PROMPT_FIX = 'every line needs {"prompt": "<non-empty text>"}, or (with a chat template) {"messages": [{"role": "user", "content": ...}]}'
TEXT_FIX = 'every line needs {"text": "<non-empty text>"}'


def prompt_budget(seq_length: int, max_new_tokens: int) -> int:
    """Most prompt tokens (bos included) that leave room for ``max_new_tokens``."""
    budget = seq_length - max_new_tokens
    if budget < 2:
        raise ConfigError(
            f"ppo.max_new_tokens={max_new_tokens} leaves no room for a prompt in model.seq_length={seq_length}; "
            "lower ppo.max_new_tokens or raise model.seq_length"
        )
    return budget


class PromptRecord(NamedTuple):
    """One prompt with where it came from: a rule-based reward gets ``record`` (the whole JSONL
    line, so a reference answer can ride along) and its errors name ``path:line``."""

    ids: List[int]  # [bos] + prompt tokens
    text: str  # record["prompt"]; for a chat line, its last user turn (record holds the conversation)
    record: dict  # the JSONL line as read
    path: str
    line: int  # 1-based

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def load_prompts(path, tokenizer, max_prompt_len: int) -> List[List[int]]:
    """Read and tokenise a prompts file -> one ``[bos] + prompt`` id list per line.

    Raises:
        DataError naming ``path:line`` for a prompt longer than ``max_prompt_len`` tokens,
        plus every ``read_jsonl`` error (missing file, empty file, bad JSON, ...).
    """
    return [prompt.ids for prompt in load_prompt_records(path, tokenizer, max_prompt_len)]


def load_prompt_records(path, tokenizer, max_prompt_len: int) -> List[PromptRecord]:
    """``load_prompts`` keeping each prompt's text, JSONL record and line (same checks, same order)."""
    prompts = []
    for line, record in read_jsonl(path, None, PROMPT_FIX):
        if is_chat(record):  # the conversation so far, rendered up to the assistant header
            ids = chat_prompt_ids(tokenizer, record["messages"], path, line)
            text = next((m.get("content", "") for m in reversed(record["messages"]) if m.get("role") == "user"), "")
        else:
            check_fields(record, {"prompt": str}, path, line, PROMPT_FIX)
            ids = [*bos_prefix(tokenizer), *tokenizer.encode(record["prompt"])]
            text = record["prompt"]
        if len(ids) > max_prompt_len:
            raise data_error(
                path, line,
                f"prompt has {len(ids)} tokens (bos included) but at most {max_prompt_len} fit "
                "(model.seq_length - ppo.max_new_tokens)",
                "raise model.seq_length, lower ppo.max_new_tokens, or shorten/remove this prompt",
            )
        prompts.append(PromptRecord(ids, text, record, str(path), line))
    return prompts


def load_pretrain(path, tokenizer, seq_length: int) -> List[SftExample]:
    """Read pretraining documents and cut them into chunks (see module docstring).

    Returns ``SftExample(prompt_ids=[first token], response_ids=the rest)`` per chunk;
    every chunk but the last has ``seq_length + 1`` tokens.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be >= 1")
    stream: List[int] = []
    for _, record in read_jsonl(path, {"text": str}, TEXT_FIX):
        stream += [*bos_prefix(tokenizer), *tokenizer.encode(record["text"]), tokenizer.eos_id]
    chunks = []
    # chunk c covers stream[c*seq_length : c*seq_length + seq_length + 1]; consecutive
    # chunks overlap by one token so no target is lost at a chunk boundary
    for start in range(0, len(stream) - 1, seq_length):
        chunk = stream[start : start + seq_length + 1]
        chunks.append(SftExample(chunk[:1], chunk[1:]))
    return chunks
