#!/usr/bin/env python
"""Hugging Face -> megatron-rlhf checkpoint.

    python tools/convert_from_hf.py HF_DIR OUT_DIR [--tensor-model-parallel-size N]
        [--pipeline-model-parallel-size M] [--tokenizer PATH] [--overwrite]

HF_DIR: a folder as save_pretrained writes it (config.json + safetensors, one file or
sharded) of Llama (incl. Llama-3.x RoPE scaling), Mistral, Qwen2/Qwen2.5, Qwen3 or GPT-2:
...ForCausalLM / GPT2LMHeadModel become a policy, ...ForSequenceClassification with
num_labels=1 a reward model (to start PPO from). The tokenizer is the folder's own:
tokenizer.model (SentencePiece) or tokenizer.json with tokenizer_config.json (or
--tokenizer, a file or folder). OUT_DIR becomes a checkpoint for `model.init_from=OUT_DIR`
(SFT, RM) or `ppo.reward_model=OUT_DIR`; it fills the model section (architecture, sizes,
tokenizer) itself. Our dist checkpoints reshard on load, so the result loads at any
layout; the TP/PP flags check that the model splits that way. Runs as one process on the
CPU; memory: one fp32 copy of the model.
"""
import argparse
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # conversion is CPU work; keep the model off the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--tokenizer", help="tokenizer to use instead of HF_DIR's own (a .model, a tokenizer.json or a folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from megatron_rlhf.cli import _quiet

    _quiet()
    from megatron_rlhf.convert import ConversionError, convert_from_hf
    from megatron_rlhf.checkpoint import CheckpointError

    try:
        summary = convert_from_hf(
            args.hf_dir, args.out_dir, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (ConversionError, CheckpointError) as exc:
        print(f"convert_from_hf: error: {exc}", file=sys.stderr)
        return 2
    model = summary["model"]
    print(f"wrote {summary['checkpoint']} ({summary['architecture']}, {summary['tensors']} tensors, source dtype {summary['source_dtype']})")
    use = "ppo.reward_model" if summary["architecture"].endswith("ForSequenceClassification") else "model.init_from"
    print(f"use it with {use}={args.out_dir}; it sets the architecture, sizes and tokenizer itself "
          f"({model['flavour']}/{model['family']}, {model['num_layers']} layers, hidden {model['hidden_size']}, "
          f"context {model['seq_length']}: a shorter model.seq_length is fine for RoPE models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
