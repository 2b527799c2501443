"""A run's ``output_dir``: one job at a time (a lock), and a ``config.yaml`` that always says
what runs.

The lock is ``output_dir/.lock`` holding ``host pid``, created atomically by rank 0 and
removed when the process exits. A lock left by a dead process on this host is taken over
(with a warning); one held by a live process, or by another host, refuses the start with
the holder named.

``config.yaml`` is the config of the run now going on. When a run resumes with a changed
config, each change either applies (it is logged: LR schedule, intervals, PPO/RM
coefficients and the like) or is refused with the key named (what fixes the network, the
data order or the layout: a resumed run would silently be another run). The previous file
is kept as ``config.N.yaml``.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import os
import socket
from pathlib import Path
from typing import Optional

import yaml

from megatron_rlhf.config import Config, ConfigError, config_from_dict, dump_config

LOCK = ".lock"
# Keys a resumed run may not change: they define the network, the data and its order, the
# starting checkpoints, or the layout the optimizer state was saved at.
FIXED_ON_RESUME = (
    "stage", "model.", "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
    "train.seed", "train.global_batch_size", "data.train_path", "data.valid_path", "data.valid_fraction", "data.shuffle",
    "data.truncation", "ppo.prompts_path", "ppo.pretrain_path", "ppo.reward_model", "ppo.max_new_tokens",
)


class OutputLock:
    """``output_dir/.lock`` for this process; released at exit."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK
        self.held = False

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a warning when a stale lock was taken over."""
        me = f"{socket.gethostname()} {os.getpid()}"
        warning = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text().strip() if self.path.exists() else ""
                if not _is_stale(holder):
                    raise ConfigError(
                        f"{self.path.parent} is in use by another run ({holder or 'unknown holder'}, lock {self.path}); "
                        f"wait for it to end or choose another output_dir"
                    ) from None
                warning = f"{self.path}: taking over the lock of a run that is gone ({holder})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me + "\n")
            self.held = True
            atexit.register(self.release)
            return warning
        raise ConfigError(f"could not lock {self.path}; remove it if no run uses {self.path.parent}")

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)


def _is_stale(holder: str) -> bool:
    parts = holder.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return True  # torn or empty: its writer died while writing it
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():
        return False  # another machine's process: we cannot tell, so it holds
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.ESRCH
    return False


def _flatten(value, prefix="") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def config_changes(previous: Config, current: Config) -> list[tuple[str, object, object]]:
    """``(key, previous, current)`` for every key whose value differs."""
    old, new = _flatten(dataclasses.asdict(previous)), _flatten(dataclasses.asdict(current))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def record_config(cfg: Config, output_dir: Path, resuming: bool) -> list[str]:
    """Check a resumed run's config against the previous ``config.yaml``, keep that one as
    ``config.N.yaml`` and write the new one. Returns log lines (the changes that apply).
    Raises ConfigError naming a changed key that a resumed run cannot take."""
    path = Path(output_dir) / "config.yaml"
    notes = []
    if path.is_file():
        try:
            previous = config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))
        except (ConfigError, yaml.YAMLError):
            previous = None  # another version's file: nothing to compare, it is kept below
        changes = config_changes(previous, cfg) if previous is not None else []
        if resuming:
            # model.init_from may change: a resumed run's weights come from its own checkpoint
            refused = [c for c in changes if c[0] != "model.init_from" and any(c[0] == k or (k.endswith(".") and c[0].startswith(k)) for k in FIXED_ON_RESUME)]
            if refused:
                listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
                raise ConfigError(
                    f"{output_dir} holds checkpoints of a run with another config ({listed}); a resumed run cannot change "
                    f"{'this key' if len(refused) == 1 else 'these keys'}. Use the previous value(s) to resume, or start a new "
                    f"output_dir (or train.restart=true to start over here)"
                )
            notes = [f"config change on resume: {k} {a!r} -> {b!r} (applies from here on)" for k, a, b in changes if k != "model.init_from"]
        if changes or previous is None:
            number = 1
            while (Path(output_dir) / f"config.{number}.yaml").exists():
                number += 1
            os.replace(path, Path(output_dir) / f"config.{number}.yaml")
            notes.append(f"the previous config is kept as {Path(output_dir) / f'config.{number}.yaml'}")
    if not path.is_file():
        tmp = path.with_suffix(".yaml.tmp")
        dump_config(cfg, tmp)
        os.replace(tmp, path)
    return notes

