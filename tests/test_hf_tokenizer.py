"""Hugging Face ``tokenizers`` behind our Tokenizer interface: the ids transformers gives,
special tokens from the folder's configs, bos only where the tokenizer adds it, a padded
model vocabulary, and a fingerprint that survives save/load and serialisation."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from hf_fixtures import write_hf_tokenizer  # noqa: E402

from megatron_rlhf.data.jsonl import DataError  # noqa: E402
from megatron_rlhf.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer  # noqa: E402

TEXTS = ["List 3 fruits.", "  two  spaces\nand a tab\t!", "naïve café 日本語 🎉", "Hello<|im_end|> world", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    return {style: write_hf_tokenizer(root / style, style) for style in ("gpt2", "llama3", "qwen2")}


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2"])
def test_ids_match_transformers(folders, style):
    tok = Tokenizer.load(folders[style])
    hf = transformers.AutoTokenizer.from_pretrained(str(folders[style]))
    assert isinstance(tok, HFTokenizer)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False).input_ids
        assert tok.bos_ids + ids == hf(text).input_ids  # the sequence start transformers builds
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.eos_id == hf.eos_token_id
    assert tok.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
    assert tok.vocab_size == len(hf)


def test_special_tokens_per_style(folders):
    gpt2, llama3, qwen2 = (Tokenizer.load(folders[s]) for s in ("gpt2", "llama3", "qwen2"))
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (None, 0, 0)  # declared bos, never added
    assert gpt2.special_ids()["bos"] == 0
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (0, 4, 4)
    assert (qwen2.bos_id, qwen2.eos_id, qwen2.pad_id) == (None, 2, 0)
    assert llama3.chat_template and qwen2.chat_template and gpt2.chat_template is None
    assert qwen2.decode(qwen2.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"  # specials are skipped


def test_generation_config_and_padded_model_vocabulary(folders, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    for f in folders["gpt2"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    (d / "config.json").write_text(json.dumps({"vocab_size": 512}))
    tok = Tokenizer.load(d)
    assert tok.eos_id == 0  # the first of generation_config's eos ids
    assert (tok.num_tokens, tok.vocab_size) == (400, 512)  # the embedding's rows, as Qwen pads 151665 -> 151936
    ids = tok.encode("apple")
    assert tok.decode(ids + [450, 511, -100]) == "apple"  # padding rows decode to nothing


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2"])
def test_save_load_and_serialisation_keep_the_fingerprint(folders, style, tmp_path):
    tok = Tokenizer.load(folders[style])
    assert Tokenizer.load(folders[style] / "tokenizer.json").fingerprint() == tok.fingerprint()
    names = tok.save(tmp_path / "saved")
    assert sorted(names) == ["tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.load(tmp_path / "saved")
    assert again.fingerprint() == tok.fingerprint()
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size, again.chat_template) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.chat_template)
    # checkpoints write serialized_model() as tokenizer.model: that file loads too
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(tok.serialized_model())
    assert Tokenizer.load(tmp_path / "ckpt").fingerprint() == tok.fingerprint()
    assert Tokenizer.from_serialized(tok.serialized_model()).encode(TEXTS[2]) == tok.encode(TEXTS[2])
    # transformers reads what save() wrote and tokenises the same
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf(TEXTS[1]).input_ids == tok.bos_ids + tok.encode(TEXTS[1])
    assert hf.eos_token_id == tok.eos_id


def test_sentencepiece_folder_file_and_save(tmp_path):
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "examples/tiny/tokenizer.model"
    tok = Tokenizer.load(model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.bos_ids == [1]
    assert tok.save(tmp_path / "sp") == ["tokenizer.model"]
    assert Tokenizer.load(tmp_path / "sp").fingerprint() == tok.fingerprint()
    # a run folder resolves through checkpoints/latest
    it = tmp_path / "run" / "checkpoints" / "iter_0000003"
    tok.save(it)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_0000003\n")
    assert Tokenizer.load(tmp_path / "run").fingerprint() == tok.fingerprint()


def test_bad_inputs(folders, tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer.*neither tokenizer.model nor tokenizer.json"):
        Tokenizer.load(tmp_path / "empty")
    d = tmp_path / "slow"
    d.mkdir()
    (d / "vocab.json").write_text("{}")
    (d / "merges.txt").write_text("")
    with pytest.raises(DataError, match="vocab.json \\+ merges.txt only.*save_pretrained"):
        Tokenizer.load(d)
    d = tmp_path / "noeos"
    d.mkdir()
    (d / "tokenizer.json").write_text((folders["qwen2"] / "tokenizer.json").read_text())
    with pytest.raises(DataError, match="no eos token.*eos_token"):
        Tokenizer.load(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(d)
    (tmp_path / "x.model").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "x.model")
