"""The output contract's ``metrics.jsonl`` (+ TensorBoard and a progress bar), rank 0 only.

One JSON object per logged step, always with ``"step"``. On resume, lines past the
checkpoint's step are dropped first, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
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
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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


def read_metrics(output_dir: Path, key: Optional[str] = None) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if key is None or key in r]
