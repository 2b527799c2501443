#!/usr/bin/env python
"""Per-GPU memory plan: tools/plan_memory.py --preset 175b --stage ppo --tp 8 --pp 16 --search.

The logic and every formula live in megatron_rlhf.memory_plan (its docstring); see `--help`.
The last line printed is `plan: peak_gib_per_gpu=X nodes=N` (nodes=0: nothing fits).
"""
import os
import sys

# Lets the script run from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlhf.commands.plan_memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
