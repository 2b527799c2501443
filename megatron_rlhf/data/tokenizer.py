"""A small SentencePiece wrapper and the trainer behind ``tools/train_tokenizer.py``.

Special ids of every tokenizer this project trains (``train_tokenizer``)::

    pad = 0   <pad>   padding only; never a target (loss masks are False there)
    bos = 1   <s>     starts every sequence
    eos = 2   </s>    ends every response / document
    unk = 3   <unk>   never produced: byte_fallback encodes any text as UTF-8 bytes

Text is kept verbatim (identity normalisation, whitespace preserved), so
``decode(encode(text)) == text`` for any string. ``encode`` adds no special tokens; the
data loaders add bos/eos themselves. A leading "▁" (space) is added to every encoded
piece of text, so ``encode(prompt) + encode(response)`` decodes as "prompt response":
every stage tokenises the prompt and the response SEPARATELY and concatenates the ids,
which is exactly what PPO does when it generates a response after a prompt.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import sentencepiece as spm

from .jsonl import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# 256 byte pieces (byte_fallback) + the 4 special pieces above
MIN_VOCAB_SIZE = 256 + 4

_HOW_TO_BUILD = (
    "build one with `python tools/train_tokenizer.py TEXT_FILE... --vocab-size 512 --model-prefix OUT` "
    "(it writes OUT.model), or for the tiny example run `python examples/tiny/make_data.py`; "
    "then set model.tokenizer to the .model file"
)


class Tokenizer:
    """A SentencePiece model. Build with ``Tokenizer.load(path)`` or ``Tokenizer.from_serialized(b)``."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
        self._sp = processor
        self.source = source

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        p = Path(path)
        if not str(path) or not p.is_file():
            raise DataError(f"tokenizer model not found: {str(path)!r}.\n  Fix: {_HOW_TO_BUILD}", path)
        return cls._from_proto(p.read_bytes(), str(p))

    @classmethod
    def from_serialized(cls, model_proto: bytes) -> "Tokenizer":
        """Rebuild from ``serialized_model()`` bytes (e.g. stored inside a checkpoint)."""
        return cls._from_proto(bytes(model_proto), "<serialized>")

    @classmethod
    def _from_proto(cls, proto: bytes, source: str) -> "Tokenizer":
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{source}: not a SentencePiece model ({exc}).\n  Fix: {_HOW_TO_BUILD}", source) from None
        return cls(processor, source)

    # ------------------------------------------------------------------ ids

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # a model trained elsewhere may have pad disabled (-1); padding must still be a valid
        # embedding index, and eos is harmless there because padding is always masked out
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without bos/eos."""
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``. Ids outside ``[0, vocab_size)`` (embedding padding rows a model
        may sample, or -100 style ignore labels) are skipped; special tokens decode to ''."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        size = self.vocab_size
        return self._sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < size])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    # ------------------------------------------------------------------ identity

    def serialized_model(self) -> bytes:
        return self._sp.serialized_model_proto()

    def fingerprint(self) -> str:
        """Short sha256 of the model proto: equal iff the tokenizers are byte-identical.
        Checkpoints store it so loading with a different tokenizer can be refused."""
        return hashlib.sha256(self.serialized_model()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


def train_tokenizer(
    text_files: Sequence[Union[str, Path]],
    vocab_size: int,
    model_prefix: Union[str, Path],
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> Tokenizer:
    """Train a SentencePiece model on plain-text files (one sentence per line).

    Writes ``{model_prefix}.model`` and ``{model_prefix}.vocab`` (piece<TAB>score per line)
    and returns the tokenizer. Deterministic: the same files and arguments give a
    byte-identical model (one training thread; lines are streamed in, so no file paths
    are recorded in the model).
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < MIN_VOCAB_SIZE + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs {MIN_VOCAB_SIZE} ids")
    lines = []
    for name in text_files:
        p = Path(name)
        if not p.is_file():
            raise DataError(f"tokenizer training text not found: {name}", name)
        lines += [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise DataError(f"no text to train a tokenizer on in {', '.join(map(str, text_files))}")

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            normalization_rule_name="identity",  # keep text verbatim: exact round trips
            remove_extra_whitespaces=False,
            num_threads=1,  # multi-threaded EM (unigram) sums in a thread-dependent order
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(
            f"SentencePiece training failed: {str(exc).rstrip('.')}. If the vocabulary is too large for this much "
            f"text, lower --vocab-size (or add text); if too small, raise it"
        ) from None
    tokenizer = Tokenizer.from_serialized(writer.getvalue())
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = prefix.with_name(prefix.name + ".model")
    model_path.write_bytes(tokenizer.serialized_model())
    sp = tokenizer._sp
    vocab_lines = [f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}" for i in range(sp.GetPieceSize())]
    prefix.with_name(prefix.name + ".vocab").write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
    tokenizer.source = str(model_path)
    return tokenizer
