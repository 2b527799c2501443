"""``megatron-rlhf data-stats FILE.jsonl...``: format, token-length percentiles, truncation and
padding (with and without ``data.packing``) at the configured context of SFT, ranking, prompt
or pretraining files (``data/stats.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_rlhf.data.stats import FORMATS, collect, format_text


def build_parser():
    p = argparse.ArgumentParser(prog="megatron-rlhf data-stats", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE.jsonl")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--config", help="stage config: model.tokenizer, model.seq_length, data.truncation, ppo.max_new_tokens")
    p.add_argument("--tokenizer", help="SentencePiece model, or a checkpoint folder holding tokenizer.model")
    p.add_argument("--seq-length", type=int, help="context to check truncation against (model.seq_length)")
    p.add_argument("--truncation", choices=("prompt_left", "drop", "error"), help="data.truncation (default prompt_left)")
    p.add_argument("--max-new-tokens", type=int, help="for prompt files: the response budget (ppo.max_new_tokens)")
    p.add_argument("--batch-size", type=int, help="examples per global batch for the padding figures (train.global_batch_size; default 64)")
    p.add_argument("--micro-batch-size", type=int, help="train.micro_batch_size for the packed bins (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per file instead of text")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlhf.checkpoint import CheckpointError, resolve_checkpoint
    from megatron_rlhf.config import ConfigError, load_config
    from megatron_rlhf.data import DataError, Tokenizer

    try:
        tokenizer_path, seq_length, truncation, max_new_tokens = args.tokenizer, args.seq_length, args.truncation, args.max_new_tokens
        batch_size, micro_batch_size = args.batch_size, args.micro_batch_size
        if args.config:
            cfg = load_config(args.config)
            tokenizer_path = tokenizer_path or cfg.model.tokenizer
            seq_length = seq_length if seq_length is not None else cfg.model.seq_length
            truncation = truncation or cfg.data.truncation
            if max_new_tokens is None and cfg.stage == "ppo":
                max_new_tokens = cfg.ppo.max_new_tokens
            batch_size = batch_size or cfg.train.global_batch_size
            micro_batch_size = micro_batch_size or cfg.train.micro_batch_size
        batch_size, micro_batch_size = batch_size or 64, micro_batch_size or 1
        if batch_size < 1 or micro_batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size} and --micro-batch-size {micro_batch_size} must be >= 1")
        if not tokenizer_path:
            raise ConfigError("data-stats needs a tokenizer: --tokenizer PATH.model (or a checkpoint folder), or --config CFG.yaml")
        if Path(tokenizer_path).is_dir() and not (Path(tokenizer_path) / "tokenizer.model").is_file():
            tokenizer_path = str(resolve_checkpoint(tokenizer_path))  # a run's output_dir or checkpoints/
        if Path(tokenizer_path).is_dir():
            tokenizer_path = str(Path(tokenizer_path) / "tokenizer.model")
        tokenizer = Tokenizer.load(tokenizer_path)
        if seq_length is not None and seq_length < 2:
            raise ConfigError(f"--seq-length {seq_length} must be >= 2")
        if max_new_tokens is not None and seq_length is not None and seq_length - max_new_tokens < 2:
            raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in --seq-length {seq_length}")
        results = [collect(f, args.format, tokenizer, seq_length, truncation or "prompt_left", max_new_tokens, not args.no_progress,
                           batch_size, micro_batch_size) for f in args.files]
    except (ConfigError, DataError, CheckpointError, OSError) as exc:
        print(f"megatron-rlhf data-stats: error: {exc}", file=sys.stderr)
        return 2
    status = 0
    for stats in results:
        print(json.dumps(stats) if args.json else format_text(stats))
        if stats["records"] == 0:
            what = "" if args.format == "auto" else f" {args.format}"
            print(f"megatron-rlhf data-stats: error: {stats['path']}: no valid{what} records", file=sys.stderr)
            status = 2
        elif stats["invalid"]:
            status = max(status, 1)
    return status
