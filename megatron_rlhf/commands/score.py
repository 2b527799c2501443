"""``megatron-rlhf score``: add the reward model's ``"reward"`` to every ``{"prompt", "response"}`` line.

    megatron-rlhf score --checkpoint runs/tiny/rm --input samples.jsonl [--output scored.jsonl] [--batch-size 32]

One process at TP=PP=1 by default. Under ``torchrun`` the ranks split the input
(data parallel) and may shard the model with ``--tensor-model-parallel-size``/
``--pipeline-model-parallel-size``;
rank 0 writes the output. Each line keeps its keys and gains ``"reward"``: the normalised
reward (the checkpoint's head already holds the normalisation bias, see
``models/reward.py``). Without ``--output`` the lines go to stdout.

Each line is scored as ``[bos] + prompt + response + [eos]``, the sequence the RM was
trained on. The RM recipe normalises with ``data.responses.load_responses`` too, so scoring the
demonstrations here reproduces their mean of 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_rlhf.config import ParallelConfig
from megatron_rlhf.data.responses import load_responses
from megatron_rlhf.progress import progress

def score_file(checkpoint: str, input_path: str, output_path: Optional[str], batch_size: int, parallel: ParallelConfig) -> dict:
    from megatron.core import parallel_state

    from megatron_rlhf.checkpoint import check_kind, load_reward_model, load_tokenizer, read_meta, resolve_checkpoint
    from megatron_rlhf.models.reward import score_sequences

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    check_kind(ckpt, meta, "reward", "--checkpoint")
    # Validate the whole input before building a model: a bad line fails in a second.
    records, sequences, _ = load_responses(input_path, load_tokenizer(ckpt), meta["model"]["seq_length"])
    model, tokenizer, meta, ckpt = load_reward_model(ckpt, parallel)
    model.eval()
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
    parser.add_argument("--tensor-model-parallel-size", "--tensor-parallel", type=int, default=1, help="TP size (under torchrun)")
    parser.add_argument("--pipeline-model-parallel-size", "--pipeline-parallel", type=int, default=1, help="PP size (under torchrun)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size, pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    score_file(args.checkpoint, args.input, args.output, args.batch_size, parallel)
    return 0

