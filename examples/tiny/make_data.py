#!/usr/bin/env python
"""Generate the tiny synthetic instruction task and its tokenizer (deterministic).

    python examples/tiny/make_data.py                 # rewrites examples/tiny/data/ and tokenizer.model
    python examples/tiny/make_data.py --out-dir /tmp/x --tokenizer-prefix /tmp/x/tok

Task: "List 3 fruits." -> "apple, pear, plum." (exactly N distinct items of the asked
category). SFT learns the format, the reward model learns that more correct requested
items is better (wrong-category items, repeats, too few or too many items are worse), and
PPO can raise that reward. See examples/tiny/data/README.md.
"""

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing

from megatron_rlhf.data.tokenizer import train_tokenizer  # noqa: E402

# name: (singular, plural, article rule for pretraining sentences, items)
CATEGORIES = {
    "fruit": ("fruit", "fruits", "a", "apple pear plum peach grape lemon lime cherry mango banana melon kiwi fig apricot"),
    "color": ("color", "colors", "", "red blue green yellow purple pink brown black white gray gold silver violet"),
    "animal": ("animal", "animals", "a", "dog cat horse cow sheep goat pig lion tiger bear wolf fox rabbit mouse"),
    "vegetable": ("vegetable", "vegetables", "a", "carrot potato onion pea bean cabbage spinach lettuce celery radish turnip leek"),
    "tool": ("tool", "tools", "a", "hammer saw drill wrench shovel rake axe chisel pliers ladder file spade"),
    "instrument": ("instrument", "instruments", "a", "piano guitar violin drum flute harp trumpet cello banjo oboe tuba organ"),
    "sport": ("sport", "sports", "", "tennis golf soccer hockey rugby boxing rowing skiing cricket baseball cycling judo"),
    "country": ("country", "countries", "", "France Spain Italy Japan China India Brazil Canada Mexico Egypt Kenya Peru Chile"),
}
ITEMS = {name: spec[3].split() for name, spec in CATEGORIES.items()}
PHRASINGS = ["List {n} {noun}.", "Name {n} {noun}.", "Give me {n} {noun}.", "Write {n} {noun}.",
             "Can you name {n} {noun}?", "Please list {n} {noun}."]
MAX_COUNT = 5
SIZES = {"sft_train": 2000, "sft_valid": 200, "rm_train": 2000, "rm_valid": 200, "rm_pairwise_sample": 20,
         "ppo_prompts": 500, "pretrain": 1000}
# Responses per RM prompt: InstructGPT's K = 4..9. A larger K gives C(K,2) pairs for K
# forwards, so the tiny RM learns faster per second with it (the paper's argument).
K_CHOICES = [4, 5, 6, 7, 8, 9]

_all = [item for items in ITEMS.values() for item in items]
assert len(_all) == len(set(_all)), "an item must belong to one category only"


def make_prompt(rng):
    category = rng.choice(sorted(CATEGORIES))
    n = rng.randint(1, MAX_COUNT)
    singular, plural = CATEGORIES[category][:2]
    text = rng.choice(PHRASINGS).format(n=n, noun=singular if n == 1 else plural)
    return text, category, n


def render(items):
    return ", ".join(items) + "."


def score(items, category, n):
    """Distinct items of the asked category (at most n), minus one per item beyond n."""
    correct = {item for item in items if item in ITEMS[category]}
    return min(len(correct), n) - max(0, len(items) - n)


def others(rng, category, k):
    pool = [item for name, items in ITEMS.items() if name != category for item in items]
    return rng.sample(pool, k)


def candidate(rng, category, n):
    """One response of random quality (items of the asked category, or not)."""
    good = ITEMS[category]
    kind = rng.choice(["correct", "correct", "few", "wrong", "all_wrong", "long"])
    if kind == "few" and n > 1:
        items = rng.sample(good, rng.randint(1, n - 1))
    elif kind == "wrong":
        bad = rng.randint(1, n)
        items = rng.sample(good, n - bad) + others(rng, category, bad)
        rng.shuffle(items)
    elif kind == "all_wrong":
        items = others(rng, rng.choice([c for c in CATEGORIES if c != category]), n)
    elif kind == "long":
        items = rng.sample(good, min(len(good), n + rng.randint(1, 2)))
    else:
        items = rng.sample(good, n)
    return items


def competition_ranks(scores):
    """Rank 1 = best; equal scores share a rank (1, 2, 2, 4)."""
    return [1 + sum(other > s for other in scores) for s in scores]


def comparison(rng):
    prompt, category, n = make_prompt(rng)
    k = rng.choice(K_CHOICES)
    while True:
        texts, scores = [], []
        while len(texts) < k:
            items = candidate(rng, category, n)
            if render(items) not in texts:
                texts.append(render(items))
                scores.append(score(items, category, n))
        if len(set(scores)) > 1:  # at least one ordered pair
            return prompt, texts, competition_ranks(scores)


def pretrain_text(rng):
    sentences = []
    for _ in range(rng.randint(1, 3)):
        category = rng.choice(sorted(CATEGORIES))
        singular, plural, article, _ = CATEGORIES[category]
        if rng.random() < 0.6:
            item = rng.choice(ITEMS[category])
            if article:
                subject = ("An " if item[0] in "aeiou" else "A ") + item
            else:
                subject = item[0].upper() + item[1:]
            sentences.append(f"{subject} is a {singular}.")
        else:
            items = rng.sample(ITEMS[category], rng.randint(2, 4))
            sentence = f"{', '.join(items[:-1])} and {items[-1]} are {plural}."
            sentences.append(sentence[0].upper() + sentence[1:])
    return " ".join(sentences)


def generate(seed):
    """All files as {name: [record, ...]}; each file has its own random stream."""
    files = {}
    for index, name in enumerate(SIZES):
        rng = random.Random(seed * 100 + index)
        records = []
        for _ in range(SIZES[name]):
            if name.startswith("sft"):
                prompt, category, n = make_prompt(rng)
                records.append({"prompt": prompt, "response": render(rng.sample(ITEMS[category], n))})
            elif name == "rm_pairwise_sample":
                prompt, texts, ranks = comparison(rng)
                best, worst = texts[ranks.index(min(ranks))], texts[ranks.index(max(ranks))]
                records.append({"prompt": prompt, "chosen": best, "rejected": worst})
            elif name.startswith("rm"):
                prompt, texts, ranks = comparison(rng)
                records.append({"prompt": prompt, "responses": texts, "ranking": ranks})
            elif name == "ppo_prompts":
                records.append({"prompt": make_prompt(rng)[0]})
            else:
                records.append({"text": pretrain_text(rng)})
        files[name] = records
    return files


def jsonl_text(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def corpus_lines(files):
    """Every piece of text in the data, one per line: the tokenizer's training text."""
    for records in files.values():
        for r in records:
            yield from (v for key in ("prompt", "response", "chosen", "rejected", "text") if (v := r.get(key)))
            yield from r.get("responses", [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(HERE / "data"))
    parser.add_argument("--tokenizer-prefix", default=str(HERE / "tokenizer"), help="writes PREFIX.model/.vocab")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    files = generate(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        (out / f"{name}.jsonl").write_text(jsonl_text(records), encoding="utf-8")
        print(f"wrote {out / name}.jsonl ({len(records)} lines)")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(corpus_lines(files)) + "\n", encoding="utf-8")
        # unigram, not BPE: with 512 ids (256 of them byte fallback) it keeps every item a
        # single token, while BPE spends its few merges on fragments ("▁M" "e" "x" ...)
        tok = train_tokenizer([text], args.vocab_size, args.tokenizer_prefix, model_type="unigram")
    print(f"wrote {tok.source} (vocab_size={tok.vocab_size}, fingerprint={tok.fingerprint()})")


if __name__ == "__main__":
    main()
