#!/usr/bin/env python
"""megatron-rlhf checkpoint -> Hugging Face folder.

    python tools/convert_to_hf.py CKPT_DIR OUT_DIR [--network NAME] [--dtype bfloat16]
        [--max-shard-size 2GB] [--overwrite]

CKPT_DIR: a run's output_dir, its checkpoints/ folder, checkpoints/best or one iter_N
folder, saved at any TP/PP layout. A policy becomes ...ForCausalLM of its family (Llama,
Mistral, Qwen2, Qwen3; GPT2LMHeadModel); a reward model or critic (scalar head) becomes
...ForSequenceClassification with num_labels=1. The reward is `logits + config.rlhf_score_bias` (GPT-2: the bias is folded
into the final LayerNorm and rlhf_score_bias is 0; Llama: HF's score layer has no bias, so
it must be added). PPO checkpoints hold "actor" (default) and "critic": pick with
--network. Writes model.safetensors (sharded above --max-shard-size), config.json,
generation_config.json and tokenizer files (a Hugging Face tokenizer: its tokenizer.json and
a tokenizer_config.json with its chat template; a SentencePiece one: tokenizer.model, a
tokenizer.json reproducing it and tokenizer_config.json). Memory: about one layer at a time.

Only the weights are read: the optimizer state every training checkpoint holds is left
alone. The folder is written beside OUT_DIR and renamed into place at the end, so a failure
(a damaged checkpoint, a full disk) leaves no partial OUT_DIR and, with --overwrite, the
previous export intact. Errors print one line and exit 2.
"""
import argparse
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--network", help="which network of the checkpoint (default: model, or actor for PPO)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the imported model's dtype, else the checkpoint's")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the checkpoint's own (a .model, a tokenizer.json or a folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from megatron_rlhf.cli import _quiet

    _quiet()
    from megatron_rlhf.convert import ConversionError, convert_to_hf
    from megatron_rlhf.checkpoint import CheckpointError

    try:
        s = convert_to_hf(args.ckpt_dir, args.out_dir, network=args.network, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          tokenizer=args.tokenizer, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConversionError, CheckpointError) as exc:
        print(f"convert_to_hf: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions: nothing was written to OUT_DIR
        where = exc.filename or args.out_dir
        print(f"convert_to_hf: error: {where}: {exc.strerror or exc}; {args.out_dir} was left as it was "
              f"(free space, fix permissions or choose another OUT_DIR)", file=sys.stderr)
        return 2
    print(f"wrote {s['out_dir']}: {s['architecture']}, {s['dtype']}, {len(s['files'])} safetensors file(s), {s['bytes'] / 1e9:.2f} GB")
    if s["score_bias"] is not None:
        print(f"reward-model bias {s['score_bias']:.6g}: {s['score_bias_handling']}")
    if s["tokenizer_mismatches"]:
        print(f"warning: tokenizer.json differs from the SentencePiece model on {len(s['tokenizer_mismatches'])} probe strings, "
              f"e.g. {s['tokenizer_mismatches'][0]!r}; tokenizer.model is included", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
