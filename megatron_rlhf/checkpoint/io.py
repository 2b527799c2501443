"""Checkpoint files: Megatron-Core dist-checkpointing, written atomically, loadable at any layout.

Layout of a run's ``checkpoints/`` folder::

    latest                  text: the name of the newest complete checkpoint (a hint, see below)
    best                    text: the name of the checkpoint with the best validation metric
    iter_0000200/
      meta.json             kind, model config, vocab size, tokenizer fingerprint, layout, extras
      tokenizer.model       the tokenizer, so a checkpoint is self-contained
      <name>/               one dist checkpoint per network ("model"; PPO: "actor", "critic")
                            holding {"model": sharded weights, "optimizer": sharded state}
      state.pt              rank 0's Python state: LR schedule, step, data position, KL controller
      rng/rank_00000.pt     every rank's RNG states

Atomic save: everything is written to ``iter_N.tmp`` and fsynced; only when every rank is
done does rank 0 commit it. Re-saving an existing ``iter_N`` (the reward model folds its
bias into its final checkpoint) moves the old copy to ``iter_N.old`` first, renames the new
one in, and only then deletes the old: a kill at any point leaves a complete ``iter_N`` or
``iter_N.old`` (which resume uses, and the next save puts back). ``latest`` and ``best``
are replaced with ``os.replace`` and only ever name committed checkpoints.

Resume (:func:`find_resume_checkpoint`) does not trust ``latest``: it takes the newest
checkpoint that passes :func:`checkpoint_problem` (meta.json parses, every network's dist
checkpoint has its metadata and all the bytes its metadata names, state.pt loads) and says
which damaged ones it skipped.

Weights reshard on load (TP/PP layouts may differ); optimizer state is restored only at
the layout it was saved with (see :func:`load_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_rlhf.checkpoint.discovery import (  # noqa: F401 (re-exported: the folder's readers)
    checkpoint_problem, dist_checkpoint_problem, find_resume_checkpoint, latest_checkpoint, resolve_checkpoint, start_over,
)
from megatron_rlhf.checkpoint.files import _ITER, BEST, LATEST, CheckpointError, _fsync_dir, _iteration_folders, _say, iter_name, read_meta
from megatron_rlhf.checkpoint.kinds import KINDS, check_kind, network_kind  # noqa: F401 (re-exported)
from megatron_rlhf.models.builder import unwrap
from megatron_rlhf.parallel import barrier, is_rank0


def _layout() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    iteration: int,
    networks: dict,
    meta: dict,
    optimizers: Optional[dict] = None,
    state: Optional[dict] = None,
    tokenizer_bytes: Optional[bytes] = None,
    keep_last: int = 0,
) -> Path:
    """Save ``networks`` ({name: model}) and their ``optimizers`` atomically; return the folder.

    Every rank must call this. ``meta`` (JSON) and ``state`` (any picklable) are rank 0's.
    No step of it removes a complete checkpoint before its replacement is committed (see
    the module docstring); ``latest`` moves only forward.
    """
    root = Path(checkpoints_dir)
    final = root / iter_name(iteration)
    tmp = root / (iter_name(iteration) + ".tmp")
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        repair_interrupted_saves(root)
        for name in networks:
            (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
    barrier()
    unstepped = []
    with _writers_die_with_us():
        for name, network in networks.items():
            model = unwrap(network)
            sharded = {"model": model.sharded_state_dict(prefix="")}
            optimizer = (optimizers or {}).get(name)
            if optimizer is not None and not _has_stepped(optimizer):
                # No step yet (e.g. PPO's actor during critic warm-up): torch creates Adam's
                # moments at the first step, so there is nothing to save, and loading expects
                # them. Recorded in meta.json; resume keeps the optimizer fresh, as it was.
                unstepped.append(name)
            elif optimizer is not None:
                sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"])
            dist_checkpointing.save(sharded, str(tmp / name))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    barrier()
    if is_rank0():
        full_meta = dict(meta, iteration=iteration, layout=_layout(), networks=sorted(networks))
        full_meta.setdefault("network_kinds", {name: network_kind(full_meta, name) for name in sorted(networks)})
        if unstepped:
            full_meta["unstepped_optimizers"] = unstepped
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        torch.save(state or {}, tmp / "state.pt")
        if tokenizer_bytes is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer_bytes)
        _fsync_tree(tmp)
        _commit(root, tmp, final)
        if keep_last > 0:
            _prune(root, keep_last)
    barrier()
    return final


def repair_interrupted_saves(root: Path) -> None:
    """Finish what a killed save left (rank 0, before writing): ``iter_N.tmp`` never committed
    and is deleted; ``iter_N.old`` beside a committed ``iter_N`` is deleted; without one it is
    renamed back (the re-save never committed)."""
    for tmp in sorted(Path(root).glob("iter_*.tmp")):
        shutil.rmtree(tmp)
    for old in sorted(Path(root).glob("iter_*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
            _fsync_dir(root)
            _say(f"{final.name}: a re-save was interrupted; restored the previous copy")


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """``tmp`` (complete, fsynced) becomes ``final``; the old ``final`` goes only afterwards."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)  # from here until the next rename, resume and best use iter_N.old
    os.replace(tmp, final)
    _fsync_dir(root)
    hint = root / LATEST
    named = hint.read_text().strip() if hint.is_file() else ""
    m = _ITER.match(named)
    if not (m and int(m.group(1)) > int(_ITER.match(final.name).group(1)) and (root / named).is_dir()):
        _write_pointer(hint, final.name)
    if old.exists():
        shutil.rmtree(old)


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints, never the ones ``best`` or ``latest`` name."""
    folders = _iteration_folders(root)
    named = {(root / f).read_text().strip() for f in (BEST, LATEST) if (root / f).is_file()}
    for n in sorted(folders)[:-keep_last]:
        if folders[n].name not in named and not folders[n].name.endswith(".old"):
            shutil.rmtree(folders[n], ignore_errors=True)


def _write_pointer(path: Path, name: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(name + "\n")
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def mark_best(checkpoints_dir: str | os.PathLike, ckpt: Path) -> None:
    """Point ``checkpoints/best`` at ``ckpt``, a committed checkpoint (atomic replace; rank 0)."""
    if is_rank0():
        if not (Path(ckpt) / "meta.json").is_file():
            raise CheckpointError(f"best would point at {ckpt}, which is not a complete checkpoint")
        _write_pointer(Path(checkpoints_dir) / BEST, Path(ckpt).name)
    barrier()


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


# ----------------------------------------------------------------- no orphaned writers
# Megatron's torch_dist save (used synchronously here) forks one writer process per file
# and, the first time, *spawns* a multiprocessing Manager to carry the writers' results
# back -- a ~270 MB process that outlives a killed trainer. Our saves are synchronous, so
# the results never leave this process: an in-process queue stands in for the Manager's.
# The forked writers get PR_SET_PDEATHSIG, so they die with the trainer instead of writing
# into a folder a rerun is about to reuse.
_saving_pid: Optional[int] = None


def _in_child_after_fork() -> None:
    if _saving_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != _saving_pid:  # the parent died before prctl took effect
        os._exit(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child_after_fork)


@contextlib.contextmanager
def _writers_die_with_us():
    global _saving_pid
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()
    _saving_pid = os.getpid()
    try:
        yield
    finally:
        _saving_pid = None


def load_weights(network, ckpt: Path, name: str = "model", skip_output_layer: bool = False) -> None:
    """Load the weights of ``ckpt/<name>`` into ``network`` at this job's layout (any TP/PP).

    ``skip_output_layer`` leaves the output layer as built: a reward model initialised from
    an SFT policy keeps its fresh scalar head in place of the unembedding.
    """
    ckpt = Path(ckpt)
    if not (ckpt / name).is_dir():
        have = read_meta(ckpt).get("networks", []) if (ckpt / "meta.json").is_file() else []
        raise CheckpointError(f"{ckpt} has no network '{name}' (it has: {', '.join(have) or 'nothing'})")
    model = unwrap(network)
    sharded = model.sharded_state_dict(prefix="")
    if skip_output_layer:
        sharded = {k: v for k, v in sharded.items() if not k.startswith("output_layer.")}
    loaded = dist_checkpointing.load({"model": sharded}, str(ckpt / name))["model"]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and not (skip_output_layer and k.startswith("output_layer."))]
    if missing:
        raise CheckpointError(f"{ckpt / name} lacks weights {missing[:5]}{'...' if len(missing) > 5 else ''}; was it saved from another architecture?")


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """A fresh DistributedOptimizer over torch's Adam (no TE/Apex) has no state to describe
    yet, and its sharded_state_dict asserts on that; Megatron's own helper creates it."""
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if hasattr(part, "_init_optimizer_states_with_dummy_values") and not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()


def _has_stepped(optimizer) -> bool:
    """Whether a Megatron optimizer (chained or not) holds any per-parameter state yet."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(len(state) > 0 for part in parts for state in part.optimizer.state.values())


def load_checkpoint(ckpt: Path, networks: dict, optimizers: Optional[dict] = None) -> dict:
    """Resume: weights, optimizer state, RNG and rank 0's Python state (returned)."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if optimizers and meta.get("layout") != _layout():
        raise CheckpointError(
            f"{ckpt} was saved at layout {meta.get('layout')} but this job runs {_layout()}; optimizer "
            f"state resumes only at the same layout. To continue from its weights at a new layout, "
            f"start a fresh run with model.init_from={ckpt}"
        )
    for name, network in networks.items():
        model = unwrap(network)
        sharded = {"model": model.sharded_state_dict(prefix="")}
        optimizer = (optimizers or {}).get(name)
        if name in meta.get("unstepped_optimizers", []):
            optimizer = None  # saved before its first step: nothing to restore
        if optimizer is not None:
            _materialize_distributed_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True)
        loaded = dist_checkpointing.load(sharded, str(ckpt / name))
        model.load_state_dict(loaded["model"])
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(ckpt / "state.pt", weights_only=False)
