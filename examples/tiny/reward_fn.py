"""A rule-based reward for the tiny task: the right items, IN ALPHABETICAL ORDER.

    ppo:
      reward_fn: examples/tiny/reward_fn.py:reward

The SFT demonstrations list their items in random order, so the SFT policy has learned WHAT
to list but not this order: a critic-free run (examples/tiny/grpo.yaml) has something to
learn that no reward model taught. The reward, in [-1, 2] for N = 1..5 requested items:

    correctness = quality / N      make_data.py's quality score: distinct items of the asked
                                   category (at most N) minus one per item beyond N; 1 = right
    order       = (adjacent pairs of the response in alphabetical order) / (N - 1), at most 1;
                  for N = 1, 1 when the response is one item, else 0
    reward      = correctness + order

An empty or unparsable response gets 0 order credit, so listing nothing or one item never
beats a correct list. N and the category come from the record's optional "n" and "category"
keys (a prompts file can carry them), else from the prompt text ("List 3 fruits.").
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

_MAKE_DATA = Path(__file__).resolve().with_name("make_data.py")
_spec = importlib.util.spec_from_file_location("tiny_make_data", _MAKE_DATA)
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

# singular and plural nouns -> category ("fruit", "fruits" -> "fruit")
NOUNS = {noun: name for name, spec in make_data.CATEGORIES.items() for noun in spec[:2]}
PROMPT = re.compile(r"(\d+)\s+(" + "|".join(sorted(NOUNS, key=len, reverse=True)) + r")\b")


def task_of(prompt: str, record: dict) -> tuple[int, str]:
    """``(N, category)`` from the record's "n"/"category", else from the prompt text."""
    if "n" in record and "category" in record:
        return int(record["n"]), str(record["category"])
    match = PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"cannot find '<N> <category>' in the prompt {prompt!r}; add \"n\" and \"category\" to its record")
    return int(match.group(1)), NOUNS[match.group(2)]


def items_of(response: str) -> list[str]:
    """``"apple, pear, plum."`` -> ``["apple", "pear", "plum"]``."""
    text = response.strip().rstrip(".").strip()
    return [item.strip() for item in text.split(",") if item.strip()] if text else []


def reward(prompt: str, response: str, record: dict) -> float:
    n, category = task_of(prompt, record)
    if category not in make_data.ITEMS:
        raise ValueError(f"unknown category {category!r}; the tiny task has {', '.join(sorted(make_data.ITEMS))}")
    items = items_of(response)
    correctness = make_data.score(items, category, n) / n
    if n == 1:
        order = 1.0 if len(items) == 1 else 0.0
    else:
        in_order = sum(a.lower() < b.lower() for a, b in zip(items, items[1:]))
        order = min(in_order / (n - 1), 1.0)
    return correctness + order
