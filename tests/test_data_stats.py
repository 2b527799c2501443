"""`megatron-rlhf data-stats`: format detection, nearest-rank percentiles, and truncation counts that
agree with the stages' own loaders, on the tiny example data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_rlhf.data import DataError, Tokenizer, load_comparisons, load_pretrain, load_prompts, load_sft
from megatron_rlhf.commands.data_stats import main
from megatron_rlhf.data.stats import percentile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples/tiny/data"
TOKENIZER = ROOT / "examples/tiny/tokenizer.model"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(TOKENIZER)


def stats(capsys, *args, status=0):
    assert main([*map(str, args), "--tokenizer", str(TOKENIZER), "--json", "--no-progress"]) == status
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7 and percentile([1, 2], 50) == 1 and percentile([1, 2], 51) == 2


@pytest.mark.parametrize("name, fmt", [
    ("sft_train", "sft"), ("rm_train", "ranking"), ("rm_pairwise_sample", "pairwise"),
    ("ppo_prompts", "prompts"), ("pretrain", "pretrain"),
])
def test_detects_every_tiny_format(name, fmt, capsys):
    path = DATA / f"{name}.jsonl"
    (result,) = stats(capsys, path)
    lines = len(path.read_text().splitlines())
    assert result["format"] == fmt and result["records"] == lines and result["invalid"] == 0
    assert result["context"] is None  # no --seq-length: lengths only


def test_sft_truncation_counts_match_load_sft(tok, capsys):
    path = DATA / "sft_valid.jsonl"
    for policy in ("prompt_left", "drop"):
        (result,) = stats(capsys, path, "--seq-length", 12, "--truncation", policy)
        ctx = result["context"]
        try:
            _, loaded = load_sft(path, tok, 12, policy)
            expected = (loaded.kept - loaded.truncated, loaded.truncated, loaded.dropped)
        except DataError:  # every line dropped
            expected = (0, 0, result["records"])
        assert (ctx["fits"], ctx["truncated"], ctx["dropped"]) == expected, policy
        assert ctx["limit"] == 13
    assert ctx["dropped"] > 0 and ctx["examples"]["dropped"][0].startswith(f"{path}:")
    (result,) = stats(capsys, path, "--seq-length", 12, "--truncation", "error")
    assert result["context"]["error"] == 200 - result["context"]["fits"] > 0
    with pytest.raises(DataError):
        load_sft(path, tok, 12, "error")


def test_ranking_truncation_counts_match_load_comparisons(tok, capsys):
    path = DATA / "rm_valid.jsonl"
    for policy in ("prompt_left", "drop"):
        (result,) = stats(capsys, path, "--seq-length", 14, "--truncation", policy)
        ctx = result["context"]
        _, loaded = load_comparisons(path, tok, 14, policy)
        assert (ctx["fits"], ctx["truncated"], ctx["dropped"]) == (loaded.kept - loaded.truncated, loaded.truncated, loaded.dropped)
        assert ctx["dropped"] > 0
    assert ctx["examples"]["dropped"][:len(loaded.examples)] == loaded.examples
    assert sum(int(n) for n in result["responses_per_prompt"].values()) == 200


def test_token_percentiles_are_those_of_the_tokenizer(tok, capsys):
    path = DATA / "rm_pairwise_sample.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    prompt = [len(tok.encode(r["prompt"])) for r in records]
    response = [len(tok.encode(r[k])) for r in records for k in ("chosen", "rejected")]
    total = [2 + len(tok.encode(r["prompt"])) + len(tok.encode(r[k])) for r in records for k in ("chosen", "rejected")]
    (result,) = stats(capsys, path)
    for key, values in (("prompt", prompt), ("response", response), ("total", total)):
        got = result["tokens"][key]
        for p in (50, 90, 99):
            assert got[f"p{p}"] == int(np.percentile(values, p, method="inverted_cdf")), (key, p)
        assert (got["min"], got["max"], got["count"]) == (min(values), max(values), len(values))
        assert got["mean"] == pytest.approx(sum(values) / len(values), abs=0.006)


def test_pretrain_chunks_match_load_pretrain(tok, capsys):
    (result,) = stats(capsys, DATA / "pretrain.jsonl", "--seq-length", 16)
    assert result["context"]["chunks"] == len(load_pretrain(DATA / "pretrain.jsonl", tok, 16)) > 1000


def test_prompts_over_the_budget(tok, capsys, tmp_path):
    path = DATA / "ppo_prompts.jsonl"
    (result,) = stats(capsys, path, "--seq-length", 12, "--max-new-tokens", 3)
    too_long = sum(1 + len(tok.encode(json.loads(l)["prompt"])) > 9 for l in path.read_text().splitlines())
    assert result["context"]["error"] == too_long > 0 and result["context"]["fits"] == 500 - too_long
    first = int(result["context"]["examples"]["error"][0].rsplit(":", 1)[1])
    with pytest.raises(DataError, match=f"ppo_prompts.jsonl:{first}: prompt has"):
        load_prompts(path, tok, 9)
    (result,) = stats(capsys, path, "--seq-length", 12)  # no budget without max_new_tokens
    assert "error" not in result["context"]


def test_invalid_and_unranked_lines_are_counted_with_their_line(tmp_path, capsys):
    good = {"prompt": "List 2 fruits.", "responses": ["apple, pear.", "dog."], "ranking": [1, 2]}
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps(good).encode(),
        json.dumps({**good, "ranking": None}).encode(),                     # 2 unranked: counted, measured
        b'{"prompt": "x", "responses": ["a"',                               # 3 malformed
        b'{"prompt": "caf\xe9", "responses": ["a", "b"], "ranking": [1, 2]}',  # 4 not UTF-8
        json.dumps({"prompt": "List 1 fruit.", "response": "fig."}).encode(),  # 5 an SFT line
        json.dumps({**good, "ranking": [1, 1]}).encode(),                   # 6 all tied
        json.dumps({"prompt": "List 1 fruit.", "chosen": "fig.", "rejected": "dog."}).encode(),  # 7 pairwise: fine
    ]) + b"\n")
    (result,) = stats(capsys, path, status=1)
    assert result["format"] == "ranking+pairwise" and result["records"] == 3 and result["pairwise_lines"] == 1
    assert result["unranked"] == 1 and result["invalid"] == 4
    assert [m.split(": ")[0] for m in result["invalid_examples"]] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    assert "looks like a sft line, but the file is ranking" in result["invalid_examples"][2]
    assert result["tokens"]["response"]["count"] == 6

    assert main([str(path), "--tokenizer", str(TOKENIZER), "--format", "pretrain", "--no-progress"]) == 2
    assert "no valid pretrain records" in capsys.readouterr().err


def test_config_supplies_tokenizer_context_and_policy(capsys):
    assert main([str(DATA / "sft_valid.jsonl"), "--config", str(ROOT / "examples/tiny/sft.yaml"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "sft, 200 records" in text and "p50" in text and "p99" in text
    assert "at seq_length=64, truncation=prompt_left (sequences up to 65 tokens): 200 fit, 0 truncated, 0 dropped" in text
    assert main([str(DATA / "sft_valid.jsonl"), "--no-progress"]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


def test_padding_fractions_by_hand():
    from megatron_rlhf.data.stats import padding_fractions

    # batches [20, 9] and [30, 5] at seq_length 32: unpacked each is 2 rows of 32 (widths round up
    # to 16) = 128 tokens for 64 used; packed [20+9] in one bin of 32, [30] and [5] in two -> 96
    pad = padding_fractions([[20], [9], [30], [5]], 32, batch_size=2, micro_batch_size=1)
    assert (pad["tokens"], pad["unpacked"], pad["unpacked_full_context"], pad["packed"]) == (64, 0.5, 0.5, round(1 - 64 / 96, 4))
    # ranking: a prompt's responses are one unit; 5 rows of width 16 = 80 (160 at the context);
    # packed, both prompts in one bin of 3 x 32 tokens: 43 used, width 48
    pad = padding_fractions([[10, 12], [7, 7, 7]], 32, batch_size=2, micro_batch_size=1)
    assert (pad["unpacked"], pad["unpacked_full_context"], pad["packed"]) == (round(1 - 43 / 80, 4), round(1 - 43 / 160, 4), round(1 - 43 / 48, 4))


def test_cli_reports_padding_with_and_without_packing(capsys):
    (sft,) = stats(capsys, DATA / "sft_train.jsonl", "--seq-length", 64, "--batch-size", 32, "--micro-batch-size", 16)
    pad = sft["context"]["padding"]
    assert (pad["batch_size"], pad["micro_batch_size"]) == (32, 16)
    assert pad["packed"] < 0.05 < 0.3 < pad["unpacked"] < pad["unpacked_full_context"]
