"""``megatron-rlhf`` (also ``python -m megatron_rlhf``): one command per pipeline step.

    megatron-rlhf sft   --config examples/tiny/sft.yaml [key=value ...]
    megatron-rlhf rm    --config examples/tiny/rm.yaml model.init_from=runs/tiny/sft
    megatron-rlhf ppo   --config examples/tiny/ppo.yaml
    megatron-rlhf report RUN_DIR
    megatron-rlhf COMMAND --help        (every command below)

Under ``torchrun`` or ``srun`` every process runs the same command. Exit status: 0 done,
2 a clear error (config, data, checkpoint, files: one line naming what and how to fix;
``MEGATRON_RLHF_DEBUG=1`` shows the traceback), 3 the run diverged (non-finite steps),
75 preempted (a checkpoint was saved; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

# Exit status after SIGTERM/SIGUSR1/Ctrl-C: every rank saved a checkpoint at the end of its
# step and rerunning the same command resumes (EX_TEMPFAIL). slurm/launch.sh requeues on it.
EXIT_PREEMPTED = 75
EXIT_ERROR = 2
EXIT_DIVERGED = 3

# name -> (module, help). Training recipes run ``module.run(cfg)`` on a config built from
# ``--config`` and ``key=value`` overrides; the other commands own their arguments
# (``module.main(argv)``).
RECIPES = {
    "sft": ("megatron_rlhf.recipes.sft", "recipe 1: supervised fine-tuning on demonstrations"),
    "rm": ("megatron_rlhf.recipes.rm", "recipe 2: reward model on K-way rankings"),
    "ppo": ("megatron_rlhf.recipes.ppo", "recipe 3: PPO-ptx against the reward model (GRPO/RLOO with ppo.advantage_estimator)"),
    "dpo": ("megatron_rlhf.recipes.dpo", "DPO on K-way rankings against a frozen reference"),
}
COMMANDS = {
    "generate": ("megatron_rlhf.commands.generate", "sample responses from a policy checkpoint"),
    "score": ("megatron_rlhf.commands.score", "add a reward model's reward to {prompt, response} lines"),
    "sample-for-ranking": ("megatron_rlhf.commands.sample_for_ranking", "K responses per prompt as ranking tasks; --check validates labels"),
    "data-stats": ("megatron_rlhf.commands.data_stats", "format, token lengths and truncation of JSONL data"),
    "report": ("megatron_rlhf.commands.report", "PNG curves and a markdown summary of a run"),
    "prepare-prompts": ("megatron_rlhf.prompt_prep", "dedupe, scrub PII and split a prompt set by user"),
    "plan-memory": ("megatron_rlhf.commands.plan_memory", "per-GPU memory plan of a layout"),
    "train-tokenizer": ("megatron_rlhf.commands.train_tokenizer", "train a SentencePiece tokenizer"),
}


def _quiet() -> None:
    # Megatron warns at import that Apex/TE are missing: expected on CPU, noise in logs.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    # Megatron-Core and torch.distributed.checkpoint deprecation notices are not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in RECIPES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    _quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return _guarded(argv[0], lambda: int(importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0))
    args = _parser().parse_args(argv)

    def train() -> int:
        from megatron_rlhf.config import load_config

        result = importlib.import_module(RECIPES[args.command][0]).run(load_config(args.config, args.overrides, stage=args.command))
        if result.get("status") == "preempted":
            print(f"megatron-rlhf {args.command}: preempted at step {result['step']}; checkpoint saved", file=sys.stderr)
            return EXIT_PREEMPTED
        return 0

    return _guarded(args.command, train)


def _guarded(command: str, body) -> int:
    """Run a command; expected failures end in one line and exit 2 (3 for divergence)."""
    from megatron_rlhf.checkpoint import CheckpointError
    from megatron_rlhf.config import ConfigError
    from megatron_rlhf.data import DataError
    from megatron_rlhf.training.loop import DivergenceError

    try:
        return body()
    except (ConfigError, DataError, CheckpointError, DivergenceError, OSError) as exc:
        if os.environ.get("MEGATRON_RLHF_DEBUG") == "1":
            traceback.print_exc()
        print(f"megatron-rlhf {command}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(exc, DivergenceError) else EXIT_ERROR
    finally:
        from megatron_rlhf.parallel import destroy_distributed

        destroy_distributed()


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename and not isinstance(exc, FileNotFoundError):
        fixes = {28: "free disk space (or point output_dir elsewhere) and rerun: it resumes from the last complete checkpoint",
                 13: "make it writable or choose another output_dir", 30: "choose a writable output_dir"}
        return f"{exc.filename}: {exc.strerror}; {fixes.get(exc.errno, 'check the path and rerun')}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
