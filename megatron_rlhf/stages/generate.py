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
import dataclasses
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
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--output", help="JSONL file to write (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal anyway)")
    return p


def load_policy(checkpoint: str, tp: int = 1):
    """(model, tokenizer, meta) for a policy checkpoint, at TP=``tp``, PP=1, in eval mode."""
    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.data import Tokenizer
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.training import checkpoint as ckpt_lib

    ckpt = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(ckpt)
    if meta.get("kind") not in (None, "policy"):
        raise ckpt_lib.CheckpointError(f"{ckpt} is a '{meta.get('kind')}' checkpoint; generate needs a policy (an SFT or PPO run)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})
    model_cfg = dataclasses.replace(model_cfg, hidden_dropout=0.0, attention_dropout=0.0, init_from="", tokenizer=str(ckpt / "tokenizer.model"))
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    init_distributed(parallel, model_cfg)
    tokenizer = Tokenizer.load(ckpt / "tokenizer.model")
    model = build_model(model_cfg, parallel, tokenizer.vocab_size, seed=0)
    network = "actor" if "actor" in meta.get("networks", []) else "model"
    ckpt_lib.load_weights(model, ckpt, network)
    return model.eval(), tokenizer, meta


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlhf.data import DataError, load_prompts, prompt_budget
    from megatron_rlhf.models.generation import generate
    from megatron_rlhf.parallel import is_rank0
    from megatron_rlhf.progress import progress
    from megatron_rlhf.training.checkpoint import CheckpointError

    try:
        model, tok, meta = load_policy(args.checkpoint, args.tensor_model_parallel_size)
        budget = prompt_budget(meta["model"]["seq_length"], args.max_new_tokens)
        if args.prompt is not None:
            prompts = [[tok.bos_id] + tok.encode(args.prompt)]
            texts = [args.prompt]
            if len(prompts[0]) > budget:
                raise DataError(f"--prompt has {len(prompts[0])} tokens; at most {budget} fit with --max-new-tokens {args.max_new_tokens}")
        else:
            prompts = load_prompts(args.prompts, tok, budget)
            with open(args.prompts, encoding="utf-8") as fh:
                texts = [json.loads(line)["prompt"] for line in fh if line.strip()]
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"megatron-rlhf generate: error: {exc}", file=sys.stderr)
        return 2
    generator = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(args.seed)
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
