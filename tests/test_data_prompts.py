"""PPO prompts (length limit with file:line), pretraining chunks, and the committed tiny data."""
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megatron_rlhf.config import ConfigError  # noqa: E402
from megatron_rlhf.data import (  # noqa: E402
    DataError, Tokenizer, collate_sft, load_comparisons, load_pretrain, load_prompts, load_sft, prompt_budget,
)

BOS, EOS, PAD = 1, 2, 0
TINY = os.path.join(REPO, "examples", "tiny")


class NumberTokenizer:
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text):
        return [int(w) for w in text.split()]


def write(tmp_path, records, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompts(tmp_path):
    path = write(tmp_path, [{"prompt": "10 11", "id": 7}, {"prompt": "12"}])
    assert load_prompts(path, NumberTokenizer(), max_prompt_len=3) == [[BOS, 10, 11], [BOS, 12]]


def test_prompt_too_long_names_line_and_fix(tmp_path):
    path = write(tmp_path, [{"prompt": "10"}, {"prompt": "10 11 12"}])
    with pytest.raises(DataError) as info:
        load_prompts(path, NumberTokenizer(), max_prompt_len=3)
    message = str(info.value)
    assert f"{path}:2: prompt has 4 tokens (bos included) but at most 3 fit" in message
    assert "raise model.seq_length" in message and "lower ppo.max_new_tokens" in message


def test_prompt_errors(tmp_path):
    with pytest.raises(DataError, match="no records"):
        load_prompts(write(tmp_path, []), NumberTokenizer(), 8)
    with pytest.raises(DataError, match=r"p.jsonl:1: missing key 'prompt'"):
        load_prompts(write(tmp_path, [{"text": "1"}]), NumberTokenizer(), 8)


def test_prompt_budget():
    assert prompt_budget(256, 64) == 192
    with pytest.raises(ConfigError, match="ppo.max_new_tokens=255"):
        prompt_budget(256, 255)


def test_pretrain_chunks_cover_every_token_once(tmp_path):
    path = write(tmp_path, [{"text": "10 11 12"}, {"text": "13 14"}, {"text": "15"}])
    stream = [BOS, 10, 11, 12, EOS, BOS, 13, 14, EOS, BOS, 15, EOS]  # 12 tokens
    chunks = load_pretrain(path, NumberTokenizer(), seq_length=4)
    assert [c.tokens for c in chunks] == [stream[0:5], stream[4:9], stream[8:12]]
    batch = collate_sft(chunks, PAD, pad_to_multiple_of=1, max_len=4)
    assert batch.tokens.shape == (3, 4)
    # every token after the first is a counted target exactly once; padding is not
    assert batch.labels[batch.loss_mask].tolist() == stream[1:]
    assert batch.loss_mask[2].tolist() == [True, True, True, False]


def test_pretrain_exact_multiple(tmp_path):
    path = write(tmp_path, [{"text": "10 11 12"}])  # 5 tokens -> one chunk of seq_length + 1
    chunks = load_pretrain(path, NumberTokenizer(), seq_length=4)
    assert [c.tokens for c in chunks] == [[BOS, 10, 11, 12, EOS]]
    with pytest.raises(DataError, match="missing key 'text'"):
        load_pretrain(write(tmp_path, [{"prompt": "1"}]), NumberTokenizer(), 4)


def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", os.path.join(TINY, "make_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tiny_data_matches_generator():
    make_data = _make_data()
    files = make_data.generate(1234)
    for name, records in files.items():
        with open(os.path.join(TINY, "data", f"{name}.jsonl"), encoding="utf-8") as handle:
            assert handle.read() == make_data.jsonl_text(records), f"{name}.jsonl is stale: rerun make_data.py"
    assert {n: len(r) for n, r in files.items()} == make_data.SIZES
    total = sum(os.path.getsize(os.path.join(TINY, "data", f)) for f in os.listdir(os.path.join(TINY, "data")))
    assert total < 2_000_000 and os.path.getsize(os.path.join(TINY, "tokenizer.model")) < 1_000_000


def test_tiny_rankings_follow_the_score():
    make_data = _make_data()
    with open(os.path.join(TINY, "data", "rm_valid.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            prompt = record["prompt"].rstrip(".?").split()
            n = int(next(w for w in prompt if w.isdigit()))
            category = next(c for c, spec in make_data.CATEGORIES.items() if prompt[-1] in spec[:2])
            scores = [make_data.score(r.rstrip(".").split(", "), category, n) for r in record["responses"]]
            assert record["ranking"] == make_data.competition_ranks(scores)
            assert len(set(record["ranking"])) > 1


def test_tiny_files_load_with_the_tiny_tokenizer():
    tok = Tokenizer.load(os.path.join(TINY, "tokenizer.model"))
    data = os.path.join(TINY, "data")
    prompts = load_prompts(os.path.join(data, "ppo_prompts.jsonl"), tok, prompt_budget(64, 32))
    assert len(prompts) == 500 and all(p[0] == tok.bos_id for p in prompts)
    chunks = load_pretrain(os.path.join(data, "pretrain.jsonl"), tok, seq_length=64)
    assert all(len(c.tokens) == 65 for c in chunks[:-1]) and tok.decode(chunks[0].tokens).startswith(
        json.loads(open(os.path.join(data, "pretrain.jsonl"), encoding="utf-8").readline())["text"])
    valid, stats = load_sft(os.path.join(data, "sft_valid.jsonl"), tok, 64)
    assert len(valid) == 200 and stats.truncated == 0
    rm_valid, _ = load_comparisons(os.path.join(data, "rm_valid.jsonl"), tok, 64)
    assert len(rm_valid) == 200
    # every demonstration is an ideal response: exactly N distinct items of the asked category
    make_data = _make_data()
    with open(os.path.join(data, "sft_train.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            words = record["prompt"].rstrip(".?").split()
            n = int(next(w for w in words if w.isdigit()))
            category = next(c for c, spec in make_data.CATEGORIES.items() if words[-1] in spec[:2])
            items = record["response"].rstrip(".").split(", ")
            assert len(items) == n and make_data.score(items, category, n) == n, record
