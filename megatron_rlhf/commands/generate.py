"""``megatron-rlhf generate``: sample responses from a policy checkpoint with the KV cache.

    megatron-rlhf generate --checkpoint runs/tiny/ppo (--prompt TEXT | --prompts FILE.jsonl)
                           --max-new-tokens N [--temperature 0] [--top-k K] [--top-p P]
                           [--num-samples K] [--output OUT.jsonl] [--seed S]

Writes one JSON line per sample: {"prompt", "response", "sample", "tokens", "finished"}
(stdout without --output). Temperature 0 is greedy. Runs in one process at TP=1 unless
launched under torchrun with ``--tensor-model-parallel-size``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def build_parser():
    p = argparse.ArgumentParser(prog="megatron-rlhf generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run's output_dir, its checkpoints/ folder or an iter_N folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help='JSONL file of {"prompt": ...}')
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (under torchrun)")
    p.add_argument("--output", help="JSONL file to write (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal anyway)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlhf.checkpoint import load_policy
    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.data import DataError, load_prompts, prompt_budget
    from megatron_rlhf.rollout import generate
    from megatron_rlhf.parallel import device, is_rank0
    from megatron_rlhf.progress import progress

    try:
        model, tok, meta, _ = load_policy(args.checkpoint, ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size))
        model.eval()
        budget = prompt_budget(meta["model"]["seq_length"], args.max_new_tokens)
        if args.prompt is not None:
            prompts = [tok.bos_ids + tok.encode(args.prompt)]
            texts = [args.prompt]
            if len(prompts[0]) > budget:
                raise DataError(f"--prompt has {len(prompts[0])} tokens; at most {budget} fit with --max-new-tokens {args.max_new_tokens}")
        else:
            prompts = load_prompts(args.prompts, tok, budget)
            with open(args.prompts, encoding="utf-8") as fh:
                texts = [json.loads(line)["prompt"] for line in fh if line.strip()]
    except ValueError as exc:
        raise DataError(str(exc)) from None
    generator = torch.Generator(device=device()).manual_seed(args.seed)
    out = open(args.output, "w", encoding="utf-8") if args.output and is_rank0() else None
    bar = progress(args.num_samples * len(prompts), "generate", "sample", enable=not args.no_progress)
    try:
        for sample in range(args.num_samples):
            for start in range(0, len(prompts), args.batch_size):
                gen = generate(model, prompts[start : start + args.batch_size], args.max_new_tokens, eos_id=tok.eos_id,
                               pad_id=tok.pad_id, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               generator=generator)
                for i, response in enumerate(gen.responses):
                    ids = [t for t in response if t != tok.eos_id]
                    record = {"prompt": texts[start + i], "response": tok.decode(ids), "sample": sample,
                              "tokens": response, "finished": gen.finished[i]}
                    if is_rank0():
                        print(json.dumps(record), file=out or sys.stdout)
                bar.update(len(gen.responses))
    finally:
        bar.close()
        if out:
            out.close()
    return 0
