"""Resolve a job's config for slurm/launch.sh: validate it and print "TP PP OUTPUT_DIR".

    python slurm/resolve.py --stage sft --config examples/tiny/sft.yaml [--write merged.yaml] [key=value ...]

Exit codes: 0 ok; 2 the config (or an override) is invalid, the message says why;
3 the package or PyYAML cannot be imported here (launch.sh then reads the YAML itself).
With exit 0, lines "warning: ..." on stderr name layouts the config accepts but the stage
refuses when it starts; launch.sh prints them with the resolved launch.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def known_limits(cfg) -> list:
    """Why the stage would stop at start with this (valid) config, in words; [] if it would not.

    These restate checks the stages make when they start, so that a dry run shows them on any
    machine. tests/test_slurm.py holds each one to the stage's own check.
    """
    notes = []
    # Every stage, PPO included, accepts any TP/PP layout that check_layout() validates (PPO
    # rollouts are generated through the pipeline stages): nothing to warn about at present.
    return notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--write", help="also write the merged config (config + overrides) to this YAML file")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        from pathlib import Path

        from megatron_rlhf.config import ConfigError, dump_config, load_config
    except ImportError as exc:
        print(f"resolve.py: cannot import the megatron_rlhf config ({exc})", file=sys.stderr)
        return 3
    try:
        cfg = load_config(a.config, a.overrides, stage=a.stage)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.write:
        dump_config(cfg, Path(a.write))
    for note in known_limits(cfg):
        print(f"warning: {note}", file=sys.stderr)
    par = cfg.parallel
    print(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, cfg.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
