"""Reward-model data: format validation (DataError with path:line), order->ranks, collation."""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megatron_rlhf.algorithms.ranking import build_ranking_pairs  # noqa: E402
from megatron_rlhf.data import DataError, Tokenizer, collate_comparisons, load_comparisons  # noqa: E402
from megatron_rlhf.data.ranking import ComparisonExample  # noqa: E402

BOS, EOS, PAD = 1, 2, 0


class NumberTokenizer:
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text):
        return [int(w) for w in text.split()]


def write(tmp_path, records):
    path = tmp_path / "rm.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def load(tmp_path, records, seq_length=64, truncation="prompt_left"):
    return load_comparisons(write(tmp_path, records), NumberTokenizer(), seq_length, truncation)


GOOD = {"prompt": "10 11", "responses": ["20", "21 22", "23"], "ranking": [2, 1, 3]}


def test_all_formats(tmp_path):
    examples, stats = load(tmp_path, [
        GOOD,
        {"prompt": "12", "responses": ["30", "31", "32"], "order": [2, 0, 1], "id": "x"},
        {"prompt": "13", "chosen": "40", "rejected": "41 42"},
        {"prompt": "14", "responses": ["50", "51", "52", "53"], "ranking": [1, 2, 2, 4]},
    ])
    assert examples[0] == ComparisonExample([BOS, 10, 11], [[20, EOS], [21, 22, EOS], [23, EOS]], [2, 1, 3])
    assert examples[1].ranks == [2, 3, 1]  # order best-first [2, 0, 1] -> rank per response
    assert examples[2] == ComparisonExample([BOS, 13], [[40, EOS], [41, 42, EOS]], [1, 2])
    assert examples[3].ranks == [1, 2, 2, 4]
    assert stats.kept == stats.records == 4


@pytest.mark.parametrize("record, message", [
    ({**GOOD, "ranking": [1, 2]}, "'ranking' has 2 entries but there are 3 responses"),
    ({"prompt": "1", "responses": ["2"], "ranking": [1]}, "1 response(s); a comparison needs K = 2..9"),
    ({"prompt": "1", "responses": ["2"] * 10, "ranking": list(range(1, 11))}, "10 response(s)"),
    ({**GOOD, "ranking": [1, 1, 1]}, "all 3 responses are tied"),
    ({**GOOD, "ranking": [0, 1, 2]}, "'ranking' [0, 1, 2]: ranks must be integers in 1..3"),
    ({**GOOD, "ranking": [1, 2, 4]}, "'ranking' [1, 2, 4]: ranks must be integers in 1..3"),
    ({**GOOD, "ranking": [1, 2, 2.5]}, "'ranking' must hold integers"),
    ({**GOOD, "ranking": [1, True, 2]}, "'ranking' must hold integers"),
    ({**GOOD, "ranking": None, "order": [0, 0, 1]}, "'order' [0, 0, 1] repeats index 0"),
    ({**GOOD, "ranking": None, "order": [0, 1, 3]}, "'order' index 3 is out of range"),
    ({**GOOD, "order": [0, 1, 2]}, 'need exactly one of "ranking"'),
    ({"prompt": "1", "responses": ["2", "3"]}, 'need exactly one of "ranking"'),
    ({**GOOD, "ranking": None}, "unranked task: fill in ranking"),
    ({"responses": ["2", "3"], "ranking": [1, 2]}, "missing key 'prompt'"),
    ({**GOOD, "responses": ["20", " ", "23"]}, "responses[1] is empty"),
    ({**GOOD, "responses": ["20", 5, "23"]}, "responses[1] must be a string"),
    ({**GOOD, "responses": "20"}, "'responses' must be a list"),
    ({"prompt": "1", "chosen": "2"}, "missing key 'rejected'"),
    ({"prompt": "1", "chosen": "2", "rejected": ""}, "'rejected' is empty"),
    ({**GOOD, "chosen": "2", "rejected": "3"}, "both pairwise"),
    ("[1, 2]", "expected a JSON object"),
])
def test_validation_errors_name_the_line(tmp_path, record, message):
    with pytest.raises(DataError) as info:
        load(tmp_path, [GOOD, record])
    assert f"rm.jsonl:2: {message}" in str(info.value) and "Fix:" in str(info.value)
    assert info.value.line == 2


def test_collate_keeps_prompts_together_and_points_at_eos(tmp_path):
    examples, _ = load(tmp_path, [GOOD, {"prompt": "12", "chosen": "40 41 42", "rejected": "43"}])
    batch = collate_comparisons(examples, PAD, pad_to_multiple_of=8)
    assert batch.tokens.shape == batch.position_ids.shape == (5, 8)
    assert batch.prompt_of.tolist() == [0, 0, 0, 1, 1] and batch.ranks.tolist() == [2, 1, 3, 1, 2]
    assert batch.last_index.tolist() == [4, 5, 4, 5, 3]
    assert (batch.tokens[torch.arange(5), batch.last_index] == EOS).all()
    assert batch.tokens[1].tolist() == [BOS, 10, 11, 21, 22, EOS, PAD, PAD]
    assert batch.num_prompts == 2 and batch.rankings() == [[2, 1, 3], [1, 2]]
    pairs = build_ranking_pairs(batch.rankings())  # interoperates with the loss
    assert pairs.offsets.tolist() == [0, 3, 5] and pairs.num_responses == batch.tokens.shape[0]


def test_collate_cap():
    example = ComparisonExample([BOS, 3], [[4, 5, EOS], [6, EOS]], [1, 2])
    assert collate_comparisons([example], PAD, pad_to_multiple_of=16, max_len=6).tokens.shape == (2, 6)
    with pytest.raises(ValueError, match="does not fit"):
        collate_comparisons([example], PAD, max_len=4)


def test_prompt_left_shares_one_prompt_cut(tmp_path):
    prompt = " ".join(str(100 + i) for i in range(10))
    (example,), stats = load(tmp_path, [{"prompt": prompt, "responses": ["20 21 22", "23"], "ranking": [1, 2]}],
                             seq_length=10)
    # longest sequence: bos + 5 newest prompt tokens + 3 + eos = 10
    assert example.prompt_ids == [BOS, 105, 106, 107, 108, 109]
    assert stats.truncated == 1 and stats.dropped == 0


def test_response_too_long_is_dropped_not_cut(tmp_path):
    long_response = " ".join(["20"] * 12)
    examples, stats = load(tmp_path, [GOOD, {"prompt": "10 11 12 13", "responses": [long_response, "21"],
                                             "ranking": [1, 2]}], seq_length=12)
    assert len(examples) == 1 and (stats.dropped, stats.kept, stats.truncated) == (1, 1, 0)


def test_drop_and_error_policies(tmp_path):
    long = {"prompt": " ".join(["10"] * 20), "responses": ["20", "21"], "ranking": [2, 1]}
    examples, stats = load(tmp_path, [GOOD, long], seq_length=12, truncation="drop")
    assert len(examples) == 1 and stats.dropped == 1 and stats.examples == [f"{tmp_path / 'rm.jsonl'}:2"]
    with pytest.raises(DataError, match="rm.jsonl:2: comparison too long: 23 tokens > model.seq_length=12"):
        load(tmp_path, [GOOD, long], seq_length=12, truncation="error")


def test_tiny_example_data():
    tok = Tokenizer.load(os.path.join(REPO, "examples/tiny/tokenizer.model"))
    data = os.path.join(REPO, "examples/tiny/data")
    examples, stats = load_comparisons(os.path.join(data, "rm_train.jsonl"), tok, 64)
    assert len(examples) == 2000 and stats.truncated == stats.dropped == 0
    assert {len(e.ranks) for e in examples} == {4, 5, 6, 7, 8, 9}  # InstructGPT's K
    pairwise, _ = load_comparisons(os.path.join(data, "rm_pairwise_sample.jsonl"), tok, 64)
    assert all(e.ranks == [1, 2] for e in pairwise)
    batch = collate_comparisons(examples[:4], tok.pad_id, max_len=64)
    assert batch.tokens.shape[0] == sum(len(e.ranks) for e in examples[:4])
    assert (batch.tokens[torch.arange(batch.tokens.shape[0]), batch.last_index] == tok.eos_id).all()
