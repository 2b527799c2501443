"""SFT data: loss mask on exactly the response + eos, truncation policies, collation, order."""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megatron_rlhf.data import DataError, SftDataset, Tokenizer, collate_sft, epoch_order, load_sft, split_holdout  # noqa: E402
from megatron_rlhf.data.sft import SftExample  # noqa: E402

BOS, EOS, PAD = 1, 2, 0


class NumberTokenizer:
    """'10 11 12' -> [10, 11, 12]: lengths and ids under the test's control."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text):
        return [int(w) for w in text.split()]


def ids(start, n):
    return " ".join(str(start + i) for i in range(n))


def write(tmp_path, records):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_loss_mask_exactly_response_and_eos(tmp_path):
    path = write(tmp_path, [{"prompt": "10 11 12", "response": "20 21"}, {"prompt": "30", "response": "40"}])
    examples, stats = load_sft(path, NumberTokenizer(), seq_length=64)
    assert examples[0] == SftExample([BOS, 10, 11, 12], [20, 21, EOS])
    batch = collate_sft(examples, PAD, pad_to_multiple_of=16)
    assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == batch.position_ids.shape == (2, 16)
    assert batch.tokens.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.long
    assert batch.loss_mask.dtype == torch.bool
    assert batch.tokens[0, :6].tolist() == [BOS, 10, 11, 12, 20, 21] and (batch.tokens[0, 6:] == PAD).all()
    assert batch.labels[0, :6].tolist() == [10, 11, 12, 20, 21, EOS]
    assert batch.loss_mask[0].tolist() == [False] * 3 + [True] * 3 + [False] * 10
    assert batch.labels[0][batch.loss_mask[0]].tolist() == [20, 21, EOS]
    assert batch.labels[1][batch.loss_mask[1]].tolist() == [40, EOS] and int(batch.loss_mask[1].sum()) == 2
    assert batch.position_ids[1].tolist() == list(range(16))
    assert (stats.records, stats.kept, stats.truncated, stats.dropped) == (2, 2, 0, 0)


def test_width_rounding_and_cap():
    ex = [SftExample([BOS, 5], [6] * 17 + [EOS])]  # 20 tokens -> input 19
    assert collate_sft(ex, PAD, pad_to_multiple_of=16).tokens.shape[1] == 32
    assert collate_sft(ex, PAD, pad_to_multiple_of=16, max_len=24).tokens.shape[1] == 24
    assert collate_sft(ex, PAD, pad_to_multiple_of=1).tokens.shape[1] == 19
    with pytest.raises(ValueError, match="does not fit max_len=18"):
        collate_sft(ex, PAD, max_len=18)


def test_prompt_left_drops_oldest_prompt_tokens(tmp_path):
    path = write(tmp_path, [{"prompt": ids(100, 10), "response": ids(200, 3)}])
    (example,), stats = load_sft(path, NumberTokenizer(), seq_length=10)
    # limit 11 = bos + 6 newest prompt tokens + 3 response + eos
    assert example.prompt_ids == [BOS, 104, 105, 106, 107, 108, 109]
    assert example.response_ids == [200, 201, 202, EOS]
    assert (stats.truncated, stats.kept, stats.dropped) == (1, 1, 0) and stats.examples == [f"{path}:1"]
    assert collate_sft([example], PAD, max_len=10).tokens.shape == (1, 10)


def test_prompt_left_cuts_long_response_tail_without_eos(tmp_path):
    path = write(tmp_path, [{"prompt": ids(100, 10), "response": ids(200, 20)}])
    (example,), stats = load_sft(path, NumberTokenizer(), seq_length=15)
    # budget 14 -> the prompt keeps a quarter (3); the response gets the other 12 slots
    assert example.prompt_ids == [BOS, 107, 108, 109]
    assert example.response_ids == [200 + i for i in range(12)] and EOS not in example.response_ids
    batch = collate_sft([example], PAD, max_len=15)
    assert batch.tokens.shape == (1, 15) and int(batch.loss_mask.sum()) == 12
    assert stats.truncated == 1


def test_drop_policy_counts(tmp_path):
    path = write(tmp_path, [{"prompt": "10", "response": "20"}, {"prompt": ids(100, 30), "response": "20"},
                            {"prompt": "11", "response": "21"}])
    examples, stats = load_sft(path, NumberTokenizer(), seq_length=8, truncation="drop")
    assert [e.prompt_ids for e in examples] == [[BOS, 10], [BOS, 11]]
    assert (stats.records, stats.kept, stats.dropped, stats.truncated) == (3, 2, 1, 0)
    assert stats.examples == [f"{path}:2"] and "1 dropped" in str(stats)


def test_error_policy_names_line(tmp_path):
    path = write(tmp_path, [{"prompt": "10", "response": "20"}, {"prompt": ids(100, 30), "response": "20"}])
    with pytest.raises(DataError) as info:
        load_sft(path, NumberTokenizer(), seq_length=8, truncation="error")
    assert f"{path}:2: demonstration too long: 33 tokens" in str(info.value)
    assert "data.truncation" in str(info.value) and info.value.line == 2


def test_exact_fit_is_not_truncated(tmp_path):
    path = write(tmp_path, [{"prompt": ids(100, 3), "response": ids(200, 3)}])  # 8 tokens = seq_length + 1
    (example,), stats = load_sft(path, NumberTokenizer(), seq_length=7, truncation="error")
    assert stats.truncated == 0 and collate_sft([example], PAD, max_len=7).tokens.shape == (1, 7)


def test_everything_dropped_is_an_error(tmp_path):
    path = write(tmp_path, [{"prompt": ids(100, 30), "response": "20"}])
    with pytest.raises(DataError, match="every demonstration was dropped"):
        load_sft(path, NumberTokenizer(), seq_length=8, truncation="drop")


def test_bad_policy():
    with pytest.raises(ValueError, match="data.truncation"):
        load_sft("unused", NumberTokenizer(), 8, truncation="left")


def test_epoch_order_is_deterministic_and_resumable():
    a = epoch_order(50, seed=7, epoch=0)
    assert a == epoch_order(50, seed=7, epoch=0) and sorted(a) == list(range(50)) and a != list(range(50))
    assert a != epoch_order(50, seed=7, epoch=1) and a != epoch_order(50, seed=8, epoch=0)
    assert epoch_order(50, seed=1, epoch=0) != epoch_order(50, seed=0, epoch=1)
    assert epoch_order(5, seed=7, epoch=3, shuffle=False) == [0, 1, 2, 3, 4]
    dataset = SftDataset([SftExample([BOS], [i, EOS]) for i in range(50)], seed=7)
    consumed = dataset.order(2)[:20]  # a run stopped at (epoch=2, offset=20) ...
    resumed = SftDataset(dataset.examples, seed=7).order(2)[20:]  # ... and resumes
    assert consumed + resumed == epoch_order(50, 7, 2) and len(dataset) == 50


def test_split_holdout():
    train, valid = split_holdout(100, 0.1, seed=3)
    assert len(valid) == 10 and sorted(train + valid) == list(range(100))
    assert (train, valid) == split_holdout(100, 0.1, seed=3) and valid != split_holdout(100, 0.1, seed=4)[1]
    assert split_holdout(10, 0.0, seed=3) == (list(range(10)), [])
    assert len(split_holdout(10, 0.01, seed=3)[1]) == 1


def test_tiny_example_data():
    tok = Tokenizer.load(os.path.join(REPO, "examples/tiny/tokenizer.model"))
    examples, stats = load_sft(os.path.join(REPO, "examples/tiny/data/sft_train.jsonl"), tok, seq_length=64)
    assert len(examples) == 2000 and stats.truncated == stats.dropped == 0
    batch = collate_sft(examples[:8], tok.pad_id, max_len=64)
    first = json.loads(open(os.path.join(REPO, "examples/tiny/data/sft_train.jsonl")).readline())
    target = batch.labels[0][batch.loss_mask[0]].tolist()
    assert target[-1] == tok.eos_id and tok.decode(target) == first["response"]
    # the input at the last prompt position predicts the first response token
    first_target = int(batch.loss_mask[0].nonzero()[0])
    assert tok.decode(batch.tokens[0][: first_target + 1]) == first["prompt"]
    assert first_target + 1 == len(examples[0].prompt_ids)
