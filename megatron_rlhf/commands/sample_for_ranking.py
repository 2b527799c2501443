"""``megatron-rlhf sample-for-ranking``: K distinct responses per prompt, written as ranking tasks.

    megatron-rlhf sample-for-ranking --checkpoint runs/tiny/sft --prompts prompts.jsonl --num-samples 4
                                     --max-new-tokens 32 [--temperature 1.0] [--top-k 0] [--top-p 1.0]
                                     [--seed 1234] [--batch-size 64] [--max-tries 4] [--output tasks.jsonl]
    megatron-rlhf sample-for-ranking --check tasks.jsonl [more.jsonl ...]

InstructGPT's steps 2 and 3 iterate: sample K outputs per prompt from the current best
policy, have labellers rank them, retrain the reward model, rerun PPO. This command writes
the tasks; the labelled file goes straight to ``megatron-rlhf rm`` as ``data.train_path``.

Sampling. Each input line ``{"prompt": str, ...}`` becomes one output line that keeps every
input key and adds::

    "responses": [K response texts], "ranking": null, "finished": [true if it ended with eos]

The K responses of a prompt are DISTINCT and non-empty (two identical texts teach the RM
nothing and ask the labeller for a tie): a duplicate or empty sample is drawn again, up to
``--max-tries`` extra rounds. A prompt still short of K distinct responses is written with
the ones it has when there are at least 2, and dropped otherwise; both are counted on stderr
with their ``file:line``, never silent. ``--temperature 0`` (greedy) is refused: every sample
would be the same. K is 2..9, the range the RM loader (and InstructGPT's interface) accepts.
Runs in one process at TP=1 unless launched under torchrun with ``--tensor-model-parallel-size``.

Labelling. A labeller replaces ``null`` with the rank of each response (``"ranking": [2, 1,
3, 4]``, 1 = best, equal ranks = tie) or adds ``"order"``: the response indices best first
(then ``"ranking"`` may stay null).

Checking. ``--check FILE ...`` validates labelled files with the RM loader's rules and lists
EVERY bad line as ``file:line: problem`` (an unranked task, malformed JSON, a ranking of the
wrong length or range, all responses tied, and identical responses given different ranks);
exit status 0 when every line would train the RM, 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List

import torch

MAX_ERRORS_SHOWN = 50


def build_parser():
    p = argparse.ArgumentParser(prog="megatron-rlhf sample-for-ranking", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", nargs="+", metavar="FILE", help="validate labelled ranking files instead of sampling")
    p.add_argument("--checkpoint", help="policy to sample from: a run's output_dir, its checkpoints/ folder or an iter_N folder")
    p.add_argument("--prompts", help='JSONL file of {"prompt": ...} (other keys are kept)')
    p.add_argument("--num-samples", type=int, help="K, responses per prompt (2..9)")
    p.add_argument("--max-new-tokens", type=int, help="longest response, in tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generation call")
    p.add_argument("--max-tries", type=int, default=4, help="extra rounds to replace duplicate or empty samples")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--output", help="JSONL file to write (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check:
        if args.checkpoint or args.prompts:
            parser.error("--check validates labelled files; it takes no --checkpoint/--prompts")
        return check_files(args.check)
    missing = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--prompts", args.prompts),
                                        ("--num-samples", args.num_samples), ("--max-new-tokens", args.max_new_tokens))
               if value is None]
    if missing:
        parser.error(f"sampling needs {', '.join(missing)} (or use --check FILE to validate labelled tasks)")
    from megatron_rlhf.data.ranking import MAX_K, MIN_K

    if not MIN_K <= args.num_samples <= MAX_K:
        parser.error(f"--num-samples {args.num_samples}: the reward model takes K = {MIN_K}..{MAX_K} responses per prompt")
    if args.temperature <= 0:
        parser.error("--temperature 0 is greedy decoding: all K samples of a prompt would be identical; use e.g. 1.0")
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.max_tries < 0:
        parser.error("--max-new-tokens and --batch-size must be >= 1, --max-tries >= 0")
    return sample(args)


# ----------------------------------------------------------------------------- sampling


def sample(args) -> int:
    from megatron_rlhf.config import ConfigError
    from megatron_rlhf.data import DataError, load_prompts, prompt_budget, read_jsonl
    from megatron_rlhf.data.prompts import PROMPT_FIX
    from megatron_rlhf.parallel import is_rank0
    from megatron_rlhf.progress import progress
    from megatron_rlhf.checkpoint import CheckpointError, load_policy
    from megatron_rlhf.config import ParallelConfig

    try:
        model, tok, meta, _ = load_policy(args.checkpoint, ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size))
        model.eval()
        budget = prompt_budget(meta["model"]["seq_length"], args.max_new_tokens)
        prompts = load_prompts(args.prompts, tok, budget)  # validates every line and its length first
        records = list(read_jsonl(args.prompts, {"prompt": str}, PROMPT_FIX))
    except (DataError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"megatron-rlhf sample-for-ranking: error: {exc}", file=sys.stderr)
        return 2
    k = args.num_samples
    generator = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(args.seed)
    block = max(1, args.batch_size // k)  # prompts sampled together (K rows each)
    short: List[str] = []
    skipped: List[str] = []
    written = 0
    rank0 = is_rank0()
    tmp = args.output + ".partial" if args.output else None
    out = open(tmp, "w", encoding="utf-8") if tmp and rank0 else None
    bar = progress(len(prompts), "sample-for-ranking", "prompt", enable=not args.no_progress)
    try:
        for start in range(0, len(prompts), block):
            indices = list(range(start, min(start + block, len(prompts))))
            responses = _distinct_samples(model, tok, [prompts[i] for i in indices], k, args, generator)
            for i, got in zip(indices, responses):
                line, record = records[i]
                where = f"{args.prompts}:{line}"
                if len(got) < 2:
                    skipped.append(where)
                    continue
                if len(got) < k:
                    short.append(where)
                task = {key: value for key, value in record.items() if key not in ("responses", "ranking", "order", "finished")}
                task.update(responses=[text for text, _ in got], ranking=None, finished=[done for _, done in got])
                if rank0:
                    print(json.dumps(task, ensure_ascii=False), file=out or sys.stdout)
                written += 1
            bar.update(len(indices))
    except BaseException:
        if out:
            out.close()
            os.unlink(tmp)
        raise
    finally:
        bar.close()
    if out:
        out.close()
        os.replace(tmp, args.output)  # a crashed run leaves no half-written task file behind
    if rank0:
        where = args.output or "stdout"
        print(f"sample-for-ranking: wrote {written} ranking tasks ({k} responses each) for {len(prompts)} prompts to {where}",
              file=sys.stderr)
        if short:
            print(f"sample-for-ranking: {len(short)} prompts got fewer than {k} distinct responses after "
                  f"{args.max_tries} extra rounds (written with what they have), e.g. {', '.join(short[:5])}", file=sys.stderr)
        if skipped:
            print(f"sample-for-ranking: {len(skipped)} prompts SKIPPED, fewer than 2 distinct non-empty responses "
                  f"(raise --temperature or --max-tries), e.g. {', '.join(skipped[:5])}", file=sys.stderr)
    return 0


def _distinct_samples(model, tok, prompts: List[List[int]], k: int, args, generator) -> List[List[tuple]]:
    """Up to ``k`` distinct, non-empty ``(text, finished)`` samples for each prompt."""
    from megatron_rlhf.rollout import generate

    got: List[List[tuple]] = [[] for _ in prompts]
    seen: List[set] = [set() for _ in prompts]
    for _ in range(1 + args.max_tries):
        rows = [p for p in range(len(prompts)) for _ in range(k - len(got[p]))]
        if not rows:
            break
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            gen = generate(model, [prompts[p] for p in chunk], args.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
            for p, response, finished in zip(chunk, gen.responses, gen.finished):
                text = tok.decode([t for t in response if t != tok.eos_id])
                key = " ".join(text.split())  # whitespace-only differences are not a different answer
                if not key or key in seen[p] or len(got[p]) >= k:
                    continue
                seen[p].add(key)
                got[p].append((text, bool(finished)))
    return got


# ----------------------------------------------------------------------------- checking


def check_task(record: dict, path, line: int) -> None:
    """The RM loader's validation (which also refuses identical responses with different ranks)."""
    from megatron_rlhf.data.ranking import parse_comparison

    parse_comparison(record, path, line)


def check_files(paths: List[str]) -> int:
    """Print every bad line of labelled ranking files; 0 if all are ready for the RM, else 2."""
    from megatron_rlhf.data import DataError
    from megatron_rlhf.data.jsonl import scan_jsonl
    from megatron_rlhf.data.ranking import RM_FIX, UnrankedTask

    bad_total = shown = hidden = 0
    for path in paths:
        tasks = bad = unranked = 0
        try:
            for line, record, error in scan_jsonl(path, RM_FIX):
                tasks += 1
                if error is None:
                    try:
                        check_task(record, path, line)
                    except DataError as exc:
                        error = exc
                        unranked += isinstance(exc, UnrankedTask)
                if error is not None:
                    bad += 1
                    if shown < MAX_ERRORS_SHOWN:
                        print(str(error), file=sys.stderr)
                        shown += 1
                    else:
                        hidden += 1
        except DataError as exc:  # missing file
            print(str(exc), file=sys.stderr)
            bad_total += 1
            continue
        if tasks == 0:
            print(f"{path}: no tasks (the file is empty or only blank lines)", file=sys.stderr)
            bad_total += 1
            continue
        bad_total += bad
        verdict = "ready for the reward model" if not bad else f"{bad} bad ({unranked} unranked)"
        print(f"{path}: {tasks} tasks, {tasks - bad} ranked and valid, {verdict}")
    if hidden:
        print(f"... and {hidden} more bad lines not shown", file=sys.stderr)
    return 0 if bad_total == 0 else 2
