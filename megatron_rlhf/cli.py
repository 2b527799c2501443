"""``megatron-rlhf`` (also ``python -m megatron_rlhf``): one command per pipeline step.

    megatron-rlhf sft   --config examples/tiny/sft.yaml [key=value ...]
    megatron-rlhf rm    --config examples/tiny/rm.yaml model.init_from=runs/tiny/sft
    megatron-rlhf ppo   --config examples/tiny/ppo.yaml
    megatron-rlhf report RUN_DIR

Under ``torchrun`` or ``srun`` every process runs the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


# Exit status after SIGTERM/SIGUSR1: every rank saved a checkpoint at the end of its step and
# rerunning the same command resumes (EX_TEMPFAIL). slurm/launch.sh requeues the job on it.
EXIT_PREEMPTED = 75


def _quiet() -> None:
    # Megatron warns at import that Apex/TE are missing: expected on CPU, noise in logs.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    # Megatron-Core and torch.distributed.checkpoint deprecation notices are not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _train_parser(name: str, help_text: str, sub) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")


def main(argv=None) -> int:
    _quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-rlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser("sft", "stage 1: supervised fine-tuning on demonstrations", sub)
    _train_parser("rm", "stage 2: reward model on K-way rankings", sub)
    _train_parser("ppo", "stage 3: PPO-ptx against the reward model", sub)
    for name in ("score", "generate", "report", "sample-for-ranking", "data-stats"):
        sub.add_parser(name, add_help=False)
    if argv and argv[0] in ("score", "generate", "report", "sample-for-ranking", "data-stats"):
        return _delegate(argv[0], argv[1:])
    args = parser.parse_args(argv)
    from megatron_rlhf.config import ConfigError, load_config
    from megatron_rlhf.data import DataError
    from megatron_rlhf.training.checkpoint import CheckpointError

    try:
        cfg = load_config(args.config, args.overrides, stage=args.command)
        stage = __import__(f"megatron_rlhf.stages.{args.command}", fromlist=["run"])
        result = stage.run(cfg)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"megatron-rlhf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from megatron_rlhf.parallel import destroy_distributed

        destroy_distributed()
    if result.get("status") == "preempted":
        print(f"megatron-rlhf {args.command}: preempted at step {result['step']}; checkpoint saved", file=sys.stderr)
    return EXIT_PREEMPTED if result.get("status") == "preempted" else 0


def _delegate(command: str, argv: list) -> int:
    module = {
        "report": "megatron_rlhf.report",
        "score": "megatron_rlhf.stages.score",
        "generate": "megatron_rlhf.stages.generate",
        "sample-for-ranking": "megatron_rlhf.stages.sample_for_ranking",
        "data-stats": "megatron_rlhf.data.stats",
    }[command]
    return int(__import__(module, fromlist=["main"]).main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
