"""``megatron-rlhf data-stats``: counts, token lengths and truncation of any of our JSONL files.

    megatron-rlhf data-stats FILE.jsonl [FILE ...] (--tokenizer T | --config CFG.yaml)
                             [--seq-length N] [--truncation prompt_left|drop|error] [--max-new-tokens M]
                             [--batch-size B] [--micro-batch-size M]
                             [--format auto|sft|ranking|pairwise|prompts|pretrain] [--json] [--no-progress]

Formats (``auto``, the default, takes the format of the first valid line):

* ``sft``: ``{"prompt", "response"}`` demonstrations;
* ``ranking``: ``{"prompt", "responses", "ranking" | "order"}`` K-way comparisons, including
  unranked tasks from ``sample-for-ranking`` (counted as such: the RM refuses them);
* ``pairwise``: ``{"prompt", "chosen", "rejected"}`` (a ranking file may mix both, as the RM
  loader allows);
* ``prompts``: ``{"prompt"}`` for PPO or generation;
* ``pretrain``: ``{"text"}`` for the ptx term.

Token lengths (min, p50, p90, p99, max, mean; nearest-rank percentiles) are given for prompts,
responses and whole sequences (``[bos] + prompt + response + [eos]``; each response of a
comparison is a sequence). With a context (``--seq-length`` or the config's ``model.seq_length``)
each record is put through the SAME rule as the stage's loader (``data.truncation``) and counted
as fits / truncated / dropped / error (under ``truncation=error``, or a prompt over the
``seq_length - max_new_tokens`` budget: the run would stop there), with the first ``file:line``
of each. Pretraining text is never cut; its count of ``seq_length + 1`` chunks is given.

Padding (SFT and ranking files, at a context): the share of the tokens a training step
computes that are padding, without packing (each global batch of ``--batch-size`` examples,
in file order, padded to its longest sequence as the trainer collates it; and with every
sequence padded to the full context) and with ``data.packing`` (the trainer's
first-fit-decreasing bins of ``micro-batch-size x K x seq_length`` tokens per global batch,
all of a step's bins at one width; K = 1, or the most responses of a prompt for ranking).
Pretraining chunks fill their rows and are not counted.

``--config`` reads ``model.tokenizer``, ``model.seq_length``, ``data.truncation``,
``ppo.max_new_tokens``, ``train.global_batch_size`` and ``train.micro_batch_size`` from a
stage config; explicit flags win. A line that is not valid for
the format is counted and its ``file:line: problem`` shown. Exit status: 0, 1 when some lines
are invalid (the statistics cover the valid ones), 2 when nothing could be read.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .common import batch_width
from .packing import first_fit_decreasing, packed_width

FORMATS = ("sft", "ranking", "pairwise", "prompts", "pretrain")
PERCENTILES = (50, 90, 99)
MAX_EXAMPLES = 5
PAD_MULTIPLE = 16  # collate_sft / collate_comparisons round a batch's width up to this
# Which formats may share a file: the RM loader takes K-way and pairwise lines mixed.
COMPATIBLE = {"ranking": {"ranking", "pairwise"}, "pairwise": {"ranking", "pairwise"}}


def percentile(sorted_values: List[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list: the smallest value with at least p% of
    the values <= it (p50 of 1..100 is 50, p99 is 99)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(values: List[int]) -> Optional[dict]:
    if not values:
        return None
    v = sorted(values)
    out = {"count": len(v), "min": v[0]}
    out.update({f"p{p}": percentile(v, p) for p in PERCENTILES})
    out.update(max=v[-1], mean=round(sum(v) / len(v), 2))
    return out


def padding_fractions(units: Sequence[Sequence[int]], seq_length: int, batch_size: int, micro_batch_size: int) -> dict:
    """Padding share of the tokens computed, unpacked and packed, as the trainer lays them out.

    ``units`` are the examples in order, each the token lengths of its rows as packed (an
    SFT input, or every response sequence of a prompt). Each global batch of ``batch_size``
    units is, unpacked, one width (the longest row rounded up, at most ``seq_length``) and,
    packed, ``first_fit_decreasing`` bins of ``micro_batch_size x rows x seq_length`` tokens
    at one width (``packed_width``), as ``training.supervised.microbatches`` does.
    """
    rows = max(len(u) for u in units)
    capacity = micro_batch_size * rows * seq_length
    used = unpacked = packed = full = 0
    for start in range(0, len(units), batch_size):
        group = units[start : start + batch_size]
        lengths = [n for u in group for n in u]
        used += sum(lengths)
        unpacked += len(lengths) * batch_width(lengths, PAD_MULTIPLE, seq_length)
        full += len(lengths) * seq_length
        loads = [sum(u) for u in group]
        bins = first_fit_decreasing(loads, capacity)
        packed += len(bins) * packed_width([sum(loads[i] for i in b) for b in bins])
    return {
        "batch_size": batch_size, "micro_batch_size": micro_batch_size, "tokens": used,
        "unpacked": round(1 - used / unpacked, 4), "unpacked_full_context": round(1 - used / full, 4), "packed": round(1 - used / packed, 4),
    }


def line_kind(record: dict) -> Optional[str]:
    """The format a record looks like, from its keys."""
    if "chosen" in record or "rejected" in record:
        return "pairwise"
    if "responses" in record:
        return "ranking"
    if "response" in record:
        return "sft"
    if "prompt" in record:
        return "prompts"
    if "text" in record:
        return "pretrain"
    return None


class Collector:
    """Accumulates one file's statistics as its lines stream past."""

    def __init__(self, path: str, fmt: str, tokenizer, seq_length: Optional[int], truncation: str, max_new_tokens: Optional[int],
                 batch_size: int = 64, micro_batch_size: int = 1):
        self.path, self.format = path, fmt
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.units: List[List[int]] = []  # per kept example: its rows' lengths as the trainer packs them
        self.tok, self.seq_length, self.truncation, self.max_new_tokens = tokenizer, seq_length, truncation, max_new_tokens
        self.lines = 0
        self.kinds: Counter = Counter()
        self.invalid = 0
        self.invalid_examples: List[str] = []
        self.unranked = 0
        self.k_counts: Counter = Counter()
        self.lengths: Dict[str, List[int]] = {"prompt": [], "response": [], "total": []}
        self.outcomes: Counter = Counter()
        self.outcome_examples: Dict[str, List[str]] = {}
        self.stream_tokens = 0  # pretraining: bos + text + eos over all documents

    def bad(self, message: str) -> None:
        self.invalid += 1
        if len(self.invalid_examples) < MAX_EXAMPLES:
            self.invalid_examples.append(message)

    def outcome(self, what: str, line: int) -> None:
        self.outcomes[what] += 1
        if what != "fits":
            examples = self.outcome_examples.setdefault(what, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{self.path}:{line}")

    def add(self, line: int, record: dict) -> None:
        from .jsonl import DataError, check_fields
        from .prompts import PROMPT_FIX, TEXT_FIX
        from .ranking import UnrankedTask, parse_comparison
        from .sft import SFT_FIX

        kind = line_kind(record)
        if self.format == "auto":
            if kind is None:
                keys = ", ".join(repr(k) for k in record) or "none"
                self.bad(f"{self.path}:{line}: no known format (keys present: {keys}); expected one of {', '.join(FORMATS)}")
                return
            self.format = kind
        allowed = COMPATIBLE.get(self.format, {self.format})
        if kind not in allowed:
            self.bad(f"{self.path}:{line}: looks like a {kind or 'unknown'} line, but the file is {self.format}")
            return
        try:
            if kind in ("ranking", "pairwise"):
                try:
                    prompt, responses, _ = parse_comparison(record, self.path, line)
                except UnrankedTask:
                    self.unranked += 1
                    prompt, responses = record["prompt"], record["responses"]
            elif kind == "sft":
                check_fields(record, {"prompt": str, "response": str}, self.path, line, SFT_FIX)
                prompt, responses = record["prompt"], [record["response"]]
            elif kind == "prompts":
                check_fields(record, {"prompt": str}, self.path, line, PROMPT_FIX)
                prompt, responses = record["prompt"], []
            else:
                check_fields(record, {"text": str}, self.path, line, TEXT_FIX)
                prompt, responses = None, [record["text"]]
        except DataError as exc:
            self.bad(str(exc).split("\n")[0])
            return
        self.kinds[kind] += 1
        self._measure(line, kind, prompt, responses)

    def _measure(self, line: int, kind: str, prompt: Optional[str], responses: List[str]) -> None:
        from .prompts import prompt_budget
        from .ranking import fit_comparison
        from .sft import build_sft_example

        tok = self.tok
        if kind == "pretrain":
            n = len(tok.encode(responses[0]))
            self.lengths["response"].append(n)
            self.lengths["total"].append(n + 2)
            self.stream_tokens += n + 2
            return
        p = tok.encode(prompt)
        self.lengths["prompt"].append(len(p))
        if kind == "prompts":
            self.lengths["total"].append(1 + len(p))
            if self.seq_length is not None and self.max_new_tokens is not None:
                budget = prompt_budget(self.seq_length, self.max_new_tokens)
                self.outcome("fits" if 1 + len(p) <= budget else "error", line)
            return
        rs = [tok.encode(r) for r in responses]
        for r in rs:
            self.lengths["response"].append(len(r))
            self.lengths["total"].append(2 + len(p) + len(r))
        if kind == "sft":
            if self.seq_length is not None:
                try:
                    example, truncated = build_sft_example(p, rs[0], tok.bos_id, tok.eos_id, self.seq_length + 1, self.truncation)
                    self.outcome("dropped" if example is None else "truncated" if truncated else "fits", line)
                    if example is not None:
                        self.units.append([len(example.tokens) - 1])  # the model reads all but the last token
                except ValueError:
                    self.outcome("error", line)
            return
        self.k_counts[len(rs)] += 1
        if self.seq_length is not None:
            outcome, kept = fit_comparison(len(p), 1 + max(len(r) for r in rs), self.seq_length, self.truncation)
            self.outcome(outcome, line)
            if outcome in ("fits", "truncated"):
                self.units.append([1 + kept + len(r) + 1 for r in rs])  # [bos] + kept prompt + response + [eos]

    def result(self) -> dict:
        fmt = self.format
        if fmt in ("ranking", "pairwise") and self.kinds["ranking"] and self.kinds["pairwise"]:
            fmt = "ranking+pairwise"
        labels = {"sft": ("prompt", "response", "total"), "ranking": ("prompt", "response", "total"),
                  "pairwise": ("prompt", "response", "total"), "prompts": ("prompt", "total"), "pretrain": ("response", "total")}
        names = labels.get(self.format, ())
        tokens = {("text" if self.format == "pretrain" and k == "response" else k): summarize(self.lengths[k]) for k in names}
        out = {
            "path": self.path, "format": fmt, "lines": self.lines, "records": sum(self.kinds.values()),
            "invalid": self.invalid, "invalid_examples": self.invalid_examples,
            "tokenizer": getattr(self.tok, "source", None), "tokens": tokens,
        }
        if self.format in ("ranking", "pairwise"):
            out["pairwise_lines"] = self.kinds["pairwise"]
            out["unranked"] = self.unranked
            out["responses_per_prompt"] = {str(k): n for k, n in sorted(self.k_counts.items())}
        context = None
        if self.seq_length is not None:
            context = {"seq_length": self.seq_length}
            if self.format == "pretrain":
                context["chunks"] = max(0, math.ceil((self.stream_tokens - 1) / self.seq_length))
            elif self.format == "prompts":
                context["max_new_tokens"] = self.max_new_tokens
                if self.max_new_tokens is not None:
                    context["prompt_budget"] = self.seq_length - self.max_new_tokens
            else:
                context["truncation"] = self.truncation
                context["limit"] = self.seq_length + 1 if self.format == "sft" else self.seq_length
            if self.format != "pretrain" and (self.format != "prompts" or self.max_new_tokens is not None):
                for what in ("fits", "truncated", "dropped", "error"):
                    context[what] = self.outcomes[what]
                context["examples"] = self.outcome_examples
            if self.units:
                context["padding"] = padding_fractions(self.units, self.seq_length, self.batch_size, self.micro_batch_size)
        out["context"] = context
        return out


def collect(path: str, fmt: str, tokenizer, seq_length=None, truncation="prompt_left", max_new_tokens=None, show_progress=True,
            batch_size: int = 64, micro_batch_size: int = 1) -> dict:
    """Statistics of one file (see the module docstring); raises DataError if it cannot be read."""
    from megatron_rlhf.progress import progress

    from .jsonl import scan_jsonl

    c = Collector(str(path), fmt, tokenizer, seq_length, truncation, max_new_tokens, batch_size, micro_batch_size)
    size = os.path.getsize(path) if Path(path).is_file() else None
    bar = progress(size, f"data-stats {Path(path).name}", "B", enable=show_progress, unit_scale=True)
    try:
        for line, record, error in scan_jsonl(path, bar=bar):
            c.lines += 1
            if error is not None:
                c.bad(str(error).split("\n")[0])
            else:
                c.add(line, record)
    finally:
        bar.close()
    return c.result()


def format_text(stats: dict) -> str:
    out = []
    invalid = f", {stats['invalid']} invalid" if stats["invalid"] else ""
    out.append(f"{stats['path']}: {stats['format']}, {stats['records']} records{invalid}")
    if "responses_per_prompt" in stats:
        ks = ", ".join(f"K={k}: {n}" for k, n in stats["responses_per_prompt"].items())
        extra = f"; {stats['pairwise_lines']} pairwise lines" if stats["pairwise_lines"] and stats["format"] != "pairwise" else ""
        out.append(f"  responses per prompt: {ks}{extra}")
        if stats["unranked"]:
            out.append(f"  UNRANKED tasks: {stats['unranked']} (the reward model refuses them: fill in \"ranking\")")
    out.append(f"  tokens ({stats['tokenizer']}):")
    cols = ["min", *(f"p{p}" for p in PERCENTILES), "max", "mean"]
    out.append("    " + f"{'':<10}" + "".join(f"{c:>8}" for c in cols))
    described = {"prompt": "prompt", "response": "response", "text": "text", "total": "sequence"}
    for key, summary in stats["tokens"].items():
        if summary:
            out.append("    " + f"{described[key]:<10}" + "".join(f"{summary[c]:>8}" for c in cols))
    shape = {"prompts": "[bos] + prompt", "pretrain": "[bos] + text + [eos]"}.get(stats["format"], "[bos] + prompt + response + [eos]")
    out.append(f"    (sequence = {shape}" + ("; one per response)" if "responses_per_prompt" in stats else ")"))
    ctx = stats["context"]
    if ctx is None:
        out.append("  truncation: give --seq-length (or --config) to see what the loader would cut")
    elif stats["format"] == "pretrain":
        out.append(f"  at seq_length={ctx['seq_length']}: {ctx['chunks']} chunks of {ctx['seq_length'] + 1} tokens (pretraining text is never cut)")
    elif stats["format"] == "prompts":
        if ctx.get("max_new_tokens") is None:
            out.append("  prompt budget: give --max-new-tokens (or a PPO --config) to count prompts too long to sample from")
        else:
            out.append(f"  at seq_length={ctx['seq_length']}, max_new_tokens={ctx['max_new_tokens']} "
                       f"(prompts up to {ctx['prompt_budget']} tokens, bos included): {ctx['fits']} fit, "
                       f"{ctx['error']} too long (the loader stops on them)")
    else:
        out.append(f"  at seq_length={ctx['seq_length']}, truncation={ctx['truncation']} (sequences up to {ctx['limit']} tokens): "
                   f"{ctx['fits']} fit, {ctx['truncated']} truncated, {ctx['dropped']} dropped"
                   + (f", {ctx['error']} stop the run (truncation=error)" if ctx["error"] else ""))
    if ctx and "padding" in ctx:
        pad = ctx["padding"]
        out.append(f"  padding at seq_length={ctx['seq_length']} (global batches of {pad['batch_size']}, micro-batches of {pad['micro_batch_size']}): "
                   f"{pad['unpacked']:.1%} unpacked ({pad['unpacked_full_context']:.1%} with every row at the full context), "
                   f"{pad['packed']:.1%} with data.packing=true")
    if ctx:
        for what, where in ctx.get("examples", {}).items():
            out.append(f"    {what}: e.g. {', '.join(where)}")
    for message in stats["invalid_examples"]:
        out.append(f"  invalid: {message}")
    if stats["invalid"] > len(stats["invalid_examples"]):
        out.append(f"  ... and {stats['invalid'] - len(stats['invalid_examples'])} more invalid lines")
    return "\n".join(out)
