"""``megatron-rlhf train-tokenizer TEXT_FILE... --vocab-size N --model-prefix OUT``: a SentencePiece tokenizer.

Writes OUT.model and OUT.vocab. Ids: pad=0, bos=1, eos=2, unk=3, then 256 byte-fallback
pieces, then learned pieces; any UTF-8 text encodes. The same input gives the same model.
The logic lives in ``megatron_rlhf.data.tokenizer.train_tokenizer``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_rlhf.data.jsonl import DataError
from megatron_rlhf.data.tokenizer import train_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rlhf train-tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text_files", nargs="+", metavar="TEXT_FILE", help="plain text, one sentence per line")
    parser.add_argument("--vocab-size", type=int, required=True, help="total ids, specials and 256 bytes included")
    parser.add_argument("--model-prefix", required=True, help="output path without extension")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        tok = train_tokenizer(args.text_files, args.vocab_size, args.model_prefix, args.model_type, args.character_coverage)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {tok.source} (vocab_size={tok.vocab_size}, fingerprint={tok.fingerprint()})")
    return 0
