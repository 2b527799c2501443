#!/usr/bin/env python
"""Train a SentencePiece tokenizer: tools/train_tokenizer.py TEXT_FILE... --vocab-size N --model-prefix OUT

The same as `megatron-rlhf train-tokenizer` (megatron_rlhf/commands/train_tokenizer.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlhf.commands.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
