"""What the GPU tests share: the CLI in a subprocess, the tiny task's overrides, metrics.

Every run goes through ``python -m megatron_rlhf`` (what users run) in a fresh process, so
each has its own CUDA context and Megatron state.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SFT_YAML = "examples/tiny/sft.yaml"
# The tiny task, short: no progress bar or TensorBoard, no evaluation until the end.
QUIET = ["train.progress_bar=false", "train.tensorboard=false"]


def env(cpu: bool = False, **extra) -> dict:
    out = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if cpu:
        out["CUDA_VISIBLE_DEVICES"] = ""  # torch then sees no GPU: the CPU path, as on a laptop
    out.update(extra)
    return out


def cli(*args, cpu: bool = False, timeout: float = 600, **extra_env) -> subprocess.CompletedProcess:
    """``python -m megatron_rlhf ARGS`` from the repository root; never raises on failure."""
    return subprocess.run([sys.executable, "-m", "megatron_rlhf", *map(str, args)], cwd=ROOT, env=env(cpu, **extra_env),
                          capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI under ``torch.distributed.run`` with ``nproc`` processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "megatron_rlhf",
           *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    """The assertion message for a failed run: the end of its stderr."""
    return f"exit {proc.returncode}\n--- stderr (end) ---\n{proc.stderr[-4000:]}\n--- stdout (end) ---\n{proc.stdout[-1500:]}"


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def series(run_dir, key: str) -> dict[int, float]:
    """``{step: value}`` of one metric from a run's metrics.jsonl."""
    return {r["step"]: r[key] for r in metrics(run_dir) if key in r}


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
