"""The output contract's ``metrics.jsonl`` (+ TensorBoard and a progress bar), rank 0 only.

One JSON object per logged step, always with ``"step"``. The file is only ever appended
to or cut at a line boundary, never rewritten. On resume, the lines past the checkpoint's
step (steps the resumed run will redo) and a torn last line (a kill mid-write) are moved to
``metrics.discarded.jsonl`` -- appended there after a note saying when and why -- so
``metrics.jsonl`` reads as one uninterrupted run and nothing is lost.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_rlhf.parallel import is_rank0


class MetricsLogger:
    def __init__(self, output_dir: Path, resume_step: int = 0, total_steps: int = 0, tensorboard: bool = True, progress_bar: bool = True, desc: str = ""):
        self.active = is_rank0()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not self.active:
            return
        if self.path.exists():
            set_aside_after(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                self.writer = None
        if progress_bar and total_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, desc=desc, dynamic_ncols=True, file=sys.stderr, disable=None)

    def log(self, step: int, metrics: dict, advance: bool = True) -> None:
        if not self.active:
            return
        record = {"step": step}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in record.items() if k in ("train/loss", "eval/loss", "eval/accuracy", "rollout/reward", "rollout/kl") and isinstance(v, float)}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


DISCARDED = "metrics.discarded.jsonl"


def _parse(line: bytes) -> Optional[dict]:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def set_aside_after(path: Path, resume_step: int) -> int:
    """Cut ``path`` before its first line that is past ``resume_step`` or unparsable (a torn
    write), appending that tail to ``metrics.discarded.jsonl`` after a note; returns how many
    lines moved. The tail is copied and fsynced before ``path`` is truncated."""
    path = Path(path)
    data = path.read_bytes()
    cut, tail = len(data), []
    offset = 0
    for raw in data.splitlines(keepends=True):
        row = _parse(raw)
        torn = not raw.endswith(b"\n")  # a kill mid-write
        if raw.strip() and (row is None or torn or row.get("step", 0) > resume_step) and cut == len(data):
            cut = offset
        if cut != len(data) and raw.strip():
            text = raw.decode("utf-8", "replace").rstrip("\n")
            tail.append(json.dumps(row) if row is not None else json.dumps({"unparsable_line": text}))
        offset += len(raw)
    if cut == len(data):
        return 0
    note = {"note": f"moved from {path.name} when a run resumed at step {resume_step}", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(path.with_name(DISCARDED), "a") as fh:
        fh.write("".join(line + "\n" for line in [json.dumps(note), *tail]))
        fh.flush()
        os.fsync(fh.fileno())
    os.truncate(path, cut)
    return len(tail)


def read_metrics(output_dir: Path, key: Optional[str] = None) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a torn last line, from a kill mid-write, is skipped)."""
    path = Path(output_dir) / "metrics.jsonl"
    lines = path.read_bytes().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        row = _parse(line)
        if row is None and line.strip() and number < len(lines):
            raise ValueError(f"{path}:{number}: not a JSON object")
        if row is not None and (key is None or key in row):
            rows.append(row)
    return rows
