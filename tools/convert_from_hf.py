#!/usr/bin/env python
"""Hugging Face -> megatron-rlhf checkpoint.

    python tools/convert_from_hf.py HF_DIR OUT_DIR [--tensor-model-parallel-size N]
        [--pipeline-model-parallel-size M] [--tokenizer SPM.model] [--overwrite]

HF_DIR: a LlamaForCausalLM (grouped-query attention, tied or untied embeddings) or
GPT2LMHeadModel folder as save_pretrained writes it (config.json + safetensors, one file or
sharded) with a SentencePiece tokenizer.model (or --tokenizer). OUT_DIR becomes a
checkpoint folder for `model.init_from=OUT_DIR`. Our dist checkpoints reshard on load, so
the result loads at any layout; the TP/PP flags check that the model splits that way.
Runs as one process on the CPU; memory: one fp32 copy of the model.
"""
import argparse
import json
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
    parser.add_argument("--tokenizer", help="SentencePiece model to use instead of HF_DIR/tokenizer.model")
    parser.add_argument("--allow-gelu-approximation", action="store_true", help="GPT-2 with tanh-approximated GELU (gelu_new): convert anyway (not exact)")
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
            tokenizer=args.tokenizer, allow_gelu_approximation=args.allow_gelu_approximation,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (ConversionError, CheckpointError) as exc:
        print(f"convert_from_hf: error: {exc}", file=sys.stderr)
        return 2
    model = summary["model"]
    arch_keys = ("flavour", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "seq_length", "norm_epsilon", "rotary_base", "untie_embeddings_and_output_weights")
    print(f"wrote {summary['checkpoint']} ({summary['architecture']}, {summary['tensors']} tensors, source dtype {summary['source_dtype']})")
    print("use it with model.init_from=" + args.out_dir + " and this model section:")
    print("model:\n" + "\n".join(f"  {k}: {json.dumps(model[k])}" for k in arch_keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
