"""The checkpoint folder's names and its smallest readers, shared by saving (``io``), resume
discovery (``discovery``) and kinds (``kinds``)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from megatron_rlhf.parallel import is_rank0

LATEST = "latest"


BEST = "best"


_ITER = re.compile(r"^iter_(\d+)(\.old)?$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or does not fit the model; the message says how to fix it."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _iteration_folders(root: Path) -> dict:
    """{iteration: folder} of committed checkpoints: ``iter_N``, else ``iter_N.old`` (a
    re-save of N killed between moving the old copy aside and renaming the new one in)."""
    found: dict = {}
    if not root.is_dir():
        return found
    for p in root.iterdir():
        m = _ITER.match(p.name)
        if m and p.is_dir():
            n = int(m.group(1))
            if not m.group(2) or n not in found:
                found[n] = p
    return found


def _say(text: str) -> None:
    if is_rank0():
        print(f"[checkpoint] warning: {text}", file=sys.stderr, flush=True)


def read_meta(ckpt: Path) -> dict:
    """``meta.json`` of a checkpoint folder (interpreted by ``checkpoint/meta.py``)."""
    path = Path(ckpt) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {ckpt} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); resume from an earlier checkpoint") from None


def _fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
