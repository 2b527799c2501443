"""Tokenizer wrapper and training: round trips, special ids, fingerprint, determinism, errors."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megatron_rlhf.data.jsonl import DataError  # noqa: E402
from megatron_rlhf.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

TINY = os.path.join(REPO, "examples", "tiny", "tokenizer.model")
LINES = [f"List {n} fruits. apple, pear, plum." for n in range(1, 6)] + ["A plum is a fruit.", "Red is a color."] * 5


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.load(TINY)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_special_ids_and_size(tiny):
    assert (tiny.pad_id, tiny.bos_id, tiny.eos_id) == (0, 1, 2)
    assert tiny.vocab_size == 512
    assert tiny.id_to_piece(0) == "<pad>" and tiny.id_to_piece(3) == "<unk>"


@pytest.mark.parametrize("text", ["List 3 fruits.", "apple, pear, plum.", "zebra  двa\ttabs 😀 ☃", "Mexico"])
def test_round_trip_any_text(tiny, text):
    ids = tiny.encode(text)
    assert ids and all(0 <= i < tiny.vocab_size for i in ids)
    assert tiny.bos_id not in ids and tiny.eos_id not in ids  # encode adds no specials
    assert tiny.decode(ids) == text
    assert 3 not in ids  # byte fallback: never <unk>


def test_items_are_single_tokens(tiny):
    # the tiny task relies on it: a response is ~2 tokens per item
    assert len(tiny.encode("apple")) == 1 and len(tiny.encode("Mexico")) == 1


def test_decode_skips_padding_rows_and_specials(tiny):
    ids = tiny.encode("apple, pear.")
    assert tiny.decode([tiny.bos_id, *ids, tiny.eos_id, tiny.pad_id, 512, 1000, -100]) == "apple, pear."
    import torch
    assert tiny.decode(torch.tensor(ids + [700])) == "apple, pear."


def test_prompt_response_concatenation_reads_naturally(tiny):
    ids = tiny.encode("List 2 fruits.") + tiny.encode("apple, pear.")
    assert tiny.decode(ids) == "List 2 fruits. apple, pear."


def test_fingerprint_and_serialization(tiny, corpus, tmp_path):
    again = Tokenizer.from_serialized(tiny.serialized_model())
    assert again.fingerprint() == tiny.fingerprint()
    assert len(tiny.fingerprint()) == 16 and int(tiny.fingerprint(), 16) >= 0
    assert again.encode("List 3 fruits.") == tiny.encode("List 3 fruits.")
    other = train_tokenizer([corpus], 300, tmp_path / "other")
    assert other.fingerprint() != tiny.fingerprint()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(corpus, tmp_path, model_type):
    a = train_tokenizer([corpus], 288, tmp_path / "a", model_type)
    b = train_tokenizer([corpus], 288, tmp_path / "b", model_type)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.fingerprint() == b.fingerprint()
    assert a.vocab_size == 288 and (a.pad_id, a.bos_id, a.eos_id) == (0, 1, 2)
    assert len((tmp_path / "a.vocab").read_text(encoding="utf-8").splitlines()) == 288
    assert Tokenizer.load(tmp_path / "a.model").fingerprint() == a.fingerprint()


def test_missing_model_names_path_and_tool(tmp_path):
    with pytest.raises(DataError) as info:
        Tokenizer.load(tmp_path / "nope.model")
    assert "nope.model" in str(info.value) and "tools/train_tokenizer.py" in str(info.value)


def test_corrupt_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer.load(bad)


def test_pad_falls_back_to_eos():
    import sentencepiece as spm
    import io
    writer = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(LINES), model_writer=writer, vocab_size=30,
                                   pad_id=-1, minloglevel=2, num_threads=1)
    tok = Tokenizer.from_serialized(writer.getvalue())
    assert tok.pad_id == tok.eos_id >= 0


def test_vocab_too_small_or_too_large(corpus, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([corpus], 100, tmp_path / "x")
    with pytest.raises(ValueError, match="lower --vocab-size"):
        train_tokenizer([corpus], 5000, tmp_path / "x")


def test_cli(corpus, tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), str(corpus),
         "--vocab-size", "300", "--model-prefix", str(tmp_path / "cli")],
        capture_output=True, text=True, check=True,
    )
    assert "vocab_size=300" in out.stdout and (tmp_path / "cli.model").is_file()


def test_cli_error_is_one_line_not_a_traceback(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", os.path.join(REPO, "tools", "train_tokenizer.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "none.txt"), "--vocab-size", "300", "--model-prefix", str(tmp_path / "x")]) == 1
    assert "error: tokenizer training text not found" in capsys.readouterr().err
