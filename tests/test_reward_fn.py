"""Rule-based rewards (ppo.reward_fn): loading, the call contract, errors naming the config key or
the prompt's file:line, and the tiny task's early-alphabet reward by hand."""

import json
from pathlib import Path

import pytest

from megatron_rlhf.config import ConfigError
from megatron_rlhf.data import DataError
from megatron_rlhf.data.prompts import PromptRecord, load_prompt_records, load_prompts
from megatron_rlhf.data.reward_fn import load_reward_fn

ROOT = Path(__file__).resolve().parents[1]
TINY_REWARD = f"{ROOT}/examples/tiny/reward_fn.py:reward"


class WordTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [10 + len(w) for w in text.split()]


def prompt(text, record=None, line=1, path="p.jsonl"):
    return PromptRecord([1], text, record or {"prompt": text}, path, line)


def write(path, text):
    path.write_text(text)
    return path


def test_prompt_records_keep_text_record_and_line(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a b", "answer": 42}\n\n{"prompt": "ccc"}\n')
    records = load_prompt_records(path, WordTokenizer(), max_prompt_len=8)
    assert [r.ids for r in records] == [[1, 11, 11], [1, 13]] == load_prompts(path, WordTokenizer(), 8)
    assert [r.line for r in records] == [1, 3]  # the blank line 2 is skipped, not renumbered
    assert records[0].record == {"prompt": "a b", "answer": 42} and records[1].text == "ccc"
    assert records[1].where == f"{path}:3"


def test_the_function_gets_prompt_response_and_record(tmp_path):
    spec = write(tmp_path / "rf.py", "def exact(prompt, response, record):\n    return float(response == record['answer']) + len(prompt)\n")
    fn = load_reward_fn(f"{spec}:exact")
    records = [prompt("ab", {"prompt": "ab", "answer": "4"}), prompt("abc", {"prompt": "abc", "answer": "5"})]
    assert fn.score(records, ["4", "6"]).tolist() == [3.0, 3.0]
    assert fn(records[0], "4") == 3.0


def test_tiny_reward_by_hand():
    fn = load_reward_fn(TINY_REWARD)
    three = prompt("List 3 fruits.")
    # fruits starting a..h: apple grape cherry banana fig apricot (6, so min(N, 6) = N here)
    assert fn(three, "apple, grape, fig.") == 2.0  # all right, all early
    assert fn(three, "apple, pear, plum.") == pytest.approx(1 + 1 / 3)  # all right, one early
    assert fn(three, "pear, plum, lemon.") == 1.0  # all right, none early
    assert fn(three, "apple, fig.") == pytest.approx(2 / 3 + 2 / 3)  # too few: 2 of 3 right, 2 of 3 early
    assert fn(three, "apple, apple, fig.") == pytest.approx(2 / 3 + 2 / 3)  # a repeat counts once
    assert fn(three, "apple, grape, fig, tiger.") == pytest.approx(2 / 3 + 1.0)  # one extra item: -1 correctness
    assert fn(three, "apple, grape, pear, fig.") == pytest.approx(2 / 3 + 2 / 3)  # only the first N count as early
    assert fn(three, "") == 0.0 and fn(three, "dog, cat, cow.") == 0.0  # wrong category: early items must be right
    assert fn(prompt("Name 1 color."), "blue.") == 2.0 and fn(prompt("Name 1 color."), "red.") == 1.0
    assert fn(prompt("Name 1 color."), "blue, red.") == 1.0  # one extra item: 1 - 1 = 0 correctness
    # vegetables have only 4 early items (carrot bean cabbage celery): 4 of them is full credit for N = 5
    assert fn(prompt("List 5 vegetables."), "carrot, bean, cabbage, celery, pea.") == 2.0
    assert fn(prompt("Can you name 2 countries?"), "France, Japan.") == 1.5  # capitals compare case-blind
    # the record's n/category win over the text
    assert fn(prompt("anything", {"prompt": "anything", "n": 2, "category": "tool"}), "axe, drill.") == 2.0


def test_sft_demonstrations_are_right_but_have_no_preference():
    """The SFT data teaches the items, not the preference: the reward leaves the policy something to learn."""
    fn = load_reward_fn(TINY_REWARD)
    lines = (ROOT / "examples/tiny/data/sft_valid.jsonl").read_text().splitlines()
    rewards = [fn(prompt(r["prompt"], r), r["response"]) for r in map(json.loads, lines)]
    mean = sum(rewards) / len(rewards)
    assert all(r >= 1.0 for r in rewards)  # every demonstration is correct
    assert 1.35 < mean < 1.65, mean  # but only about half of their items are early ones (2.0 = all)


def test_spec_and_file_errors_name_the_key_and_path(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo.reward_fn='rf.py' is not 'path:function'"):
        load_reward_fn("rf.py")
    with pytest.raises(ConfigError, match=r"ppo.reward_fn=nope/rf.py:reward: the file nope/rf.py does not exist"):
        load_reward_fn("nope/rf.py:reward")
    with pytest.raises(ConfigError, match="is a directory"):
        load_reward_fn(f"{tmp_path}:reward")
    spec = write(tmp_path / "rf.py", "import math\nVALUE = 3\ndef reward(prompt, response, record):\n    return 1.0\ndef two(prompt, response):\n    return 0.0\n")
    with pytest.raises(ConfigError, match=r"has no function 'rewad'; did you mean reward\?"):
        load_reward_fn(f"{spec}:rewad")
    with pytest.raises(ConfigError, match="VALUE in .* is a int, not a function"):
        load_reward_fn(f"{spec}:VALUE")
    with pytest.raises(ConfigError, match=r"two must accept \(prompt: str, response: str, record: dict\)"):
        load_reward_fn(f"{spec}:two")
    broken = write(tmp_path / "broken.py", "def reward(prompt, response, record):\n    return (\n")
    with pytest.raises(ConfigError, match=r"importing .*broken.py failed \(line \d\): SyntaxError"):
        load_reward_fn(f"{broken}:reward")
    raises = write(tmp_path / "raises.py", "import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="ModuleNotFoundError: No module named 'not_a_module_anywhere'"):
        load_reward_fn(f"{raises}:reward", key="score.reward_fn")
    # the key in the message is the one given
    with pytest.raises(ConfigError, match=r"^score.reward_fn="):
        load_reward_fn(f"{raises}:reward", key="score.reward_fn")


def test_bad_returns_and_exceptions_name_the_prompt_line(tmp_path):
    spec = write(tmp_path / "rf.py", (
        "def reward(prompt, response, record):\n"
        "    if response == 'boom':\n"
        "        raise KeyError('answer')\n"
        "    return {'text': 'two', 'nan': float('nan'), 'inf': float('inf'), 'none': None, 'yes': True}[response]\n"
    ))
    fn = load_reward_fn(f"{spec}:reward")
    where = prompt("q", line=17, path="data/prompts.jsonl")
    with pytest.raises(DataError, match=r"^data/prompts.jsonl:17: ppo.reward_fn .*rf.py:reward raised KeyError: 'answer' \(at .*rf.py:3\)") as info:
        fn(where, "boom")
    assert info.value.line == 17 and "'boom'" in str(info.value)
    with pytest.raises(DataError, match=r"data/prompts.jsonl:17: .* returned str 'two', not a number"):
        fn(where, "text")
    with pytest.raises(DataError, match=r"data/prompts.jsonl:17: .* returned None"):
        fn(where, "none")
    for bad in ("nan", "inf"):
        with pytest.raises(DataError, match=rf"(?s)data/prompts.jsonl:17: .* returned {bad}.*Fix: return a finite number"):
            fn(where, bad)
    assert fn(where, "yes") == 1.0  # a bool is a 0/1 reward
    assert fn.score([where, where], ["yes", "yes"]).tolist() == [1.0, 1.0]
