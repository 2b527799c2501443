#!/usr/bin/env python
"""Prepare a prompt set: tools/prepare_prompts.py IN.jsonl OUT_DIR [options].

The logic lives in megatron_rlhf.prompt_prep so that the `megatron-rlhf` CLI
and this script behave identically; see `--help` for the rules and options.
"""
import os
import sys

# Lets the script run from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlhf.prompt_prep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
