"""Our SentencePiece model as Hugging Face tokenizer files (``tokenizer.json`` & co).

``transformers``' own SentencePiece -> fast conversion assumes Llama's BPE set-up (and in
transformers 5 always builds a BPE), so a unigram model, or one trained with
``remove_extra_whitespaces=False`` like ours, tokenises differently after conversion. We
build the ``tokenizers`` pipeline from the model proto ourselves so that it reproduces
SentencePiece exactly:

* normaliser: none for ``identity`` (ours, Llama's), else SentencePiece's precompiled
  charsmap; ``remove_extra_whitespaces`` is honoured;
* pre-tokeniser: ``Metaspace`` that always prepends "▁" (SentencePiece's dummy prefix, also
  before a leading space, which ``prepend_scheme="first"`` would not do) and splits before
  every "▁" (``split_by_whitespace``); digits split when ``split_digits``;
* model: ``Unigram`` with the piece scores, or ``BPE`` whose merges are every split of a
  piece into two pieces, ranked by the merged piece's score (SentencePiece merges the
  adjacent pair whose concatenation scores highest); byte fallback as in the model;
* decoder: "▁" -> " ", byte fallback, fuse, strip the dummy-prefix space;
* post-processor: ``<s>`` before every sequence, as our data loaders do.

:func:`tokenizer_mismatches` checks the result against SentencePiece on probe strings;
``convert_to_hf`` reports any difference instead of shipping a silently different tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Optional

from megatron_rlhf.data.tokenizer import Tokenizer

UNIGRAM, BPE = 1, 2


def _proto(tok: Tokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.serialized_model())
    return proto


def special_ids(tok: Tokenizer) -> dict:
    """bos/eos/unk/pad ids for the HF side. Pad: SentencePiece's pad piece if the model has
    one; otherwise the unk id (byte fallback never produces it), so that
    ``...ForSequenceClassification`` -- which reads the last token that is not
    ``pad_token_id`` -- never mistakes a real eos for padding."""
    sp = tok._sp
    pad = sp.pad_id()
    if pad < 0:
        pad = sp.unk_id() if sp.unk_id() >= 0 else tok.eos_id
    return {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": pad}


def build_hf_tokenizer(tok: Tokenizer):
    """A ``tokenizers.Tokenizer`` equivalent to ``tok`` (raises ValueError if not representable)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    proto = _proto(tok)
    sp = tok._sp
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("SentencePiece models with treat_whitespace_as_suffix have no tokenizers equivalent")
    n = sp.GetPieceSize()
    pieces = [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(n)]
    unk = sp.unk_id()
    byte_fallback = bool(trainer.byte_fallback)
    if trainer.model_type == UNIGRAM:
        model = models.Unigram(pieces, unk_id=unk if unk >= 0 else None, byte_fallback=byte_fallback)
    elif trainer.model_type == BPE:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        mergeable = {i for i in range(n) if not sp.IsUnknown(i) and not sp.IsControl(i) and not sp.IsByte(i) and not sp.IsUnused(i)}
        merges = []
        for i in sorted(mergeable, key=lambda i: (-pieces[i][1], i)):
            p = pieces[i][0]
            for cut in range(1, len(p)):
                left, right = vocab.get(p[:cut]), vocab.get(p[cut:])
                if left in mergeable and right in mergeable:
                    merges.append((p[:cut], p[cut:]))
        model = models.BPE(vocab, merges, unk_token=sp.IdToPiece(unk) if unk >= 0 else None, fuse_unk=True, byte_fallback=byte_fallback)
    else:
        raise ValueError(f"SentencePiece model_type {trainer.model_type} (only unigram and bpe are supported)")
    hf = HFTokenizer(model)

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    # SentencePiece always adds the dummy "▁", even before a leading space; Metaspace's
    # prepend_scheme skips text that already starts with one, so prepend in the normaliser.
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    hf.normalizer = normalizers.Sequence(steps)
    pre = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=bool(trainer.split_by_whitespace))]
    if trainer.split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    hf.pre_tokenizer = pre[0] if len(pre) == 1 else pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("▁", " ")]
    if byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(dec)

    specials = [i for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)]
    hf.add_special_tokens([AddedToken(sp.IdToPiece(i), special=True, normalized=False) for i in specials])
    bos = sp.bos_id()
    if bos >= 0:
        b = sp.IdToPiece(bos)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, bos)]
        )
    return hf


def _probes(tok: Tokenizer, extra: Optional[List[str]] = None, count: int = 300) -> List[str]:
    rng = random.Random(0)
    words = [tok.id_to_piece(i).replace("▁", " ") for i in range(tok.vocab_size) if not tok._sp.IsControl(i) and not tok._sp.IsByte(i) and not tok._sp.IsUnknown(i)]
    chars = list("abcXYZ019 .,;!?'\"()-\n\t") + ["  ", "é", "ß", "日本", "🎉", "\u00a0"]
    out = ["", " ", "  leading spaces", "trailing  ", "Hello world", "a\tb\nc", "naïve café 日本語 🎉", "x  y   z"]
    for _ in range(count):
        parts = [rng.choice(words) if rng.random() < 0.6 else rng.choice(chars) for _ in range(rng.randint(1, 12))]
        out.append("".join(parts))
    return out + list(extra or [])


def tokenizer_mismatches(tok: Tokenizer, hf_tokenizer, extra: Optional[List[str]] = None) -> List[str]:
    """Probe strings on which ``hf_tokenizer`` (a ``tokenizers.Tokenizer``) and SentencePiece
    disagree (ids without specials, or decoding)."""
    bad = []
    for text in _probes(tok, extra):
        ids = tok.encode(text)
        if hf_tokenizer.encode(text, add_special_tokens=False).ids != ids or hf_tokenizer.decode(ids) != tok.decode(ids):
            bad.append(text)
    return bad


def write_hf_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> dict:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    Returns ``{"ids": special ids, "mismatches": [...], "fast": bool}``.
    """
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.model").write_bytes(tok.serialized_model())
    ids = special_ids(tok)
    sp = tok._sp
    names = {k: (sp.IdToPiece(v) if v is not None and v >= 0 else None) for k, v in ids.items()}
    mismatches: List[str] = []
    fast = True
    try:
        hf = build_hf_tokenizer(tok)
        mismatches = tokenizer_mismatches(tok, hf)
        hf.save(str(out_dir / "tokenizer.json"))
    except ValueError:
        fast = False
    config = {
        # PreTrainedTokenizerFast loads tokenizer.json as written (transformers 4 and 5);
        # model-specific classes would rebuild their own pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "unk_token": names["unk"],
        "pad_token": names["pad"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "padding_side": "right",
    }
    if not fast:
        # no tokenizer.json: transformers converts tokenizer.model itself (approximately)
        config["tokenizer_class"] = "LlamaTokenizerFast"
    (out_dir / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2) + "\n")
    special_map = {f"{k}_token": v for k, v in names.items() if v is not None}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return {"ids": ids, "mismatches": mismatches, "fast": fast}
