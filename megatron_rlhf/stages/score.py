"""``megatron-rlhf score``: add the reward model's ``"reward"`` to every ``{"prompt", "response"}`` line.

    megatron-rlhf score --checkpoint runs/tiny/rm --input samples.jsonl [--output scored.jsonl] [--batch-size 32]

One process at TP=PP=1 by default. Under ``torchrun`` the ranks split the input
(data parallel) and may shard the model with ``--tensor-parallel``/``--pipeline-parallel``;
rank 0 writes the output. Each line keeps its keys and gains ``"reward"``: the normalised
reward (the checkpoint's head already holds the normalisation bias, see
``models/reward.py``). Without ``--output`` the lines go to stdout.

Each line is scored as ``[bos] + prompt + response + [eos]``, the sequence the RM was
trained on. The RM stage normalises with :func:`load_responses` too, so scoring the
demonstrations here reproduces their mean of 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_rlhf.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rlhf.data import DataError, LoadStats, Tokenizer, read_jsonl
from megatron_rlhf.data.common import prompt_keep
from megatron_rlhf.data.jsonl import data_error
from megatron_rlhf.progress import progress
from megatron_rlhf.training import checkpoint as ckpt_lib

SCORE_FIX = 'every line needs {"prompt": "<text>", "response": "<text>"} (other keys are kept)'


def response_sequence(tokenizer: Tokenizer, prompt: str, response: str, seq_length: int) -> Optional[List[int]]:
    """``[bos] + prompt + response + [eos]`` as the RM reads it, or None when it cannot fit.

    A sequence longer than ``seq_length`` loses its oldest prompt tokens (down to a quarter
    of the budget, as in RM training); a response that still does not fit is never cut:
    its reward would be read somewhere in the middle of it.
    """
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response)
    if 2 + len(prompt_ids) + len(response_ids) > seq_length:
        keep = prompt_keep(len(prompt_ids), len(response_ids), seq_length)
        if 2 + keep + len(response_ids) > seq_length:
            return None
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return [tokenizer.bos_id, *prompt_ids, *response_ids, tokenizer.eos_id]


def load_responses(path, tokenizer: Tokenizer, seq_length: int, skip_too_long: bool = False) -> Tuple[List[dict], List[List[int]], LoadStats]:
    """Validate and tokenise a ``{"prompt", "response"}`` JSONL file.

    Returns ``(records, sequences, stats)``: the kept records (all their keys) and their
    token sequences, in file order. A response too long for ``seq_length`` is an error
    naming ``path:line``, or with ``skip_too_long`` skipped and counted in ``stats``.
    """
    records, sequences, stats = [], [], LoadStats()
    for line, record in read_jsonl(path, {"prompt": str, "response": str}, SCORE_FIX):
        stats.records += 1
        sequence = response_sequence(tokenizer, record["prompt"], record["response"], seq_length)
        if sequence is None:
            if not skip_too_long:
                raise data_error(
                    path, line, f"the response alone does not fit model.seq_length={seq_length}",
                    "score with a model of a longer context or shorten the response",
                )
            stats.dropped += 1
            stats.note(f"{path}:{line}")
            continue
        stats.kept += 1
        records.append(record)
        sequences.append(sequence)
    return records, sequences, stats


def model_config_from_meta(meta: dict, tokenizer_path: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = {k: v for k, v in meta.get("model", {}).items() if k in known}
    # Inference: no dropout; the weights come from the checkpoint, not from init_from.
    return dataclasses.replace(
        ModelConfig(**saved), tokenizer=tokenizer_path, init_from="", vocab_size=None, hidden_dropout=0.0, attention_dropout=0.0
    )


def load_reward_model(checkpoint: str, parallel: ParallelConfig = ParallelConfig()):
    """Build a reward model from an RM checkpoint at this job's layout; return (model, tokenizer, meta, ckpt).

    Starts torch.distributed / Megatron's parallel state if needed (one process is fine).
    """
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed

    ckpt = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(ckpt)
    if meta.get("kind") != "reward":
        raise ckpt_lib.CheckpointError(
            f"{ckpt} is a {meta.get('kind', 'unknown')!r} checkpoint, not a reward model; "
            "give the output of `megatron-rlhf rm` (its output_dir or an iter_N folder)"
        )
    tokenizer = Tokenizer.load(ckpt / "tokenizer.model")
    model_cfg = model_config_from_meta(meta, str(ckpt / "tokenizer.model"))
    init_distributed(parallel, model_cfg)
    model = build_model(model_cfg, parallel, tokenizer.vocab_size, scalar_head=True)
    ckpt_lib.load_weights(model, ckpt, name="model")
    model.eval()
    return model, tokenizer, meta, ckpt


def score_file(checkpoint: str, input_path: str, output_path: Optional[str], batch_size: int, parallel: ParallelConfig) -> dict:
    from megatron_rlhf.models.reward import score_sequences
    from megatron.core import parallel_state

    ckpt = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(ckpt)
    if not (ckpt / "tokenizer.model").is_file():
        raise ckpt_lib.CheckpointError(f"{ckpt} has no tokenizer.model; it is not a complete checkpoint")
    tokenizer = Tokenizer.load(ckpt / "tokenizer.model")
    # Validate the whole input before building a model: a bad line fails in a second.
    records, sequences, _ = load_responses(input_path, tokenizer, model_config_from_meta(meta, "").seq_length)
    model, tokenizer, meta, ckpt = load_reward_model(str(ckpt), parallel)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(sequences), dp))
    # Scored in chunks of many micro-batches: one schedule call each, and a progress bar.
    chunk = batch_size * 16
    parts = []
    with progress(len(mine), "score", "seq") as bar:
        for start in range(0, len(mine), chunk):
            parts.append(score_sequences(model, [sequences[i] for i in mine[start : start + chunk]], batch_size, tokenizer.pad_id))
            bar.update(len(parts[-1]))
    rewards = torch.cat(parts) if parts else torch.zeros(0)
    if dp > 1:
        gathered = [None] * dp
        dist.all_gather_object(gathered, (mine, rewards.tolist()), group=parallel_state.get_data_parallel_group(with_context_parallel=False))
        pairs = [(i, r) for idx, rs in gathered for i, r in zip(idx, rs)]
    else:
        pairs = list(zip(mine, rewards.tolist()))
    by_index = dict(pairs)
    if not dist.is_initialized() or dist.get_rank() == 0:
        lines = [json.dumps(dict(rec, reward=by_index[i]), ensure_ascii=False) for i, rec in enumerate(records)]
        text = "\n".join(lines) + "\n"
        if output_path:
            Path(output_path).parent.mkdir(parents=True, exist_ok=True)
            Path(output_path).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        if "rm_bias" not in meta:
            print(f"[score] note: {ckpt} was not normalised (no rm_bias in meta.json); rewards are raw", file=sys.stderr)
        values = torch.tensor([by_index[i] for i in range(len(records))], dtype=torch.float64)
        print(f"[score] {len(records)} lines, mean reward {values.mean().item():+.6f}, std {values.std().item() if len(records) > 1 else 0.0:.4f}", file=sys.stderr)
    return {"count": len(records), "mean": sum(by_index.values()) / max(len(by_index), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rlhf score", description="Add the reward model's \"reward\" to each {\"prompt\", \"response\"} line.")
    parser.add_argument("--checkpoint", required=True, help="an RM run's output_dir, its checkpoints/ folder, checkpoints/best or an iter_N folder")
    parser.add_argument("--input", required=True, help="JSONL with {\"prompt\", \"response\"} per line (other keys are kept)")
    parser.add_argument("--output", help="where to write the scored JSONL (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="TP size (under torchrun)")
    parser.add_argument("--pipeline-parallel", type=int, default=1, help="PP size (under torchrun)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_parallel, pipeline_model_parallel_size=args.pipeline_parallel)
    try:
        score_file(args.checkpoint, args.input, args.output, args.batch_size, parallel)
    except (ConfigError, DataError, ckpt_lib.CheckpointError, FileNotFoundError) as exc:
        print(f"megatron-rlhf score: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from megatron_rlhf.parallel import destroy_distributed

        destroy_distributed()
    return 0

