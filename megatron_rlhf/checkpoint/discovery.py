"""Which checkpoint to read: ``resolve_checkpoint`` for a path a user gives, and
``find_resume_checkpoint`` for a run that resumes, which does not trust ``latest`` but takes
the newest checkpoint that passes :func:`checkpoint_problem` and names the damaged ones it
skipped. ``start_over`` (``train.restart=true``) moves old checkpoints aside."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_rlhf.checkpoint.files import BEST, LATEST, CheckpointError, _fsync_dir, _iteration_folders, _say
from megatron_rlhf.parallel import barrier, is_rank0

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a run's output_dir, its ``checkpoints/`` folder, its ``latest``/``best`` file or
    one ``iter_N`` folder. A folder resolves to the checkpoint ``latest`` names; without a
    usable ``latest``, to its newest complete checkpoint (with a warning). The consumer
    checks the networks it reads (a damaged one is named, not silently replaced)."""
    p = Path(path)
    if p.is_file() and p.name in (LATEST, BEST):
        return _follow(p)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} (give a run's output_dir, its checkpoints/ folder or an iter_N folder)")
    if (p / "meta.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            try:
                return _follow(root / LATEST)
            except CheckpointError:
                pass
        if (root / LATEST).is_file() or _iteration_folders(root):
            found = _newest_complete(root, _say, "Copy the run again, or give a checkpoint saved elsewhere")
            if found is not None:
                return found
    if p.name.endswith(".tmp") or any(c.name.endswith(".tmp") for c in p.glob("*")):
        raise CheckpointError(f"{p} holds only a partial checkpoint (a save was interrupted); resume from an earlier one")
    raise CheckpointError(f"no checkpoint in {p}: expected meta.json or a '{LATEST}' file (is this a run's output_dir?)")


def _follow(pointer: Path) -> Path:
    """The checkpoint a ``latest``/``best`` file names (or its ``.old`` copy mid-re-save)."""
    name = pointer.read_text().strip()
    for target in (pointer.parent / name, pointer.parent / (name + ".old")):
        if (target / "meta.json").is_file():
            return target
    raise CheckpointError(f"{pointer} points to {pointer.parent / name}, which is not a complete checkpoint; give an iter_N folder instead")


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The checkpoint a run resumes from; see :func:`find_resume_checkpoint`."""
    return find_resume_checkpoint(checkpoints_dir)


def dist_checkpoint_problem(path: Path, keep: Optional[Callable[[str], bool]] = None, need_common: bool = True) -> Optional[str]:
    """Why the dist checkpoint folder ``path`` cannot be read, or None.

    Cheap: reads the small ``.metadata`` and stats the data files, checking each is as long
    as the byte ranges its metadata names (a truncated copy or an interrupted write).
    ``keep(key)`` limits the check to some tensors (export reads only the weights).
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not path.is_dir():
        return f"{path} is missing"
    if not (path / ".metadata").is_file():
        return f"{path / '.metadata'} is missing"
    for name in ("metadata.json", "common.pt") if need_common else ():  # Megatron's own, read on every load
        if not (path / name).is_file():
            return f"{path / name} is missing"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # a truncated or garbled pickle: any unpickling error
        return f"{path / '.metadata'} is unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    need: dict = {}
    for index, info in (metadata.storage_data or {}).items():
        if keep is None or keep(index.fqn):
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        have = f.stat().st_size
        if have < size:
            return f"{f} is truncated ({have} of at least {size} bytes)"
    return None


def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` is not a complete checkpoint, or None (see the module docstring)."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except FileNotFoundError:
        return f"{ckpt / 'meta.json'} is missing"
    except (OSError, ValueError) as exc:
        return f"{ckpt / 'meta.json'} is unreadable ({type(exc).__name__})"
    if not isinstance(meta, dict):
        return f"{ckpt / 'meta.json'} is not a JSON object"
    for name in meta.get("networks") or []:
        problem = dist_checkpoint_problem(ckpt / name)
        if problem:
            return problem
    state = ckpt / "state.pt"
    if state.exists():
        try:
            torch.load(state, weights_only=False)
        except Exception as exc:
            return f"{state} is unreadable ({type(exc).__name__})"
    return None


def find_resume_checkpoint(checkpoints_dir: str | os.PathLike, warn: Callable[[str], None] = _say) -> Optional[Path]:
    """The newest complete checkpoint in ``checkpoints_dir``; None when it holds no ``iter_*``.

    ``latest`` is only a hint: every ``iter_N`` is considered, newest first, and damaged
    ones (see :func:`checkpoint_problem`) are skipped with a warning naming both. Raises
    :class:`CheckpointError` when ``iter_*`` folders exist but none is usable, so a run
    never silently starts over on top of them. Reads only; any rank may call it.
    """
    return _newest_complete(
        Path(checkpoints_dir), warn,
        "Refusing to start over on top of them: set train.restart=true to start from step 0 "
        "(they are set aside, not deleted) or give a new output_dir",
    )


def _newest_complete(root: Path, warn: Callable[[str], None], fix: str) -> Optional[Path]:
    folders = _iteration_folders(root)
    if not folders:
        return None
    skipped = []
    chosen = None
    for n in sorted(folders, reverse=True):
        problem = checkpoint_problem(folders[n])
        if problem is None:
            chosen = folders[n]
            break
        skipped.append(f"{folders[n].name} ({problem})")
    if chosen is None:
        raise CheckpointError(f"{root} holds checkpoint folders but none is complete: {'; '.join(skipped)}. {fix}")
    if skipped:
        warn(f"skipping damaged checkpoint(s) {'; '.join(skipped)}; using {chosen}, the newest complete one")
    hint = root / LATEST
    named = hint.read_text().strip() if hint.is_file() else None
    if named is None:
        warn(f"{hint} is missing; found {chosen.name} by scanning {root}")
    elif named != chosen.name and not (chosen.name.endswith(".old") and named == chosen.name[: -len(".old")]) and not skipped:
        warn(f"{hint} names {named}, but the newest complete checkpoint is {chosen.name}; using {chosen.name}")
    return chosen


def start_over(checkpoints_dir: str | os.PathLike) -> Optional[Path]:
    """``train.restart=true``: move ``checkpoints_dir`` aside (to ``checkpoints.before-restart-K``)
    so the new run's steps cannot mix with the old run's; returns where it went (None: nothing
    to move). Every rank must call it."""
    root = Path(checkpoints_dir)
    aside = None
    if root.is_dir() and any(root.iterdir()):
        k = 1
        while root.with_name(f"{root.name}.before-restart-{k}").exists():
            k += 1
        aside = root.with_name(f"{root.name}.before-restart-{k}")
    barrier()  # every rank has chosen the same name before rank 0 moves anything
    if is_rank0() and aside is not None:
        os.replace(root, aside)
        root.mkdir()
        _fsync_dir(root.parent)
        _say(f"train.restart=true: moved the previous checkpoints to {aside}")
    barrier()
    return aside
