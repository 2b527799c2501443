"""The tokenizer interface every stage uses, over SentencePiece or Hugging Face ``tokenizers``.

    tok = Tokenizer.load("examples/tiny/tokenizer.model")   # SentencePiece model file
    tok = Tokenizer.load("hf/Qwen2.5-0.5B")                # a folder: tokenizer.model or tokenizer.json
    tok = Tokenizer.load("runs/sft/checkpoints/best")      # a checkpoint folder (whatever it carries)
    tok.save(folder)                                       # its own files, loadable by Tokenizer.load(folder)

The interface: ``encode(text)`` (no special tokens), ``decode(ids)``, ``bos_id`` (the token
the data loaders put first, or None where the tokenizer's own convention adds none, as for
GPT-2 and Qwen), ``eos_id``, ``pad_id``, ``vocab_size`` (the rows of the embedding it
indexes), ``chat_template``, ``serialized_model()`` (every byte that defines it) and
``fingerprint()`` (a hash of those bytes, stored in checkpoints).

SentencePiece models this project trains (``train_tokenizer``)::

    pad = 0   <pad>   padding only; never a target (loss masks are False there)
    bos = 1   <s>     starts every sequence
    eos = 2   </s>    ends every response / document
    unk = 3   <unk>   never produced: byte_fallback encodes any text as UTF-8 bytes

Text is kept verbatim (identity normalisation, whitespace preserved), so
``decode(encode(text)) == text`` for any string. A leading "▁" (space) is added to every
encoded piece of text, so ``encode(prompt) + encode(response)`` decodes as "prompt
response": every stage tokenises the prompt and the response SEPARATELY and concatenates
the ids, which is exactly what PPO does when it generates a response after a prompt.

Hugging Face tokenizers (``tokenizer.json``: byte-level BPE of GPT-2, Llama-3, Qwen,
Mistral-Nemo...). Special tokens come from ``tokenizer_config.json``, then
``generation_config.json``, then ``config.json``; bos is used only if the tokenizer adds
it itself (its post-processor, or ``add_bos_token``), so our sequences are those
``transformers`` builds. ``vocab_size`` is the larger of the tokenizer's ids and the
model's ``config.json`` ``vocab_size`` (Qwen2.5 pads 151665 tokens to 151936 rows); ids
past the tokenizer's own decode to nothing. The chat template is ``tokenizer_config.json``'s
``chat_template`` (or ``chat_template.jinja``). ``serialized_model()`` is a canonical JSON
bundle of ``tokenizer.json``'s text and the resolved special tokens, template and size;
``from_serialized`` and ``load`` of a file holding it rebuild the same tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import sentencepiece as spm

from .common import bos_prefix
from .jsonl import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# 256 byte pieces (byte_fallback) + the 4 special pieces above
MIN_VOCAB_SIZE = 256 + 4
BUNDLE_FORMAT = "megatron-rlhf/hf-tokenizer/1"
SP_FILE, HF_FILE, HF_CONFIG, GEN_CONFIG, MODEL_CONFIG, TEMPLATE_FILE = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "chat_template.jinja",
)

_HOW_TO_BUILD = (
    "give a SentencePiece .model file, a Hugging Face folder with tokenizer.json (as save_pretrained writes it), "
    "or a checkpoint folder; to build one, run `python tools/train_tokenizer.py TEXT_FILE... --vocab-size 512 "
    "--model-prefix OUT` (it writes OUT.model), or for the tiny example `python examples/tiny/make_data.py`"
)


class Tokenizer(ABC):
    """What every stage needs from a tokenizer. Build with ``Tokenizer.load(path)`` or
    ``Tokenizer.from_serialized(b)``; the subclasses are :class:`SentencePieceTokenizer`
    and :class:`HFTokenizer`."""

    source: str = "<memory>"
    chat_template: Optional[str] = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        """A SentencePiece ``.model`` file, a ``tokenizer.json``, a serialized bundle, or a
        folder holding one (``tokenizer.model`` first, then ``tokenizer.json``). A run's
        output folder or ``checkpoints/`` resolves to its newest checkpoint."""
        p = Path(path)
        if not str(path) or not p.exists():
            raise DataError(f"tokenizer not found: {str(path)!r}.\n  Fix: {_HOW_TO_BUILD}", path)
        if p.is_dir():
            return cls._load_folder(p)
        if p.name.endswith(".json") and p.name != HF_CONFIG:
            return HFTokenizer.from_folder(p.parent, tokenizer_json=p)
        return cls._from_bytes(p.read_bytes(), str(p))

    @classmethod
    def _load_folder(cls, folder: Path) -> "Tokenizer":
        if (folder / SP_FILE).is_file():
            return cls._from_bytes((folder / SP_FILE).read_bytes(), str(folder / SP_FILE))
        if (folder / HF_FILE).is_file():
            return HFTokenizer.from_folder(folder)
        # a run's output folder, checkpoints/ or latest-style pointer: its newest checkpoint
        for sub in (folder / "checkpoints", folder):
            pointer = sub / "latest"
            if pointer.is_file():
                target = sub / pointer.read_text().strip()
                if target.is_dir() and target != folder:
                    return cls._load_folder(target)
        has = sorted(q.name for q in folder.iterdir())[:12]
        hint = ""
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            hint = (" It has vocab.json + merges.txt only: write tokenizer.json with `transformers.AutoTokenizer"
                    f".from_pretrained('{folder}').save_pretrained('{folder}')`.")
        raise DataError(
            f"{folder} holds no tokenizer (neither {SP_FILE} nor {HF_FILE}; it has: {', '.join(has) or 'nothing'}).{hint}"
            f"\n  Fix: {_HOW_TO_BUILD}", folder,
        )

    @classmethod
    def from_serialized(cls, data: bytes) -> "Tokenizer":
        """Rebuild from ``serialized_model()`` bytes (e.g. stored inside a checkpoint)."""
        return cls._from_bytes(bytes(data), "<serialized>")

    @classmethod
    def _from_bytes(cls, data: bytes, source: str) -> "Tokenizer":
        if data.lstrip()[:1] == b"{":
            return HFTokenizer.from_bundle(data, source)
        return SentencePieceTokenizer.from_proto(data, source)

    # ------------------------------------------------------------------ the interface

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        ...

    @property
    @abstractmethod
    def bos_id(self) -> Optional[int]:
        ...

    @property
    @abstractmethod
    def eos_id(self) -> int:
        ...

    @property
    @abstractmethod
    def pad_id(self) -> int:
        ...

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        ...

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        ...

    @abstractmethod
    def serialized_model(self) -> bytes:
        ...

    @abstractmethod
    def save(self, folder: Union[str, Path]) -> List[str]:
        """Write this tokenizer's files into ``folder`` (created if needed); returns their
        names. ``Tokenizer.load(folder)`` gives back a tokenizer with the same fingerprint."""
        ...

    @property
    def bos_ids(self) -> List[int]:
        """``[bos_id]``, or ``[]`` where the tokenizer adds no bos: what starts a sequence."""
        return bos_prefix(self)

    def fingerprint(self) -> str:
        """Short sha256 of ``serialized_model()``: equal iff the tokenizers are the same.
        Checkpoints store it so loading with a different tokenizer can be refused."""
        return hashlib.sha256(self.serialized_model()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


def _clean(ids: Iterable[int], size: int) -> List[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids if 0 <= int(i) < size]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``tokenizer.model``)."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
        self._sp = processor
        self.source = source

    @classmethod
    def from_proto(cls, proto: bytes, source: str) -> "SentencePieceTokenizer":
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{source}: not a SentencePiece model ({exc}).\n  Fix: {_HOW_TO_BUILD}", source) from None
        return cls(processor, source)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> Optional[int]:
        bos = self._sp.bos_id()
        return bos if bos >= 0 else None

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # a model trained elsewhere may have pad disabled (-1); padding must still be a valid
        # embedding index, and eos is harmless there because padding is always masked out
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without bos/eos."""
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``. Ids outside ``[0, vocab_size)`` (embedding padding rows a model
        may sample, or -100 style ignore labels) are skipped; special tokens decode to ''."""
        return self._sp.DecodeIds(_clean(ids, self.vocab_size))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def serialized_model(self) -> bytes:
        return self._sp.serialized_model_proto()

    def save(self, folder: Union[str, Path]) -> List[str]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SP_FILE).write_bytes(self.serialized_model())
        return [SP_FILE]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})", path) from None
    return data if isinstance(data, dict) else {}


def _template_of(tcfg: dict, folder: Path) -> Optional[str]:
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (folder / TEMPLATE_FILE).is_file():
        template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    return template or None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``) with resolved special
    tokens. ``settings``: ``bos_token``/``eos_token``/``pad_token``/``unk_token`` (strings or
    None), ``add_bos`` (does a sequence start with bos), ``chat_template``, ``vocab_size``."""

    def __init__(self, tokenizer_json: str, settings: dict, source: str = "<memory>"):
        from tokenizers import Tokenizer as _Backend

        try:
            self._tk = _Backend.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception on bad input
            raise DataError(f"{source}: not a valid tokenizer.json ({exc}).\n  Fix: {_HOW_TO_BUILD}", source) from None
        self._json = tokenizer_json
        self.source = source
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.num_tokens = max(vocab.values()) + 1 if vocab else 0
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = settings.get(key)
            if token is not None and self._tk.token_to_id(token) is None:
                raise DataError(f"{source}: {key} {token!r} is not in the tokenizer's vocabulary", source)
            ids[key] = None if token is None else self._tk.token_to_id(token)
        if ids["eos_token"] is None:
            raise DataError(
                f"{source}: no eos token: tokenizer_config.json has no eos_token and generation_config.json / config.json "
                f"no eos_token_id.\n  Fix: add \"eos_token\": \"<the end-of-text token>\" to tokenizer_config.json", source,
            )
        if settings.get("add_bos") and ids["bos_token"] is None:
            raise DataError(f"{source}: add_bos_token is set but the tokenizer has no bos_token", source)
        size = int(settings.get("vocab_size") or 0)
        self.settings = dict(settings, vocab_size=max(size, self.num_tokens))
        self._ids = ids
        self.chat_template = self.settings.get("chat_template")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_json: Optional[Path] = None) -> "HFTokenizer":
        """``tokenizer.json`` plus whatever of ``tokenizer_config.json``,
        ``generation_config.json``, ``config.json`` and ``chat_template.jinja`` sits beside it."""
        folder = Path(folder)
        path = Path(tokenizer_json) if tokenizer_json else folder / HF_FILE
        text = path.read_text(encoding="utf-8")
        tcfg = _read_json(folder / HF_CONFIG)
        if isinstance(tcfg.get("megatron_rlhf"), dict):  # written by save(): already resolved
            return cls(text, tcfg["megatron_rlhf"], str(path))
        from tokenizers import Tokenizer as _Backend

        try:
            backend = _Backend.from_str(text)
        except Exception as exc:
            raise DataError(f"{path}: not a valid tokenizer.json ({exc}).\n  Fix: {_HOW_TO_BUILD}", path) from None
        others = [_read_json(folder / GEN_CONFIG), _read_json(folder / MODEL_CONFIG)]
        n = backend.get_vocab_size(with_added_tokens=True)

        def token(name: str) -> Optional[str]:
            value = tcfg.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and backend.token_to_id(value) is not None:
                return value
            for other in others:
                tid = other.get(f"{name}_id")
                if isinstance(tid, list):
                    tid = tid[0] if tid else None
                if isinstance(tid, int) and backend.id_to_token(tid) is not None:
                    return backend.id_to_token(tid)
            return None

        bos = token("bos_token")
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:  # what the tokenizer's post-processor does
            plain = backend.encode("a", add_special_tokens=False).ids
            full = backend.encode("a").ids
            prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
            add_bos = len(prefix) == 1 and (bos is None or backend.token_to_id(bos) == prefix[0])
            if add_bos:
                bos = backend.id_to_token(prefix[0])
        model_vocab = others[1].get("vocab_size")
        settings = dict(
            bos_token=bos, eos_token=token("eos_token"), pad_token=token("pad_token"), unk_token=token("unk_token"),
            add_bos=bool(add_bos and bos is not None), chat_template=_template_of(tcfg, folder),
            vocab_size=max(n, model_vocab if isinstance(model_vocab, int) else 0),
        )
        return cls(text, settings, str(path))

    @classmethod
    def from_bundle(cls, data: bytes, source: str) -> "HFTokenizer":
        try:
            bundle = json.loads(data.decode("utf-8"))
        except ValueError as exc:
            raise DataError(f"{source}: neither a SentencePiece model nor a tokenizer bundle ({exc})", source) from None
        if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
            raise DataError(f"{source}: a JSON file, but not a megatron-rlhf tokenizer bundle (format {BUNDLE_FORMAT})", source)
        return cls(bundle["tokenizer_json"], bundle["settings"], source)

    # ------------------------------------------------------------------ the interface

    @property
    def vocab_size(self) -> int:
        return self.settings["vocab_size"]

    @property
    def bos_id(self) -> Optional[int]:
        return self._ids["bos_token"] if self.settings.get("add_bos") else None

    @property
    def eos_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def pad_id(self) -> int:
        pad = self._ids["pad_token"]
        return pad if pad is not None else self.eos_id

    def special_ids(self) -> dict:
        """Declared special ids for a Hugging Face config (bos even where it is not added)."""
        return {k[: -len("_token")]: v for k, v in self._ids.items()}

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without bos/eos (special tokens written in the text, such
        as a chat template's ``<|im_start|>``, are recognised, as in ``transformers``)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens and ids past the tokenizer's own (embedding
        padding rows) are skipped."""
        return self._tk.decode(_clean(ids, self.num_tokens), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tk.id_to_token(int(token_id)) or ""

    def serialized_model(self) -> bytes:
        bundle = {"format": BUNDLE_FORMAT, "settings": self.settings, "tokenizer_json": self._json}
        return json.dumps(bundle, sort_keys=True, ensure_ascii=False).encode("utf-8")

    def save(self, folder: Union[str, Path], model_max_length: Optional[int] = None) -> List[str]:
        """``tokenizer.json`` as loaded, and a ``tokenizer_config.json`` that ``transformers``
        reads (``PreTrainedTokenizerFast``: tokenizer.json as written) and that keeps our
        resolved settings under ``"megatron_rlhf"``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / HF_FILE).write_text(self._json, encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if self.settings.get(key) is not None:
                config[key] = self.settings[key]
        if self.settings.get("pad_token") is None:
            config["pad_token"] = self.settings["eos_token"]  # transformers pads with it, as we do
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if model_max_length:
            config["model_max_length"] = int(model_max_length)
        config["megatron_rlhf"] = self.settings
        (folder / HF_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [HF_FILE, HF_CONFIG]


def train_tokenizer(
    text_files: Sequence[Union[str, Path]],
    vocab_size: int,
    model_prefix: Union[str, Path],
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> "SentencePieceTokenizer":
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
    tokenizer = SentencePieceTokenizer.from_proto(writer.getvalue(), "<trained>")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = prefix.with_name(prefix.name + ".model")
    model_path.write_bytes(tokenizer.serialized_model())
    sp = tokenizer._sp
    vocab_lines = [f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}" for i in range(sp.GetPieceSize())]
    prefix.with_name(prefix.name + ".vocab").write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
    tokenizer.source = str(model_path)
    return tokenizer
