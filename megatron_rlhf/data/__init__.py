"""Data: the tokenizer interface (SentencePiece, Hugging Face ``tokenizers``), chat templates,
validated JSONL loaders and batch collation for SFT, RM and PPO.

Conventions shared by every module here:

* sequences are ``[bos] + prompt + response + [eos]``, prompt and response tokenised apart
  (no bos for a tokenizer that adds none: ``bos_id`` None); a chat line is rendered by the
  tokenizer's template instead (:mod:`.chat`);
* batches are right-padded with ``pad_id``; a ``*_mask`` is True where a token COUNTS;
* a bad line raises ``DataError`` naming ``path:line`` and the fix.
"""

from .common import LoadStats, pad_sequences
from .jsonl import DataError, read_jsonl
from .prompts import load_pretrain, load_prompts, prompt_budget
from .ranking import ComparisonBatch, ComparisonExample, collate_comparisons, load_comparisons
from .sampler import epoch_order, split_holdout
from .sft import SftBatch, SftDataset, SftExample, collate_sft, load_sft
from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, train_tokenizer

__all__ = [
    "ComparisonBatch", "ComparisonExample", "DataError", "LoadStats", "SftBatch", "SftDataset", "SftExample",
    "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "collate_comparisons", "collate_sft", "epoch_order", "load_comparisons", "load_pretrain",
    "load_prompts", "load_sft", "pad_sequences", "prompt_budget", "read_jsonl", "split_holdout", "train_tokenizer",
]
