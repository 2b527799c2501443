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
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_rlhf.models.builder import unwrap
from megatron_rlhf.parallel import barrier, is_rank0

LATEST = "latest"
BEST = "best"
_ITER = re.compile(r"^iter_(\d+)(\.old)?$")

# The kind of model each network of a checkpoint holds. "policy": a language model (SFT,
# PPO actor, an imported HF model); "reward": a reward model; "critic": PPO's value model.
KINDS = ("policy", "reward", "critic")
_DEFAULT_NETWORK_KINDS = {"actor": "policy", "critic": "critic"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or does not fit the model; the message says how to fix it."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


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


def _say(text: str) -> None:
    if is_rank0():
        print(f"[checkpoint] warning: {text}", file=sys.stderr, flush=True)


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


def network_kind(meta: dict, network: str) -> Optional[str]:
    """What ``network`` of a checkpoint holds: "policy", "reward" or "critic" (None: unknown,
    a checkpoint written before kinds were recorded)."""
    kinds = meta.get("network_kinds") or {}
    if network in kinds:
        return kinds[network]
    return _DEFAULT_NETWORK_KINDS.get(network, meta.get("kind"))


_KIND_WORDS = {"policy": "a policy (an SFT run, a PPO run or an imported model)", "reward": "a reward model (an RM run)", "critic": "a PPO critic"}


def check_kind(ckpt: Path, meta: dict, expected: Union[str, Sequence[str]], what: str = "model.init_from", network: Optional[str] = None) -> str:
    """Refuse a checkpoint of the wrong kind, naming the key and what to give instead.

    ``expected``: one kind or several; ``network`` defaults to the one a consumer reads
    (``model``, else ``actor``). Returns the network to load. A checkpoint that records no
    kind passes (written before kinds were recorded).
    """
    wanted = (expected,) if isinstance(expected, str) else tuple(expected)
    if not set(wanted) <= set(KINDS):
        raise ValueError(f"expected kinds {wanted}: each must be one of {KINDS}")
    networks = meta.get("networks") or ["model"]
    if network is None:
        network = next((n for n in ("model", "actor") if n in networks), networks[0])
    kind = network_kind(meta, network)
    if kind is None or kind in wanted:
        return network
    stage = meta.get("stage")
    have = _KIND_WORDS.get(kind, kind) + (f" [meta.json: stage={stage}, network {network}]" if stage else "")
    raise CheckpointError(
        f"{what}={ckpt} is {have}, not {' or '.join(_KIND_WORDS.get(k, k) for k in wanted)}; "
        f"give {what} a checkpoint of the right kind"
    )


def read_meta(ckpt: Path) -> dict:
    """``meta.json`` of a checkpoint folder (interpreted by ``checkpoint/meta.py``)."""
    path = Path(ckpt) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {ckpt} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); resume from an earlier checkpoint") from None


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
