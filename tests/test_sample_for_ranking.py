"""The labelling loop: sample-for-ranking -> rankings filled in by a script -> the RM trains on them;
the --check of labelled files; the RM loader refuses unranked tasks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rlhf.commands.sample_for_ranking import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples/tiny/data"
ARCH = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=32"]
QUIET = ["train.progress_bar=false", "train.tensorboard=false"]
K = 4


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_rlhf", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _make_data():
    spec = importlib.util.spec_from_file_location("tiny_make_data", ROOT / "examples/tiny/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def label(task: dict, tiny) -> list:
    """A scripted labeller for the tiny task: rank by its quality score (correct distinct items of the
    asked category, at most N, minus extras), equal scores tie; if all tie, the shorter response wins."""
    prompt = task["prompt"]
    n = int(re.search(r"\d+", prompt).group())
    category = next(c for c, spec in tiny.CATEGORIES.items() if re.search(rf"\b({spec[0]}|{spec[1]})\b", prompt))
    scores = [tiny.score(re.findall(r"[A-Za-z]+", r), category, n) for r in task["responses"]]
    if len(set(scores)) == 1:
        scores = [-len(r) * 100 - i for i, r in enumerate(task["responses"])]
    return tiny.competition_ranks(scores)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    result = cli("sft", "--config", "examples/tiny/sft.yaml", *ARCH, *QUIET, "train.max_steps=10", "train.eval_interval=10",
                 f"output_dir={root / 'sft'}")
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = root / "prompts.jsonl"
    lines = (DATA / "ppo_prompts.jsonl").read_text().splitlines()[:5]
    prompts.write_text("".join(json.dumps(dict(json.loads(l), id=f"p{i}")) + "\n" for i, l in enumerate(lines)))
    tasks = root / "tasks.jsonl"
    result = cli("sample-for-ranking", "--checkpoint", str(root / "sft"), "--prompts", str(prompts), "--num-samples", str(K),
                 "--max-new-tokens", "12", "--seed", "3", "--batch-size", "8", "--output", str(tasks))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "prompts": prompts, "tasks": tasks, "stderr": result.stderr}


def test_tasks_have_k_distinct_responses_and_keep_prompt_fields(loop):
    prompts = [json.loads(l) for l in loop["prompts"].read_text().splitlines()]
    tasks = [json.loads(l) for l in loop["tasks"].read_text().splitlines()]
    assert [t["prompt"] for t in tasks] == [p["prompt"] for p in prompts]
    assert [t["id"] for t in tasks] == ["p0", "p1", "p2", "p3", "p4"]
    for task in tasks:
        assert task["ranking"] is None
        assert len(task["responses"]) == K and len(task["finished"]) == K
        assert len({" ".join(r.split()) for r in task["responses"]}) == K
        assert all(r.strip() for r in task["responses"])
    assert f"wrote 5 ranking tasks ({K} responses each)" in loop["stderr"]
    assert not Path(str(loop["tasks"]) + ".partial").exists()


def test_unranked_tasks_are_refused_by_check_and_by_the_rm(loop, capsys):
    assert main(["--check", str(loop["tasks"])]) == 2
    captured = capsys.readouterr()
    for line in range(1, 6):
        assert f"tasks.jsonl:{line}: unranked task: fill in ranking" in captured.err
    assert "5 tasks, 0 ranked and valid, 5 bad (5 unranked)" in captured.out

    from megatron_rlhf.data import DataError, Tokenizer, load_comparisons

    with pytest.raises(DataError, match=r"tasks\.jsonl:1: unranked task: fill in ranking"):
        load_comparisons(loop["tasks"], Tokenizer.load(ROOT / "examples/tiny/tokenizer.model"), 32)


def test_scripted_rankings_train_the_reward_model(loop, capsys):
    tiny = _make_data()
    labelled = loop["root"] / "labelled.jsonl"
    with open(labelled, "w") as out:
        for line in loop["tasks"].read_text().splitlines():
            task = json.loads(line)
            task["ranking"] = label(task, tiny)
            out.write(json.dumps(task) + "\n")
    assert main(["--check", str(labelled)]) == 0
    assert "5 tasks, 5 ranked and valid, ready for the reward model" in capsys.readouterr().out

    demos = loop["root"] / "demos.jsonl"
    demos.write_text("".join((DATA / "sft_train.jsonl").read_text().splitlines(keepends=True)[:20]))
    out = loop["root"] / "rm"
    result = cli("rm", "--config", "examples/tiny/rm.yaml", *ARCH, *QUIET, f"model.init_from={loop['root'] / 'sft'}",
                 f"data.train_path={labelled}", f"data.valid_path={labelled}", f"rm.demonstrations_path={demos}",
                 "train.global_batch_size=1", "train.micro_batch_size=1", "train.max_steps=3", "train.eval_interval=3",
                 f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    assert any("eval/accuracy" in r for r in rows)


def test_check_lists_every_bad_line(tmp_path, capsys):
    good = {"prompt": "List 2 fruits.", "responses": ["apple, pear.", "dog."], "ranking": [1, 2]}
    lines = [
        json.dumps(good),
        json.dumps({**good, "ranking": None}),                                   # 2 unranked
        '{"prompt": "x", "responses": ["a", "b"], "ranking": [1, 2]',           # 3 malformed JSON
        json.dumps({**good, "ranking": [1, 2, 3]}),                              # 4 wrong length
        json.dumps({**good, "ranking": [1, 1]}),                                 # 5 all tied
        json.dumps({**good, "responses": ["a.", "b.", " a."], "ranking": [1, 2, 3]}),  # 6 same text, other rank
        "",
        json.dumps({**good, "ranking": None, "order": [1, 0]}),                 # 8 labelled with "order": fine
        json.dumps({"prompt": "y", "chosen": "a", "rejected": "b"}),            # 9 pairwise: fine
    ]
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["--check", str(path)]) == 2
    captured = capsys.readouterr()
    flagged = sorted(int(m) for m in re.findall(r"labelled\.jsonl:(\d+): ", captured.err))
    assert flagged == [2, 3, 4, 5, 6]
    assert "malformed JSON" in captured.err and "'ranking' has 3 entries" in captured.err
    assert "all 2 responses are tied" in captured.err
    assert "responses[0] and responses[2] are the same text but ranked 1 and 3" in captured.err
    assert "8 tasks, 3 ranked and valid, 5 bad (1 unranked)" in captured.out

    missing = tmp_path / "missing.jsonl"
    assert main(["--check", str(missing)]) == 2
    assert "data file not found" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "1"], "K = 2..9"),
    (["--num-samples", "10"], "K = 2..9"),
    (["--num-samples", "4", "--temperature", "0"], "greedy decoding"),
    ([], "sampling needs --num-samples"),
])
def test_bad_arguments_exit_2_before_loading_anything(args, message, capsys):
    base = ["--checkpoint", "/nonexistent", "--prompts", "/nonexistent.jsonl", "--max-new-tokens", "8"]
    with pytest.raises(SystemExit) as info:
        main(base + args)
    assert info.value.code == 2 and message in capsys.readouterr().err
