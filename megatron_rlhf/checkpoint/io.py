"""Checkpoint files: Megatron-Core dist-checkpointing, written atomically, loadable at any layout.

Layout of a run's ``checkpoints/`` folder::

    latest                  text: the name of the newest complete checkpoint
    iter_0000200/
      meta.json             kind, model config, vocab size, tokenizer fingerprint, layout, extras
      tokenizer.model       the tokenizer, so a checkpoint is self-contained
      <name>/               one dist checkpoint per network ("model"; PPO: "actor", "critic")
                            holding {"model": sharded weights, "optimizer": sharded state}
      state.pt              rank 0's Python state: LR schedule, step, data position, KL controller
      rng/rank_00000.pt     every rank's RNG states

Atomic save: everything is written to ``iter_N.tmp``; only when every rank is done does
rank 0 rename it to ``iter_N`` and then replace ``latest`` (write + ``os.replace``). A job
killed mid-save leaves ``latest`` pointing at the previous, complete checkpoint.

Weights reshard on load (TP/PP layouts may differ); optimizer state is restored only at
the layout it was saved with (see :func:`load_checkpoint`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_rlhf.models.builder import unwrap
from megatron_rlhf.parallel import barrier, is_rank0

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or does not fit the model; the message says how to fix it."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a run's output_dir, its ``checkpoints/`` folder or one ``iter_N`` folder."""
    p = Path(path)
    if p.is_file() and p.name in (LATEST, "best"):
        target = p.parent / p.read_text().strip()
        if not (target / "meta.json").is_file():
            raise CheckpointError(f"{p} points to {target}, which is not a complete checkpoint")
        return target
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} (give a run's output_dir, its checkpoints/ folder or an iter_N folder)")
    if (p / "meta.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        latest = root / LATEST
        if latest.is_file():
            target = root / latest.read_text().strip()
            if not (target / "meta.json").is_file():
                raise CheckpointError(f"{latest} points to {target}, which is not a complete checkpoint")
            return target
    if p.name.endswith(".tmp") or any(c.name.endswith(".tmp") for c in p.glob("*")):
        raise CheckpointError(f"{p} holds only a partial checkpoint (a save was interrupted); resume from an earlier one")
    raise CheckpointError(f"no checkpoint in {p}: expected meta.json or a '{LATEST}' file (is this a run's output_dir?)")


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    latest = Path(checkpoints_dir) / LATEST
    if not latest.is_file():
        return None
    target = Path(checkpoints_dir) / latest.read_text().strip()
    return target if (target / "meta.json").is_file() else None


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
    """
    root = Path(checkpoints_dir)
    final = root / iter_name(iteration)
    tmp = root / (iter_name(iteration) + ".tmp")
    if is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous save of this step that was interrupted
        for name in networks:
            (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
    barrier()
    unstepped = []
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
        if unstepped:
            full_meta["unstepped_optimizers"] = unstepped
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        torch.save(state or {}, tmp / "state.pt")
        if tokenizer_bytes is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer_bytes)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / (LATEST + ".tmp")
        latest_tmp.write_text(final.name + "\n")
        with open(latest_tmp) as fh:
            os.fsync(fh.fileno())
        os.replace(latest_tmp, root / LATEST)
        if keep_last > 0:
            done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
            best = (root / "best").read_text().strip() if (root / "best").is_file() else None
            for old in [p for p in done[:-keep_last] if p.name != best]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def mark_best(checkpoints_dir: str | os.PathLike, ckpt: Path) -> None:
    """Point ``checkpoints/best`` at ``ckpt`` (atomic replace; rank 0)."""
    if is_rank0():
        root = Path(checkpoints_dir)
        tmp = root / "best.tmp"
        tmp.write_text(Path(ckpt).name + "\n")
        os.replace(tmp, root / "best")
    barrier()


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


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
